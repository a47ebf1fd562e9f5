"""Sweep: routers, zipped with their top-k and gate handling (a zip: the
lists are taken together, not crossed), on the CPU recipe's trunk.

  python scripts/sweep.py --sweep configs/sweeps/routers.py --workdir runs/sweeps/routers
  python scripts/sweep.py --sweep configs/sweeps/routers.py:small   # 200 steps each

Runs: router=tokens_choose,top_k=1,renormalize_gates=False (Switch),
router=tokens_choose,top_k=2,renormalize_gates=True (GShard-style),
router=experts_choose,top_k=1,renormalize_gates=False (experts choose; not
causal, warns).
"""


def get_sweep(arg: str = ''):
  sweep = {
      'config': 'configs/switch.py:cpu',
      'zip': {
          'moe.router': ['tokens_choose', 'tokens_choose', 'experts_choose'],
          'moe.top_k': [1, 2, 1],
          'moe.renormalize_gates': [False, True, False],
      },
      'fixed': {},
  }
  if arg == 'small':
    sweep['fixed'].update(num_steps=200, eval_every=100)
  elif arg:
    raise ValueError(f"unknown variant {arg!r} of configs/sweeps/routers.py; use '' or 'small'.")
  return sweep
