"""Checkpoints: an orbax CheckpointManager holding, per step, the train state
(model + optimizer), the data iterator's state and the resolved config; and
the policy of a training (re)start: which step to resume (`resume_point`),
restoring it, falling back past damage and setting newer steps aside
(`restore_for_training`, `restore_iterator`).

Saves are asynchronous; a step directory appears only once its save has
committed, so a crash mid-save leaves the previous checkpoint as the latest
(orbax removes the partial temporary directory on the next start). Restores
always target the current mesh's shardings, so a checkpoint written under one
mesh restores under another. Errors from orbax are never swallowed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from moe import disk_space, process_sync, run_dir
from moe.user_error import UserError


def _path(keys) -> str:
  """A tree path as 'a/b/0/c', the same for live trees and orbax metadata."""
  parts = (getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))) for k in keys)
  return '/'.join(str(p) for p in parts)


class CheckpointError(UserError, RuntimeError):
  """A checkpoint that cannot be restored; the message names the step."""


class CheckpointMismatchError(CheckpointError):
  """A checkpoint whose shapes differ from the model config: never damage,
  so a fall-back restore does not skip it."""


class _ReadOnlyNotice(logging.Filter):
  """Drops orbax's warning, on every read-only manager, that its directory
  is read-only: eval.py and upcycling ask for exactly that."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith('Given directory is read only')


_READ_ONLY_NOTICE = _ReadOnlyNotice()


class _DiskFullNoise(logging.Filter):
  """Drops orbax's error logs (each with a traceback, from several
  threads) of a save that ran out of disk space: Checkpointer reports it
  in one line (disk_space.DiskFullError)."""

  def filter(self, record: logging.LogRecord) -> bool:
    text = str(record.msg) % record.args if record.args else str(record.msg)
    if 'No space left on device' in text:
      return False
    return not (record.exc_info and disk_space.is_disk_full(record.exc_info[1]))


_DISK_FULL_NOISE = _DiskFullNoise()


