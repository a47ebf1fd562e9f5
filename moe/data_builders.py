"""Our TFDS builders, written as array_record and read without TensorFlow.

Two `GeneratorBasedBuilder`s (registered with TFDS when this module is
imported; `moe.data` imports it):

  * `python_stdlib`: the embedded default corpus, the `.py` sources of the
    running interpreter's standard library (`sysconfig.get_paths()['stdlib']`).
    Every `.py` file below it counts, test packages included (`test/`,
    `idlelib/idle_test/`, `lib2to3/tests/`...: real code, ~60% of the bytes,
    kept because more data helps and the size costs nothing); `site-packages`,
    `dist-packages` and `__pycache__` directories are skipped, and so are empty
    or whitespace-only files. Its one config is `py<major><minor>` (e.g.
    `py311`). The whole tree (~1,800 files, ~31 MB) builds in about a second.
  * `text_files`: the files matching a user's glob (or every non-hidden file
    below a directory), one document per file. Its config is made by
    `text_files_config(pattern)`, named after a fingerprint of the matching
    files (relative path, size, mtime), so editing the files leads to a fresh
    build instead of stale data.

Both store one example per file, `{'text': raw bytes, 'path': relative path}`
(raw bytes, so files that are not valid UTF-8 survive), keyed by the relative
path. Both split by a stable hash of the relative POSIX path: a file is in
`validation` when the first 8 bytes of sha256(path), read as a big-endian
fraction of 2**64, are below `VALIDATION_FRACTION` (2%); the same on every
machine. When that puts no file in validation and there are at least two
files, the file with the smallest hash goes there (so small corpora still have
a validation split).
"""

from __future__ import annotations

import dataclasses
import glob as glob_lib
import hashlib
import logging
import os
import sys
import sysconfig

import tensorflow_datasets as tfds

from moe.config import ConfigError

VALIDATION_FRACTION = 0.02
_SKIP_DIRS = frozenset({'site-packages', 'dist-packages', '__pycache__'})


class _BuilderNotices(logging.Filter):
  """Drops TFDS's warnings about our own builders that ask nothing of the
  user: 'Using custom data configuration' (our text_files config, logged
  at every builder made, three times a run) and 'Variant folder ... has no
  dataset_info.json' (a corpus about to be built)."""

  def filter(self, record: logging.LogRecord) -> bool:
    msg = str(record.msg)
    return not (msg.startswith('Using custom data configuration')
                or msg.startswith('Variant folder %s has no %s'))


logging.getLogger('absl').addFilter(_BuilderNotices())   # TFDS logs through absl


def _path_hash(relpath: str) -> int:
  return int.from_bytes(hashlib.sha256(relpath.encode('utf-8')).digest()[:8],
                        'big')


def assign_splits(relpaths: list[str]) -> dict[str, list[str]]:
  """Splits relative paths into train/validation by a stable path hash."""
  threshold = int(VALIDATION_FRACTION * 2**64)
  hashes = {p: _path_hash(p) for p in relpaths}
  val = sorted(p for p in relpaths if hashes[p] < threshold)
  if not val and len(relpaths) >= 2:
    val = [min(relpaths, key=lambda p: hashes[p])]
  val_set = set(val)
  return {'train': sorted(p for p in relpaths if p not in val_set),
          'validation': val}


def _read_nonempty(path: str) -> bytes | None:
  with open(path, 'rb') as f:
    data = f.read()
  return data if data.strip() else None


def _generate(root: str, relpaths: list[str]):
  """(key, example) for each non-empty file; the key is its relative path."""
  for rel in relpaths:
    text = _read_nonempty(os.path.join(root, rel))
    if text is not None:
      yield rel, {'text': text, 'path': rel}


def _features() -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      'text': tfds.features.Text(doc='Raw file contents (bytes).'),
      'path': tfds.features.Text(doc='Path relative to the corpus root.'),
  })


# --- python_stdlib -----------------------------------------------------------

def stdlib_root() -> str:
  return sysconfig.get_paths()['stdlib']


def stdlib_files(root: str | None = None) -> list[str]:
  """Relative POSIX paths of the standard library's non-empty `.py` files."""
  root = root or stdlib_root()
  out = []
  for dirpath, dirnames, filenames in os.walk(root):  # symlinks not followed
    dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
    for name in filenames:
      if not name.endswith('.py'):
        continue
      full = os.path.join(dirpath, name)
      if os.path.isfile(full) and os.path.getsize(full) > 0:
        out.append(os.path.relpath(full, root).replace(os.sep, '/'))
  return sorted(out)


