"""One live trainer per workdir: a lease on `workdir/LOCK`, held by process 0
for the run's life.

The lock is a small JSON record (holder's host, pid, command, start time, a
random token and the time of its last heartbeat). A thread renews the
heartbeat every HEARTBEAT_SECONDS. A lock is *stale*, and taken over with a
notice, when its heartbeat is older than LEASE_SECONDS (a job killed or
preempted on any host) or, on the same host, at once when its process is
gone. A live lock refuses a second trainer in one line naming the holder.

Taking the lock works the same on a local disk and on GCS, without
compare-and-swap: write our record, wait SETTLE_SECONDS, read it back. Two
trainers starting together both write; the last write wins, and each
reads it back after both writes have landed, so exactly one sees its own
token. (On GCS, a write is one atomic object upload, strongly consistent
for the read that follows; SETTLE_SECONDS there covers an upload's
latency. Locally the record is replaced atomically by a rename.) The holder
checks the record at every heartbeat: a holder that finds another token
has lost the lock (it was stalled for longer than the lease) and the loop
stops before its next checkpoint save (`check`).

eval.py and the reports only read a workdir and take no lock.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

from etils import epath

from moe import run_dir
from moe.user_error import UserError

LOCK_NAME = 'LOCK'
HEARTBEAT_SECONDS = 10.0
LEASE_SECONDS = 60.0
SETTLE_SECONDS = {'local': 0.2, 'remote': 2.0}


class WorkdirLockedError(UserError, RuntimeError):
  """Another live trainer holds the workdir (the message names it)."""


def _unknown(command: str) -> dict:
  """The record of a lock whose holder cannot be read: stale (heartbeat at
  the epoch)."""
  return {'token': '', 'host': '?', 'pid': -1, 'command': command,
          'started': 0.0, 'heartbeat': 0.0}


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:   # someone else's process: alive
    return True
  return True


def describe(record: dict, now: float | None = None) -> str:
  """'host H, pid P, started T, last heartbeat N s ago'."""
  now = time.time() if now is None else now
  started = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(record['started']))
  return (f"host {record['host']}, pid {record['pid']}, started {started}, "
          f"last heartbeat {now - record['heartbeat']:.0f} s ago")


def stale_reason(record: dict, now: float | None = None) -> str | None:
  """Why the lock `record` no longer holds (None: its holder is live)."""
  now = time.time() if now is None else now
  if record['host'] == socket.gethostname() and not _pid_alive(record['pid']):
    return f"its process {record['pid']} is gone"
  age = now - record['heartbeat']
  if age > LEASE_SECONDS:
    return f'no heartbeat for {age:.0f} s (lease {LEASE_SECONDS:.0f} s)'
  return None


class RunLock:
  """The lock of `workdir`; `acquire` it, `check` it at each save, `release`
  it at the end."""

  def __init__(self, workdir: str, command: str):
    self.path = epath.Path(workdir) / LOCK_NAME
    self._remote = run_dir.is_remote(workdir)
    now = time.time()
    self.record = {'token': uuid.uuid4().hex, 'host': socket.gethostname(),
                   'pid': os.getpid(), 'command': command, 'started': now,
                   'heartbeat': now}
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self.lost_to: dict | None = None   # the record that replaced ours

  def read(self) -> dict | None:
    """The lock's record, None if there is none. A record that cannot be
    parsed (a writer killed mid-write on a filesystem without atomic
    replace) counts as stale: its heartbeat is the epoch."""
    try:
      text = self.path.read_text()
    except FileNotFoundError:
      return None
    try:
      record = json.loads(text)
      record['heartbeat'] = float(record['heartbeat'])
      return record
    except (ValueError, KeyError, TypeError):
      return _unknown('?')

  def _write(self) -> None:
    text = json.dumps(self.record)
    if self._remote:   # one object upload: atomic
      self.path.write_text(text)
      return
    tmp = self.path.parent / f'.{LOCK_NAME}.{self.record["token"]}'
    tmp.write_text(text)
    os.replace(tmp, self.path)

  def acquire(self) -> str | None:
    """Takes the lock, or raises WorkdirLockedError naming the live holder.
    Returns a notice when a stale lock was taken over, else None."""
    held = self.read()
    notice = None
    if held is not None:
      reason = stale_reason(held)
      if reason is None:
        raise self._refusal(held)
      notice = (f'taking over the stale lock {self.path} of '
                f'{describe(held)}: {reason}')
    self._write()
    time.sleep(SETTLE_SECONDS['remote' if self._remote else 'local'])
    held = self.read()
    if held is None or held['token'] != self.record['token']:
      raise self._refusal(held or self.record)
    self._thread = threading.Thread(target=self._heartbeat, daemon=True,
                                    name='workdir-lock-heartbeat')
    self._thread.start()
    return notice

  def _refusal(self, held: dict) -> WorkdirLockedError:
    return WorkdirLockedError(
        f'{self.path.parent} is in use by another trainer ({describe(held)}; '
        f"command: {held['command']}). Wait for it to finish, stop it, or use "
        f'another workdir; a lock whose holder died is taken over once its '
        f'heartbeat is {LEASE_SECONDS:.0f} s old (at once on the same host).')

  def _heartbeat(self) -> None:
    while not self._stop.wait(HEARTBEAT_SECONDS):
      try:
        held = self.read()
        if held is None or held['token'] != self.record['token']:
          self.lost_to = held or _unknown('(lock file deleted)')
          return
        self.record['heartbeat'] = time.time()
        self._write()
      except OSError:   # a transient filesystem error: try at the next beat
        continue

  def check(self) -> str | None:
    """None while we hold the lock; else why not (for the loop to stop)."""
    if self.lost_to is None:
      return None
    return (f'the lock {self.path} was taken over ({describe(self.lost_to)}; '
            f"command: {self.lost_to['command']}) while this trainer was "
            'stalled for longer than the lease')

  def release(self) -> None:
    """Stops the heartbeat and removes the lock, if it is still ours."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    held = self.read()
    if held is not None and held['token'] == self.record['token']:
      self.path.unlink(missing_ok=True)
