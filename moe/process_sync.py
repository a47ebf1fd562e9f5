"""What every process of a run must agree on: one JSON object from each
process, one error raised on all of them, one line printed by process 0."""

from __future__ import annotations

import json
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils


def per_process(obj) -> list:
  """The JSON-serializable `obj` of every process, in process order (the
  checkpoint's data item holds every process's training-iterator state)."""
  if jax.process_count() == 1:
    return [obj]
  raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.int32(raw.size)))
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:raw.size] = raw
  rows = np.asarray(multihost_utils.process_allgather(padded))
  return [json.loads(rows[i, :sizes[i]].tobytes()) for i in range(len(sizes))]


def print0(msg: str) -> None:
  """A progress line on process 0 (absl's INFO log is orbax's chatter)."""
  if jax.process_index() == 0:
    print(msg, flush=True)


def raise_on_all(message: str | None, error: type[Exception]) -> None:
  """Raises `error` on every process with the first message any process
  has (each from its own check), so that all stop together."""
  message = next((m for m in per_process(message) if m), None)
  if message:
    raise error(message)


def refused_by_any(check: Callable[[], Any], error: type[Exception]):
  """Runs `check` here; if it raised `error` on any process, raises it on
  every process with that process's message. Returns check's result."""
  result, message = None, None
  try:
    result = check()
  except error as e:
    message = str(e)
  raise_on_all(message, error)
  return result
