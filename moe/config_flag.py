"""The --config flag of every command (train.py, eval.py, scripts/): a locked
ml_collections config file flag, and `run`, their `app.run`.

A --config.FIELD override of a field that does not exist is reported like
any other bad flag, in one line that names it and the close match, exit 1.
ml_collections raises it as a KeyError wrapped in an AttributeError, when
the flag is defined (it applies sys.argv's overrides to the default config)
or when flags are parsed; absl would print either as a traceback.
"""

import contextlib
import functools
import logging as py_logging
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from moe.user_error import UserError


@contextlib.contextmanager
def _unknown_fields_in_one_line(argv: list[str]):
  try:
    yield
  except (AttributeError, KeyError) as e:
    reason = e
    while isinstance(reason, BaseException) and reason.args:
      reason = reason.args[0]   # the innermost message, not its repr
    key = re.match(r"'([^']+)'", str(reason))
    bad = [a.split('=')[0] for a in argv if key and a.startswith('--config.')
           and key.group(1) in a.split('=')[0].split('.')[1:]]
    if not bad:
      raise   # not a misspelled override: a real error, with its traceback
    hint = str(reason)[key.end():].strip()
    sys.stderr.write(f'FATAL Flags parsing error: {bad[0]}: the config has no '
                     f'field {key.group(0)}. {hint}'.rstrip() + '\n')
    sys.exit(1)


def define(default: str, help_text: str):
  """DEFINE_config_file('config', default), locked: a typo cannot add a key."""
  with _unknown_fields_in_one_line(sys.argv):
    return config_flags.DEFINE_config_file('config', default, help_text,
                                           lock_config=True)


def parse(argv: list[str]) -> list[str]:
  """absl's own parsing, for `app.run(main, flags_parser=parse)`."""
  with _unknown_fields_in_one_line(argv):
    return app.parse_flags_with_usage(argv)


def quiet_logs() -> None:
  """Warnings and up from every logger (orbax logs each save at INFO),
  unless the command line asked for --verbosity."""
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
    py_logging.getLogger().setLevel(py_logging.WARNING)


def run(main) -> None:
  """`app.run(main)` with this module's flag parser and quiet logs
  (`quiet_logs`). A UserError is
  reported like a bad flag: `FATAL <error>: <message>`, exit 1, without the
  traceback (whose chained causes can run to hundreds of lines, e.g. TFDS's
  list of every dataset); --verbosity (absl's) keeps it. Any other error
  keeps its traceback."""

  @functools.wraps(main)
  def main_reporting_user_errors(argv):
    quiet_logs()
    try:
      return main(argv)
    except UserError as e:
      if flags.FLAGS['verbosity'].present:
        raise
      sys.stderr.write(f'FATAL {type(e).__name__}: {e}\n')
      sys.exit(1)

  app.run(main_reporting_user_errors, flags_parser=parse)
