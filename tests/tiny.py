"""What the end-to-end tests share: the tiny Transformer trunk they shrink
recipes to, the loop settings of a short run, and reading its metrics."""

import json
import os


def shrink_trunk(c, seq_len: int = 32):
  """d_model 32, 2 layers of 2 heads x 16, dense width 64, sequences of
  `seq_len`; the MoE section is left as the recipe has it."""
  c.model.d_model = 32
  c.model.num_heads = 2
  c.model.head_dim = 16
  c.model.mlp_dim = 64
  c.model.num_layers = 2
  c.model.max_seq_len = c.seq_len = seq_len
  return c


def loop_settings(c, data_dir, num_steps=2):
  """Loop-only settings of a short run: no model or MoE change."""
  c.data.data_dir = data_dir
  c.num_steps = num_steps
  c.log_every = 1
  c.eval_every = num_steps
  c.eval_batches = 1
  c.final_eval_batches = 1
  c.progress_bar = False
  c.peak_flops_per_device = 1e12   # declared: no matmul probe
  return c


# A tiny MoE (2 layers, width 32, groups of 2 sequences) as --config
# overrides of configs/switch.py:cpu, for the scripts tests run as processes.
SWITCH_OVERRIDES = {
    'model.d_model': 32, 'model.num_layers': 2, 'model.num_heads': 2,
    'model.head_dim': 16, 'model.max_seq_len': 32, 'seq_len': 32,
    'moe.expert_dim': 32, 'moe.group_size': 64, 'batch_size': 8,
    'log_every': 1, 'peak_flops_per_device': 1e12, 'progress_bar': False,
}


def read_jsonl(workdir, *, complete_lines_only=False):
  """metrics.jsonl as dicts ([] before it exists); `complete_lines_only`
  skips a last line still being written (for polling a running process)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = f.read().split('\n')
  if complete_lines_only:
    lines = lines[:-1]   # after the last newline: empty or partial
  return [json.loads(line) for line in lines if line.strip()]
