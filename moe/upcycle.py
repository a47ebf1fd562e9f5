"""Sparse upcycling (Komatsuzaki et al. 2022, arXiv 2212.05055): start an MoE
from a trained dense checkpoint.

  python train.py --config configs/switch.py:cpu --workdir runs/upcycled \\
      --config.init_from=runs/dense

On a fresh run (no checkpoint in --workdir yet) whose config sets `init_from`
to a dense run's workdir, the newest checkpoint of that run is restored under
the MoE's mesh (moe.steps.fresh_state) and mapped onto the MoE model by this
module's pure mapping, `upcycle_params`:

  * every expert of an MoE layer is a copy of that layer's dense SwiGLU
    (w_gate/w_up [D, F] -> [E, D, F], w_down [F, D] -> [E, F, D]);
  * the router (w_router [D, E], or [D, N] with cheap experts) starts at
    zero, the balance bias and any constant experts' vectors at zero;
  * every other parameter (embeddings, attention, norms, the MLPs of the
    layers that stay dense) is carried over as it is;
  * step, optimizer state and data iterator start fresh (the optimizer
    moments are zeros whatever the parameters are).

When the step-0 loss equals the dense model's: with a zero router every
expert has probability 1/E and top-k picks the same k experts for every token
(ties go to the lower index), so a token's MoE output is (sum of its k gates)
x the dense MLP's output:
  * `moe.renormalize_gates=True`: the gates are 1/k each and sum to 1 -> the
    dense MLP exactly;
  * `moe.top_k == moe.num_experts`: k gates of 1/E sum to 1 -> exactly;
  * otherwise the FFN output starts scaled by k/E (a fine start, not equal).
Since every token goes to the same k experts, nothing is dropped only when an
expert's capacity holds the whole group: capacity factor >= E/k (or eval's
'dropless'). Experts-choose routing is allowed but never exact (with a zero
router, each expert picks the same C tokens). The router's gradient (aux loss)
and the tokens each expert then receives break the symmetry between the
copies.

Requirements (checked before anything runs, `check_init_from`, by moe.preflight): `init_from` is
a directory holding a dense run's checkpoints and its config.json; the MoE's
trunk equals the dense one (vocab_size, d_model, num_layers, num_heads,
head_dim, rope_theta, and mlp_dim for the layers that stay dense);
`moe.expert_dim` == the dense `mlp_dim`; no shared experts.
"""

from __future__ import annotations

import jax.numpy as jnp
from etils import epath

from moe import run_config
from moe.checkpoint import checkpoint_steps
from moe.config import ConfigError, ModelConfig

TRUNK_FIELDS = ('vocab_size', 'd_model', 'num_layers', 'num_heads', 'head_dim',
                'mlp_dim', 'rope_theta')


def check_compatible(dense: ModelConfig, moe: ModelConfig, source: str = '') -> None:
  """Refuses an MoE that cannot be upcycled from `dense`; names every field."""
  where = f'init_from={source!r}: ' if source else ''
  if moe.moe is None:
    raise ConfigError(f'{where}upcycling starts an MoE, but this config is '
                      'dense (config.moe is None).')
  if dense.moe is not None:
    raise ConfigError(f'{where}the source run is an MoE; init_from needs a '
                      'dense run (config.moe None).')
  bad = [f'model.{name}: dense {getattr(dense, name)} vs MoE {getattr(moe, name)}'
         for name in TRUNK_FIELDS if getattr(dense, name) != getattr(moe, name)]
  if moe.moe.expert_dim != dense.mlp_dim:
    bad.append(f'moe.expert_dim={moe.moe.expert_dim} must equal the dense '
               f'model.mlp_dim={dense.mlp_dim} (every expert copies the dense MLP)')
  if moe.moe.num_shared_experts:
    bad.append(f'moe.num_shared_experts={moe.moe.num_shared_experts}: '
               'upcycling supports routed experts only (use 0)')
  if bad:
    raise ConfigError(f'{where}cannot upcycle: ' + '; '.join(bad) + '.')


def check_init_from(init_from: str, moe: ModelConfig) -> ModelConfig:
  """Validation of `config.init_from`: a dense run's workdir with at least
  one checkpoint, compatible with `moe`. Returns the dense ModelConfig."""
  if not epath.Path(init_from).is_dir():
    raise ConfigError(f'init_from={init_from!r} is not a directory; give the '
                      'workdir of a trained dense run.')
  if not checkpoint_steps(init_from):
    raise ConfigError(f'init_from={init_from!r} has no checkpoints (no '
                      f'{init_from}/checkpoints/STEP); train the dense model first.')
  dense = run_config.saved(init_from, 'init_from').model
  check_compatible(dense, moe, init_from)
  return dense


def upcycle_params(dense: dict, moe: dict, cfg: ModelConfig) -> dict:
  """Pure-dict parameters of the MoE `cfg` built from the dense ones.

  `dense`, `moe`: nnx.to_pure_dict of the two models' parameters (arrays or
  tracers). Returns a dict shaped like `moe`."""
  def copy(src, like, path):
    if isinstance(like, dict):
      return {k: copy(src[k], v, f'{path}/{k}') for k, v in like.items()}
    if tuple(src.shape) != tuple(like.shape):
      raise ConfigError(f'cannot upcycle {path}: dense shape {src.shape} vs '
                        f'MoE shape {like.shape}.')
    return jnp.asarray(src, like.dtype)

  out = {k: copy(dense[k], v, k) for k, v in moe.items() if k != 'blocks'}
  out['blocks'] = {}
  for i, block in moe['blocks'].items():
    d_block = dense['blocks'][i]
    new = {k: copy(d_block[k], v, f'blocks/{i}/{k}') for k, v in block.items() if k != 'ffn'}
    if cfg.is_moe_layer(int(i)):
      e = cfg.moe.num_experts
      mlp, ffn = d_block['ffn'], block['ffn']
      new['ffn'] = {
          name: copy(jnp.broadcast_to(mlp[name], (e,) + tuple(mlp[name].shape)),
                     ffn[name], f'blocks/{i}/ffn/{name}')
          for name in ('w_gate', 'w_up', 'w_down')}
      new['ffn']['w_router'] = jnp.zeros_like(ffn['w_router'])
      if 'const_vectors' in ffn:   # constant experts start at zero, as fresh
        new['ffn']['const_vectors'] = jnp.zeros_like(ffn['const_vectors'])
      extra = set(ffn) - set(new['ffn'])
      if extra:
        raise ConfigError(f'cannot upcycle blocks/{i}/ffn: no dense source for '
                          f'{sorted(extra)}.')
    else:
      new['ffn'] = copy(d_block['ffn'], block['ffn'], f'blocks/{i}/ffn')
    out['blocks'][i] = new
  return out
