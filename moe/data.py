"""Data: TFDS corpora (no TensorFlow) -> tokens -> packed, sharded batches.

Public interface::

  DataConfig(name, data_dir, ...)            # frozen, validated (its fields below)
  prepare(cfg) -> tfds DatasetBuilder        # builds our corpora once, reuses
  check_source(cfg)                          # refuses what cannot be read, early
  get_tokenizer(cfg) -> Tokenizer            # .vocab_size .eos_id .pad_id
                                             # .encode(text) .decode(ids)
  vocab_size(cfg) -> int                     # = get_tokenizer(cfg).vocab_size
  row_shuffle(cfg, split) -> 'global' | 'window'   # 'auto' resolved
  train_iterator(cfg, *, seq_len, batch_size, seed, shard_index=None,
                 shard_count=None) -> grain.DatasetIterator   # endless
  eval_set(cfg, *, seq_len, batch_size, max_batches=None,
           shard_index=None, shard_count=None) -> EvalSet   # of EvalBatch
  global_batch(local_batch, sharding) -> jax.Array
  unigram_entropy(cfg, *, max_tokens=None) -> float  # nats/token, train split
  split_stats(cfg, split) -> {'documents', 'bytes', 'tokens'}
  prepare_command(cfg) -> str                # shell command preparing cfg
  DatasetNotPreparedError                    # message holds prepare_command
  verify(cfg) -> {split: [Damage]}           # reads every record
  rebuild_command(cfg) -> str                # rebuilds a damaged dataset
  python -m moe.data --name NAME --data_dir DIR [--text_files GLOB]
                     [--verify | --rebuild]  # prepare + print split stats

Corpora (`DataConfig.name`):
  * 'python_stdlib' (default): the running interpreter's standard-library
    `.py` sources, built offline by our TFDS builder (`moe.data_builders`) in
    about a second; split train/validation by a stable hash of the path.
  * 'text_files': the files matching `DataConfig.text_files` (a glob, or a
    directory meaning every non-hidden file below it), one document per file,
    split the same way. Nothing matching is an error naming the glob.
  * anything else: a TFDS dataset by name ('c4/en', 'lm1b:1.1.0', ...) already
    prepared as array_record under `data_dir` (local, or gs:// with gcsfs
    installed, which moe does not require). A missing,
    unprepared or tfrecord-prepared dataset raises `DatasetNotPreparedError`
    whose message holds the `tfds build ... --file_format=array_record` command
    (run it where TensorFlow is installed: `pip install 'moe[tf]'`).
  `data_dir` defaults to TFDS's own (`$TFDS_DATA_DIR` or ~/tensorflow_datasets).
  Our corpora are built into it on first use and reused afterwards. With
  several processes, prepare once first (process 0, or `python -m moe.data`)
  so they do not all build at once.

Tokens: bytes by default (ids 0-255 are bytes, EOS=256, PAD=257, vocab_size
384 = the 258 ids padded to a multiple of 128); or `tokenizer=<path to a
SentencePiece .model>` (needs `pip install sentencepiece`; vocab padded the
same way, EOS/PAD appended when the model has none).

Packing: every document is followed by EOS; the token stream is cut into
consecutive, non-overlapping rows of `seq_len + 1` tokens (the model predicts
tokens[:, 1:] from tokens[:, :-1], so the pair across a row boundary is not
trained on). Rows carry no padding.

Training rows are shuffled, not only documents, so that a batch is a sample
of the corpus rather than 2 KB of one file (DESIGN.md §3). Two orders
(`DataConfig.row_shuffle`; 'auto', the default, takes 'global' for a split
stored in at most GLOBAL_SHUFFLE_MAX_BYTES, else 'window'):
  * 'global' (Megatron's GPT dataset): the split's documents are tokenized
    once into memory, concatenated in an order drawn from `seed`, and cut
    into rows; a grain MapDataset then draws the rows in a permutation of
    all of them, a new one each epoch (grain's per-epoch index shuffle).
    Global batch t is rows [t*B, (t+1)*B) of that order and process p takes
    its p-th slice, so the batches are the same for any number of
    processes, and processes read disjoint rows.
  * 'window' (corpora too large to index): documents are sharded by process
    (document i to shard i % shard_count), shuffled per epoch, tokenized and
    packed as they stream, and the rows are shuffled in windows of
    `shuffle_window` rows (grain's WindowShuffleIterDataset). A batch then
    mixes the documents of one window.
Either way the order is a function of `seed` alone (an MoE and its twins
read the same batches), repeats forever with a new order each epoch, and
the iterator's get_state() / set_state() (JSON-serializable; what orbax's
grain handler saves) restore it exactly, mid-epoch too. The state belongs
to this process's shard: restore with the same shard_count.

Evaluation (`eval_set`): a fixed set of rows, the same for every run of a
(corpus, seq_len, batch size). max_batches=None is the whole eval split,
documents in stored order, its last global batch padded with weight-0
rows; max_batches=N is N global batches of rows spread evenly over the
whole split (never its first batches; for a split too large to hold, whole
documents in a fixed random order until N batches are full). Each batch
carries row weights and the document of every target token, so losses can
be exact over the set and per document (bootstrap intervals, report.py).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import functools
import math
import os
import re
import shlex
import time
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from moe import corpus_check, data_builders, run_dir
from moe.config import ConfigError
from moe.user_error import UserError

OUR_DATASETS = ('python_stdlib', 'text_files')
_TFDS_NAME = re.compile(r'^[a-z][a-z0-9_]*(/[A-Za-z0-9_.+-]+)?(:[0-9.*]+)?$')
VOCAB_MULTIPLE = 128
ROW_SHUFFLES = ('auto', 'global', 'window')
# 'auto' shuffles rows globally up to this stored split size: the split's
# tokens are then held in memory (2 bytes a token for vocabularies up to
# 65,536), by every process.
GLOBAL_SHUFFLE_MAX_BYTES = 1 << 30


class DatasetNotPreparedError(UserError, FileNotFoundError):
  """A TFDS dataset that is unknown, missing or not prepared as array_record.

  The message holds the command that prepares it."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Which corpus, where it lives, and how it is tokenized and read."""
  name: str = 'python_stdlib'       # or 'text_files', or a TFDS name ('c4/en')
  data_dir: str = ''                # '': TFDS's default (may be gs://bucket/tfds)
  text_files: str = ''              # glob or directory, for name='text_files'
  tokenizer: str = 'bytes'          # or a SentencePiece .model path
  text_key: str = 'text'            # the text feature of TFDS datasets
  train_split: str = 'train'
  eval_split: str = 'validation'    # e.g. 'test' for lm1b
  read_threads: int = 2             # grain reader threads (0: read inline)
  row_shuffle: str = 'auto'         # training rows: 'global' (a permutation of every
                                    # packed row), 'window' (for corpora too large to
                                    # index) or 'auto' (global up to 1 GiB stored)
  shuffle_window: int = 8192        # rows per shuffle window ('window' order)

  def __post_init__(self):
    if not isinstance(self.name, str) or not _TFDS_NAME.match(self.name):
      raise ConfigError(
          f'data.name={self.name!r} is not valid; choose one of {OUR_DATASETS}'
          " or a TFDS dataset name such as 'c4/en' or 'lm1b:1.1.0'.")
    base = self.name.split('/')[0].split(':')[0]
    if base in OUR_DATASETS and self.name != base:
      raise ConfigError(
          f'data.name={self.name!r}: our builder {base!r} takes no config or '
          f'version; use data.name={base!r}.')
    if self.name == 'text_files':
      if not self.text_files:
        raise ConfigError(
            "data.name='text_files' needs data.text_files: a glob such as "
            "'/data/books/**/*.txt' or a directory.")
    elif self.text_files:
      raise ConfigError(
          f'data.text_files={self.text_files!r} is only used with '
          f"data.name='text_files', not data.name={self.name!r}.")
    if not isinstance(self.tokenizer, str) or not (
        self.tokenizer == 'bytes' or self.tokenizer.endswith('.model')):
      raise ConfigError(
          f'data.tokenizer={self.tokenizer!r} is not valid; choose '
          "'bytes' or the path of a SentencePiece model ('.../spm.model').")
    for field in ('text_key', 'train_split', 'eval_split'):
      if not isinstance(getattr(self, field), str) or not getattr(self, field):
        raise ConfigError(f'data.{field}={getattr(self, field)!r} must be a '
                          'non-empty string.')
    if not isinstance(self.read_threads, int) or self.read_threads < 0:
      raise ConfigError(f'data.read_threads={self.read_threads!r} must be an int >= 0.')
    if self.row_shuffle not in ROW_SHUFFLES:
      raise ConfigError(f'data.row_shuffle={self.row_shuffle!r} is not valid; '
                        f'choose one of {ROW_SHUFFLES}.')
    if (not isinstance(self.shuffle_window, int)
        or isinstance(self.shuffle_window, bool) or self.shuffle_window < 1):
      raise ConfigError(f'data.shuffle_window={self.shuffle_window!r} must be '
                        'an int >= 1 (rows).')


