"""moe.data: our TFDS builders (built offline here), tokenizer, packing, the
grain pipeline (determinism, sharding, checkpoints), and the errors."""

import json
import os
import sys

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


def _docs_in(stream: np.ndarray) -> list[bytes]:
  """Complete documents (EOS-terminated) in a token stream starting at one."""
  ends = np.flatnonzero(stream == EOS)
  starts = np.concatenate([[0], ends[:-1] + 1])
  return [stream[s:e].astype(np.uint8).tobytes() for s, e in zip(starts, ends)]


def _first_epoch(it, batches=40) -> list[bytes]:
  stream = np.concatenate([next(it).reshape(-1) for _ in range(batches)])
  seen = []
  for doc in _docs_in(stream):
    if doc in seen:
      return seen
    seen.append(doc)
  raise AssertionError('stream shorter than one epoch')


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
  for split in ('train', 'validation'):
    assert len(by_name[split]) == len(by_dir[split])
    paths[split] = {ex['path'].decode() for ex in by_dir[split]}
    # Only empty/whitespace files are left out.
    assert paths[split] <= set(expected[split])
    assert len(paths[split]) >= len(expected[split]) - 20
  assert len(paths['train']) > 1000 and len(paths['validation']) >= 10
  assert not paths['train'] & paths['validation']
  assert not any('site-packages' in p for p in paths['train'])
  ex = by_name['train'][0]
  root = data_builders.stdlib_root()
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
  assert len(list(data.eval_batches(cfg, seq_len=15, batch_size=2))) == 18
  bad = data.DataConfig(name='toy_corpus_for_test', data_dir=str(tmp_path))
  with pytest.raises(ConfigError, match="Split 'validation'.*'test', 'train'"):
    data.eval_batches(bad, seq_len=15, batch_size=2)


@pytest.mark.parametrize('kwargs, match', [
    (dict(name='Not A Name'), "data.name='Not A Name'"),
    (dict(name='python_stdlib/py27'), 'takes no config'),
    (dict(name='text_files'), 'needs data.text_files'),
    (dict(text_files='/x/*.txt'), 'only used with'),
    (dict(tokenizer='gpt2'), "data.tokenizer='gpt2'.*'bytes'"),
    (dict(read_threads=-1), 'read_threads'),
])
def test_config_validation(kwargs, match):
  with pytest.raises(ValueError, match=match):
    data.DataConfig(**kwargs)


def test_pipeline_argument_validation(stdlib_cfg):
  with pytest.raises(ValueError, match='shard_index=2'):
    data.train_iterator(stdlib_cfg, seq_len=8, batch_size=1, seed=0,
                        shard_index=2, shard_count=2)
  with pytest.raises(ValueError, match='seq_len=0'):
    data.eval_batches(stdlib_cfg, seq_len=0, batch_size=1)


def test_tokenizers(tmp_path):
  tok = data.get_tokenizer(data.DataConfig())
  assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (384, 256, 257)
  assert data.vocab_size(data.DataConfig()) % 128 == 0
  ids = tok.encode('héllo')
  assert ids.dtype == np.int32 and ids.max() < 256
  assert tok.decode(np.append(ids, EOS)) == 'héllo'.encode()
  try:
    import sentencepiece  # noqa: F401
  except ImportError:
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


def test_train_batches_are_packed_documents(corpus):
  cfg, docs = corpus
  it = data.train_iterator(cfg, seq_len=31, batch_size=3, seed=0,
                           shard_index=0, shard_count=1)
  batches = [next(it) for _ in range(10)]
  assert all(b.shape == (3, 32) and b.dtype == np.int32 for b in batches)
  stream = np.concatenate([b.reshape(-1) for b in batches])
  found = _docs_in(stream)
  assert len(found) > 20
  assert set(found) <= set(docs.values())   # EOS exactly between documents
  assert not (stream == data.ByteTokenizer.pad_id).any()


# --- Determinism, sharding, checkpoints --------------------------------------

def test_deterministic_for_a_seed(stdlib_cfg):
  def first(seed, n=3):
    it = data.train_iterator(stdlib_cfg, seq_len=32, batch_size=4, seed=seed,
                             shard_index=0, shard_count=1)
    return np.stack([next(it) for _ in range(n)])
  a = first(1)
  np.testing.assert_array_equal(a, first(1))
  assert not np.array_equal(a, first(2))


def test_shards_are_disjoint_and_cover(corpus):
  cfg, _ = corpus
  train = {ex['text'] for ex in data.prepare(cfg).as_data_source('train')}
  epochs = [_first_epoch(data.train_iterator(
      cfg, seq_len=15, batch_size=4, seed=3, shard_index=i, shard_count=2))
            for i in range(2)]
  a, b = set(epochs[0]), set(epochs[1])
  assert len(a) == len(epochs[0]) and len(b) == len(epochs[1])
  assert not a & b
  assert a | b == train
  assert abs(len(a) - len(b)) <= 1
  # The next epoch is shuffled differently.
  it = data.train_iterator(cfg, seq_len=15, batch_size=4, seed=3,
                           shard_index=0, shard_count=1)
  stream = np.concatenate([next(it).reshape(-1) for _ in range(60)])
  found = _docs_in(stream)
  assert found[:len(train)] != found[len(train):2 * len(train)]


@pytest.mark.parametrize('skip', [1, 5])
def test_checkpoint_round_trip(stdlib_cfg, skip):
  kw = dict(seq_len=64, batch_size=4, seed=7, shard_index=1, shard_count=2)
  it = data.train_iterator(stdlib_cfg, **kw)
  for _ in range(skip):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
  assert state['offset'] > 0  # restoring into the middle of a document
  expected = [next(it) for _ in range(4)]
  restored = data.train_iterator(stdlib_cfg, **kw)
  restored.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(next(restored), want)
  # Also after crossing into new documents and a restore of the restored one.
  state = restored.get_state()
  expected = [next(restored) for _ in range(3)]
  again = data.train_iterator(stdlib_cfg, **kw)
  again.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(next(again), want)


def test_eval_batches_finite_deterministic_sharded(stdlib_cfg):
  kw = dict(seq_len=255, batch_size=8)
  whole = data.eval_batches(stdlib_cfg, shard_index=0, shard_count=1, **kw)
  a, b = list(whole), list(whole)
  assert len(a) > 100  # ~459k validation tokens / (8 x 256)
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x, y)
  assert all(x.shape == (8, 256) and x.dtype == np.int32 for x in a)
  limited = data.eval_batches(stdlib_cfg, max_batches=3, shard_index=0,
                              shard_count=1, **kw)
  assert len(list(limited)) == 3
  # Two processes with 4 rows each see the same rows as one with 8.
  halves = [list(data.eval_batches(stdlib_cfg, seq_len=255, batch_size=4,
                                   shard_index=i, shard_count=2))
            for i in range(2)]
  assert len(halves[0]) == len(halves[1]) == len(a)
  for x, h0, h1 in zip(a, *halves):
    np.testing.assert_array_equal(x, np.concatenate([h0, h1]))
  with pytest.raises(ValueError, match='fewer than one global eval batch'):
    list(data.eval_batches(stdlib_cfg, seq_len=255, batch_size=10**5))


def test_unigram_entropy(corpus, stdlib_cfg):
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
