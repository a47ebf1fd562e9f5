"""Benchmarks: MoE overhead, throughput against the dense twin, expert-count
scaling, MFU, compile time and memory, and whether the input pipeline keeps
up (rows per second of the config's training iterator against what the MoE's
step consumes). One process, variants interleaved,
compile time excluded from step times, medians over at least --steps timed
steps per model variant and --layer_calls calls per layer variant.

  python scripts/bench.py --out bench.json            # default CPU Switch config
  python scripts/bench.py --config configs/switch.py:cpu --steps 20 --out b.json

Every timed function is the library's own (the MoE layer, the jitted train
step of moe.steps.build, and `moe.dispatch.expert_ffn` alone on random
cf-1.25 buffers as the floor of the capacity paths, at the config's expert
count and at 8 and 64 experts, the counts of the 64/8 figure): no
benchmark-only code path. Adaptive compute: the train step with the
config's FFN experts under fixed top-1, fixed top-2, cheap experts and
threshold routing (the last two sized for a mean of 1.0 FFN expert per
token), side by side.
"""

import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # configs/

from moe import config_flag, data, dispatch, metrics, run_config, sharding, steps  # noqa: E402
from moe.layers import Mlp  # noqa: E402
from moe.moe_layer import MoeFeedForward  # noqa: E402

_CONFIG = config_flag.define(
    os.path.join(ROOT, 'configs', 'switch.py:cpu'),
    'The MoE config to measure.')
_OUT = flags.DEFINE_string('out', None, 'Write the figures here as JSON.')
_STEPS = flags.DEFINE_integer('steps', 10, 'At least this many timed steps per variant (median).',
                              lower_bound=1)
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Interleaved rounds per variant.', lower_bound=1)
_LAYER_CALLS = flags.DEFINE_integer(
    'layer_calls', 60, 'At least this many timed calls per layer variant, in '
    'interleaved rounds of up to 5. '
    'A layer call takes milliseconds: fewer calls let one burst of load on a '
    'shared machine swing a ratio by a third.', lower_bound=1)
_LOADER_BATCHES = flags.DEFINE_integer(
    'loader_batches', 200, 'Batches drawn from the training iterator to time it.',
    lower_bound=1)


