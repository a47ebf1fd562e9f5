"""Switch Transformer recipe (Fedus et al. 2021): top-1 routing, MoE every
other layer, capacity factor 1.25, aux loss 0.01.

Variants (`--config configs/switch.py:VARIANT`):
  cpu  (default) the comparison that runs in minutes on a laptop CPU on the
       embedded Python-stdlib corpus: d=128, 4 layers, MoE in EVERY layer
       (E=8, top-1, expert width 256), 600 steps of 16 x 128 tokens. Chosen
       under the old row order (every batch one file), where it looked
       level with its active-FLOP twin; on shuffled rows (2026-12-05,
       3 seeds) it is level with that twin within noise and behind its
       matched-total twin, and the dropless variant is ahead of the active
       twin (docs/performance.md section 1, with the one-knob-at-a-time
       sweep configs/sweeps/recipe.py).
         python train.py --config configs/switch.py:cpu --workdir runs/switch
         python scripts/compare.py --config configs/switch.py:cpu --workdir runs/compare
  gpu  ~490M total parameters (8 experts, d=1024, 8 layers, bf16) for one
       H100/H200; what scripts/gpu_check.sh measures:
         python train.py --config configs/switch.py:gpu --workdir runs/switch_gpu
  1b   ~1.0B total parameters (32 experts, d=1024, 16 layers, bf16), for a
       TPU v5p-32 slice or one 8xH100/H200 node; needs a real corpus:
         python train.py --config configs/switch.py:1b --workdir gs://B/switch1b \\
           --config.data.name=c4/en --config.data.data_dir=gs://B/tfds
  1b_4nodes  the 1b model on 4 nodes x 8 GPUs: experts inside each node
       (mesh (1, 8, 1): the all-to-all on NVLink), data across the nodes
       (dcn_mesh (4, 1, 1): only the gradient all-reduce on InfiniBand);
       scripts/plan.py --config configs/switch.py:1b_4nodes shows the split:
         scripts/launch_slurm.sh --nodes=4 --gpus_per_node=8 --workdir=/shared/runs/s1b \\
           --data_dir=/shared/tfds -- --config configs/switch.py:1b_4nodes \\
           --config.data.name=c4/en
  1b_fsdp  the 1b model on 32 or more devices with 8-way expert parallelism
       and data over the rest (mesh (-1, 8, 1)), its weights' d_model also
       sharded over `data` (fsdp=True, ZeRO-3 style): parameters and Adam
       state per device shrink by the data-axis size, for the price of
       gathering each layer's weights in the step:
         python train.py --config configs/switch.py:1b_fsdp --workdir gs://B/switch1b \\
           --config.data.name=c4/en --config.data.data_dir=gs://B/tfds
"""

from configs import base


def get_config(arg: str = 'cpu'):
  c = base.get_config()
  c.moe.top_k = 1
  if arg == 'cpu':
    c.model.moe_every = 1
    c.moe.expert_dim = 256
    c.num_steps = 600
    c.eval_every = 100
    c.eval_batches = 12     # periodic evals: 192 rows spread over the split;
                            # the last step's: the whole split (3,556 rows).
                            # All evals: 15.7% of the training time
                            # (scripts/bench.py, docs/performance.md)
    c.checkpoint_every = 200
  elif arg == 'gpu':
    one_gpu(c)
  elif arg in ('1b', '1b_4nodes', '1b_fsdp'):
    real_scale(c)
    c.moe.num_experts = 32
    if arg == '1b_4nodes':
      c.mesh = (1, 8, 1)
      c.dcn_mesh = (4, 1, 1)
    if arg == '1b_fsdp':
      c.mesh = (-1, 8, 1)
      c.fsdp = True
  else:
    raise ValueError(f"unknown variant {arg!r} of configs/switch.py; choose 'cpu', "
                     "'gpu', '1b', '1b_4nodes' or '1b_fsdp'.")
  return c


def one_gpu(c):
  """~490M total / ~135M active parameters in bf16: one H100/H200."""
  c.model.d_model = 1024
  c.model.num_layers = 8
  c.model.num_heads = 16
  c.model.head_dim = 64
  c.model.mlp_dim = 4096
  c.model.max_seq_len = 1024
  c.model.dtype = 'bfloat16'
  c.model.remat = True               # scripts/plan.py: 72.9 GiB without, 14.8 GiB with
  c.moe.expert_dim = 4096
  c.moe.group_size = 4096
  c.batch_size = 32
  c.seq_len = 1024
  c.mesh = (1, 1, 1)
  c.peak_flops_per_device = 989e12   # H100/H200 dense bf16 datasheet
  c.optimizer.learning_rate = 6e-4


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
  c.final_eval_batches = 256       # rows spread over c4's validation split
