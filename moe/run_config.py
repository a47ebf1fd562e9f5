"""The run config (an ml_collections ConfigDict from `configs/*.py`),
validated once, here, before anything expensive (data, compilation).

`validate(config, num_devices)` returns a `Run`: the frozen model and data
configs plus the resolved mesh shape. Every error names the bad value and
what would be valid (`moe.config.ConfigError`).
"""

from __future__ import annotations

import dataclasses
import difflib
import warnings

import ml_collections

from moe import data, layers, routing, run_dir, sharding
from moe.config import ConfigError, ModelConfig, MoeConfig

OPTIMIZERS = ('adamw', 'adafactor')
DECAYS = ('cosine', 'linear', 'constant')
NONFINITE = ('skip', 'stop')
# The keys outside the model/moe/data sections (configs/base.py documents
# them; tests/test_reliability.py keeps the two in step).
TOP_LEVEL_KEYS = (
    'seed', 'model', 'moe', 'data', 'batch_size', 'seq_len', 'num_steps',
    'restore_step', 'skip_batches', 'init_from', 'optimizer', 'mesh', 'dcn_mesh',
    'fsdp',
    'log_every', 'eval_every', 'eval_batches', 'final_eval_batches',
    'checkpoint_every',
    'max_to_keep', 'nonfinite', 'restore_fallback', 'accept_config_change',
    'peak_flops_per_device',
    'progress_bar', 'eval')
OPTIMIZER_KEYS = ('name', 'learning_rate', 'warmup_steps', 'decay',
                  'min_lr_ratio', 'weight_decay', 'b1', 'b2', 'grad_clip')
EVAL_KEYS = ('capacity_factors', 'checkpoint_step', 'compute_what_if')


@dataclasses.dataclass(frozen=True)
class Run:
  model: ModelConfig
  data: data.DataConfig
  mesh_shape: tuple[int, int, int]       # the whole mesh: mesh x dcn_mesh
  dcn_mesh_shape: tuple[int, int, int] = (1, 1, 1)   # domains per axis


def _fields(cls, section: ml_collections.ConfigDict, prefix: str) -> dict:
  """The ConfigDict section as dataclass kwargs; unknown keys suggest a name."""
  _known_keys(section, {f.name for f in dataclasses.fields(cls)}, prefix + '.')
  return {key: tuple(value) if isinstance(value, list) else value
          for key, value in section.items()}


def _known_keys(section, names, prefix: str) -> None:
  """Refuses a key no code reads (a typo), suggesting the closest name."""
  for key in section.keys():
    if key not in names:
      close = difflib.get_close_matches(key, names, n=1)
      hint = f' Did you mean {prefix}{close[0]}?' if close else ''
      raise ConfigError(f'unknown config key {prefix}{key}.{hint}')


def _choice(name, value, choices):
  if value not in choices:
    raise ConfigError(f'{name}={value!r} is not valid; choose one of {choices}.')


def _positive(config, *names, allow_zero=False):
  for name in names:
    value = config
    for part in name.split('.'):
      value = value[part]
    ok = value >= 0 if allow_zero else value > 0
    if not isinstance(value, (int, float)) or not ok:
      bound = '>= 0' if allow_zero else '> 0'
      raise ConfigError(f'{name}={value!r} must be {bound}.')


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
  """The frozen ModelConfig; vocab_size 0 takes the tokenizer's."""
  kwargs = _fields(ModelConfig, config.model, 'model')
  kwargs.pop('moe', None)
  if not kwargs.get('vocab_size'):
    kwargs['vocab_size'] = data.vocab_size(data_config(config))
  moe = None if config.moe is None else MoeConfig(**_fields(MoeConfig, config.moe, 'moe'))
  return ModelConfig(**kwargs, moe=moe)


def data_config(config: ml_collections.ConfigDict) -> data.DataConfig:
  kwargs = _fields(data.DataConfig, config.data, 'data')
  for key in ('data_dir', 'text_files'):
    kwargs[key] = kwargs.get(key) or None
  return data.DataConfig(**kwargs)


