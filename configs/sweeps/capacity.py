"""Sweep: what dropping costs. The CPU Switch recipe trained with capacity
factor 1.0, 1.25 and 2.0 and with the dropless dispatch (a zip), side by side
(validation loss, dropped fraction, step time). docs/performance.md holds a
measured run.

  python scripts/sweep.py --sweep configs/sweeps/capacity.py --workdir runs/sweeps/capacity
  python scripts/sweep.py --sweep configs/sweeps/capacity.py:short   # 200 steps each,
                                                   # in runs/sweeps/capacity_short
"""


def get_sweep(arg: str = ''):
  sweep = {
      'config': 'configs/switch.py:cpu',
      'zip': {
          'moe.dispatch': ['gather', 'gather', 'gather', 'dropless'],
          'moe.train_capacity_factor': [1.0, 1.25, 2.0, 1.25],
      },
      'fixed': {},
  }
  if arg == 'short':
    sweep['fixed'].update(num_steps=200, eval_every=100, checkpoint_every=200)
  elif arg:
    raise ValueError(f"unknown variant {arg!r} of configs/sweeps/capacity.py; use '' or 'short'.")
  return sweep
