"""Logical axis names, the ONE rules table that maps them to mesh axes, and
`constrain()` for activations.

Parameters are created through `param()`, which records their logical axis
names (`Param.logical_axes`). Activations are pinned at block boundaries with
`constrain(x, names)`, a no-op when no mesh is set (`jax.set_mesh`), so the
unsharded model is the (1, 1, 1) mesh case of the same code.

Mesh axes: `data`, `expert`, `model`. The batch and the routing groups are
sharded over (`data`, `expert`): the expert axis doubles as data parallelism
for the non-expert layers (GShard / t5x). Expert weights are sharded over
`expert` on their expert dimension and over `model` on their hidden dimension.

Two levels (`make_mesh(..., dcn_shape)`): devices come in domains joined by
a fast network (a GPU node's NVLink, a TPU slice's ICI); domains are joined
by a slow one (InfiniBand, DCN). `config.mesh` is the shape inside one
domain and `config.dcn_mesh` the multiplier across domains, per axis (as
MaxText's ici_*/dcn_* parallelism): the mesh is their elementwise product.
The expert all-to-all belongs inside a domain; data parallelism (and FSDP)
goes across. A domain is a TPU slice, or elsewhere a node: a run of
consecutive processes (one per node, or one per GPU as Slurm numbers them).
"""

from __future__ import annotations

from typing import Sequence

import math
import os
import warnings

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from moe.config import ConfigError, ModelConfig

MESH_AXES = ('data', 'expert', 'model')
BATCH_AXES = ('data', 'expert')

# One rule per logical name: duplicate names would silently override.
RULES: dict[str, str | tuple[str, ...] | None] = {
    'batch': BATCH_AXES,        # sequences in a batch
    'group': BATCH_AXES,        # routing groups
    'expert_group': 'data',     # routing groups inside expert buffers
    'length': None,             # positions in a sequence / tokens in a group
    'act_embed': None,          # d_model of activations
    'vocab': 'model',
    'embed': None,              # d_model of weights ('data' under FSDP)
    'heads': 'model',
    'head_dim': None,
    'mlp': 'model',             # dense SwiGLU hidden
    'expert': 'expert',         # expert dimension of expert weights / buffers
    'router': None,             # expert dimension of router weights / logits
    'expert_mlp': 'model',      # expert SwiGLU hidden
    'capacity': None,           # expert buffer slots
}


def param(init, key: jax.Array, shape: Sequence[int], axes: Sequence[str | None],
          dtype=jax.numpy.float32) -> nnx.Param:
  """An `nnx.Param` initialized by `init` and named by logical `axes`."""
  assert len(axes) == len(shape), (axes, shape)
  for a in axes:
    assert a is None or a in RULES, f'logical axis {a!r} has no rule'
  return nnx.Param(init(key, tuple(shape), dtype), logical_axes=tuple(axes))


