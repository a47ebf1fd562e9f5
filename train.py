"""Pretrains an MoE (or dense) language model; resumes from --workdir.

Intentionally kept short: flags in, `moe.train_lib.train(config, workdir)`.

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

from moe import cli, config_flag  # noqa: E402  (the flags)


def main(argv):
  del argv
  from moe.run_config import quiet_logs
  quiet_logs()
  from moe import train_lib  # after flags: jax starts here
  cli.init_distributed()
  result = train_lib.train(cli.CONFIG.value, cli.WORKDIR.value,
                           command=shlex.join(sys.argv))
  print(f"step {result['step']}: train loss {result['train'].get('loss', float('nan')):.4f}, "
        f"eval loss {result['eval'].get('loss', float('nan')):.4f}")


if __name__ == '__main__':
  config_flag.run(main)
