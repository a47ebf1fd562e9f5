"""Dense Transformer baseline (no MoE layer).

Variants (`--config configs/dense.py:VARIANT`):
  cpu  (default) laptop CPU, embedded corpus:
         python train.py --config configs/dense.py:cpu --workdir runs/dense
  1b   ~0.8B parameters (d=2048, 16 layers, bf16) for a TPU v5p-32 slice or one
       8xH100/H200 node:
         python train.py --config configs/dense.py:1b --workdir gs://B/dense1b \\
           --config.data.name=c4/en --config.data.data_dir=gs://B/tfds
"""

from configs import base, switch


def get_config(arg: str = 'cpu'):
  c = base.get_config()
  c.mesh = (-1, 1, 1)
  if arg == 'cpu':
    pass
  elif arg == '1b':
    switch.real_scale(c)
    c.model.d_model = 2048
    c.model.mlp_dim = 5632
    c.model.head_dim = 128
  else:
    raise ValueError(f"unknown variant {arg!r} of configs/dense.py; choose 'cpu' or '1b'.")
  c.moe = None
  return c
