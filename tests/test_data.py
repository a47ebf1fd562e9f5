"""moe.data: our TFDS builders (built offline here), tokenizer, packing, the
grain pipeline (determinism, sharding, checkpoints), and the errors."""

import dataclasses
import json
import os
import sys
import unittest.mock

import grain
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import NamedSharding, PartitionSpec as P

from moe import data
from moe import data_builders
from moe.config import ConfigError

EOS = data.ByteTokenizer.eos_id


@pytest.fixture(scope='module')
def stdlib_cfg(data_dir):
  return data.DataConfig(data_dir=data_dir)


def _write_corpus(root, docs):
  os.makedirs(root, exist_ok=True)
  for name, text in docs.items():
    path = os.path.join(root, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as f:
      f.write(text)


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  """40 distinct small documents (one epoch of the train split is easy to
  find in a stream: it ends where a document repeats)."""
  root = str(tmp_path_factory.mktemp('corpus'))
  docs = {f'sub{i % 3}/doc{i:02d}.txt': (f'doc {i}: ' + 'xyz' * (i % 7 + 1)
                                         ).encode() for i in range(40)}
  _write_corpus(root, docs)
  cfg = data.DataConfig(name='text_files', text_files=root,
                        data_dir=str(tmp_path_factory.mktemp('tfds_text')))
  return cfg, docs


def _pieces(row: np.ndarray) -> list[bytes]:
  """A row cut at its EOS tokens (the first and last piece may be partial)."""
  ends = np.flatnonzero(row == EOS)
  bounds = [-1, *ends, len(row)]
  return [row[a + 1:b].astype(np.uint8).tobytes() for a, b in zip(bounds, bounds[1:])]


def _epochs(it, rows_per_epoch: int, epochs: int) -> list[list[bytes]]:
  """The rows (as bytes) of the first `epochs` epochs of a global-order
  iterator, epoch by epoch."""
  rows = []
  while len(rows) < rows_per_epoch * epochs:
    rows.extend(r.tobytes() for r in next(it))
  return [rows[e * rows_per_epoch:(e + 1) * rows_per_epoch] for e in range(epochs)]


def _train_docs(cfg) -> list[bytes]:
  return [ex['text'] for ex in data.prepare(cfg).as_data_source('train')]


# --- Builders ----------------------------------------------------------------

def test_stdlib_builder_reads_back_without_tensorflow(stdlib_cfg, data_dir):
  builder = data.prepare(stdlib_cfg)
  assert builder.info.file_format.value == 'array_record'
  # Through TFDS's own entry points, by name and by directory.
  by_name = tfds.data_source('python_stdlib', data_dir=data_dir,
                             download=False)
  by_dir = tfds.builder_from_directory(builder.data_dir).as_data_source()
  files = data_builders.stdlib_files()
  expected = data_builders.assign_splits(files)
  paths = {}
  root = data_builders.stdlib_root()
  for split in ('train', 'validation'):
    assert len(by_name[split]) == len(by_dir[split])
    paths[split] = {ex['path'].decode() for ex in by_dir[split]}
    # Exactly the split's files with text: only whitespace-only ones are out.
    with_text = set()
    for rel in expected[split]:
      with open(os.path.join(root, rel), 'rb') as f:
        if f.read().strip():
          with_text.add(rel)
    assert paths[split] == with_text
    assert len(by_dir[split]) == len(with_text)
  assert len(paths['train']) > 1000 and len(paths['validation']) >= 10
  assert not paths['train'] & paths['validation']
  assert not any('site-packages' in p for p in paths['train'])
  ex = by_name['train'][0]
  with open(os.path.join(root, ex['path'].decode()), 'rb') as f:
    assert f.read() == ex['text']
  assert 'tensorflow' not in sys.modules


def test_split_is_a_stable_hash_of_the_path():
  # Same answer on every machine: sha256 of the relative path, not hash().
  assert data_builders._path_hash('os.py') == 15697233401230026892
  files = data_builders.stdlib_files()
  a = data_builders.assign_splits(files)
  b = data_builders.assign_splits(list(reversed(files)))
  assert a == b
  assert not set(a['train']) & set(a['validation'])
  assert set(a['train']) | set(a['validation']) == set(files)
  frac = len(a['validation']) / len(files)
  assert 0.005 < frac < 0.04, frac
  # Adding files never moves existing ones (a path's split is its own hash).
  more = data_builders.assign_splits(
      files + [f'x/new{i}.py' for i in range(50)])
  assert set(a['validation']) <= set(more['validation'])


def test_text_files_builder(corpus, tmp_path):
  cfg, docs = corpus
  builder = data.prepare(cfg)
  source = tfds.builder_from_directory(builder.data_dir).as_data_source()
  got = {ex['path'].decode(): ex['text']
         for split in ('train', 'validation') for ex in source[split]}
  assert got == docs
  val = {ex['path'].decode() for ex in source['validation']}
  assert val and len(val) < len(docs)
  info = os.path.join(builder.data_dir, 'dataset_info.json')
  built_at = os.stat(info).st_mtime_ns
  assert data.prepare(cfg).data_dir == builder.data_dir
  assert os.stat(info).st_mtime_ns == built_at                 # reused, not rebuilt
  # A glob, with a non-UTF-8 file, an empty file (skipped) and a single file
  # per validation fallback.
  root = str(tmp_path / 'c')
  _write_corpus(root, {'a.txt': b'\xff\xfe bytes', 'b.txt': b'hello',
                       'c.txt': b'', 'd.md': b'not matched'})
  cfg2 = data.DataConfig(name='text_files', text_files=f'{root}/*.txt',
                         data_dir=str(tmp_path / 'tfds'))
  source = data.prepare(cfg2).as_data_source()
  texts = sorted(ex['text'] for s in source.values() for ex in s)
  assert texts == [b'hello', b'\xff\xfe bytes']
  assert len(source['validation']) == 1


def test_prepare_command_line(corpus, tmp_path, capsys):
  """python -m moe.data: prepares and prints the corpus' statistics; bad
  input is one line, exit 1, as from train.py."""
  cfg, docs = corpus
  data.main(['--name', 'text_files', '--text_files', cfg.text_files,
             '--data_dir', cfg.data_dir])
  out = capsys.readouterr().out
  train = data.split_stats(cfg, 'train')
  assert f"  train: {train}" in out and '  vocab_size: 384' in out
  assert train['documents'] + data.split_stats(cfg, 'validation')['documents'] == len(docs)
  pattern = str(tmp_path / 'nothing' / '*.txt')
  with pytest.raises(SystemExit) as e:
    data.main(['--name', 'text_files', '--text_files', pattern])
  assert e.value.code == 1
  assert capsys.readouterr().err == (
      f"FATAL ConfigError: text_files={pattern!r} matches no files (looked for "
      f"{pattern!r}): nothing to build. Pass a directory or a glob such as "
      '"/data/corpus/**/*.txt".\n')


def test_empty_text_corpus_fails_before_building(tmp_path):
  pattern = str(tmp_path / 'nothing' / '*.txt')
  cfg = data.DataConfig(name='text_files', text_files=pattern,
                        data_dir=str(tmp_path / 'tfds'))
  with pytest.raises(ValueError, match='matches no files') as e:
    data.prepare(cfg)
  assert pattern in str(e.value)
  assert not (tmp_path / 'tfds').exists()


# --- Errors and config -------------------------------------------------------

def test_unprepared_tfds_dataset_error_has_prepare_command(tmp_path):
  cfg = data.DataConfig(name='lm1b', data_dir=str(tmp_path))
  with pytest.raises(data.DatasetNotPreparedError) as e:
    data.prepare(cfg)
  assert (f'tfds build lm1b --file_format=array_record --data_dir={tmp_path}'
          in str(e.value))
  # c4 cannot even be imported without TensorFlow: same kind of error.
  cfg = data.DataConfig(name='c4/en', data_dir=str(tmp_path))
  with pytest.raises(data.DatasetNotPreparedError) as e:
    data.train_iterator(cfg, seq_len=8, batch_size=1, seed=0)
  assert (f'tfds build c4/en --file_format=array_record --data_dir={tmp_path}'
          in str(e.value))


def test_unknown_dataset_name(tmp_path):
  cfg = data.DataConfig(name='pyhton_stdlb', data_dir=str(tmp_path))
  with pytest.raises(data.DatasetNotPreparedError,
                     match="Unknown or missing dataset.*'pyhton_stdlb'.*"
                           "Did you mean 'python_stdlib'"):
    data.prepare(cfg)


class ToyCorpusForTest(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Stands in for a TFDS dataset prepared elsewhere (e.g. c4 built with TF)."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({'text': tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(0, 30),
            'test': self._generate_examples(30, 40)}

  def _generate_examples(self, lo, hi):
    for i in range(lo, hi):
      yield i, {'text': f'document number {i} ' * 3}


def test_any_prepared_tfds_dataset_by_name(tmp_path):
  ToyCorpusForTest(data_dir=str(tmp_path), file_format='array_record'
             ).download_and_prepare()
  # The builder's code is not registered: read from the prepared files only.
  cfg = data.DataConfig(name='toy_corpus_for_test', data_dir=str(tmp_path),
                        eval_split='test')
  batch = next(data.train_iterator(cfg, seq_len=15, batch_size=2, seed=0))
  assert batch.shape == (2, 16) and batch.dtype == np.int32
  # 10 test documents of 3 x 19 bytes + EOS = 580 tokens: 36 rows, 18 batches.
  whole = data.eval_set(cfg, seq_len=15, batch_size=2)
  assert (len(whole), whole.rows, whole.tokens, whole.documents) == (18, 36, 540, 10)
  assert len(list(whole)) == 18 and whole.whole_split
  bad = data.DataConfig(name='toy_corpus_for_test', data_dir=str(tmp_path))
  with pytest.raises(ConfigError, match="Split 'validation'.*'test', 'train'"):
    data.eval_set(bad, seq_len=15, batch_size=2)


@pytest.mark.parametrize('kwargs, match', [
    (dict(name='Not A Name'), "data.name='Not A Name'"),
    (dict(name='python_stdlib/py27'), 'takes no config'),
    (dict(name='text_files'), 'needs data.text_files'),
    (dict(text_files='/x/*.txt'), 'only used with'),
    (dict(tokenizer='gpt2'), "data.tokenizer='gpt2'.*'bytes'"),
    (dict(read_threads=-1), 'read_threads'),
    (dict(row_shuffle='rows'), "data.row_shuffle='rows'.*'global', 'window'"),
    (dict(shuffle_window=0), 'data.shuffle_window=0 must be an int >= 1'),
])
def test_config_validation(kwargs, match):
  with pytest.raises(ValueError, match=match):
    data.DataConfig(**kwargs)


def test_pipeline_argument_validation(stdlib_cfg):
  with pytest.raises(ValueError, match='shard_index=2'):
    data.train_iterator(stdlib_cfg, seq_len=8, batch_size=1, seed=0,
                        shard_index=2, shard_count=2)
  with pytest.raises(ValueError, match='seq_len=0'):
    data.eval_set(stdlib_cfg, seq_len=0, batch_size=1)


def test_tokenizers(tmp_path):
  tok = data.get_tokenizer(data.DataConfig())
  assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (384, 256, 257)
  assert data.vocab_size(data.DataConfig()) % 128 == 0
  ids = tok.encode('héllo')
  assert ids.dtype == np.int32 and ids.max() < 256
  assert tok.decode(np.append(ids, EOS)) == 'héllo'.encode()
  # Without the sentencepiece package (not a dependency of moe): one line.
  with unittest.mock.patch.dict(sys.modules, {'sentencepiece': None}):
    cfg = data.DataConfig(tokenizer=str(tmp_path / 'spm.model'))
    with pytest.raises(ConfigError, match='pip install sentencepiece'):
      data.get_tokenizer(cfg)


# --- Packing -----------------------------------------------------------------

def test_packing_exact():
  docs = [np.arange(n, dtype=np.int32) + 10 * n for n in (3, 1, 7, 2, 5, 4)]
  ds = grain.MapDataset.source(docs).map(
      lambda d: np.append(d, np.int32(EOS)).astype(np.int32))
  rows = list(data._PackIterDataset(ds.to_iter_dataset(), 5))
  stream = np.concatenate([np.append(d, EOS) for d in docs])  # 28 tokens
  assert len(rows) == 5  # the last 3 tokens do not fill a row
  assert all(r.shape == (5,) and r.dtype == np.int32 for r in rows)
  np.testing.assert_array_equal(np.concatenate(rows), stream[:25])


@pytest.mark.parametrize('row_shuffle', ['global', 'window'])
def test_train_rows_are_cut_from_packed_documents(corpus, row_shuffle):
  cfg, docs = corpus
  cfg = dataclasses.replace(cfg, row_shuffle=row_shuffle, shuffle_window=5)
  it = data.train_iterator(cfg, seq_len=31, batch_size=3, seed=0,
                           shard_index=0, shard_count=1)
  rows = np.concatenate([next(it) for _ in range(10)])
  assert rows.shape == (30, 32) and rows.dtype == np.int32
  texts = set(docs.values())
  for row in rows:
    first, *whole, last = _pieces(row)
    assert set(whole) <= texts               # EOS exactly between documents
    assert any(t.endswith(first) for t in texts)
    assert any(t.startswith(last) for t in texts)
  assert not (rows == data.ByteTokenizer.pad_id).any()


def test_cpu_recipe_batches_sample_the_corpus(stdlib_cfg):
  """With the CPU recipe's shape (16 rows of 129 tokens, seed 0), a batch
  draws its rows from many source files, not one (issue 17: the median was
  1 when rows followed document order)."""
  docs = _train_docs(stdlib_cfg)
  corpus = b''.join(docs)
  starts = np.cumsum([0] + [len(d) for d in docs])
  it = data.train_iterator(stdlib_cfg, seq_len=128, batch_size=16, seed=0,
                           shard_index=0, shard_count=1)
  distinct = []
  for _ in range(20):
    sources = set()
    for row in next(it):
      piece = max(_pieces(row), key=len)     # found in exactly its file, or
      at = corpus.find(piece)                # first in an identical one
      assert at >= 0
      sources.add(int(np.searchsorted(starts, at, side='right')) - 1)
    distinct.append(len(sources))
  print(f'distinct source files per batch: {distinct}; median {np.median(distinct)}')
  assert np.median(distinct) >= 12, distinct


# --- Determinism, sharding, checkpoints --------------------------------------

@pytest.mark.parametrize('row_shuffle', ['global', 'window'])
def test_deterministic_for_a_seed(stdlib_cfg, row_shuffle):
  cfg = dataclasses.replace(stdlib_cfg, row_shuffle=row_shuffle)

  def first(seed, n=3):
    it = data.train_iterator(cfg, seq_len=32, batch_size=4, seed=seed,
                             shard_index=0, shard_count=1)
    return np.stack([next(it) for _ in range(n)])
  a = first(1)
  np.testing.assert_array_equal(a, first(1))
  assert not np.array_equal(a, first(2))


def test_global_order_epochs_and_processes(corpus):
  """Each epoch is a permutation of every packed row, a new one each epoch;
  two processes read disjoint rows, which together are exactly the batches
  of one process reading both shares."""
  cfg, _ = corpus
  length = 16
  tokens = sum(len(d) + 1 for d in _train_docs(cfg))
  rows_per_epoch = tokens // length
  kw = dict(seq_len=length - 1, seed=3)
  one = data.train_iterator(cfg, batch_size=4, shard_index=0, shard_count=1, **kw)
  epochs = _epochs(one, rows_per_epoch, 3)
  assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(epochs[2])
  assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
  assert len(set(epochs[0])) > rows_per_epoch // 2   # mostly distinct rows
  # Two processes, 2 rows each: global batch t = the single process's batch t.
  single = data.train_iterator(cfg, batch_size=4, shard_index=0, shard_count=1, **kw)
  halves = [data.train_iterator(cfg, batch_size=2, shard_index=i, shard_count=2, **kw)
            for i in range(2)]
  seen = [[], []]
  for _ in range(rows_per_epoch // 4):
    parts = [next(h) for h in halves]
    np.testing.assert_array_equal(np.concatenate(parts), next(single))
    for i in range(2):
      seen[i].extend(r.tobytes() for r in parts[i])
  # Disjoint as positions in the epoch's order (identical rows aside).
  assert not (set(seen[0]) & set(seen[1])) - {
      r for r in epochs[0] if epochs[0].count(r) > 1}


def test_window_order_shards_are_disjoint_documents(corpus):
  cfg, _ = corpus
  cfg = dataclasses.replace(cfg, row_shuffle='window', shuffle_window=4)
  texts = [set(), set()]
  for i in range(2):
    it = data.train_iterator(cfg, seq_len=63, batch_size=4, seed=3,
                             shard_index=i, shard_count=2)
    for _ in range(4):
      for row in next(it):
        texts[i].update(_pieces(row)[1:-1])
  assert texts[0] and texts[1] and not texts[0] & texts[1]


@pytest.mark.parametrize('row_shuffle, skip', [
    ('global', 1), ('global', 37), ('window', 1), ('window', 9)])
def test_checkpoint_round_trip(stdlib_cfg, row_shuffle, skip):
  """Restoring an iterator's state mid-epoch (and, for 'window', mid-window
  and mid-document) continues the exact row sequence."""
  cfg = dataclasses.replace(stdlib_cfg, row_shuffle=row_shuffle, shuffle_window=16)
  kw = dict(seq_len=64, batch_size=4, seed=7, shard_index=1, shard_count=2)
  it = data.train_iterator(cfg, **kw)
  for _ in range(skip):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
  expected = [next(it) for _ in range(6)]
  restored = data.train_iterator(cfg, **kw)
  restored.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(next(restored), want)
  # Also a restore of the restored one.
  state = restored.get_state()
  expected = [next(restored) for _ in range(3)]
  again = data.train_iterator(cfg, **kw)
  again.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(next(again), want)


def test_row_shuffle_auto_follows_the_split_size(stdlib_cfg, monkeypatch):
  assert data.row_shuffle(stdlib_cfg, 'train') == 'global'   # ~30 MiB
  monkeypatch.setattr(data, 'GLOBAL_SHUFFLE_MAX_BYTES', 1 << 20)
  assert data.row_shuffle(stdlib_cfg, 'train') == 'window'
  assert data.row_shuffle(stdlib_cfg, 'validation') == 'global'   # ~450 KiB
  forced = dataclasses.replace(stdlib_cfg, row_shuffle='global')
  assert data.row_shuffle(forced, 'train') == 'global'


def test_eval_set_whole_split(stdlib_cfg):
  kw = dict(seq_len=255, batch_size=8)
  whole = data.eval_set(stdlib_cfg, shard_index=0, shard_count=1, **kw)
  stats = data.split_stats(stdlib_cfg, 'validation')
  assert whole.whole_split and whole.rows == stats['tokens'] // 256
  assert whole.tokens == whole.rows * 255
  assert whole.documents == whole.num_documents == stats['documents']
  a, b = list(whole), list(whole)
  assert len(a) == -(-whole.rows // 8)
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x.tokens, y.tokens)
  assert all(x.tokens.shape == (8, 256) and x.tokens.dtype == np.int32 for x in a)
  # Every row once with weight 1; the padding of the last batch weighs 0.
  weights = np.concatenate([x.weights for x in a])
  assert weights.sum() == whole.rows and (weights[:whole.rows] == 1).all()
  # Documents in stored order: a target's document is the one after an EOS.
  docs = np.concatenate([x.documents for x in a])[:whole.rows].ravel()
  targets = np.concatenate([x.tokens[:, 1:] for x in a])[:whole.rows].ravel()
  assert docs[0] == 0 and docs[-1] <= stats['documents'] - 1
  step = np.diff(docs)
  assert set(np.unique(step)) <= {0, 1}
  np.testing.assert_array_equal(step == 1, targets[:-1] == EOS)
  # Two processes with 4 rows each see the same rows as one with 8.
  halves = [list(data.eval_set(stdlib_cfg, seq_len=255, batch_size=4,
                               shard_index=i, shard_count=2))
            for i in range(2)]
  assert len(halves[0]) == len(halves[1]) == len(a)
  for x, h0, h1 in zip(a, *halves):
    np.testing.assert_array_equal(x.tokens, np.concatenate([h0.tokens, h1.tokens]))
    np.testing.assert_array_equal(x.weights, h0.weights)
    np.testing.assert_array_equal(x.documents, h1.documents)
  with pytest.raises(ValueError, match='fewer than one global eval batch'):
    data.eval_set(stdlib_cfg, seq_len=255, batch_size=10**5)


def test_eval_set_positions_and_target_bytes_of_short_documents():
  # 40 documents of 9 bytes: 10 tokens each with their EOS, so 10 tokens
  # per 9 bytes, 11% off the 1.0001 of the stdlib split. (Mutation: bytes
  # counted as tokens gives 40 more.)
  docs = [np.append(np.frombuffer(b'abcdefgh\n', np.uint8), EOS) for _ in range(40)]
  stream = np.concatenate(docs).astype(np.uint16)
  starts = np.arange(41) * 10
  es = data.EvalSet(stream, starts, np.arange(400 // 17), 17, True, 2, 0, 1)
  batches = list(es)
  positions = np.concatenate([b.positions[b.weights > 0] for b in batches])
  targets = np.concatenate([b.tokens[:, 1:][b.weights[:2] > 0] for b in batches])
  np.testing.assert_array_equal(stream[positions], targets)   # positions name the targets
  np.testing.assert_array_equal(np.concatenate(
      [b.documents[b.weights > 0] for b in batches]), positions // 10)
  assert es.tokens == len(targets.ravel()) == 23 * 16
  n_eos = int(np.sum(targets == EOS))
  assert es.target_bytes(data.ByteTokenizer()) == es.tokens - n_eos
  assert es.tokens / es.target_bytes(data.ByteTokenizer()) > 1.1


def test_eval_set_sample_is_spread_over_the_split(stdlib_cfg):
  kw = dict(seq_len=255, batch_size=8, shard_index=0, shard_count=1)
  whole = np.concatenate([x.tokens for x in data.eval_set(stdlib_cfg, **kw)])
  sample = data.eval_set(stdlib_cfg, max_batches=3, **kw)
  assert not sample.whole_split and (sample.rows, len(sample)) == (24, 3)
  batches = list(sample)
  rows = {r.tobytes() for x in batches for r in x.tokens}
  assert len(rows) == 24 and rows <= {r.tobytes() for r in whole}
  docs = np.concatenate([x.documents for x in batches])
  # Not the split's first rows: from its first document to its last ones.
  assert docs.min() == 0 and docs.max() >= sample.num_documents - 3
  assert sample.documents >= 10
  # A split too large to hold in memory: whole documents in a fixed order.
  big = dataclasses.replace(stdlib_cfg, row_shuffle='window')
  with unittest.mock.patch.object(data, 'GLOBAL_SHUFFLE_MAX_BYTES', 1 << 10):
    drawn = [data.eval_set(big, max_batches=3, **kw) for _ in range(2)]
  for x, y in zip(*drawn, strict=True):
    np.testing.assert_array_equal(x.tokens, y.tokens)
  assert drawn[0].rows == 24 and not drawn[0].whole_split
  assert drawn[0].documents >= 2


def test_unigram_entropy(corpus, stdlib_cfg, tmp_path):
  # In closed form: every document is b'aab', so a token is 'a' (1/2), 'b'
  # (1/4) or EOS (1/4): 1.5 ln 2 nats, whichever documents are in train.
  _write_corpus(str(tmp_path / 'aab'), {f'd{i}.txt': b'aab' for i in range(12)})
  aab = data.DataConfig(name='text_files', text_files=str(tmp_path / 'aab'),
                        data_dir=str(tmp_path / 'tfds'))
  assert data.unigram_entropy(aab) == pytest.approx(1.5 * np.log(2), rel=1e-12)
  # Counted from the raw bytes of the records, without the tokenizer.
  cfg, _ = corpus
  counts = np.zeros(384)
  for ex in data.prepare(cfg).as_data_source('train'):
    counts += np.bincount(np.frombuffer(ex['text'], np.uint8), minlength=384)
    counts[EOS] += 1
  p = counts[counts > 0] / counts.sum()
  assert data.unigram_entropy(cfg) == pytest.approx(-(p * np.log(p)).sum())
  h = data.unigram_entropy(stdlib_cfg, max_tokens=2_000_000)
  assert 2.5 < h < 4.0  # Python source: ~3.25 nats/token over all of it


def test_global_batch(stdlib_cfg):
  mesh = jax.make_mesh((4, 2), ('data', 'expert'),
                       axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  sharding = NamedSharding(mesh, P(('data', 'expert')))
  local = next(data.train_iterator(stdlib_cfg, seq_len=16, batch_size=8,
                                   seed=0))
  arr = data.global_batch(local, sharding)
  assert arr.shape == (8, 17) and arr.dtype == np.int32
  assert arr.sharding == sharding
  np.testing.assert_array_equal(np.asarray(arr), local)
