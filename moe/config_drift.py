"""Config drift on resume: the config a checkpoint was saved with against the
one a restart brings.

Keys of RESTART_KEYS may change on a restart (how long, how often to log,
evaluate and save, how to lay the run out on devices, where the data
lives): they pass with a one-line notice. Any other change (model, MoE,
data, seed, optimizer, batch, sequence length) would make one run out of
two different ones, so it is refused with the list of differences, unless
`accept_config_change=True`: then it goes on, and the change is recorded
in `workdir/starts.jsonl` with the config of every start.

A field the saved config does not have at all was added to the code after
the checkpoint was written: at its default value it keeps the behaviour the
run was trained with (new fields are added so), so it passes with a notice;
set to anything else it is a change like any other.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from moe.config import ConfigError, ModelConfig, MoeConfig
from moe.data import DataConfig

# Dotted keys (a trailing '.' covers a whole section) that may change on a
# restart.
RESTART_KEYS = (
    'num_steps', 'log_every', 'eval_every', 'eval_batches',
    'final_eval_batches', 'checkpoint_every', 'max_to_keep', 'progress_bar',
    'peak_flops_per_device', 'restore_step', 'skip_batches',
    'restore_fallback', 'nonfinite', 'mesh', 'dcn_mesh', 'fsdp', 'init_from',
    'accept_config_change', 'data.data_dir', 'data.read_threads', 'eval.')


def flatten(tree: dict, prefix: str = '') -> dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1}; lists as tuples (JSON has no tuples)."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten(value, f'{prefix}{key}.'))
    else:
      out[prefix + key] = tuple(value) if isinstance(value, list) else value
  return out


def _may_change(key: str) -> bool:
  return any(key == k or (k.endswith('.') and key.startswith(k))
             for k in RESTART_KEYS)


def differences(saved: dict, new: dict) -> dict[str, tuple[Any, Any]]:
  """{dotted key: (saved value, new value)} of every key that differs (a
  key only one side has counts, with None on the other)."""
  a, b = flatten(saved), flatten(new)
  return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
          if a.get(k) != b.get(k)}


@functools.cache
def _field_defaults() -> dict[str, Any]:
  """{'moe.top_k': 1, ...}: the defaults of the typed config sections."""
  out = {}
  for prefix, cls in (('model.', ModelConfig), ('moe.', MoeConfig),
                      ('data.', DataConfig)):
    for f in dataclasses.fields(cls):
      if f.default is not dataclasses.MISSING:
        out[prefix + f.name] = f.default
  return out


def _listing(changes: dict[str, tuple[Any, Any]]) -> str:
  return '; '.join(f'{k}: {old!r} -> {new!r}' for k, (old, new) in changes.items())


def check(saved: dict, new: dict, *, step: int, accept: bool) -> tuple[dict, str | None]:
  """(differences, notice) of resuming checkpoint `step` (saved with config
  `saved`) under config `new`. Refuses, with a ConfigError listing them,
  changes outside RESTART_KEYS unless `accept`."""
  changes = differences(saved, new)
  if not changes:
    return changes, None
  had, defaults = flatten(saved), _field_defaults()

  def section_was_there(key: str) -> bool:   # a dense run's moe is None
    return isinstance(saved.get(key.split('.')[0]), dict)

  added = {k: v for k, v in changes.items() if k not in had and k in defaults
           and section_was_there(k) and v[1] == defaults[k]}
  drift = {k: v for k, v in changes.items()
           if not _may_change(k) and k not in added}
  if drift and not accept:
    raise ConfigError(
        f'resuming step {step} with a config that differs from the one it was '
        f'trained with: {_listing(drift)}. Resume with the saved config '
        '(workdir/config.json), train in a new workdir, or pass '
        '--config.accept_config_change=True to continue with these changes '
        '(recorded in workdir/starts.jsonl).')
  restart = {k: v for k, v in changes.items() if k not in drift and k not in added}
  parts = []
  if restart:
    parts.append(f'resuming step {step} with new settings: {_listing(restart)}')
  if added:
    parts.append('config fields added since this checkpoint was saved, at '
                 f'their defaults: {", ".join(f"{k}={v[1]!r}" for k, v in added.items())}')
  if drift:
    parts.append(f'ACCEPTED config changes (accept_config_change=True, recorded '
                 f'in starts.jsonl): {_listing(drift)}')
  return changes, '; '.join(parts)
