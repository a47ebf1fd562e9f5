"""Token categories for the routes analysis: a label for every byte of a text.

A labeller maps a document's bytes to one category index per byte, indices
into its `CATEGORIES` attribute (the tuple of category names). Two ship
here:

* `python`: the category of the Python `tokenize` token that holds the byte:
  keyword, builtin name, other identifier, operator/punctuation, string,
  comment, number; whitespace outside strings and comments is
  indentation/newline (a newline, or the whitespace before a line's first
  token) or other whitespace. Bytes of a document that `tokenize` cannot
  finish (a Python 2 file, an unterminated string) keep what was labelled
  before the error; the rest are 'other' (non-whitespace) or whitespace.
  Bytes that are not UTF-8 read as one U+FFFD character each.
* `bytes`: byte classes for any text: letter, digit, punctuation, space,
  newline, non-ASCII.

`get(spec)` takes 'python', 'bytes' or 'package.module:function' for a
user's own labeller with the same signature: `(text: bytes) -> np.ndarray`
of indices into its `CATEGORIES` attribute, the tuple of its names.
"""

from __future__ import annotations

import builtins
import importlib
import io
import keyword
import re
import string
import tokenize
from collections.abc import Callable

import numpy as np

from moe.config import ConfigError

# The extra category of a token that stands for no bytes (EOS, PAD).
END_OF_TEXT = 'end of text'

PYTHON = ('keyword', 'builtin name', 'identifier', 'operator/punctuation',
          'string', 'comment', 'number', 'indentation/newline',
          'other whitespace', 'other')
_P = {name: i for i, name in enumerate(PYTHON)}
_BUILTINS = frozenset(n for n in dir(builtins) if not n.startswith('_'))
_STRING_TYPES = {tokenize.STRING} | {
    getattr(tokenize, n) for n in ('FSTRING_START', 'FSTRING_MIDDLE',
                                   'FSTRING_END') if hasattr(tokenize, n)}
_SURROGATE = re.compile('[\udc80-\udcff]')
_SPACE = np.zeros(256, bool)
_SPACE[[ord(c) for c in ' \t\r\f\v']] = True


def _char_to_byte(line: str) -> np.ndarray | None:
  """Byte offset of each character of `line` (and its end); None if ASCII."""
  if line.isascii():
    return None
  widths = [len(ch.encode('utf-8', 'surrogateescape')) for ch in line]
  return np.concatenate([[0], np.cumsum(widths)])


def python(text: bytes) -> np.ndarray:
  """PYTHON category index of every byte of `text`."""
  raw = np.frombuffer(text, np.uint8)
  labels = np.full(len(raw), _P['other'], np.uint8)
  labels[_SPACE[raw]] = _P['other whitespace']
  newline = raw == ord('\n')
  labels[newline] = _P['indentation/newline']
  # Whitespace before a line's first non-whitespace byte: indentation.
  line_id = np.cumsum(newline) - newline              # the line of each byte
  seen_text = np.zeros(len(raw), bool)
  body = ~(_SPACE[raw] | newline)
  if len(raw):
    first_text = np.full(line_id[-1] + 1, len(raw))
    np.minimum.at(first_text, line_id[body], np.flatnonzero(body))
    seen_text = np.arange(len(raw)) >= first_text[line_id]
  labels[_SPACE[raw] & ~seen_text] = _P['indentation/newline']

  source = text.decode('utf-8', 'surrogateescape')   # a bad byte: one character
  lines = source.split('\n')
  line_start = np.concatenate(
      [[0], np.cumsum([len(l.encode('utf-8', 'surrogateescape')) + 1
                       for l in lines])])
  maps = {}

  def offset(row: int, col: int) -> int:
    if row - 1 not in maps:
      maps[row - 1] = _char_to_byte(lines[row - 1]) if row - 1 < len(lines) else None
    m = maps[row - 1]
    return int(line_start[row - 1] + (col if m is None else m[min(col, len(m) - 1)]))

  # tokenize reads the same characters with each bad byte as U+FFFD (a lone
  # surrogate would stop it); offsets come from `lines`, bytes included.
  readline = io.StringIO(_SURROGATE.sub('\ufffd', source)).readline
  try:
    for tok in tokenize.generate_tokens(readline):
      if tok.type == tokenize.NAME:
        cat = ('keyword' if keyword.iskeyword(tok.string) else
               'builtin name' if tok.string in _BUILTINS else 'identifier')
      elif tok.type == tokenize.OP:
        cat = 'operator/punctuation'
      elif tok.type in _STRING_TYPES:
        cat = 'string'
      elif tok.type == tokenize.COMMENT:
        cat = 'comment'
      elif tok.type == tokenize.NUMBER:
        cat = 'number'
      else:   # NEWLINE, NL, INDENT, DEDENT, ENDMARKER, ERRORTOKEN
        continue
      lo, hi = offset(*tok.start), offset(*tok.end)
      labels[lo:hi] = _P[cat]
  except (tokenize.TokenError, SyntaxError, UnicodeError):
    pass   # the module doc: what came before the error keeps its labels
  return labels


python.CATEGORIES = PYTHON

BYTE_CLASSES = ('letter', 'digit', 'punctuation', 'space', 'newline',
                'non-ASCII')
_BYTE_CLASS = np.full(256, BYTE_CLASSES.index('non-ASCII'), np.uint8)
for _chars, _name in ((string.ascii_letters, 'letter'),
                      (string.digits, 'digit'),
                      (string.punctuation, 'punctuation'),
                      (' \t\r\f\v', 'space'), ('\n', 'newline')):
  _BYTE_CLASS[[ord(c) for c in _chars]] = BYTE_CLASSES.index(_name)
# Other ASCII control bytes count as space.
_BYTE_CLASS[[b for b in range(128) if BYTE_CLASSES[_BYTE_CLASS[b]] == 'non-ASCII']] = (
    BYTE_CLASSES.index('space'))


def byte_classes(text: bytes) -> np.ndarray:
  """BYTE_CLASSES index of every byte of `text`."""
  return _BYTE_CLASS[np.frombuffer(text, np.uint8)]


byte_classes.CATEGORIES = BYTE_CLASSES

LABELLERS = {'python': python, 'bytes': byte_classes}


def get(spec: str) -> Callable[[bytes], np.ndarray]:
  """'python', 'bytes' or 'package.module:function' (with a CATEGORIES
  attribute: the names its indices refer to)."""
  if spec in LABELLERS:
    return LABELLERS[spec]
  if ':' not in spec:
    raise ConfigError(f'categories={spec!r} is not valid; choose one of '
                      f'{tuple(LABELLERS)} or a labeller as '
                      "'package.module:function'.")
  module, name = spec.split(':', 1)
  try:
    fn = getattr(importlib.import_module(module), name)
  except (ImportError, AttributeError) as e:
    raise ConfigError(f'categories={spec!r}: cannot import it ({e}).') from e
  names = getattr(fn, 'CATEGORIES', None)
  if not names or not all(isinstance(n, str) for n in names):
    raise ConfigError(
        f'categories={spec!r}: the labeller needs a CATEGORIES attribute, '
        'the tuple of category names its labels index.')
  return fn
