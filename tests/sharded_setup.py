"""The small MoE model, optimizer and batches shared by the sharding tests
and the multi-process worker (prime-ish sizes to ease shape tracing)."""

import re

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from moe import sharding, steps
from moe.config import ModelConfig, MoeConfig
from moe.data import DataConfig
from moe.run_config import LayoutConfig, OptimizerConfig, RunConfig

GLOBAL_BATCH, SEQ_LEN = 16, 8


def model_config(dispatch: str, balance_scope: str = 'group', **moe_kw) -> ModelConfig:
  return ModelConfig(
      vocab_size=128, d_model=24, num_layers=2, num_heads=4, head_dim=6,
      mlp_dim=40, max_seq_len=SEQ_LEN,
      moe=MoeConfig(**{**dict(num_experts=8, top_k=2, expert_dim=12, group_size=SEQ_LEN,
                              dispatch=dispatch, train_capacity_factor=1.0,
                              min_capacity=1, balance_scope=balance_scope), **moe_kw}),
      moe_every=1)


def build(mesh_shape, dispatch: str, devices=None, balance_scope: str = 'group',
          fsdp: bool = False, dcn_shape=(1, 1, 1), moe_kw=()):
  """(Trainer, initial TrainState) on a mesh of the given (whole) shape, with
  `dcn_shape` domains per axis; `moe_kw`: (name, value) pairs changing the
  MoE layer."""
  cfg = model_config(dispatch, balance_scope, **dict(moe_kw))
  sharding.validate_layout(cfg, mesh_shape, global_batch=GLOBAL_BATCH,
                           seq_len=SEQ_LEN)
  t = trainer(cfg, sharding.make_mesh(mesh_shape, devices, dcn_shape), fsdp=fsdp)
  return t, t.init(jax.random.key(0))


def trainer(cfg: ModelConfig, mesh, *, fsdp: bool = False, lr: float = 3e-3) -> steps.Trainer:
  """moe.steps.build for a bare model config: AdamW at a constant `lr`."""
  run = RunConfig(model=cfg, data=DataConfig(), layout=LayoutConfig(fsdp=fsdp),
                  optimizer=OptimizerConfig(learning_rate=lr, warmup_steps=0,
                                            decay='constant'))
  return steps.build(run, mesh)


def loss_and_grads(t: steps.Trainer):
  """The train step's loss, metrics and gradients, jitted on t's mesh (no
  update): for comparing meshes and reading the step's all-to-alls."""
  replicated = NamedSharding(t.mesh, P())
  with jax.set_mesh(t.mesh):
    fn = jax.jit(steps.loss_and_grads(t.graphdef, seed=0),
                 in_shardings=(t.state_shardings, t.batch_sharding),
                 out_shardings=(replicated, replicated, t.state_shardings.params))
  return steps.under_mesh(t.mesh, fn)


def bytes_per_device(tree) -> int:
  """Bytes of the tree's arrays held on the first device."""
  dev = jax.devices()[0]
  return sum(s.data.nbytes for x in jax.tree.leaves(tree)
             for s in x.addressable_shards if s.device == dev)


def batches(steps: int = 3):
  rng = np.random.default_rng(7)
  return [rng.integers(0, 128, (GLOBAL_BATCH, SEQ_LEN + 1), dtype=np.int32)
          for _ in range(steps)]


# --- Reading a compiled step's all-to-alls -------------------------------------

_ITEMSIZE = {'f32': 4, 'bf16': 2, 'f16': 2, 's32': 4, 'u32': 4, 'pred': 1}
_A2A = re.compile(r'= (.*?) all-to-all(?:-start)?\(.*?replica_groups=(\{\{[\d,{}]*\}\}|'
                  r'\[[\d,]+\]<=\[[\d,]+\](?:T\([\d,]+\))?)')


def _groups(text: str) -> list[list[int]]:
  """HLO replica groups, listed ({{0,1},{2,3}}) or as an iota
  ([2,2]<=[4] or [2,2]<=[2,2]T(1,0)), as lists of partition ids."""
  if text.startswith('{'):
    return [[int(i) for i in g.split(',')] for g in re.findall(r'\{([\d,]+)\}', text)]
  shape, dims, perm = re.fullmatch(
      r'\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?', text).groups()
  ints = lambda s: [int(i) for i in s.split(',')]
  ids = np.arange(int(np.prod(ints(dims)))).reshape(ints(dims))
  if perm:
    ids = ids.transpose(ints(perm))
  return ids.reshape(ints(shape)).tolist()


def all_to_alls(hlo: str) -> list[tuple[int, list[list[int]]]]:
  """(bytes one device hands to the op, replica groups) of every all-to-all
  of a compiled HLO module; a device sends 1/len(group) of its bytes to each
  member of its group (itself included)."""
  out = []
  for result, groups in _A2A.findall(hlo):
    nbytes = sum(_ITEMSIZE[dtype] * int(np.prod([int(n) for n in dims.split(',') if n]))
                 for dtype, dims in re.findall(r'(\w+)\[([\d,]*)\]', result))
    out.append((nbytes, _groups(groups)))
  return out