def spec(axes: Sequence[str | None], rule_table=None) -> P:
  """PartitionSpec for logical `axes` under the rules table."""
  rule_table = RULES if rule_table is None else rule_table
  return P(*(None if a is None else rule_table[a] for a in axes))


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """Pins an activation's layout by logical names; no-op without a mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, spec(axes))


# Expert weights (w_gate, w_up, w_down) inside the explicit all-to-all paths:
# experts over `expert`, the hidden F over `model`, whole over `data` (FSDP's
# d_model shards are gathered on entry).
EXPERT_WEIGHT_SPECS = tuple(spec(axes) for axes in (
    ('expert', None, 'expert_mlp'), ('expert', None, 'expert_mlp'),
    ('expert', 'expert_mlp', None)))


def experts_split() -> bool:
  """Whether the current mesh splits the experts over devices (`expert` or
  `model` > 1): only then do the dispatch paths need their explicit
  all-to-all. Otherwise the plain expert FFN runs, with any data parallelism
  left to the compiler (a shard_map over size-1 axes still costs a copy of
  every expert's weight gradient, an all-reduce among one device)."""
  mesh = jax.sharding.get_abstract_mesh()
  return not mesh.empty and mesh.shape['expert'] * mesh.shape['model'] > 1


def rules(fsdp: bool = False) -> dict:
  """The rules table; FSDP shards the weights' d_model over `data`."""
  return {**RULES, 'embed': 'data'} if fsdp else RULES


# --- Mesh -------------------------------------------------------------------

def resolve_mesh_shape(shape, num_devices: int) -> tuple[int, int, int]:
  """(data, expert, model) with at most one -1 meaning 'the rest'."""
  shape = tuple(int(s) for s in shape)
  if len(shape) != 3 or shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ConfigError(
        f'mesh shape {shape} is not valid: give (data, expert, model) sizes '
        '>= 1, with at most one -1 meaning "the rest of the devices".')
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ConfigError(
          f'mesh shape {shape}: {num_devices} devices do not divide by {known}.')
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise ConfigError(
        f'mesh shape {shape} needs {math.prod(shape)} devices but '
        f'{num_devices} exist; use sizes whose product is {num_devices} '
        '(or -1 for one axis).')
  return shape


def resolve_dcn_shape(dcn_shape) -> tuple[int, int, int]:
  """(data, expert, model) domain counts, each >= 1."""
  dcn = tuple(dcn_shape)
  if len(dcn) != 3 or not all(isinstance(s, int) and s >= 1 for s in dcn):
    raise ConfigError(
        f'dcn_mesh {dcn} is not valid: give (data, expert, model) numbers of '
        'domains >= 1 (no -1), e.g. (4, 1, 1) for data across 4 nodes.')
  return dcn


def resolve_layout(shape, dcn_shape, num_devices: int) -> tuple[int, int, int]:
  """The whole mesh: `shape` inside a domain (its -1 resolved against the
  devices per domain) times `dcn_shape` across domains, axis by axis."""
  dcn = resolve_dcn_shape(dcn_shape)
  domains = math.prod(dcn)
  if num_devices % domains:
    raise ConfigError(
        f'dcn_mesh {dcn} makes {domains} domains, but {num_devices} devices do '
        f'not divide into {domains} equal domains.')
  inner = resolve_mesh_shape(shape, num_devices // domains)
  return tuple(i * d for i, d in zip(inner, dcn))


def spans_domains(dcn_shape) -> list[str]:
  """The collective-heavy axes (`expert`, `model`) a layout puts across
  domains."""
  return [a for a, d in zip(MESH_AXES, resolve_dcn_shape(dcn_shape))
          if a != 'data' and d > 1]


def _domains(devices, count: int | None) -> list[int] | None:
  """The fast-network domain of each device: its TPU slice; elsewhere its
  node, taken as `count` runs of consecutive processes (one process per
  node, or one per GPU as Slurm numbers a node's tasks). count=None (a flat
  mesh): a process is a domain only when it drives several devices; one
  device per process says nothing about nodes, so None."""
  if devices[0].platform == 'tpu':
    return [getattr(d, 'slice_index', 0) or 0 for d in devices]
  processes = 1 + max(d.process_index for d in devices)
  if count is None:
    if processes == 1 or len(devices) == processes:
      return None
    return [d.process_index for d in devices]
  if processes % count:
    raise ConfigError(
        f'dcn_mesh asks for {count} domains, but the devices belong to '
        f'{processes} processes, which do not split into {count} nodes of '
        f'equal size; use a dcn_mesh whose product divides {processes}.')
  return [d.process_index // (processes // count) for d in devices]


def make_mesh(shape, devices=None, dcn_shape=(1, 1, 1)) -> jax.sharding.Mesh:
  """A (data, expert, model) mesh of `shape` (the whole mesh, e.g.
  `RunConfig.mesh_shapes`); axis types are always given explicitly.

  With `dcn_shape` (domains per axis) other than all ones, each domain holds
  one `shape / dcn_shape` block, laid out as
  `mesh_utils.create_hybrid_device_mesh` does, whose own granules (a process
  or a TPU slice) cannot express a node of several one-GPU processes. A
  flat mesh whose expert or model axis crosses domains is built as asked,
  with a warning."""
  devices = jax.devices() if devices is None else devices
  dcn = resolve_dcn_shape(dcn_shape)
  shape = resolve_mesh_shape(shape, len(devices))
  if any(s % d for s, d in zip(shape, dcn)):
    raise ConfigError(f'mesh {shape} is not a multiple of dcn_mesh {dcn} '
                      'axis by axis.')
  axis_types = (jax.sharding.AxisType.Auto,) * 3
  if math.prod(dcn) == 1:
    mesh = jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    _warn_if_spanning(mesh)
    return mesh
  keys = _domains(devices, math.prod(dcn))
  by_domain = {}
  for key, d in sorted(zip(keys, devices), key=lambda kd: (kd[0], kd[1].id)):
    by_domain.setdefault(key, []).append(d)
  if len(by_domain) != math.prod(dcn):
    raise ConfigError(
        f'dcn_mesh {dcn} asks for {math.prod(dcn)} domains, but the '
        f'{len(devices)} devices are in {len(by_domain)}; use a dcn_mesh whose '
        f'product is {len(by_domain)}.')
  inner = tuple(s // d for s, d in zip(shape, dcn))
  return jax.sharding.Mesh(hybrid_devices(inner, dcn, list(by_domain.values())),
                           MESH_AXES, axis_types=axis_types)


def hybrid_devices(inner, dcn, domains: list[list]) -> np.ndarray:
  """The device grid of shape inner x dcn (axis by axis): domain i (of
  prod(dcn), in row-major order over the dcn grid) holds block i, an
  `inner`-shaped mesh of its devices."""
  blocks = np.empty(dcn, dtype=object)
  for i, members in enumerate(domains):
    blocks.flat[i] = mesh_utils.create_device_mesh(inner, members)
  return np.block(blocks.tolist())


def _warn_if_spanning(mesh: jax.sharding.Mesh) -> None:
  """Warns when the expert or model axis of a flat mesh crosses domains."""
  keys = _domains(list(mesh.devices.flat), None)
  if keys is None:
    return
  domains = np.asarray(keys).reshape(mesh.devices.shape)
  for i, axis in enumerate(MESH_AXES[1:], start=1):
    lines = np.moveaxis(domains, i, -1).reshape(-1, mesh.devices.shape[i])
    if any(len(set(line)) > 1 for line in lines):
      warnings.warn(
          f"mesh axis '{axis}' (size {mesh.shape[axis]}) spans "
          f'{len(set(domains.ravel()))} domains (processes of several devices, '
          'or TPU slices): its collectives, the expert all-to-all among them, '
          'cross the slow network between them. Keep it inside a domain: '
          'config.mesh is the shape inside one, config.dcn_mesh puts data '
          'across domains.', stacklevel=2)


def validate_layout(cfg: ModelConfig, mesh_shape, *, global_batch: int,
                    seq_len: int) -> None:
  """Refuses, before compilation, a model and batch the mesh cannot hold."""
  data, expert, model = mesh_shape
  cfg.check_sequence(seq_len)
  batch_shards = data * expert
  errors = []
  if global_batch % batch_shards:
    errors.append(f'batch_size={global_batch} is not divisible by data x expert '
                  f'= {data} x {expert} = {batch_shards} devices')
  for name in ('num_heads', 'mlp_dim', 'vocab_size'):
    if getattr(cfg, name) % model:
      errors.append(f'model.{name}={getattr(cfg, name)} is not divisible by the '
                    f'model axis ({model})')
  if cfg.moe is not None:
    m = cfg.moe
    if m.num_experts % expert:
      errors.append(f'moe.num_experts={m.num_experts} is not divisible by the '
                    f'expert axis ({expert})')
    if m.expert_dim % model:
      errors.append(f'moe.expert_dim={m.expert_dim} is not divisible by the '
                    f'model axis ({model})')
    spg = m.seqs_per_group(global_batch, seq_len)    # refuses a ragged batch
    groups = global_batch // spg
    if groups % batch_shards:
      errors.append(f'{groups} routing groups (batch_size={global_batch} / '
                    f'{spg} sequences per group from moe.group_size='
                    f'{m.group_size}) are not divisible by data x expert = '
                    f'{batch_shards}; lower moe.group_size or raise batch_size')
  if errors:
    raise ConfigError(f'cannot lay out on mesh (data={data}, expert={expert}, '
                      f'model={model}): ' + '; '.join(errors) + '.')


# --- Shardings of state trees -------------------------------------------------

def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def tree_shardings(tree, mesh, rule_table=None):
  """NamedShardings for a tree of nnx Variables (by logical_axes) and arrays
  (replicated). Optimizer states inherit their parameters' names; a state of
  another rank (Adafactor's factored moments) is replicated."""
  def one(x):
    if _is_var(x):
      axes = x.get_metadata().get('logical_axes')
      fits = axes and len(axes) == len(x.get_value().shape)
      sharding = NamedSharding(mesh, spec(axes, rule_table) if fits else P())
      return x.replace(sharding)
    return NamedSharding(mesh, P())
  return jax.tree.map(one, tree, is_leaf=_is_var)


def check_sharded(tree, shardings, min_size: int = 2 ** 14) -> None:
  """Refuses a run whose large parameters ended up replicated by mistake:
  every array of >= min_size elements that its rules split across devices
  must really hold only its shard on each device."""
  for path, x, s in zip(*_paths_and_leaves(tree), jax.tree.leaves(shardings)):
    if x.size < min_size:
      continue
    want = s.shard_shape(x.shape)
    have = x.addressable_shards[0].data.shape
    if math.prod(want) < x.size and tuple(have) != tuple(want):
      raise RuntimeError(
          f'parameter {path} of shape {x.shape} is held as {have} per device '
          f'but its rules shard it to {want}: it was replicated by mistake.')


def _paths_and_leaves(tree):
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return [jax.tree_util.keystr(p) for p, _ in flat], [x for _, x in flat]


# --- Multi-process -------------------------------------------------------------

def init_distributed(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> None:
  """`jax.distributed.initialize`: explicit coordinator flags, or the
  environment's cluster auto-detection (TPU pod slices, Slurm, ...).

  A single process outside a cluster does not initialize; its preemption
  signal (SIGTERM) is caught by the train loop's own handler."""
  if coordinator or num_processes or process_id is not None:
    if not (coordinator and num_processes and process_id is not None):
      raise ConfigError(
          'multi-process flags need all three: coordinator address '
          f'({coordinator!r}), num_processes ({num_processes!r}) and '
          f'process_id ({process_id!r}).')
    jax.distributed.initialize(coordinator, num_processes, process_id)
  elif _in_cluster():
    jax.distributed.initialize()


def _in_cluster() -> bool:
  """True under a launcher whose environment jax can auto-detect."""
  slurm = int(os.environ.get('SLURM_NTASKS', '1')) > 1
  tpu = os.environ.get('TPU_WORKER_HOSTNAMES', '').count(',') > 0
  return slurm or tpu
