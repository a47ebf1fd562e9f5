"""Pre-flight planner: what a config costs on a target mesh, before launch.

  python scripts/plan.py --config configs/switch.py:1b --mesh=4,8,1

Everything is computed from shapes and shardings, without devices: the mesh
may be larger than the machine (a 32-device plan on a laptop). Per device:

  * parameters and optimizer state: every array of the abstract train state
    (`jax.eval_shape`, no memory) split by the ONE rules table
    (`moe.sharding.rules`) over the mesh axis sizes; XLA pads a dimension
    that does not divide, so shard sizes round up.
  * gradients: the parameters' size (float32, same sharding).
  * activations: the residuals JAX saves for the backward pass of one train
    step, read from the jaxpr of `jax.vjp` of the loss (`jax.make_jaxpr`: no
    compilation) for the per-device slice of the model: the local batch
    (batch / (data x expert) sequences), heads, MLP/expert widths and
    vocabulary divided by the `model` axis. Only residuals that grow with the
    batch count (the jaxpr is traced at b and 2b sequences; the difference is
    the activation memory of b sequences), so transposed or cast weights are
    not counted twice. With `model.remat` the saved residuals are the
    blocks' inputs, and the backward pass recomputes one block at a time, so
    one block's residuals (those of the model without remat, per layer) are
    added. Plus the loss's working set at the start of the backward pass: the
    logits, their softmax and their gradient, 3 x [b, T, V/model] float32.
  * the batch (int32 tokens).
  * total = parameters + optimizer state + max(gradients, activations) +
    batch: the backward pass frees each layer's residuals as it writes that
    layer's gradients, so the two peak at opposite ends of it (the optimizer
    update runs after both). Compared in tests/test_plan.py with XLA's own
    figure for the compiled train step of `moe.steps.build`
    (`memory_analysis()`: arguments + outputs - donated aliases +
    temporaries, `moe.metrics.compiled_memory`, what
    `moe.metrics.peak_memory_mb` reports), within 20%, without remat: XLA:CPU
    does not realize remat's saving (its figure for the `switch.py:cpu`
    model is about the same with and without; jax-ml/jax#19822), so the
    remat figures are not checked against a compiler here.

  Not modelled: FSDP's all-gathered weights (fsdp=True), XLA's own padding
  and fusion choices, and framework/runtime overhead.

All-to-all per MoE layer: a device holds expert buffers of [G_local, E, C, D]
(G_local = its routing groups, C = the training capacity) in the compute
dtype; one all-to-all over the `expert` axis sends (ep-1)/ep of it away. A
train step does four (dispatch and combine forward, their transposes
backward), the same volume whether `gather` does it explicitly
(`jax.shard_map`) or `einsum` lets XLA insert it. With expert axis 1 there is
none. With a two-level mesh (`config.dcn_mesh`), of the ep - 1 peers a device
sends to, ep/dcn_e - 1 share its domain and the rest are across the slow
network: the bytes are split so, and each part gets a time from a declared
bandwidth (`ICI_GBPS`, `DCN_GBPS`: gigabits per second per device, one way).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe import metrics, sharding, steps
from moe.config import ConfigError, ModelConfig
from moe.model import Transformer, lm_loss
from moe.run_config import RunConfig

F32 = 4
# Default bandwidths (Gb/s per device, one way): an H100/H200 node's NVLink 4
# (450 GB/s) and one 400 Gb/s InfiniBand NIC per GPU between nodes. For a
# TPU v5p, Cloud TPU's figures per chip: ICI 4,800 (1,200 GB/s both ways),
# DCN 50 (scripts/plan.py --ici_gbps / --dcn_gbps; README, "Plan before launch").
ICI_GBPS = 3600.0
DCN_GBPS = 400.0


@dataclasses.dataclass
class MoeLayerPlan:
  layer: int
  num_experts: int
  experts_per_device: int
  capacity: int                        # C per routing group (training)
  buffer_shape: tuple[int, int, int, int]  # per device [G_local, E, C, D]
  buffer_bytes: int
  all_to_all_bytes_per_step: int       # sent by one device, forward + backward
  all_to_all_ici_bytes_per_step: int   # ... of which to peers in its domain
  all_to_all_dcn_bytes_per_step: int   # ... and to peers in other domains


@dataclasses.dataclass
class Plan:
  mesh_shape: tuple[int, int, int]      # the whole mesh
  dcn_mesh_shape: tuple[int, int, int]  # domains per axis
  num_devices: int
  num_params: int
  num_active_params: int
  flops_per_token: float
  tokens_per_step: int
  local_batch: int                      # sequences per device (data x expert shards)
  param_bytes: int                      # per device
  optimizer_bytes: int
  gradient_bytes: int
  activation_bytes: int
  batch_bytes: int
  moe_layers: list[MoeLayerPlan]
  ici_gbps: float                       # declared bandwidths, per device, one way
  dcn_gbps: float

  @property
  def all_to_all_bytes(self) -> dict[str, int]:
    """All-to-all bytes per device per step inside ('ici') and across
    ('dcn') domains, over every MoE layer."""
    return {'ici': sum(l.all_to_all_ici_bytes_per_step for l in self.moe_layers),
            'dcn': sum(l.all_to_all_dcn_bytes_per_step for l in self.moe_layers)}

  @property
  def all_to_all_seconds(self) -> dict[str, float]:
    """Estimated all-to-all time per step inside and across domains."""
    gbps = {'ici': self.ici_gbps, 'dcn': self.dcn_gbps}
    return {k: 8 * b / (gbps[k] * 1e9) for k, b in self.all_to_all_bytes.items()}

  @property
  def total_bytes(self) -> int:
    return (self.param_bytes + self.optimizer_bytes
            + max(self.gradient_bytes, self.activation_bytes) + self.batch_bytes)

  @property
  def flops_per_device_per_step(self) -> float:
    return self.flops_per_token * self.tokens_per_step / self.num_devices

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d['total_bytes'] = self.total_bytes
    d['flops_per_device_per_step'] = self.flops_per_device_per_step
    d['all_to_all_bytes'] = self.all_to_all_bytes
    d['all_to_all_seconds'] = self.all_to_all_seconds
    return d


# --- Sharded sizes of the train state -----------------------------------------------

def _axis_size(entry, sizes: dict) -> int:
  if entry is None:
    return 1
  names = (entry,) if isinstance(entry, str) else tuple(entry)
  return math.prod(sizes[n] for n in names)


def shard_bytes(shape, dtype, axes, sizes: dict, rule_table) -> int:
  """Bytes of one device's shard of an array with logical `axes`."""
  if axes and len(axes) == len(shape):
    spec = sharding.spec(axes, rule_table)
    shape = [math.ceil(n / _axis_size(e, sizes)) for n, e in zip(shape, spec)]
  # Rank differs (e.g. Adafactor's factored moments): counted replicated.
  return int(math.prod(shape)) * jnp.dtype(dtype).itemsize


