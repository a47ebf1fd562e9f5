"""The small MoE model, optimizer and batches shared by the sharding tests
and the multi-process worker (prime-ish sizes to ease shape tracing)."""

import jax
import numpy as np
import optax

from moe import sharding, train_lib
from moe.config import ModelConfig, MoeConfig

GLOBAL_BATCH, SEQ_LEN = 16, 8


def model_config(dispatch: str, balance_scope: str = 'group') -> ModelConfig:
  return ModelConfig(
      vocab_size=128, d_model=24, num_layers=2, num_heads=4, head_dim=6,
      mlp_dim=40, max_seq_len=SEQ_LEN,
      moe=MoeConfig(num_experts=8, top_k=2, expert_dim=12, group_size=SEQ_LEN,
                    dispatch=dispatch, train_capacity_factor=1.0,
                    min_capacity=1, balance_scope=balance_scope),
      moe_every=1)


def build(mesh_shape, dispatch: str, devices=None, balance_scope: str = 'group',
          fsdp: bool = False):
  """(Setup, initial TrainState) on a mesh of the given shape."""
  cfg = model_config(dispatch, balance_scope)
  sharding.validate_layout(cfg, mesh_shape, global_batch=GLOBAL_BATCH,
                           seq_len=SEQ_LEN)
  s = train_lib.setup(cfg, optax.adamw(3e-3), sharding.make_mesh(mesh_shape, devices),
                      fsdp=fsdp)
  return s, s.init(jax.random.key(0))


def batches(steps: int = 3):
  rng = np.random.default_rng(7)
  return [rng.integers(0, 128, (GLOBAL_BATCH, SEQ_LEN + 1), dtype=np.int32)
          for _ in range(steps)]
