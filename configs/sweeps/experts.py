"""Sweep: number of experts x training capacity factor of the CPU Switch
recipe (9 runs of configs/switch.py:cpu, 600 steps each on the embedded corpus).

  python scripts/sweep.py --sweep configs/sweeps/experts.py --workdir runs/sweeps/experts
  python scripts/sweep.py --sweep configs/sweeps/experts.py --metric eval/loss \\
      --x moe.num_experts --report_only

Runs are named num_experts=8,train_capacity_factor=1.25 etc. The recipe's mesh
(1, -1, 1) puts experts over every device: on N devices the expert counts
must divide by N (the sweep checks every run before starting any).
"""


def get_sweep(arg: str = ''):
  del arg
  return {
      'config': 'configs/switch.py:cpu',
      'grid': {
          'moe.num_experts': [4, 8, 16],
          'moe.train_capacity_factor': [1.0, 1.25, 2.0],
      },
      'fixed': {
          'eval_every': 250,
      },
  }