def tree_bytes(tree, sizes: dict, rule_table) -> int:
  """Per-device bytes of an abstract tree of nnx Variables / arrays."""
  total = 0
  for x in jax.tree.leaves(tree, is_leaf=lambda v: isinstance(v, nnx.Variable)):
    if isinstance(x, nnx.Variable):
      axes = x.get_metadata().get('logical_axes')
      value = x.get_value()
    else:
      axes, value = None, x
    total += shard_bytes(value.shape, value.dtype, axes, sizes, rule_table)
  return total


# --- Activations -------------------------------------------------------------------------

def local_model(cfg: ModelConfig, model_axis: int) -> ModelConfig:
  """The slice of the model one device computes: heads, MLP and expert
  widths and the vocabulary divided by the `model` axis."""
  def div(n):
    return max(1, math.ceil(n / model_axis))
  moe = cfg.moe and dataclasses.replace(cfg.moe, expert_dim=div(cfg.moe.expert_dim))
  return dataclasses.replace(cfg, num_heads=div(cfg.num_heads), mlp_dim=div(cfg.mlp_dim),
                             vocab_size=div(cfg.vocab_size), moe=moe)


def residual_bytes(cfg: ModelConfig, batch: int, seq_len: int) -> int:
  """Bytes of the residuals `jax.vjp` saves for the backward pass of the
  training loss of `batch` sequences (the inputs themselves not counted)."""
  graphdef, params, extra = jax.eval_shape(
      lambda k: nnx.split(Transformer(cfg, k), nnx.Param, ...), jax.random.key(0))

  def vjp(params, extra, tokens):
    def loss(p):
      model = nnx.merge(graphdef, p, extra)
      return lm_loss(model, tokens, train=True, rng=jax.random.key(0))[0]
    return jax.vjp(loss, params)[1]

  tokens = jax.ShapeDtypeStruct((batch, seq_len + 1), jnp.int32)
  closed, out = jax.make_jaxpr(vjp, return_shape=True)(params, extra, tokens)
  jaxpr = closed.jaxpr
  residuals = jaxpr.outvars[len(jaxpr.outvars) - len(jax.tree.leaves(out)):]
  inputs = {id(v) for v in jaxpr.invars} | {id(v) for v in jaxpr.constvars}
  seen = {id(v): v for v in residuals
          if hasattr(v, 'aval') and not hasattr(v, 'val') and id(v) not in inputs}
  return sum(int(np.prod(v.aval.shape)) * v.aval.dtype.itemsize for v in seen.values())


