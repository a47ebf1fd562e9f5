"""A damaged prepared corpus, reported in one line that names the file.

A prepared TFDS split is a few array_record shard files. A record that
cannot be read (array_record raises e.g. 'Corrupted Riegeli/records file:
block header hash mismatch') becomes a CorpusDamagedError naming the
dataset, the split, the shard file and the command that rebuilds it.
`scan` reads every record of a split and lists the damaged files
(`python -m moe.data --verify`).
"""

from __future__ import annotations

import bisect
import itertools
from typing import Any, NamedTuple

from moe.user_error import UserError


# What array_record raises for a record it cannot read or decode.
READ_ERRORS = (RuntimeError, OSError, ValueError)


class CorpusDamagedError(UserError, RuntimeError):
  """A prepared shard file that cannot be read (one line: file, rebuild)."""


class Damage(NamedTuple):
  file: str
  bad_records: int
  first_record: int   # the first unreadable record's index in the file


class CheckedSource:
  """A TFDS data source (len, [i]) whose read errors name their shard file.

  `shards`: (file, first record read, records read) per file, in order
  (TFDS's file instructions of the split)."""

  def __init__(self, source, *, dataset: str, split: str,
               shards: list[tuple[str, int, int]], rebuild_command: str):
    self._source = source
    self.dataset, self.split = dataset, split
    self._shards = [(str(f), int(skip), int(take)) for f, skip, take in shards]
    self._ends = list(itertools.accumulate(take for _, _, take in self._shards))
    self.rebuild_command = rebuild_command

  def __len__(self) -> int:
    return len(self._source)

  def locate(self, index: int) -> tuple[str, int]:
    """(shard file, record index in that file) of record `index`."""
    k = bisect.bisect_right(self._ends, index)
    file, skip, take = self._shards[k]
    return file, skip + index - (self._ends[k] - take)

  def __getitem__(self, index: int) -> Any:
    """Record `index`, or its read error as a CorpusDamagedError."""
    index = int(index)
    try:
      return self._source[index]
    except READ_ERRORS as e:
      file, record = self.locate(index)
      raise CorpusDamagedError(
          f'the prepared corpus {self.dataset!r} split {self.split!r} is '
          f'damaged: record {record} of {file} cannot be read '
          f'({_first_line(e)}). Rebuild it: {self.rebuild_command}') from None


def _first_line(e: BaseException) -> str:
  return (str(e).strip().splitlines() or [type(e).__name__])[0]


def scan(source: CheckedSource) -> list[Damage]:
  """Reads every record of `source`; the files holding unreadable ones."""
  bad: dict[str, list] = {}
  for i in range(len(source)):
    try:
      source[i]
    except CorpusDamagedError:
      file, record = source.locate(i)
      bad.setdefault(file, [0, record])[0] += 1
  return [Damage(f, n, first) for f, (n, first) in bad.items()]
