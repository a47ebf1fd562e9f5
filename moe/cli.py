"""Flags shared by train.py and eval.py: the run (--config, --workdir) and
the multi-process launch.

On TPU pod slices and under Slurm jax.distributed detects the cluster by
itself; elsewhere every process gets --coordinator_address, --num_processes
and --process_id.
"""

import os

from absl import flags

from moe import config_flag, sharding

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = config_flag.define(
    os.path.join(_ROOT, 'configs', 'switch.py:cpu'),
    'Config file and variant, e.g. configs/switch.py:cpu (eval.py: the one '
    'the run was trained with, overrides included).')
WORKDIR = flags.DEFINE_string(
    'workdir', 'runs/switch_cpu', 'The run: checkpoints, metrics and config.')

_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None,
    'host:port of process 0 (multi-process without auto-detection).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the job.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process (0-based).')


def init_distributed() -> None:
  """jax.distributed from the flags (or the cluster's environment)."""
  sharding.init_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                            _PROCESS_ID.value)