def activation_bytes(cfg: ModelConfig, local_batch: int, seq_len: int,
                     model_axis: int) -> int:
  """Per-device activation memory of one train step (module docstring)."""
  local = local_model(cfg, model_axis)

  def grows_with_batch(c: ModelConfig) -> int:
    return (residual_bytes(c, 2 * local_batch, seq_len) - residual_bytes(c, local_batch, seq_len))
  saved = grows_with_batch(local)
  if local.remat:   # plus the one block the backward pass recomputes at a time
    every_block = grows_with_batch(dataclasses.replace(local, remat=False))
    saved += (every_block - saved) // local.num_layers
  loss_working_set = 3 * local_batch * seq_len * local.vocab_size * F32
  return saved + loss_working_set


# --- The plan ---------------------------------------------------------------------------

def _moe_layers(cfg: ModelConfig, mesh_shape, dcn_mesh_shape, global_batch: int,
                seq_len: int) -> list[MoeLayerPlan]:
  if cfg.moe is None:
    return []
  data, expert, _ = mesh_shape
  expert_in_domain = expert // dcn_mesh_shape[1]
  m = cfg.moe
  spg = m.seqs_per_group(global_batch, seq_len)
  groups = global_batch // spg
  group_tokens = spg * seq_len
  g_local = math.ceil(groups / (data * expert))
  c = m.capacity(group_tokens, train=True)
  shape = (g_local, m.num_experts, c, cfg.d_model)
  buf = int(math.prod(shape)) * jnp.dtype(cfg.dtype).itemsize
  # To each of its ep - 1 peers a device sends 1/ep of its buffers.
  ici = 4 * buf * (expert_in_domain - 1) // expert
  dcn = 4 * buf * (expert - expert_in_domain) // expert
  return [MoeLayerPlan(i, m.num_experts, math.ceil(m.num_experts / expert), c,
                       shape, buf, ici + dcn, ici, dcn)
          for i in range(cfg.num_layers) if cfg.is_moe_layer(i)]


def make_plan(run: RunConfig, num_devices: int | None = None, *,
              ici_gbps: float = ICI_GBPS, dcn_gbps: float = DCN_GBPS) -> Plan:
  """The plan of `run` on its mesh (`mesh` x `dcn_mesh`, with -1 resolved
  against `num_devices`, default: the mesh's own product); all-to-all times
  from the declared bandwidths."""
  for name, value in (('ici_gbps', ici_gbps), ('dcn_gbps', dcn_gbps)):
    if not value > 0:
      raise ConfigError(f'{name}={value}: a bandwidth must be > 0 (Gb/s).')
  if num_devices is None:
    num_devices = math.prod(int(s) for s in (*run.layout.mesh, *run.layout.dcn_mesh))
    if num_devices < 0:
      raise ConfigError(f'mesh {tuple(run.layout.mesh)} has a -1: give num_devices.')
  mesh_shape, dcn_mesh_shape = run.mesh_shapes(num_devices)
  cfg, loop = run.model, run.loop
  sizes = dict(zip(sharding.MESH_AXES, mesh_shape))
  rule_table = sharding.rules(run.layout.fsdp)
  state = steps.abstract_state(run)[1]
  param_bytes = tree_bytes(state.params, sizes, rule_table)
  batch_shards = mesh_shape[0] * mesh_shape[1]
  local_batch = loop.batch_size // batch_shards
  return Plan(
      mesh_shape=mesh_shape, dcn_mesh_shape=dcn_mesh_shape,
      num_devices=math.prod(mesh_shape),
      num_params=cfg.num_params, num_active_params=cfg.num_active_params,
      flops_per_token=cfg.flops_per_token(loop.seq_len),
      tokens_per_step=loop.batch_size * loop.seq_len,
      local_batch=local_batch,
      param_bytes=param_bytes,
      optimizer_bytes=(tree_bytes(state.opt_state, sizes, rule_table)
                       + tree_bytes(state.extra, sizes, rule_table)),
      gradient_bytes=param_bytes,
      activation_bytes=activation_bytes(cfg, local_batch, loop.seq_len, mesh_shape[2]),
      batch_bytes=local_batch * (loop.seq_len + 1) * 4,
      moe_layers=_moe_layers(cfg, mesh_shape, dcn_mesh_shape, loop.batch_size,
                             loop.seq_len),
      ici_gbps=ici_gbps, dcn_gbps=dcn_gbps)


