"""GShard recipe (Lepikhin et al. 2020): top-2 routing with capacity, MoE
every other layer.

Variants (`--config configs/gshard.py:VARIANT`):
  cpu  (default) laptop CPU, embedded corpus:
         python train.py --config configs/gshard.py:cpu --workdir runs/gshard
  1b   ~1B total parameters (32 experts of width 1024, bf16) for a TPU v5p-32
       slice or one 8xH100/H200 node:
         python train.py --config configs/gshard.py:1b --workdir gs://B/gshard1b \\
           --config.data.name=c4/en --config.data.data_dir=gs://B/tfds
"""

from configs import base, switch


def get_config(arg: str = 'cpu'):
  c = base.get_config()
  c.moe.top_k = 2
  if arg == 'cpu':
    c.moe.expert_dim = 256
  elif arg == '1b':
    switch.real_scale(c)
    c.moe.num_experts = 32
  else:
    raise ValueError(f"unknown variant {arg!r} of configs/gshard.py; choose 'cpu' or '1b'.")
  return c
