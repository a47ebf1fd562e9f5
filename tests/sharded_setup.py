"""The small MoE model, optimizer and batches shared by the sharding tests
and the multi-process worker (prime-ish sizes to ease shape tracing)."""

import re

import jax
import numpy as np
import optax

from moe import sharding, train_lib
from moe.config import ModelConfig, MoeConfig

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
  """(Setup, initial TrainState) on a mesh of the given (whole) shape, with
  `dcn_shape` domains per axis; `moe_kw`: (name, value) pairs changing the
  MoE layer."""
  cfg = model_config(dispatch, balance_scope, **dict(moe_kw))
  sharding.validate_layout(cfg, mesh_shape, global_batch=GLOBAL_BATCH,
                           seq_len=SEQ_LEN)
  mesh = sharding.make_mesh(mesh_shape, devices, dcn_shape)
  s = train_lib.setup(cfg, optax.adamw(3e-3), mesh, fsdp=fsdp)
  return s, s.init(jax.random.key(0))


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