def validate(config: ml_collections.ConfigDict, num_devices: int) -> Run:
  """Checks the whole run config; returns the resolved pieces."""
  _known_keys(config, TOP_LEVEL_KEYS, '')
  _known_keys(config.optimizer, OPTIMIZER_KEYS, 'optimizer.')
  _known_keys(config.eval, EVAL_KEYS, 'eval.')
  _positive(config, 'batch_size', 'seq_len', 'num_steps', 'log_every',
            'eval_every', 'checkpoint_every', 'max_to_keep',
            'optimizer.learning_rate')
  if not isinstance(config.restore_step, int) or config.restore_step < -1:
    raise ConfigError(f'restore_step={config.restore_step!r} must be -1 (newest) '
                      'or a step >= 0.')
  _positive(config, 'seed', 'skip_batches', 'eval_batches', 'final_eval_batches',
            'optimizer.warmup_steps', 'optimizer.weight_decay',
            'optimizer.grad_clip', 'optimizer.min_lr_ratio',
            'peak_flops_per_device', allow_zero=True)
  if config.skip_batches and config.restore_step < 0:
    raise ConfigError(
        f'skip_batches={config.skip_batches} needs restore_step=N, the step to '
        'restart from (e.g. the newest checkpoint\'s): the skip is applied '
        'once, on the restart from N; with restore_step=-1 every later resume '
        'would skip again.')
  _choice('optimizer.name', config.optimizer.name, OPTIMIZERS)
  _choice('optimizer.decay', config.optimizer.decay, DECAYS)
  _choice('nonfinite', config.nonfinite, NONFINITE)
  for cf in config.eval.capacity_factors:
    if cf != 'dropless' and not (isinstance(cf, (int, float)) and cf > 0):
      raise ConfigError(f'eval.capacity_factors has {cf!r}; each must be a '
                        "number > 0 or 'dropless'.")
  model = model_config(config)
  if model.is_moe:
    routing.compute_what_if(model.moe, config.eval.compute_what_if)
  model.attention_kernel(layers.platform())  # 'cudnn' where it cannot run: refused
  if config.get('init_from'):
    run_dir.check_filesystem(config.init_from, 'init_from')
    from moe import upcycle  # pylint: disable=g-import-not-at-top
    upcycle.check_source(config.init_from, model)
  dcn_mesh_shape = sharding.resolve_dcn_shape(config.dcn_mesh)
  mesh_shape = sharding.resolve_layout(config.mesh, dcn_mesh_shape, num_devices)
  sharding.validate_layout(model, mesh_shape, global_batch=config.batch_size,
                           seq_len=config.seq_len)
  for axis in sharding.spans_domains(dcn_mesh_shape):
    warnings.warn(
        f'dcn_mesh {dcn_mesh_shape} puts the {axis} axis across domains '
        '(nodes or TPU slices): its collectives, the expert all-to-all among '
        'them, cross the slow network. Prefer data across domains and the '
        f'{axis} axis inside one (config.mesh).', stacklevel=2)
  if model.moe is not None and model.moe.router == 'experts_choose':
    warnings.warn(
        "moe.router='experts_choose' is NOT causal: each token's routing "
        'depends on later tokens of its group, so this decoder sees the '
        'future during training and cannot be sampled autoregressively.',
        stacklevel=2)
  return Run(model, data_config(config), mesh_shape, dcn_mesh_shape)


def dense_twins(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
  """The MoE config and its two dense twins, identical in everything (data,
  seed, optimizer, batch, steps) except the FFNs:
    dense_total:  a uniform SwiGLU width giving the same total parameters;
    dense_active: a uniform SwiGLU width giving the same active FLOPs/token."""
  model = model_config(config)
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


def quiet_logs() -> None:
  """Warnings and up from every logger (orbax logs each save at INFO),
  unless the command line asked for --verbosity."""
  import logging as py_logging
  from absl import flags, logging
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
    py_logging.getLogger().setLevel(py_logging.WARNING)