# --- Tokenizers --------------------------------------------------------------

def _round_up(n: int, multiple: int = VOCAB_MULTIPLE) -> int:
  return -(-n // multiple) * multiple


class ByteTokenizer:
  """UTF-8 bytes are the tokens 0-255; EOS=256, PAD=257; vocab_size 384."""
  eos_id = 256
  pad_id = 257
  vocab_size = _round_up(258)

  def encode(self, text: bytes | str) -> np.ndarray:
    if isinstance(text, str):
      text = text.encode('utf-8')
    return np.frombuffer(text, np.uint8).astype(np.int32)

  def decode(self, ids) -> bytes:
    ids = np.asarray(ids)
    return ids[ids < 256].astype(np.uint8).tobytes()

  def token_bytes(self, token_id: int) -> bytes:
    """The bytes one token stands for (b'' for EOS and PAD)."""
    return bytes([token_id]) if token_id < 256 else b''


class SentencePieceTokenizer:
  """A SentencePiece model (local or gs:// path); specials added if absent."""

  def __init__(self, path: str):
    try:
      import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ConfigError(
          f'data.tokenizer={path!r} needs the sentencepiece package, which is '
          'not a dependency of moe: pip install sentencepiece') from e
    if not epath.Path(path).exists():
      raise ConfigError(f'data.tokenizer={path!r}: no such SentencePiece '
                        "model file (or use tokenizer='bytes').")
    self._sp = spm.SentencePieceProcessor(model_proto=epath.Path(path).read_bytes())
    n = self._sp.get_piece_size()
    self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else n
    n = max(n, self.eos_id + 1)
    self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else n
    self.vocab_size = _round_up(max(n, self.pad_id + 1))

  def encode(self, text: bytes | str) -> np.ndarray:
    if isinstance(text, bytes):
      text = text.decode('utf-8', errors='replace')
    return np.asarray(self._sp.encode(text, out_type=int), np.int32)

  def decode(self, ids) -> str:
    n = self._sp.get_piece_size()
    return self._sp.decode([int(i) for i in ids if i < n and i not in (self.eos_id, self.pad_id)])

  def token_bytes(self, token_id: int) -> bytes:
    """The bytes one token stands for, near enough for analysis: its piece
    with '▁' as a space, a byte-fallback piece as its byte, U+FFFD for the
    unknown id, b'' for control ids. (The document itself may differ by the
    model's normalization and the leading space it adds.)"""
    sp = self._sp
    if token_id >= sp.get_piece_size() or sp.is_control(token_id):
      return b''
    if sp.is_unknown(token_id):
      return '\ufffd'.encode('utf-8')
    piece = sp.id_to_piece(token_id)
    if sp.is_byte(token_id):          # '<0x0A>'
      return bytes([int(piece[1:-1], 16)])
    return piece.replace('\u2581', ' ').encode('utf-8')


Tokenizer = ByteTokenizer | SentencePieceTokenizer


@functools.lru_cache(maxsize=8)
def _tokenizer(spec: str) -> Tokenizer:
  return ByteTokenizer() if spec == 'bytes' else SentencePieceTokenizer(spec)


def get_tokenizer(cfg: DataConfig) -> Tokenizer:
  return _tokenizer(cfg.tokenizer)


def vocab_size(cfg: DataConfig) -> int:
  """The model's vocab_size for this data: tokenizer ids padded to 128."""
  return get_tokenizer(cfg).vocab_size


# --- Sources -----------------------------------------------------------------

def resolve_data_dir(cfg: DataConfig) -> str:
  """cfg.data_dir, or TFDS's default; a gs:// one this machine cannot reach
  is refused (moe.run_dir.check_filesystem)."""
  d = str(cfg.data_dir or tfds.core.constants.DATA_DIR)
  # A gs:// data_dir goes through etils.epath; the array_record files
  # themselves are opened by array_record's reader.
  run_dir.check_filesystem(d, 'data.data_dir')
  return d if run_dir.is_remote(d) else os.path.expanduser(d)


def prepare_command(cfg: DataConfig) -> str:
  """The shell command that prepares `cfg`'s dataset under its data_dir."""
  data_dir = resolve_data_dir(cfg)
  if cfg.name in OUR_DATASETS:
    extra = (f' --text_files={shlex.quote(cfg.text_files)}' if cfg.text_files else '')
    return (f'python -m moe.data --name={cfg.name}{extra} '
            f'--data_dir={shlex.quote(data_dir)}')
  return (f'tfds build {cfg.name} --file_format=array_record '
          f'--data_dir={shlex.quote(data_dir)}')


def rebuild_command(cfg: DataConfig) -> str:
  """The shell command that deletes `cfg`'s prepared dataset and prepares it
  again (for a damaged one)."""
  if cfg.name in OUR_DATASETS:
    return prepare_command(cfg) + ' --rebuild'
  return prepare_command(cfg) + ' --overwrite'


def check_source(cfg: DataConfig) -> None:
  """Refuses a data source this run cannot read, from metadata only (for
  moe.preflight, before anything expensive): a data_dir this machine
  cannot reach, text_files matching no file, or a TFDS dataset not prepared
  under data_dir (the error says how to prepare it). Ours are built on
  first use (`prepare`)."""
  data_dir = resolve_data_dir(cfg)
  if cfg.name == 'text_files':
    data_builders.resolve_text_files(cfg.text_files)
  elif cfg.name not in OUR_DATASETS:
    _prepared_tfds_builder(cfg, data_dir)


def prepare(cfg: DataConfig) -> tfds.core.DatasetBuilder:
  """The dataset's TFDS builder, prepared as array_record (ours: built if
  needed, offline; others: must already be prepared, else the error says
  how)."""
  data_dir = resolve_data_dir(cfg)
  if cfg.name == 'python_stdlib':
    builder = data_builders.PythonStdlib(
        config=data_builders.stdlib_config_name(), data_dir=data_dir,
        file_format='array_record')
  elif cfg.name == 'text_files':
    config = data_builders.text_files_config(cfg.text_files)  # empty: raises
    builder = data_builders.TextFiles(config=config, data_dir=data_dir, file_format='array_record')
  else:
    return _prepared_tfds_builder(cfg, data_dir)
  if not builder.is_prepared():
    builder.download_and_prepare(file_format='array_record')
  return builder


def _prepared_tfds_builder(cfg: DataConfig,
                           data_dir: str) -> tfds.core.DatasetBuilder:
  cmd = prepare_command(cfg)
  how = (f'prepare it once (where TensorFlow is installed: '
         f"pip install 'moe[tf]'):\n  {cmd}")
  try:
    builder = tfds.builder(cfg.name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    base = cfg.name.split('/')[0].split(':')[0]
    known = list(OUR_DATASETS) + tfds.list_builders(with_community_datasets=False)
    close = difflib.get_close_matches(base, known, n=3)
    hint = f' Did you mean {" or ".join(map(repr, close))}?' if close else ''
    raise DatasetNotPreparedError(
        f'Unknown or missing dataset data.name={cfg.name!r}: TFDS has no '
        f'builder of that name importable without TensorFlow, and nothing is '
        f'prepared for it under data_dir={data_dir!r}.{hint} Ours are '
        f'{OUR_DATASETS}; the TFDS catalog is at '
        'https://www.tensorflow.org/datasets/catalog. If the name is right, '
        + how) from e
  except ValueError as e:  # e.g. an unknown config or version
    raise DatasetNotPreparedError(
        f'data.name={cfg.name!r} cannot be loaded from data_dir={data_dir!r}: '
        f'{e}\nIf the name is right, {how}') from e
  if not builder.is_prepared():
    raise DatasetNotPreparedError(
        f'Dataset {cfg.name!r} is not prepared under data_dir={data_dir!r} '
        f'(no {builder.data_dir}/dataset_info.json); {how}')
  fmt = builder.info.file_format
  if fmt is None or getattr(fmt, 'value', fmt) != 'array_record':
    raise DatasetNotPreparedError(
        f'Dataset {cfg.name!r} under data_dir={data_dir!r} is prepared as '
        f'{getattr(fmt, "value", fmt)}, but random access without TensorFlow '
        'needs array_record. Prepare it as array_record into another data_dir '
        f'(or delete {builder.data_dir}), where TensorFlow is installed: '
        f'\n  {cmd}')
  return builder


def _source(cfg: DataConfig, split: str):
  builder = prepare(cfg)
  if split.split('[')[0] not in builder.info.splits:
    raise ConfigError(
        f'Split {split!r} of {cfg.name!r} does not exist; it has '
        f'{sorted(builder.info.splits)} (set data.train_split / '
        'data.eval_split).')
  features = builder.info.features
  if cfg.text_key not in features:
    raise ConfigError(
        f'data.text_key={cfg.text_key!r} is not a feature of {cfg.name!r}; '
        f'it has {sorted(features)}.')
  return corpus_check.CheckedSource(
      builder.as_data_source(split), dataset=cfg.name, split=split,
      shards=[(fi.filename, fi.skip, fi.take)
              for fi in builder.info.splits[split].file_instructions],
      rebuild_command=rebuild_command(cfg))


# --- Pipeline ----------------------------------------------------------------

class _Tokenize(grain.transforms.Map):
  """An example -> its token ids followed by EOS (int32)."""

  def __init__(self, tokenizer: Tokenizer, key: str):
    self._tok, self._key = tokenizer, key

  def map(self, example):
    ids = self._tok.encode(example[self._key])
    out = np.empty(len(ids) + 1, np.int32)
    out[:-1] = ids
    out[-1] = self._tok.eos_id
    return out


class _PackIterator(grain.DatasetIterator):
  """Concatenates documents and cuts the stream into rows of `length`.

  State: the parent's state before the document the next row starts in, and
  how many of that document's tokens were already emitted."""

  def __init__(self, parent: grain.DatasetIterator, length: int):
    super().__init__(parent)
    self._length = length
    self._doc: np.ndarray | None = None
    self._pos = 0
    self._doc_state: dict[str, Any] | None = None

  def __next__(self) -> np.ndarray:
    out = np.empty(self._length, np.int32)
    filled = 0
    while filled < self._length:
      if self._doc is None or self._pos == len(self._doc):
        state = self._parent.get_state()
        doc = next(self._parent)  # StopIteration: a partial row is dropped.
        self._doc, self._pos, self._doc_state = doc, 0, state
      take = min(self._length - filled, len(self._doc) - self._pos)
      out[filled:filled + take] = self._doc[self._pos:self._pos + take]
      filled += take
      self._pos += take
    return out

  def get_state(self) -> dict[str, Any]:
    if self._doc is not None and self._pos < len(self._doc):
      return {'parent': copy.deepcopy(self._doc_state), 'offset': self._pos}
    return {'parent': self._parent.get_state(), 'offset': 0}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state['parent'])
    self._doc, self._pos, self._doc_state = None, 0, None
    if state['offset']:
      self._doc_state = copy.deepcopy(state['parent'])
      self._doc = next(self._parent)
      self._pos = int(state['offset'])


class _PackIterDataset(grain.IterDataset):

  def __init__(self, parent: grain.IterDataset, length: int):
    super().__init__(parent)
    self._length = length

  def __iter__(self) -> _PackIterator:
    return _PackIterator(self._parent.__iter__(), self._length)

  def __str__(self) -> str:
    return f'PackIterDataset(length={self._length})'


class _Rows:
  """Random access to the rows of a packed token stream: row i is
  stream[i * length:(i + 1) * length] as int32 (a grain data source)."""

  def __init__(self, stream: np.ndarray, length: int):
    self._stream, self._length = stream, length

  def __len__(self) -> int:
    return len(self._stream) // self._length

  def __getitem__(self, i: int) -> np.ndarray:
    start = int(i) * self._length
    return self._stream[start:start + self._length].astype(np.int32)


def _concat(cfg: DataConfig, docs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """(stream, starts): tokenized documents (_Tokenize: EOS-terminated) as
  one array (uint16 where the vocab fits, else uint32), and each one's
  first index in it (plus the end)."""
  dtype = np.uint16 if get_tokenizer(cfg).vocab_size <= 2**16 else np.uint32
  starts = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
  return np.concatenate(docs).astype(dtype), starts


@functools.lru_cache(maxsize=4)
def _split_tokens(cfg: DataConfig, split: str) -> tuple[np.ndarray, np.ndarray]:
  """`_concat` of every document of `split`, in stored order (cached)."""
  source = _source(cfg, split)
  tokenize = _Tokenize(get_tokenizer(cfg), cfg.text_key)
  return _concat(cfg, [tokenize.map(source[i]) for i in range(len(source))])


def row_shuffle(cfg: DataConfig, split: str) -> str:
  """'global' or 'window': cfg.row_shuffle, with 'auto' resolved by the
  split's stored size (global up to GLOBAL_SHUFFLE_MAX_BYTES)."""
  if cfg.row_shuffle != 'auto':
    return cfg.row_shuffle
  info = prepare(cfg).info.splits[split]
  return 'global' if int(info.num_bytes) <= GLOBAL_SHUFFLE_MAX_BYTES else 'window'


def _check_int(name: str, value, lo: int, hi: int | None = None) -> None:
  if (not isinstance(value, (int, np.integer)) or isinstance(value, bool)
      or value < lo or (hi is not None and value > hi)):
    rng = f'>= {lo}' if hi is None else f'in [{lo}, {hi}]'
    raise ConfigError(f'{name}={value!r} must be an int {rng}.')


def _shards(shard_index: int | None,
            shard_count: int | None) -> tuple[int, int]:
  shard_count = jax.process_count() if shard_count is None else shard_count
  shard_index = jax.process_index() if shard_index is None else shard_index
  _check_int('shard_count', shard_count, 1)
  _check_int('shard_index', shard_index, 0, shard_count - 1)
  return int(shard_index), int(shard_count)


def _read_options(cfg: DataConfig) -> grain.ReadOptions:
  return grain.ReadOptions(num_threads=cfg.read_threads,
                           prefetch_buffer_size=64 if cfg.read_threads else 1)


def train_iterator(cfg: DataConfig, *, seq_len: int, batch_size: int,
                   seed: int, shard_index: int | None = None,
                   shard_count: int | None = None) -> grain.DatasetIterator:
  """An endless, checkpointable iterator of int32 [batch_size, seq_len + 1].

  batch_size is per process; shard_index/shard_count default to
  jax.process_index()/jax.process_count(). See the module docstring for the
  two row orders ('global', 'window')."""
  _check_int('seq_len', seq_len, 1)
  _check_int('batch_size', batch_size, 1)
  _check_int('seed', seed, 0, 2**32 - 1)
  shard_index, shard_count = _shards(shard_index, shard_count)
  length = seq_len + 1
  if row_shuffle(cfg, cfg.train_split) == 'global':
    stream, starts = _split_tokens(cfg, cfg.train_split)
    order = np.random.default_rng(seed).permutation(len(starts) - 1)
    stream = np.concatenate([stream[starts[d]:starts[d + 1]] for d in order])
    rows = _Rows(stream, length)
    if len(rows) < batch_size * shard_count:
      raise ConfigError(
          f'{cfg.name!r} split {cfg.train_split!r} packs into {len(rows)} rows '
          f'of seq_len+1={length} tokens, fewer than one global batch '
          f'({batch_size} x {shard_count} processes).')
    # Global batch t is rows [t*B, (t+1)*B) of the shuffled order; process p
    # takes its p-th slice, so any process count reads the same batches.
    ds = grain.MapDataset.source(rows).shuffle(seed=int(seed)).repeat()
    ds = ds.batch(batch_size, drop_remainder=True)[shard_index::shard_count]
    return iter(ds.to_iter_dataset(_read_options(cfg)))
  source = _source(cfg, cfg.train_split)
  if len(source) < shard_count:
    raise ConfigError(
        f'{cfg.name!r} split {cfg.train_split!r} has {len(source)} documents, '
        f'fewer than shard_count={shard_count} processes.')
  docs = grain.MapDataset.source(source)[shard_index::shard_count]
  docs = docs.shuffle(seed=int(seed)).repeat()  # a new order every epoch
  docs = docs.map(_Tokenize(get_tokenizer(cfg), cfg.text_key))
  rows = _PackIterDataset(docs.to_iter_dataset(_read_options(cfg)), length)
  rows = grain.experimental.WindowShuffleIterDataset(
      rows, window_size=cfg.shuffle_window, seed=int(seed))
  return iter(rows.batch(batch_size, drop_remainder=True))


class EvalBatch(NamedTuple):
  tokens: np.ndarray    # int32 [batch_size, seq_len + 1]: this process's rows
  weights: np.ndarray   # float32 [global batch]: 1 for a row of the set, 0 for padding
  documents: np.ndarray  # int32 [global batch, seq_len]: each target's document
  positions: np.ndarray  # int64 [global batch, seq_len]: each target's index in `stream`


class EvalSet(Iterable[EvalBatch]):
  """A fixed set of evaluation rows, re-iterable: every pass yields the same
  batches. Attributes: `rows`, `tokens` (targets evaluated), `documents`
  (documents with at least one target), `num_documents` (of the sampled
  stream: the size of per-document arrays), `whole_split` (bool), and the
  token `stream` the rows were cut from with each document's first index in
  it, `starts` (plus the end): target j of a row is stream[positions[j]]."""

  def __init__(self, stream: np.ndarray, starts: np.ndarray,
               row_index: np.ndarray, length: int, whole_split: bool,
               batch_size: int, shard_index: int, shard_count: int):
    self.stream, self.starts = stream, starts
    # [R, L-1]: the stream index of each row's targets (position j + 1).
    self._positions = (row_index[:, None] * length + 1 + np.arange(length - 1)[None, :])
    self._rows = stream[self._positions[:, :1] - 1 + np.arange(length)]  # [R, L]
    # The document of each target token.
    self._row_docs = (np.searchsorted(starts, self._positions, side='right') - 1).astype(np.int32)
    self._batch_size, self._shard_index = batch_size, shard_index
    self._global = batch_size * shard_count
    self.rows = len(row_index)
    self.tokens = int(self._positions.size)
    self.documents = int(len(np.unique(self._row_docs)))
    self.num_documents = len(starts) - 1
    self.whole_split = whole_split

  def __len__(self) -> int:
    return -(-self.rows // self._global)

  def documents_of_targets(self) -> np.ndarray:
    """int32 [tokens]: the document of every target of the set."""
    return self._row_docs.ravel()

  def target_bytes(self, tokenizer: Tokenizer) -> int:
    """The bytes the set's targets stand for (EOS: none), for bits per byte
    of exactly what was evaluated."""
    lengths = np.array([len(tokenizer.token_bytes(i))
                        for i in range(tokenizer.vocab_size)], np.int64)
    return int(lengths[self.stream[self._positions.ravel()]].sum())

  def __iter__(self) -> Iterator[EvalBatch]:
    lo = self._shard_index * self._batch_size
    for b in range(len(self)):
      # The last batch is filled up with the set's first rows, weighted 0.
      idx = np.arange(b * self._global, (b + 1) * self._global)
      weights = (idx < self.rows).astype(np.float32)
      idx %= self.rows
      yield EvalBatch(self._rows[idx[lo:lo + self._batch_size]].astype(np.int32),
                      weights, self._row_docs[idx], self._positions[idx])


def eval_set(cfg: DataConfig, *, seq_len: int, batch_size: int,
             max_batches: int | None = None, shard_index: int | None = None,
             shard_count: int | None = None) -> EvalSet:
  """The rows evaluation reads, fixed for a (cfg, seq_len, batch_size).

  max_batches=None: the whole eval split (documents in stored order, packed,
  the last batch padded with weight-0 rows). max_batches=N: N global batches
  of rows spread evenly over the whole split (the split packed in stored
  order, where it fits in memory by `row_shuffle`'s rule; else documents in a
  fixed random order, packed until N batches are full). Never the split's
  first batches."""
  _check_int('seq_len', seq_len, 1)
  _check_int('batch_size', batch_size, 1)
  if max_batches is not None:
    _check_int('max_batches', max_batches, 1)
  shard_index, shard_count = _shards(shard_index, shard_count)
  length, per_global = seq_len + 1, batch_size * shard_count
  split = cfg.eval_split
  covers_split = max_batches is None or row_shuffle(cfg, split) == 'global'
  if covers_split:
    stream, starts = _split_tokens(cfg, split)
  else:   # too large to hold: a fixed random sample of whole documents,
    # enough for the batches asked for (every document has >= 1 token).
    source = _source(cfg, split)
    tokenize = _Tokenize(get_tokenizer(cfg), cfg.text_key)
    docs, need = [], max_batches * per_global * length
    for i in np.random.default_rng(0).permutation(len(source)):
      docs.append(tokenize.map(source[int(i)]))
      need -= len(docs[-1])
      if need <= 0:
        break
    stream, starts = _concat(cfg, docs)
  num_rows = len(stream) // length
  if num_rows < per_global:
    raise ConfigError(
        f'{cfg.name!r} split {split!r} packs into only {num_rows} rows of '
        f'seq_len+1={length} tokens, fewer than one global eval batch '
        f'({batch_size} x {shard_count} processes): use a smaller eval batch '
        'or seq_len.')
  row_index = np.arange(num_rows)
  sampled = max_batches is not None and max_batches * per_global < num_rows
  if sampled:
    row_index = np.linspace(0, num_rows, max_batches * per_global, endpoint=False).astype(np.int64)
  return EvalSet(stream, starts, row_index, length, covers_split and not sampled,
                 batch_size, shard_index, shard_count)


def global_batch(local_batch: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
  """This process's rows -> the global batch, laid out by `sharding` (e.g.
  NamedSharding(mesh, P(('data', 'expert')))): the local shape with the batch
  dimension times the processes it spans."""
  return jax.make_array_from_process_local_data(sharding, np.asarray(local_batch))


# --- Statistics --------------------------------------------------------------

def _iter_token_docs(cfg: DataConfig, split: str):
  source = _source(cfg, split)
  tok = get_tokenizer(cfg)
  for i in range(len(source)):
    text = source[i][cfg.text_key]
    yield text, tok.encode(text)


def unigram_entropy(cfg: DataConfig, *, max_tokens: int | None = None) -> float:
  """Entropy (nats/token) of the training split's unigram distribution, EOS
  included: the loss of the best model that ignores context. Counts the
  documents in stored order until `max_tokens` (None: all)."""
  tok = get_tokenizer(cfg)
  counts = np.zeros(tok.vocab_size, np.int64)
  total = 0
  for _, ids in _iter_token_docs(cfg, cfg.train_split):
    counts += np.bincount(ids, minlength=tok.vocab_size)
    counts[tok.eos_id] += 1
    total += len(ids) + 1
    if max_tokens is not None and total >= max_tokens:
      break
  p = counts[counts > 0] / total
  return float(-(p * np.log(p)).sum())


def split_stats(cfg: DataConfig, split: str) -> dict[str, int]:
  """Documents, bytes of text and tokens (EOS included) of a split."""
  docs = nbytes = tokens = 0
  for text, ids in _iter_token_docs(cfg, split):
    docs += 1
    nbytes += len(text)
    tokens += len(ids) + 1
  return {'documents': docs, 'bytes': nbytes, 'tokens': tokens}


def verify(cfg: DataConfig) -> dict[str, list[corpus_check.Damage]]:
  """Reads every record of every split of the prepared dataset; the damaged
  shard files of each split (empty lists: intact)."""
  builder = prepare(cfg)
  return {split: corpus_check.scan(_source(cfg, split)) for split in sorted(builder.info.splits)}


def rebuild(cfg: DataConfig) -> tfds.core.DatasetBuilder:
  """Deletes our prepared corpus and builds it again (a damaged one). A TFDS
  dataset is rebuilt where TensorFlow is installed (`rebuild_command`)."""
  if cfg.name not in OUR_DATASETS:
    raise ConfigError(f'{cfg.name!r} is not built by moe; rebuild it where '
                      f'TensorFlow is installed: {rebuild_command(cfg)}')
  builder = prepare(cfg)
  epath.Path(builder.data_dir).rmtree()
  return prepare(cfg)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
      prog='python -m moe.data',
      description='Prepare a corpus as array_record and print its statistics; '
                  'or verify or rebuild a prepared one.')
  parser.add_argument('--name', default='python_stdlib')
  parser.add_argument('--data_dir', default=None)
  parser.add_argument('--text_files', default=None)
  parser.add_argument('--tokenizer', default='bytes')
  action = parser.add_mutually_exclusive_group()
  action.add_argument('--verify', action='store_true',
                      help='read every record of every split; name damaged '
                           'files (exit 1 if any)')
  action.add_argument('--rebuild', action='store_true',
                      help='delete the prepared corpus (ours) and build it again')
  args = parser.parse_args(argv)
  start = time.perf_counter()
  try:   # bad input: one line, as from train.py (moe.config_flag.run)
    cfg = DataConfig(name=args.name, data_dir=args.data_dir or '',
                     text_files=args.text_files or '', tokenizer=args.tokenizer)
    if args.verify:
      _print_verification(cfg, verify(cfg), parser)
      return
    builder = rebuild(cfg) if args.rebuild else prepare(cfg)
  except UserError as e:
    parser.exit(1, f'FATAL {type(e).__name__}: {e}\n')
  print(f'{cfg.name}: {"rebuilt" if args.rebuild else "prepared"} at '
        f'{builder.data_dir} in {time.perf_counter() - start:.1f}s')
  for split in (cfg.train_split, cfg.eval_split):
    if split in builder.info.splits:
      print(f'  {split}: {split_stats(cfg, split)}')
  print(f'  vocab_size: {vocab_size(cfg)}')
  h = unigram_entropy(cfg)
  print(f'  unigram entropy (train): {h:.4f} nats/token '
        f'({h / math.log(2):.3f} bits)')


def _print_verification(cfg: DataConfig, damage: dict, parser) -> None:
  for split, files in damage.items():
    print(f'{cfg.name} {split}: ' + ('intact' if not files else f'{len(files)} damaged file(s)'))
    for d in files:
      print(f'  DAMAGED {d.file}: {d.bad_records} unreadable record(s), '
            f'the first at record {d.first_record}')
  if any(damage.values()):
    parser.exit(1, f'damaged: rebuild with {rebuild_command(cfg)}\n')


if __name__ == '__main__':
  main()
