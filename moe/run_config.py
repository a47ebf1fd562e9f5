"""The run config: one frozen `RunConfig`, built once (`build`) from the
ConfigDict of `configs/*.py` and its --config overrides, at the command line.

Its sections are frozen dataclasses that check their own values (a
ConfigError names the bad value and what is valid): `model` (ModelConfig and
its MoeConfig), `data`, `optimizer`, `eval`, and the top-level keys in `loop`,
`resume` and `layout`. A key no field has is refused with the closest name.
The fields' defaults are the only defaults (`default_config()`: configs/base.py).
Nothing here starts a backend (`saved` reads a run's config.json), so a sweep
launcher builds runs for another target (`mesh_shapes(n)`); moe.preflight
checks the machine for train and eval.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import warnings

import ml_collections
from etils import epath

from moe import data, routing, sharding
from moe.config import ConfigError, ModelConfig, MoeConfig

OPTIMIZERS = ('adamw', 'adafactor')
DECAYS = ('cosine', 'linear', 'constant')
NONFINITE = ('skip', 'stop')


def _choice(name, value, choices):
  if value not in choices:
    raise ConfigError(f'{name}={value!r} is not valid; choose one of {choices}.')


def _positive(section, prefix: str, *names: str, allow_zero: bool = False) -> None:
  for name in names:
    value = getattr(section, name)
    ok = isinstance(value, (int, float)) and (value >= 0 if allow_zero else value > 0)
    if not ok:
      raise ConfigError(f'{prefix}{name}={value!r} must be {">= 0" if allow_zero else "> 0"}.')


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """`config.optimizer` (moe.optimizer)."""
  name: str = 'adamw'             # or 'adafactor' (large runs)
  learning_rate: float = 3e-3
  warmup_steps: int = 100
  decay: str = 'cosine'           # 'cosine', 'linear' or 'constant'
  min_lr_ratio: float = 0.1       # final lr / peak lr
  weight_decay: float = 0.1       # lr * 0.1 * p a step (AdamW and Adafactor);
                                  # not on norms, biases or the router bias
  b1: float = 0.9
  b2: float = 0.95
  grad_clip: float = 1.0          # global-norm clipping (0: off)

  def __post_init__(self):
    _positive(self, 'optimizer.', 'learning_rate')
    _positive(self, 'optimizer.', 'warmup_steps', 'weight_decay', 'grad_clip',
              'min_lr_ratio', allow_zero=True)
    _choice('optimizer.name', self.name, OPTIMIZERS)
    _choice('optimizer.decay', self.decay, DECAYS)


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """Top-level keys: batches, steps, logging, evaluation and saving."""
  batch_size: int = 16            # global sequences per step
  seq_len: int = 128
  num_steps: int = 1000
  log_every: int = 50
  eval_every: int = 250
  eval_batches: int = 8           # periodic evals: batches spread over the
                                  # validation split (0: the whole split)
  final_eval_batches: int = 0     # the last step's eval and eval.py (0: whole split)
  checkpoint_every: int = 500
  max_to_keep: int = 3
  nonfinite: str = 'skip'         # non-finite loss/grads: 'skip' the update or 'stop'
  peak_flops_per_device: float = 0.0   # MFU peak; 0: measured by a matmul probe
  progress_bar: bool = True       # tqdm on process 0

  def __post_init__(self):
    _positive(self, '', 'batch_size', 'seq_len', 'num_steps', 'log_every',
              'eval_every', 'checkpoint_every', 'max_to_keep')
    _positive(self, '', 'eval_batches', 'final_eval_batches',
              'peak_flops_per_device', allow_zero=True)
    _choice('nonfinite', self.nonfinite, NONFINITE)


@dataclasses.dataclass(frozen=True)
class ResumeConfig:
  """Top-level keys: where a (re)start begins."""
  restore_step: int = -1          # -1: resume from the newest checkpoint; N: from step <= N
  skip_batches: int = 0           # on (re)start, skip this many batches (loss spikes)
  init_from: str = ''             # dense run's workdir: upcycle a fresh MoE (moe/upcycle.py)
  restore_fallback: bool = False  # damaged latest checkpoint: use the previous one
  accept_config_change: bool = False  # resume under a changed model/data/optimizer/
                                  # seed config (recorded in starts.jsonl); else refused

  def __post_init__(self):
    if not isinstance(self.restore_step, int) or self.restore_step < -1:
      raise ConfigError(f'restore_step={self.restore_step!r} must be -1 (newest) '
                        'or a step >= 0.')
    _positive(self, '', 'skip_batches', allow_zero=True)
    if self.skip_batches and self.restore_step < 0:
      raise ConfigError(
          f'skip_batches={self.skip_batches} needs restore_step=N, the step to '
          'restart from (e.g. the newest checkpoint\'s): the skip is applied '
          'once, on the restart from N; with restore_step=-1 every later resume '
          'would skip again.')


@dataclasses.dataclass(frozen=True)
class LayoutConfig:
  """Top-level keys: the device mesh. `mesh` (data, expert, model) is the
  shape inside one domain (a GPU node, a TPU slice), -1 the rest of the
  domain's devices; `dcn_mesh` the domains per axis across the slow network
  (the whole mesh is mesh x dcn_mesh); data goes across."""
  mesh: tuple = (1, -1, 1)
  dcn_mesh: tuple = (1, 1, 1)
  fsdp: bool = False              # shard weights' d_model over `data`


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """`config.eval`: eval.py's what-ifs and checkpoint."""
  capacity_factors: tuple = (1.0, 1.25, 2.0, 'dropless')   # 'dropless': no drops
  checkpoint_step: int = -1       # -1: latest
  # Compute what-if, each row without capacity drops: 'as_trained',
  # thresholds p in (0, 1] (threshold routing, at most moe.top_k choices),
  # 'no_cheap' (cheap experts off); ('auto',): for adaptive compute (cheap
  # experts or moe.top_p) as trained, p = 0.5 ... 1.0 and no_cheap; else none.
  compute_what_if: tuple = ('auto',)

  def __post_init__(self):
    for cf in self.capacity_factors:
      if cf != 'dropless' and not (isinstance(cf, (int, float)) and cf > 0):
        raise ConfigError(f'eval.capacity_factors has {cf!r}; each must be a '
                          "number > 0 or 'dropless'.")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """A whole run: what `build` makes of a ConfigDict."""
  model: ModelConfig
  data: data.DataConfig
  seed: int = 0                   # init, data order and router noise
  optimizer: OptimizerConfig = OptimizerConfig()
  loop: LoopConfig = LoopConfig()
  resume: ResumeConfig = ResumeConfig()
  layout: LayoutConfig = LayoutConfig()
  eval: EvalConfig = EvalConfig()
  # The ConfigDict as given, as JSON: workdir/config.json, the checkpoints'
  # config item and the drift check on resume (moe.config_drift) keep it.
  # dataclasses.replace keeps it too: train only what `build` made.
  config_json: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

  def __post_init__(self):
    _positive(self, '', 'seed', allow_zero=True)
    if self.model.is_moe:
      routing.compute_what_if(self.model.moe, self.eval.compute_what_if)
    sharding.resolve_dcn_shape(self.layout.dcn_mesh)

  def mesh_shapes(self, num_devices: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(the whole mesh, domains per axis) on `num_devices` devices; refuses
    (ConfigError) a layout the devices, model or batch do not fit."""
    dcn = sharding.resolve_dcn_shape(self.layout.dcn_mesh)
    shape = sharding.resolve_layout(self.layout.mesh, dcn, num_devices)
    sharding.validate_layout(self.model, shape, global_batch=self.loop.batch_size,
                             seq_len=self.loop.seq_len)
    return shape, dcn


# Top-level keys by section: the ConfigDict's own sections, then the flat
# sections' fields (their names are the keys).
_NESTED = ('seed', 'model', 'moe', 'data', 'optimizer', 'eval')
_FLAT = {'loop': LoopConfig, 'resume': ResumeConfig, 'layout': LayoutConfig}


def _known_keys(section, names, prefix: str) -> None:
  """Refuses a key no field has (a typo), suggesting the closest name."""
  for key in section.keys():
    if key not in names:
      close = difflib.get_close_matches(key, names, n=1)
      hint = f' Did you mean {prefix}{close[0]}?' if close else ''
      raise ConfigError(f'unknown config key {prefix}{key}.{hint}')


def _section(cls, values, prefix: str, **resolved):
  """`cls` from a ConfigDict section (JSON lists as tuples); keys it lacks
  take the field's default."""
  names = [f.name for f in dataclasses.fields(cls)]
  _known_keys(values, [n for n in names if n not in resolved], prefix)
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
  return cls(**kwargs, **resolved)


def build(config: ml_collections.ConfigDict) -> RunConfig:
  """The RunConfig of a ConfigDict, every value checked (ConfigError) but
  the mesh's fit to a device count (`RunConfig.mesh_shapes`)."""
  _known_keys(config, [*_NESTED, *(f.name for c in _FLAT.values()
                                  for f in dataclasses.fields(c))], '')
  flat = {name: _section(cls, {f.name: config[f.name] for f in dataclasses.fields(cls)
                               if f.name in config}, '')
          for name, cls in _FLAT.items()}
  optimizer = _section(OptimizerConfig, config.get('optimizer') or {}, 'optimizer.')
  evals = _section(EvalConfig, config.get('eval') or {}, 'eval.')
  data_cfg = _section(data.DataConfig, config.get('data') or {}, 'data.')
  moe = config.get('moe')
  moe = None if moe is None else _section(MoeConfig, moe, 'moe.')
  model = dict(config.get('model') or {})
  model.pop('moe', None)   # the top-level section
  if not model.get('vocab_size'):   # 0: the tokenizer's
    model['vocab_size'] = data.vocab_size(data_cfg)
  run = RunConfig(model=_section(ModelConfig, model, 'model.', moe=moe), data=data_cfg,
                  seed=config.get('seed', 0), optimizer=optimizer, eval=evals,
                  config_json=json.loads(config.to_json_best_effort()), **flat)
  for axis in sharding.spans_domains(run.layout.dcn_mesh):
    warnings.warn(
        f'dcn_mesh {tuple(run.layout.dcn_mesh)} puts the {axis} axis across domains '
        '(nodes or TPU slices): its collectives, the expert all-to-all among them, '
        'cross the slow network. Prefer data across domains and the '
        f'{axis} axis inside one (config.mesh).', stacklevel=2)
  if run.model.is_moe and run.model.moe.router == 'experts_choose':
    warnings.warn(
        "moe.router='experts_choose' is NOT causal: each token's routing "
        'depends on later tokens of its group, so this decoder sees the '
        'future during training and cannot be sampled autoregressively.', stacklevel=2)
  return run


def saved(workdir: str, key: str) -> RunConfig:
  """The RunConfig of the config a run wrote to workdir/config.json (`key`:
  the config key that named the run, for the error)."""
  path = epath.Path(workdir) / 'config.json'
  if not path.exists():
    raise ConfigError(f'{key}={workdir!r} has no config.json: it is not a '
                      'run directory written by train.py.')
  return build(ml_collections.ConfigDict(json.loads(path.read_text())))


def _defaults(cls) -> dict:
  """{field: default} of a section, in field order (fields with one)."""
  return {f.name: f.default for f in dataclasses.fields(cls)
          if f.default is not dataclasses.MISSING}


def default_config() -> ml_collections.ConfigDict:
  """Every field's default as the ConfigDict recipes start from
  (configs/base.py); model.vocab_size 0 takes the tokenizer's."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = {'vocab_size': 0, **{k: v for k, v in _defaults(ModelConfig).items() if k != 'moe'}}
  c.moe = _defaults(MoeConfig)    # None for a dense model
  c.data = _defaults(data.DataConfig)
  for cls in _FLAT.values():
    c.update(_defaults(cls))
  c.optimizer = _defaults(OptimizerConfig)
  c.eval = _defaults(EvalConfig)
  return c


def dense_twins(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
  """The MoE config and its two dense twins, identical in everything (data,
  seed, optimizer, batch, steps) except the FFNs:
    dense_total:  a uniform SwiGLU width giving the same total parameters;
    dense_active: a uniform SwiGLU width giving the same active FLOPs/token."""
  model = build(config).model
  if model.moe is None:
    raise ConfigError('the comparison needs an MoE config (config.moe is None); '
                      'use e.g. configs/switch.py:cpu.')
  runs = {'moe': config}
  for name, twin in (('dense_total', model.dense_twin_total()),
                     ('dense_active', model.dense_twin_active())):
    c = ml_collections.ConfigDict(config.to_dict())
    c.moe = None
    c.model.mlp_dim = twin.mlp_dim
    c.mesh = (-1, 1, 1)   # pure data parallelism; same global batch
    runs[name] = c
  return runs