def stdlib_config_name() -> str:
  return f'py{sys.version_info.major}{sys.version_info.minor}'


class PythonStdlib(tfds.core.GeneratorBasedBuilder):
  """The `.py` sources of the running interpreter's standard library."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(
      name=stdlib_config_name(),
      description=f'Python {sys.version_info.major}.{sys.version_info.minor} '
                  'standard library, every non-empty .py file.')]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, features=_features(),
        description='Python standard library sources, one file per example, '
                    f'{VALIDATION_FRACTION:.0%} validation by path hash.',
        homepage='https://docs.python.org/3/library/')

  def _split_generators(self, dl_manager):
    del dl_manager  # Offline: nothing to download.
    root = stdlib_root()
    return {split: self._generate_examples(root, paths)
            for split, paths in assign_splits(stdlib_files(root)).items()}

  def _generate_examples(self, root, relpaths):
    return _generate(root, relpaths)


# --- text_files --------------------------------------------------------------

def resolve_text_files(pattern: str) -> tuple[str, list[str]]:
  """(root, sorted relative paths) of the regular files matching `pattern`.

  A directory means every non-hidden regular file below it (recursively);
  anything else is a glob (`**` recurses). Raises ConfigError naming the
  pattern when nothing matches.
  """
  expanded = os.path.abspath(os.path.expanduser(pattern))
  if os.path.isdir(expanded):
    root = expanded
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
      dirnames[:] = [d for d in dirnames if not d.startswith('.')]
      files += [os.path.join(dirpath, n) for n in filenames
                if not n.startswith('.')]
  else:
    files = glob_lib.glob(expanded, recursive=True)
    root = None
  files = sorted(f for f in files if os.path.isfile(f))
  if not files:
    raise ConfigError(
        f'text_files={pattern!r} matches no files (looked for '
        f'{expanded!r}{" recursively" if root else ""}): nothing to build. '
        'Pass a directory or a glob such as "/data/corpus/**/*.txt".')
  nonempty = [f for f in files  # a small file may hold only whitespace
              if os.path.getsize(f) > 4096 or _read_nonempty(f) is not None]
  if len(nonempty) < 2:
    raise ConfigError(
        f'text_files={pattern!r} matches {len(files)} files, of which '
        f'{len(nonempty)} are non-empty: the corpus is empty or too small to '
        'split. Give at least 2 non-empty files (documents are split into '
        'train and validation by file).')
  files = nonempty
  if root is None:  # two or more distinct files: their common directory
    root = os.path.commonpath(files)
  return root, [os.path.relpath(f, root).replace(os.sep, '/') for f in files]


@dataclasses.dataclass(eq=False)
class TextFilesConfig(tfds.core.BuilderConfig):
  root: str = ''
  files: tuple[str, ...] = ()


def text_files_config(pattern: str) -> TextFilesConfig:
  """A config for the files matching `pattern`, named by their fingerprint."""
  root, files = resolve_text_files(pattern)
  h = hashlib.sha256(root.encode('utf-8'))
  for rel in files:
    st = os.stat(os.path.join(root, rel))
    h.update(f'\0{rel}\0{st.st_size}\0{st.st_mtime_ns}'.encode('utf-8'))
  return TextFilesConfig(
      name=f'files_{h.hexdigest()[:16]}', root=root, files=tuple(files),
      description=f'{len(files)} text files matching {pattern!r} '
                  f'(root {root!r}).')


class TextFiles(tfds.core.GeneratorBasedBuilder):
  """A user's text files, one document per file (config: text_files_config)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, features=_features(),
        description='Local text files, one file per example, '
                    f'{VALIDATION_FRACTION:.0%} validation by path hash.')

  def _split_generators(self, dl_manager):
    del dl_manager
    cfg = self.builder_config
    if not isinstance(cfg, TextFilesConfig) or not cfg.files:
      raise ValueError('The text_files builder needs a config from '
                       'moe.data_builders.text_files_config(pattern).')
    return {split: self._generate_examples(cfg.root, paths)
            for split, paths in assign_splits(list(cfg.files)).items()}

  def _generate_examples(self, root, relpaths):
    return _generate(root, relpaths)