def _median_times(fns: dict, steps: int, rounds: int) -> dict:
  """Median seconds per call of each fn over at least `steps` timed calls,
  variants interleaved round-robin."""
  times = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      for _ in range(-(-steps // rounds)):
        t = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - t)
  return {name: float(np.median(ts)) for name, ts in times.items()}


def _layer_fns(model_cfg, batch: int, seq_len: int):
  """fwd+bwd of the MoE FFN per dispatch path (capacity paths at cf 1.25)
  and of the dense-active SwiGLU."""

  m = model_cfg.moe
  x = jax.random.normal(jax.random.key(1), (batch, seq_len, model_cfg.d_model))

  def timed(module, call, inputs):
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def loss(params, inputs):
      return jnp.sum(call(nnx.merge(graphdef, params, rest), inputs) ** 2)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    jax.block_until_ready(step(params, inputs))      # compile, not timed
    return lambda: jax.block_until_ready(step(params, inputs))

  fns = {}
  for path in dispatch.DISPATCHES:
    cfg = dataclasses.replace(model_cfg, moe=dataclasses.replace(
        m, dispatch=path, train_capacity_factor=1.25))
    fns[path] = timed(MoeFeedForward(cfg, jax.random.key(0)),
                      lambda mod, x: mod(x, train=True)[0], x)

  # The expert FFN alone on full cf-1.25 buffers: what the capacity paths
  # cost before any routing or dispatch. Stored expert-major, [E, G, C, D],
  # as the `gather` path's gathers write them (XLA folds its [G, E, C, D]
  # view into the gather), so this floor pays no transposes the layer skips.
  # Also at whichever of 8 and 64 experts the config does not have, the two
  # counts of the 64/8 scaling figure (same k, F, cf: about the same FLOPs
  # in E x C rows, C rounded up), to see what the FFN adds to it.
  spg = m.seqs_per_group(batch, seq_len)
  for e in (m.num_experts, *(e for e in (8, 64) if e != m.num_experts)):
    cfg = dataclasses.replace(model_cfg, moe=dataclasses.replace(
        m, num_experts=e, dispatch='gather', train_capacity_factor=1.25))
    buffers = jax.random.normal(jax.random.key(2), (
        e, batch // spg, cfg.moe.capacity(spg * seq_len, True, 1.25), model_cfg.d_model))
    name = 'experts_only' if e == m.num_experts else f'experts_only_e{e}'
    fns[name] = timed(MoeFeedForward(cfg, jax.random.key(0)),
                      lambda mod, xe: dispatch.expert_ffn(
                          jnp.swapaxes(xe, 0, 1), mod.expert_weights(), mod.dtype),
                      buffers)
  dense = Mlp(model_cfg.d_model, m.top_k * m.expert_dim, model_cfg.dtype, jax.random.key(0))
  fns['dense_active'] = timed(dense, lambda mod, x: mod(x), x)
  return fns


def _step_fn(run, model_cfg):
  """(call, compile+first-step seconds, compiled, eval call) of the real
  train step, and of its eval step on the same batch."""
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  s = steps.build(dataclasses.replace(run, model=model_cfg, seed=0, eval=run_config.EvalConfig(),
                                      layout=run_config.LayoutConfig()), mesh)
  tokens = np.random.default_rng(0).integers(
      0, model_cfg.vocab_size, (run.loop.batch_size, run.loop.seq_len + 1), dtype=np.int32)
  t = time.perf_counter()
  state = s.init(jax.random.key(0))
  tokens = jax.device_put(tokens, s.batch_sharding)
  compiled = s.train_step.lower(state, tokens).compile()
  box = {'state': compiled(state, tokens)[0]}
  jax.block_until_ready(box['state'])
  first = time.perf_counter() - t

  def call():
    box['state'], metrics = compiled(box['state'], tokens)
    jax.block_until_ready(metrics['loss'])

  def eval_call():
    jax.block_until_ready(s.eval_step(box['state'], tokens)['loss'])

  def ffn_per_token():   # FFN experts per token of one step, mean over layers
    return float(np.mean(compiled(box['state'], tokens)[1]['router'].ffn_per_token))

  eval_call()   # compile, not timed
  return call, first, compiled, eval_call, ffn_per_token


def _eval_share(run, eval_batch_s: float, step_s: float) -> dict:
  """The config's evaluations (every eval_every steps on eval_batches, the
  last step's on final_eval_batches) against its num_steps train steps,
  from one eval batch's and one train step's seconds."""
  cfg = run.data

  def batches(n):
    return len(data.eval_set(cfg, seq_len=run.loop.seq_len, batch_size=run.loop.batch_size,
                             max_batches=n or None, shard_index=0, shard_count=1))
  periodic = -(-run.loop.num_steps // run.loop.eval_every) * batches(run.loop.eval_batches)
  final = (0 if run.loop.final_eval_batches == run.loop.eval_batches
           else batches(run.loop.final_eval_batches))
  return {'eval_batch_s': eval_batch_s, 'eval_batches_per_run': periodic + final,
          'share_of_training': (periodic + final) * eval_batch_s
                               / (run.loop.num_steps * step_s)}


def _loader(run) -> dict:
  """The config's training iterator (one process): start-up seconds (the
  split tokenized and permuted, the first batch) and rows per second after."""
  cfg = run.data
  data.prepare(cfg)
  t = time.perf_counter()
  it = data.train_iterator(cfg, seq_len=run.loop.seq_len, batch_size=run.loop.batch_size,
                           seed=0, shard_index=0, shard_count=1)
  next(it)
  startup = time.perf_counter() - t
  n = _LOADER_BATCHES.value
  t = time.perf_counter()
  for _ in range(n):
    next(it)
  return {'row_shuffle': data.row_shuffle(cfg, cfg.train_split),
          'startup_s': startup,
          'rows_per_sec': n * run.loop.batch_size / (time.perf_counter() - t)}


def _layer_overhead(run, moe_cfg) -> dict:
  """Layer overhead: MoE FFN / dense SwiGLU of hidden k*F, fwd+bwd, cf 1.25."""
  layer = _median_times(_layer_fns(moe_cfg, run.loop.batch_size, run.loop.seq_len),
                        _LAYER_CALLS.value, -(-_LAYER_CALLS.value // 5))
  return {'layer_overhead': {d: layer[d] / layer['dense_active'] for d in dispatch.DISPATCHES},
          'expert_ffn_floor': layer['experts_only'] / layer['dense_active'],
          'layer_seconds': layer}


def _model_throughput(run, moe_cfg, layer_seconds: dict, peak: float) -> tuple[dict, tuple]:
  """Model throughput, expert scaling and MFU on the real train step, and the MoE's
  _step_fn tuple. The dense twin with the MoE's active FLOPs bounds what the MoE's
  MFU can be at this model size (the same attention, norms and small matmuls)."""
  dense_cfg = moe_cfg.dense_twin_total()
  variants = {'moe': moe_cfg, 'dense_total': dense_cfg, 'dense_active': moe_cfg.dense_twin_active()}
  num_experts = moe_cfg.moe.num_experts
  variants.update({f'e{e}': dataclasses.replace(moe_cfg, moe=dataclasses.replace(
      moe_cfg.moe, num_experts=e)) for e in (8, 64) if e != num_experts})
  built = {name: _step_fn(run, cfg) for name, cfg in variants.items()}
  step = _median_times({n: b[0] for n, b in built.items()}, _STEPS.value, _ROUNDS.value)
  tokens = run.loop.batch_size * run.loop.seq_len
  flops = {n: c.flops_per_token(run.loop.seq_len) * tokens / step[n] for n, c in variants.items()}
  # Step seconds, and expert-FFN-alone seconds, with e experts ('moe' when it has e).
  at_experts = {e: step['moe' if e == num_experts else f'e{e}'] for e in (8, 64)}
  at_floor = {e: layer_seconds['experts_only' if e == num_experts else f'experts_only_e{e}']
              for e in (8, 64)}
  figures = {'throughput_ratio_vs_dense_total': step['dense_total'] / step['moe'],
             'analytic_flop_ratio': (dense_cfg.flops_per_token(run.loop.seq_len)
                                     / moe_cfg.flops_per_token(run.loop.seq_len)),
             'expert_scaling_64_over_8': at_experts[64] / at_experts[8],
             # The expert FFN's share of that: its fwd+bwd time at 64 experts minus
             # at 8, in every MoE layer, over the step-time difference (None when
             # the 64-expert step is not the slower one). An estimate: the floor
             # is the gather path's FFN at cf 1.25, the steps use the config's.
             'expert_ffn_share_of_64_over_8': (
                 moe_cfg.num_moe_layers * (at_floor[64] - at_floor[8])
                 / (at_experts[64] - at_experts[8]) if at_experts[64] > at_experts[8] else None),
             'matmul_peak_gflops': peak / 1e9,
             'mfu_dense': flops['dense_total'] / peak,
             'mfu_moe': flops['moe'] / peak,
             'mfu_dense_active': flops['dense_active'] / peak,
             'step_seconds': step,
             'time_to_first_step_s': built['moe'][1],
             'peak_memory_mb': metrics.peak_memory_mb(built['moe'][2])}
  if declared := run.loop.peak_flops_per_device:   # the datasheet peak, beside the measured one
    figures.update(declared_peak_gflops=declared / 1e9,
                   mfu_dense_vs_declared=flops['dense_total'] / declared,
                   mfu_moe_vs_declared=flops['moe'] / declared)
  return figures, built['moe']


def _loader_and_evaluation(run, moe_built: tuple, moe_step_s: float) -> dict:
  """The input pipeline: its rows/s against the MoE step's consumption, and the
  share of a step that fetching its batch would take if nothing overlapped it (the
  loop fetches while the device runs the step); the evaluations' share of training."""
  loader = _loader(run)
  eval_s = _median_times({'eval': moe_built[3]}, _STEPS.value, _ROUNDS.value)['eval']
  consumed = run.loop.batch_size / moe_step_s
  return {'evaluation': _eval_share(run, eval_s, moe_step_s),
          'loader': {**loader, 'consumed_rows_per_sec': consumed,
                     'over_consumption': loader['rows_per_sec'] / consumed,
                     'fetch_share_of_step': consumed / loader['rows_per_sec']}}


def _adaptive_compute(run, moe_cfg) -> dict:
  """Adaptive compute: is the FLOP saving real in step time? The train step with
  the config's FFN experts under fixed top-1, fixed top-2, top-2 over them plus
  as many cheap experts (half zero, a quarter copy, a quarter constant) and
  threshold routing (p = 0.5, at most 2): the last two with capacity sized for
  a mean of 1.0 FFN expert per token (compute_target), the buffers of top-1."""
  m = moe_cfg.moe
  e = m.num_experts
  base = dataclasses.replace(m, top_k=2, num_zero_experts=0, num_copy_experts=0,
                             num_const_experts=0, top_p=0.0, compute_target=0.0,
                             compute_loss_coef=0.0)
  moes = {
      'top1': dataclasses.replace(base, top_k=1),
      'top2': base,
      'cheap': dataclasses.replace(base, num_zero_experts=e - e // 2 - e // 4,
                                   num_copy_experts=e // 4, num_const_experts=e // 4,
                                   compute_target=1.0, compute_loss_coef=1.0),
      'top_p': dataclasses.replace(base, top_p=0.5, compute_target=1.0,
                                   compute_loss_coef=1.0),
  }
  adaptive = {n: dataclasses.replace(moe_cfg, moe=c) for n, c in moes.items()}
  built = {n: _step_fn(run, c) for n, c in adaptive.items()}
  step = _median_times({n: b[0] for n, b in built.items()}, _STEPS.value, _ROUNDS.value)
  return {'step_seconds': step,
          'capacity': {n: c.moe.capacity(c.moe.seqs_per_group(run.loop.batch_size, run.loop.seq_len)
                                         * run.loop.seq_len, True) for n, c in adaptive.items()},
          'ffn_experts_per_token_at_init': {n: b[4]() for n, b in built.items()},
          'over_top2': {n: step[n] / step['top2'] for n in adaptive},
          'over_top1': {n: step[n] / step['top1'] for n in adaptive}}


def _print_table(result: dict) -> None:
  """The figures against their targets, as a markdown table."""
  overhead, loader = result['layer_overhead'], result['loader']
  rows = [
      ('MoE layer / dense-active layer, gather (cf 1.25)', overhead['gather'], '<= 1.25'),
      ('MoE layer / dense-active layer, einsum (cf 1.25)', overhead['einsum'], '(reference)'),
      ('MoE layer / dense-active layer, dropless', overhead['dropless'], '(no drops)'),
      ('expert FFN alone on cf-1.25 buffers / dense-active layer',
       result['expert_ffn_floor'], '(floor of the capacity paths)'),
      ('MoE tokens/s / matched-total dense tokens/s', result['throughput_ratio_vs_dense_total'],
       f">= {0.8 * result['analytic_flop_ratio']:.2f} (0.8 x analytic {result['analytic_flop_ratio']:.2f})"),
      ('step time 64 experts / 8 experts', result['expert_scaling_64_over_8'], '<= 1.15'),
      ('share of that step-time difference in the expert FFN (64 vs 8 experts)',
       result['expert_ffn_share_of_64_over_8'], ''),
      ('dense MFU vs measured matmul peak', result['mfu_dense'], '>= 0.50'),
      ('MoE MFU / dense MFU', result['mfu_moe_over_dense'], '>= 0.85'),
      ('dense-active MFU / dense MFU (bound for the line above)',
       result['mfu_dense_active'] / result['mfu_dense'], ''),
      ('time to first step (s)', result['time_to_first_step_s'], '<= 30'),
      (f"loader rows/s / rows/s the MoE step consumes ({loader['row_shuffle']} order)",
       loader['over_consumption'], '>= 10'),
      ('batch fetch time / MoE step time (no overlap counted)',
       loader['fetch_share_of_step'], '< 0.02'),
      ('loader start-up (s): split tokenized, first batch', loader['startup_s'], ''),
      ('step time, cheap experts (capacity for 1.0 FFN expert) / fixed top-2',
       result['adaptive']['over_top2']['cheap'], '< 1 (fewer FFN FLOPs)'),
      ('step time, cheap experts / fixed top-1', result['adaptive']['over_top1']['cheap'], ''),
      ('step time, threshold p=0.5 (capacity for 1.0) / fixed top-2',
       result['adaptive']['over_top2']['top_p'], '< 1 (fewer FFN FLOPs)'),
      ('step time, threshold p=0.5 / fixed top-1', result['adaptive']['over_top1']['top_p'], ''),
      ("the config's evaluations / its training time (eval batch over train step)",
       result['evaluation']['share_of_training'], '<= 0.20'),
      ('peak memory (MiB)', result['peak_memory_mb'], ''),
      ('matmul peak (GFLOP/s)', result['matmul_peak_gflops'], ''),
  ]
  if 'declared_peak_gflops' in result:
    rows += [('dense MFU vs declared peak', result['mfu_dense_vs_declared'], ''),
             ('MoE MFU vs declared peak', result['mfu_moe_vs_declared'], '')]
  print(f"\n{result['device']}: {result['config']}\n")
  print('| figure | measured | target |\n|---|---|---|')
  for name, value, target in rows:
    print(f'| {name} | {"n/a" if value is None else f"{value:.3f}"} | {target} |')


def main(argv):
  del argv

  run = run_config.build(_CONFIG.value)
  moe_cfg = run.model
  peak = metrics.measure_matmul_peak(jnp.dtype(moe_cfg.dtype))
  layer = _layer_overhead(run, moe_cfg)
  model, moe_built = _model_throughput(run, moe_cfg, layer['layer_seconds'], peak)
  result = {'device': jax.devices()[0].device_kind,
            'config': f'{moe_cfg.num_params:,} params, E={moe_cfg.moe.num_experts}, '
                      f'k={moe_cfg.moe.top_k}, d={moe_cfg.d_model}, F={moe_cfg.moe.expert_dim}',
            **layer, **model,
            **_loader_and_evaluation(run, moe_built, model['step_seconds']['moe']),
            'adaptive': _adaptive_compute(run, moe_cfg)}
  result['mfu_moe_over_dense'] = result['mfu_moe'] / result['mfu_dense']
  result['throughput_over_analytic'] = (result['throughput_ratio_vs_dense_total']
                                        / result['analytic_flop_ratio'])
  _print_table(result)
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      json.dump(result, f, indent=2)


if __name__ == '__main__':
  config_flag.run(main)
