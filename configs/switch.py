"""Switch Transformer recipe (Fedus et al. 2021): top-1 routing, MoE every
other layer, capacity factor 1.25, aux loss 0.01.

Variants (`--config configs/switch.py:VARIANT`):
  cpu  (default) a ~3M-total-parameter model that trains in minutes on a
       laptop CPU on the embedded Python-stdlib corpus:
         python train.py --config configs/switch.py:cpu --workdir runs/switch
  1b   ~1.0B total parameters (32 experts, d=1024, 16 layers, bf16), for a
       TPU v5p-32 slice or one 8xH100/H200 node; needs a real corpus:
         python train.py --config configs/switch.py:1b --workdir gs://B/switch1b \\
           --config.data.name=c4/en --config.data.data_dir=gs://B/tfds
"""

from configs import base


def get_config(arg: str = 'cpu'):
  c = base.get_config()
  c.moe.top_k = 1
  if arg == 'cpu':
    c.num_steps = 1000
  elif arg == '1b':
    real_scale(c)
    c.moe.num_experts = 32
  else:
    raise ValueError(f"unknown variant {arg!r} of configs/switch.py; choose 'cpu' or '1b'.")
  return c


def real_scale(c):
  """The shared ~1B-total-parameter shape (bf16, long sequences, big batch)."""
  c.model.d_model = 1024
  c.model.num_layers = 16
  c.model.num_heads = 16
  c.model.head_dim = 64
  c.model.mlp_dim = 4096
  c.model.max_seq_len = 2048
  c.model.dtype = 'bfloat16'
  c.model.remat = True
  c.moe.expert_dim = 1024
  c.moe.group_size = 4096
  c.batch_size = 256
  c.seq_len = 2048
  c.num_steps = 100_000
  c.optimizer.learning_rate = 3e-4
  c.optimizer.warmup_steps = 2000
  c.eval_every = 2000
  c.checkpoint_every = 1000
  c.log_every = 100
  c.eval_batches = 32