class Checkpointer:

  def __init__(self, directory: str, *, max_to_keep: int | None = None,
               read_only: bool = False):
    """read_only: for readers of another run's checkpoints (eval.py,
    upcycling), which must never create, clean up or delete anything there."""
    if not run_dir.is_remote(directory):  # orbax needs absolute local paths
      directory = os.path.abspath(directory)
    if read_only:
      logging.getLogger('absl').addFilter(_READ_ONLY_NOTICE)   # orbax logs through absl
    for logger in ('absl', 'asyncio'):   # orbax's logs; its tasks' errors
      logging.getLogger(logger).addFilter(_DISK_FULL_NOISE)
    self._saving: int | None = None   # the step of the last save started
    self.manager = ocp.CheckpointManager(
        directory,
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'data': ocp.JsonCheckpointHandler(),
                       'config': ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, read_only=read_only, create=not read_only,
            save_interval_steps=0 if read_only else 1,   # orbax warns otherwise
            enable_async_checkpointing=True, cleanup_tmp_directories=not read_only))

  @property
  def directory(self) -> str:
    return str(self.manager.directory)

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return max(self.all_steps(), default=None)

  def saved_config(self, step: int) -> dict | None:
    """The config (JSON) checkpoint `step` was saved with; None if it
    cannot be read (restore then reports the damage)."""
    try:
      return self.manager.restore(step, args=ocp.args.Composite(
          config=ocp.args.JsonRestore())).config
    except Exception:  # pylint: disable=broad-except
      return None

  def save(self, step: int, state, data_state: dict, config: dict) -> None:
    """Starts an async save of `state` (a pytree of jax.Arrays) at `step`.
    A save that runs out of disk space, this one or the previous one still
    being written, raises a one-line disk_space.DiskFullError."""
    self.wait_until_finished()
    self._saving = step
    with self._disk_full_as_one_line():
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=ocp.args.JsonSave(data_state),
          config=ocp.args.JsonSave(config)), force=True)

  def wait_until_finished(self) -> None:
    """Waits for the save in flight (DiskFullError if it ran out of space)."""
    with self._disk_full_as_one_line():
      self.manager.wait_until_finished()

  @contextlib.contextmanager
  def _disk_full_as_one_line(self):
    try:
      yield
    except Exception as e:  # orbax re-raises tensorstore's errors as ValueError
      if not disk_space.is_disk_full(e):
        raise
      raise disk_space.failed_save(self.directory, self._saving, self.latest_step()) from None

  def restore(self, step: int, abstract_state, state_shardings):
    """(state, data_state) of `step`, laid out by `state_shardings`."""
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract_state, state_shardings)
    self._check_shapes(step, target)
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target),
          data=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types; name the step, keep the cause
      raise CheckpointError(
          f'checkpoint step {step} in {self.manager.directory} cannot be '
          f'restored ({type(e).__name__}: {e}); it may be damaged. A training run '
          'can fall back to the previous step with restore_fallback=True.') from e
    return out.state, out.data

  def _check_shapes(self, step: int, target) -> None:
    """Refuses a checkpoint whose model shapes differ from the config's."""
    try:
      saved = self.manager.item_metadata(step).state
    except Exception:  # unreadable metadata: restore() reports the damage
      return
    if saved is None:
      return
    want = {_path(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(target)[0]}
    have = {_path(p): tuple(getattr(x, 'shape', None) or ())
            for p, x in jax.tree_util.tree_flatten_with_path(saved)[0]}
    bad = [f'{k}: checkpoint {have.get(k)} vs config {v}'
           for k, v in want.items() if k in have and tuple(have[k]) != tuple(v)]
    missing = sorted(set(want) - set(have))
    if bad or missing:
      detail = '; '.join(bad[:4] + [f'{k} missing' for k in missing[:4]])
      raise CheckpointMismatchError(
          f'checkpoint step {step} in {self.manager.directory} does not match '
          f'the model config: {detail}. Use the config it was trained with '
          f'(saved beside it as config) or a new workdir.')

  def restore_latest(self, abstract_state, state_shardings, *, fallback: bool,
                     at_most: int | None = None):
    """(step, state, data_state) of the newest restorable checkpoint (at or
    before `at_most` if given), or None when there is none.

    A damaged newest step raises, or with `fallback` is skipped (and logged)
    in favour of the previous one; a shape mismatch always raises."""
    steps = [s for s in self.all_steps() if at_most is None or s <= at_most]
    if at_most is not None and not steps:
      raise CheckpointError(
          f'restore_step={at_most}: no checkpoint at or before it in '
          f'{self.manager.directory}; available: {self.all_steps()}.')
    for step in reversed(steps):
      try:
        return (step,) + self.restore(step, abstract_state, state_shardings)
      except CheckpointMismatchError:
        raise
      except CheckpointError as e:
        if not fallback:
          raise
        logging.warning('skipping damaged checkpoint: %s', e)
    return None

  def set_aside_after(self, step: int, requested: int) -> str:
    """Moves the step directories newer than `step` into a sibling folder
    (kept, never deleted) so a run restarted (restore_step=`requested`) from
    `step` can save again. The folder is made even when empty: it marks the
    restart as done (`restarted_from`)."""
    return self._move_aside([s for s in self.all_steps() if s > step], f'after_{requested}')

  def set_aside_damaged(self, step: int | None) -> str | None:
    """Moves the step directories newer than `step` (None: all of them),
    which a fall-back restore skipped as damaged, into a sibling folder
    `<directory>.damaged.<time>` (kept, never deleted), so the resumed run
    can save those steps again. Returns the folder, or None if none moved."""
    newer = [s for s in self.all_steps() if step is None or s > step]
    return self._move_aside(newer, 'damaged') if newer else None

  def _move_aside(self, steps, label: str) -> str:
    aside = move_aside(self.manager.directory, steps, label)
    self.manager.reload()
    return aside

  def restarted_from(self, requested: int) -> bool:
    """True once a restart with restore_step=`requested` has happened."""
    return restarted_from(self.manager.directory, requested)

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def close(self) -> None:
    """Waits for the last save and closes; a save that ran out of space is
    a DiskFullError, raised once orbax's threads have stopped."""
    try:
      self.wait_until_finished()
    finally:
      with contextlib.suppress(Exception):   # the same failure, again
        self.manager.close()


def checkpoint_steps(workdir: str) -> list[int]:
  """Committed checkpoint steps of a run's workdir (local or gs://)."""
  directory = epath.Path(workdir) / 'checkpoints'
  if not directory.is_dir():
    return []
  return sorted(ocp.utils.checkpoint_steps(directory))


def latest_step(workdir: str) -> int | None:
  """The newest committed checkpoint step of a run's workdir, or None."""
  return max(checkpoint_steps(workdir), default=None)


def move_aside(directory, steps, label: str) -> str:
  """Moves the `steps` of a checkpoint directory (local or gs://, through
  epath as orbax) into a new sibling folder `<directory>.<label>.<time>`,
  kept, never deleted; returns it. A MOVING note, replaced by SET_ASIDE.txt
  once every step has moved, marks a move still under way
  (`restarted_from`) and makes the folder exist meanwhile: object stores
  have no empty folders, and a move into a folder that does not exist
  fails."""
  directory = epath.Path(directory)
  aside = directory.parent / f'{directory.name}.{label}.{time.strftime("%Y%m%d-%H%M%S")}'
  if aside.exists():
    raise FileExistsError(f'{aside} already exists; not merging into it.')
  aside.mkdir(parents=True)
  note = f'Checkpoint steps {list(steps)} moved here from {directory} ({label}).\n'
  (aside / 'MOVING').write_text(note)
  for s in steps:
    (directory / str(s)).rename(aside / str(s))
  (aside / 'SET_ASIDE.txt').write_text(note)
  (aside / 'MOVING').unlink()
  return str(aside)


def restarted_from(directory, requested: int) -> bool:
  """True once a restart with restore_step=`requested` has set the newer
  steps of this checkpoint directory aside: a folder of move_aside's with no
  MOVING note left in it (older folders have no notes at all)."""
  directory = epath.Path(directory)
  return any(not (p / 'MOVING').exists()
             for p in directory.parent.glob(f'{directory.name}.after_{requested}.*'))


def read_state(workdir: str, step: int, abstract_state, state_shardings):
  """The train state of another run's checkpoint `step` (eval.py,
  upcycling, routes), laid out by `state_shardings`; read-only."""
  ckpt = Checkpointer(str(epath.Path(workdir) / 'checkpoints'), read_only=True)
  try:
    return ckpt.restore(step, abstract_state, state_shardings)[0]
  finally:
    ckpt.close()


# --- A training (re)start -----------------------------------------------------------

def resume_point(ckpt: Checkpointer, restore_step: int) -> tuple[int | None, int | None]:
  """(at_most, step): the restore_step bound still to honour (None: the
  newest step) and the checkpoint step a restore will start from (None:
  a fresh run; a damaged newest step may make a fall-back restore older)."""
  at_most = None if restore_step < 0 else restore_step
  if at_most is not None and ckpt.restarted_from(at_most):
    # This restart already happened (a preempted restart re-runs the same
    # command): resume from the newest checkpoint instead of rewinding again.
    process_sync.print0(f'restore_step={at_most} was already honoured; resuming '
                        'from the newest step')
    at_most = None
  steps = [s for s in ckpt.all_steps() if at_most is None or s <= at_most]
  return at_most, max(steps, default=None)


def restore_for_training(ckpt: Checkpointer, abstract_state, state_shardings, *,
                         at_most: int | None, fallback: bool):
  """(step, state, data_state) to resume from, or None for a fresh run.
  Then process 0 moves aside (keeps) the steps newer than a restart from
  `at_most`, or those a fall-back skipped as damaged, so that this run can
  save them again; every process has looked before any moves."""
  restored = ckpt.restore_latest(abstract_state, state_shardings,
                                 fallback=fallback, at_most=at_most)
  multihost_utils.sync_global_devices('checkpoints restored')
  if at_most is not None and jax.process_index() == 0:
    aside = ckpt.set_aside_after(restored[0], at_most)
    process_sync.print0(f'restarting from step {restored[0]}: newer checkpoints '
                        f'(if any) moved to {aside}')
  elif fallback and jax.process_index() == 0:
    aside = ckpt.set_aside_damaged(None if restored is None else restored[0])
    if aside:
      process_sync.print0(f'damaged checkpoints moved to {aside}')
  multihost_utils.sync_global_devices('checkpoints set aside')
  ckpt.manager.reload()
  return restored


def restore_iterator(it, data_state: dict, step: int, order: str) -> None:
  """Puts this process's training iterator where checkpoint `step` left it
  (its data item holds every process's state). Another process count, or
  a state of another row order (another data.row_shuffle, or a checkpoint
  from before rows were shuffled), is a CheckpointError."""
  states = data_state['iterators']
  if len(states) != jax.process_count():
    raise CheckpointError(
        f'checkpoint step {step} was written by {len(states)} process(es) and '
        f'this run has {jax.process_count()}: the training data is sharded by '
        'process, so its data position cannot be restored exactly. Resume '
        f'with {len(states)} process(es).')
  state = states[jax.process_index()]
  try:
    it.set_state(state)
  except (KeyError, TypeError, ValueError) as e:
    raise CheckpointError(
        f'checkpoint step {step} holds a data-iterator state that does not fit '
        f"this run's '{order}' row order (state keys {sorted(state)}): it was "
        'written with another data.row_shuffle, or by a version that did not '
        'shuffle rows. Resume with the row order it was written with, or '
        'train in a new workdir.') from e
