"""The main job: an MoE and its two dense twins on the same data, one report.

  python scripts/compare.py --config configs/switch.py:cpu --workdir runs/compare
  python scripts/compare.py --config configs/switch.py:cpu --workdir runs/compare3 --seeds 3

Trains, one after another, the MoE of --config and its dense twins with
matched total parameters and matched active FLOPs per token (same seed, data
order, optimizer and token budget), for seeds 0..N-1 (the seed sets init,
router noise and data order; arms share it seed by seed), in
workdir/seed_{i}/{moe,dense_total,dense_active}, then writes
workdir/report.md and its plots: final validation losses with 95% intervals
(over seeds; with one seed, a bootstrap over validation documents), one
sentence per twin, and what seed 0's experts took (scripts/routes.py's
analysis of its final checkpoint, in seed_0/moe/routes/). Re-running resumes unfinished runs and skips finished
ones; --report_only rebuilds the report from the runs' files.
"""

import os
import shlex
import sys

from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # configs/

from moe import config_flag, report, routes_report, run_config, sweep  # noqa: E402

_CONFIG = config_flag.define(
    os.path.join(ROOT, 'configs', 'switch.py:cpu'),
    'The MoE config and variant.')
_WORKDIR = flags.DEFINE_string('workdir', 'runs/compare', 'Runs and report go here.')
_SEEDS = flags.DEFINE_integer('seeds', 1, 'Train each arm with seeds 0..N-1.',
                              lower_bound=1)
_REPORT_ONLY = flags.DEFINE_bool('report_only', False,
                                 'Only rebuild the report from existing runs.')


def main(argv):
  del argv
  if not _REPORT_ONLY.value:
    runs = {}
    for seed in range(_SEEDS.value):
      config = _CONFIG.value.copy_and_resolve_references()
      config.seed = seed
      for name, c in run_config.dense_twins(config).items():
        runs[os.path.join(_WORKDIR.value, f'seed_{seed}', name)] = c
    sweep.train_unfinished(runs, command=shlex.join(sys.argv))
    moe_dir = os.path.join(_WORKDIR.value, 'seed_0', 'moe')
    if not routes_report.is_current(moe_dir, runs[moe_dir].num_steps):
      routes_report.run(run_config.build(runs[moe_dir]), moe_dir, stability=False)
  print('report:', report.write_report(_WORKDIR.value))


if __name__ == '__main__':
  config_flag.run(main)
