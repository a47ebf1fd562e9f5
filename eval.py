"""Evaluates the latest (or --config.eval.checkpoint_step) checkpoint of a
run under the current mesh and writes workdir/eval.json.

  python eval.py --config configs/switch.py:cpu --workdir runs/switch_cpu
Pass the same config (and overrides) the run was trained with.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # configs/

import jax  # noqa: E402

from moe import cli, config_flag, eval_lib, run_config  # noqa: E402


def main(argv):
  del argv
  run = run_config.build(cli.CONFIG.value)
  cli.init_distributed()
  result = eval_lib.run_eval(run, cli.WORKDIR.value)
  if jax.process_index() == 0:
    print(eval_lib.format_table(result))


if __name__ == '__main__':
  config_flag.run(main)
