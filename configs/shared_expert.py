"""Shared-expert recipe (DeepSeekMoE style): top-2 of many small routed
experts plus one always-active shared expert, MoE in every layer, with the
aux-loss-free balancing bias next to a small aux loss.

Variants (`--config configs/shared_expert.py:VARIANT`):
  cpu  (default) laptop CPU, embedded corpus:
         python train.py --config configs/shared_expert.py:cpu --workdir runs/shared
  1b   ~1.0B total parameters (32 routed experts of width 512 + 1 shared, bf16)
       for a TPU v5p-32 slice or one 8xH100/H200 node:
         python train.py --config configs/shared_expert.py:1b --workdir gs://B/se1b \\
           --config.data.name=c4/en --config.data.data_dir=gs://B/tfds
"""

from configs import base, switch


def get_config(arg: str = 'cpu'):
  c = base.get_config()
  c.model.moe_every = 1
  c.moe.top_k = 2
  c.moe.num_shared_experts = 1
  c.moe.renormalize_gates = True
  c.moe.balance_bias_rate = 1e-3
  c.moe.aux_loss_coef = 1e-3
  if arg == 'cpu':
    c.moe.num_experts = 16
    c.moe.expert_dim = 128
  elif arg == '1b':
    switch.real_scale(c)
    c.moe.num_experts = 32
    c.moe.expert_dim = 512
  else:
    raise ValueError(f"unknown variant {arg!r} of configs/shared_expert.py; choose 'cpu' or '1b'.")
  return c
