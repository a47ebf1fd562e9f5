"""Disk space for checkpoints, checked before it runs out.

A checkpoint holds the train state (parameters, optimizer moments, router
balance bias) at their stored dtypes, plus a few kilobytes of JSON. At its
fullest the checkpoint directory holds `max_to_keep` committed steps and
one being written (orbax deletes the oldest only after the new one
commits). So before training, the free space under a local workdir must
cover the checkpoints this run has still to add; before each save, one
more checkpoint. A gs:// workdir has no free-space figure and is not
checked.
"""

from __future__ import annotations

import errno
import os
import shutil

import jax

from moe import run_dir
from moe.user_error import UserError

# Per checkpoint, above the arrays' bytes: orbax's metadata, the data
# iterators' state and the config, as JSON, a few KB. The arrays' bytes
# alone are already above a checkpoint's files on disk (a tiny run: 991 KB
# against 952-979 KB; tests/test_accidents.py asserts 0-10% above).
OVERHEAD_BYTES = 64 << 10


class DiskFullError(UserError, RuntimeError):
  """Not enough space for a checkpoint; the message has both numbers."""


def checkpoint_bytes(abstract_state) -> int:
  """The bytes one checkpoint of `abstract_state` (ShapeDtypeStructs) takes."""
  arrays = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_state))
  return int(arrays) + OVERHEAD_BYTES


def free_bytes(path: str) -> int | None:
  """Free bytes for a non-root user on the filesystem of `path` (or of its
  nearest existing parent); None for a URL."""
  if run_dir.is_remote(path):
    return None
  path = os.path.abspath(path)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  return shutil.disk_usage(path).free


def saves_left(step: int, num_steps: int, every: int) -> int:
  """Checkpoints a run at `step` still writes: every `every` steps and at
  num_steps."""
  periodic = num_steps // every - step // every
  return periodic + (num_steps % every != 0 and num_steps > step)


def needed_bytes(per_checkpoint: int, *, kept: int, max_to_keep: int,
                 saves: int) -> int:
  """Bytes the checkpoint directory still grows by, at its fullest: from
  `kept` committed steps to max_to_keep plus one being written."""
  if saves <= 0:
    return 0
  fullest = min(max_to_keep, kept + saves - 1) + 1
  return max(fullest - kept, 1) * per_checkpoint


def _mb(n: int) -> str:
  return f'{n / 2**20:,.1f} MB'


def check_before_training(directory: str, per_checkpoint: int, *, kept: int,
                          max_to_keep: int, saves: int) -> None:
  """Refuses a run whose checkpoints cannot fit in the free space left."""
  free = free_bytes(directory)
  need = needed_bytes(per_checkpoint, kept=kept, max_to_keep=max_to_keep,
                      saves=saves)
  if free is not None and free < need:
    raise DiskFullError(
        f'not enough disk space for the checkpoints under {directory}: '
        f'{_mb(free)} free, {_mb(need)} needed ({min(max_to_keep, saves)} to '
        f'keep + 1 being written, {_mb(per_checkpoint)} each, {kept} already '
        'there). Free some space, lower max_to_keep, or use another workdir.')


def check_before_save(directory: str, per_checkpoint: int, step: int,
                      last_saved: int | None) -> None:
  """Refuses to start a save of `step` that would not fit."""
  free = free_bytes(directory)
  if free is not None and free < per_checkpoint:
    raise DiskFullError(_stopped(directory, step, last_saved, free, per_checkpoint))


def _stopped(directory, step, last_saved, free, needed=None) -> str:
  kept = (f'the last checkpoint, step {last_saved}, is intact'
          if last_saved is not None else 'no checkpoint was saved yet')
  need = f', {_mb(needed)} needed' if needed else ''
  return (f'disk full: checkpoint step {step} not saved under {directory} '
          f'({_mb(free)} free{need}); {kept}. Free some space and re-run the '
          'same command to resume.')


def is_disk_full(e: BaseException) -> bool:
  """Whether `e` (or an exception it was raised from) is 'no space left':
  an OSError with ENOSPC, or tensorstore's RESOURCE_EXHAUSTED text, which
  orbax re-raises as a ValueError."""
  while e is not None:
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
      return True
    if 'No space left on device' in str(e):
      return True
    e = e.__cause__ or e.__context__
  return False


def failed_save(directory: str, step: int | None,
                last_saved: int | None) -> DiskFullError:
  """The one-line error of a save that ran out of space while writing."""
  return DiskFullError(_stopped(directory, step, last_saved,
                                free_bytes(directory) or 0))
