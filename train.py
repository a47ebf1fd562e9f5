"""Pretrains an MoE (or dense) language model; resumes from --workdir.

Intentionally kept short: flags in, the RunConfig built once
(`moe.run_config.build`), `moe.train_lib.train(run, workdir)`.

  python train.py                                   # CPU Switch recipe, embedded corpus
  python train.py --config configs/gshard.py:cpu --workdir runs/gshard \\
      --config.moe.num_experts=16 --config.num_steps=500
Multi-host: on TPU pod slices and under Slurm, jax.distributed is
auto-detected; elsewhere pass --coordinator_address, --num_processes and
--process_id on every process.
"""

import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # configs/

from moe import cli, config_flag, run_config, train_lib  # noqa: E402


def main(argv):
  del argv
  run = run_config.build(cli.CONFIG.value)
  cli.init_distributed()
  result = train_lib.train(run, cli.WORKDIR.value, command=shlex.join(sys.argv))
  print(f"step {result['step']}: train loss {result['train'].get('loss', float('nan')):.4f}, "
        f"eval loss {result['eval'].get('loss', float('nan')):.4f}")


if __name__ == '__main__':
  config_flag.run(main)