def _bytes(n: float) -> str:
  for unit in ('B', 'KiB', 'MiB', 'GiB', 'TiB'):
    if abs(n) < 1024 or unit == 'TiB':
      return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.2f} {unit}'
    n /= 1024


def _count(n: float) -> str:
  for unit, div in (('T', 1e12), ('B', 1e9), ('M', 1e6), ('K', 1e3)):
    if n >= div:
      return f'{n / div:.3f}{unit}'
  return f'{n:.0f}'


def format_plan(p: Plan) -> str:
  data, expert, model = p.mesh_shape
  two_level = math.prod(p.dcn_mesh_shape) > 1
  domains = (f' = {tuple(s // d for s, d in zip(p.mesh_shape, p.dcn_mesh_shape))} '
             f'in each of {math.prod(p.dcn_mesh_shape)} domains x dcn_mesh '
             f'{p.dcn_mesh_shape}' if two_level else '')
  lines = [
      f'mesh (data={data}, expert={expert}, model={model}){domains}: '
      f'{p.num_devices} devices, {p.local_batch} sequences per device',
      f'parameters: {_count(p.num_params)} total, {_count(p.num_active_params)} '
      f'active per token',
      f'training FLOPs per token: {_count(p.flops_per_token)} '
      f'({_count(p.flops_per_device_per_step)} per device per step of '
      f'{p.tokens_per_step} tokens)',
      '',
      'memory per device:',
      f'  parameters        {_bytes(p.param_bytes)}',
      f'  optimizer state   {_bytes(p.optimizer_bytes)}',
      f'  gradients         {_bytes(p.gradient_bytes)}',
      f'  activations       {_bytes(p.activation_bytes)}',
      f'  batch             {_bytes(p.batch_bytes)}',
      f'  total             {_bytes(p.total_bytes)}   (gradients and activations '
      'peak apart: the larger one counts)',
  ]
  if p.moe_layers:
    lines += ['', 'all-to-all per MoE layer (per device, per step: 4 x (ep-1)/ep '
              'of the expert buffer):']
    for l in p.moe_layers:
      lines.append(
          f'  layer {l.layer}: {l.num_experts} experts ({l.experts_per_device} per '
          f'device), capacity {l.capacity}, buffer {list(l.buffer_shape)} = '
          f'{_bytes(l.buffer_bytes)}, all-to-all {_bytes(l.all_to_all_bytes_per_step)}')
    total = sum(l.all_to_all_bytes_per_step for l in p.moe_layers)
    lines.append(f'  all MoE layers: {_bytes(total)} per device per step'
                 + (' (expert axis 1: no all-to-all)' if expert == 1 else ''))
    parts, seconds = p.all_to_all_bytes, p.all_to_all_seconds
    for net, gbps, key in (('inside a domain (ICI/NVLink)', p.ici_gbps, 'ici'),
                           ('across domains (DCN/IB)', p.dcn_gbps, 'dcn')):
      lines.append(f'    {net:29s} {_bytes(parts[key]):>11s}  ~{1e3 * seconds[key]:.2f} ms '
                   f'per step at {gbps:g} Gb/s')
  return '\n'.join(lines)


def compiled_bytes(run: RunConfig) -> dict:
  """XLA's memory analysis of the jitted train step of `run` on the local
  devices (compiles; the mesh must fit this machine)."""
  shape, dcn_shape = run.mesh_shapes(jax.device_count())
  t = steps.build(run, sharding.make_mesh(shape, dcn_shape=dcn_shape))
  tokens = jax.ShapeDtypeStruct((run.loop.batch_size, run.loop.seq_len + 1), jnp.int32,
                                sharding=t.batch_sharding)
  return metrics.compiled_memory(t.train_step.lower(t.abstract_state, tokens).compile())
