"""Sweep: the CPU Switch recipe re-derived under shuffled rows (issue 17), one
knob at a time around configs/switch.py:cpu (a zip: column i is run i).

  python scripts/sweep.py --sweep configs/sweeps/recipe.py --workdir runs/sweeps/recipe --noeval

Run 0 is the recipe as shipped; each other run changes one knob: MoE every
other layer, routing groups of 1,024 and 2,048 tokens, capacity factor 2.0,
dropless dispatch, 16 experts at the same active compute (top-1 of 16, each
as wide as before), aux coefficient 0.001, and learning rates 1.5e-3 and
6e-3. The twins' learning-rate grid is scripts/compare.py with
--config.optimizer.learning_rate (every arm at every rate); docs/performance.md
holds the measured tables.
"""

DEFAULT = {
    'model.moe_every': 1, 'moe.group_size': 256,
    'moe.train_capacity_factor': 1.25, 'moe.dispatch': 'gather',
    'moe.num_experts': 8, 'moe.aux_loss_coef': 0.01,
    'optimizer.learning_rate': 3e-3,
}
CHANGES = [
    {}, {'model.moe_every': 2}, {'moe.group_size': 1024},
    {'moe.group_size': 2048}, {'moe.train_capacity_factor': 2.0},
    {'moe.dispatch': 'dropless'}, {'moe.num_experts': 16},
    {'moe.aux_loss_coef': 0.001}, {'optimizer.learning_rate': 1.5e-3},
    {'optimizer.learning_rate': 6e-3},
]


def get_sweep(arg: str = ''):
  if arg:
    raise ValueError(f"unknown variant {arg!r} of configs/sweeps/recipe.py; use ''.")
  return {
      'config': 'configs/switch.py:cpu',
      'zip': {k: [{**DEFAULT, **c}[k] for c in CHANGES] for k in DEFAULT},
      'fixed': {},
  }
