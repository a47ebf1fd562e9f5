"""Run directories on GCS (gs://): what the run writes besides its checkpoint
arrays (metrics, TensorBoard, config.json, command.txt, the checkpoints'
set-aside folders) goes through etils.epath.

GCS cannot be reached here, so `fake_gcs` maps gs://BUCKET/... onto a local
folder through epath's own test hook, with GCS's two differences from a
disk: no append, and no directories (a folder exists while an object is in
it). Run in a scratch cwd: a plain `open('gs://...')` or `os.makedirs` would
leave a local 'gs:' folder there, which every test refuses.
"""

import json
import os
import shutil

import pytest
from etils import epath
from etils.epath import testing as epath_testing

from moe import metrics as M
from moe import checkpoint, report, run_dir
from moe.config import ConfigError
from test_metrics import read_tb


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
  """gs://... -> tmp_path/bucket/...; yields that root."""
  root = tmp_path / 'bucket'
  root.mkdir()
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(run_dir, 'gcs_client_installed', lambda: True)

  def local(path):
    path = os.fspath(path)
    return str(root / path[len('gs://'):]) if path.startswith('gs://') else path

  def remote(path):
    return os.fspath(path).startswith('gs://')

  def open_(fn, path, mode):
    if remote(path) and 'a' in mode:
      raise OSError(f'GCS objects cannot be appended to: {path}')
    if remote(path) and ('w' in mode):
      os.makedirs(os.path.dirname(local(path)), exist_ok=True)
    return fn(local(path), mode)

  def makedirs(fn, path, exist_ok=False):
    if not remote(path):
      fn(path, exist_ok=exist_ok)

  def glob(fn, pattern):
    return ['gs://' + os.path.relpath(p, root) if remote(pattern) else p
            for p in fn(local(pattern))]

  def unary(fn, path):
    return fn(local(path))

  def exists(fn, path):    # a remote folder: while an object is in it
    if remote(path) and os.path.isdir(local(path)):
      return any(files for _, _, files in os.walk(local(path)))
    return fn(local(path))

  with epath_testing.mock_epath(
      open=open_, makedirs=makedirs, mkdir=makedirs, glob=glob,
      exists=exists, isdir=exists, listdir=unary, remove=unary, rmtree=unary,
      stat=unary, rename=lambda fn, a, b: fn(local(a), local(b)),
      walk=lambda fn, top, **kw: fn(local(top), **kw)):
    yield root
  assert not os.path.exists(tmp_path / 'gs:'), 'a gs:// path was written locally'


def test_metrics_on_gcs_upload_at_sync_and_continue_on_resume(fake_gcs):
  workdir = 'gs://bkt/run'
  with M.MetricWriter(workdir, enabled=True, total_steps=4, progress=False) as w:
    w.write(1, {'loss': 4.0})
    w.write_eval(1, {'loss': 3.5})
    w.sync()                                   # a checkpoint: uploaded so far
    remote = fake_gcs / 'bkt/run/metrics.jsonl'
    assert [json.loads(l) for l in remote.read_text().splitlines()] == [
        {'step': 1, 'loss': 4.0}, {'step': 1, 'eval/loss': 3.5}]
    w.write(2, {'loss': 3.0})
    assert len(remote.read_text().splitlines()) == 2   # not before the next sync
    staging = w._staging
  assert not os.path.exists(staging)           # close uploaded, then cleaned up
  tb = read_tb(fake_gcs / 'bkt/run')
  assert tb['loss'] == [(1, 4.0), (2, 3.0)] and tb['eval/loss'] == [(1, 3.5)]
  with M.MetricWriter(workdir, enabled=True, total_steps=4, progress=False) as w:
    w.write(3, {'loss': 2.0})                  # a resumed run continues the file
  info, train, evals, _ = report.read_metrics(workdir + '/metrics.jsonl')
  assert {s: r['loss'] for s, r in train.items()} == {1: 4.0, 2: 3.0, 3: 2.0}
  assert evals == {1: {'loss': 3.5}}


def test_run_files_on_gcs(fake_gcs):
  workdir = 'gs://bkt/run'
  run_dir.check_writable(workdir)
  assert os.listdir(fake_gcs / 'bkt/run') == []   # the probe is gone again
  run_dir.append_text(workdir, 'command.txt', 'python train.py\n')
  run_dir.append_text(workdir, 'command.txt', 'python train.py --resume\n')
  run_dir.write_text(workdir, 'config.json', '{}')
  assert (fake_gcs / 'bkt/run/command.txt').read_text() == (
      'python train.py\npython train.py --resume\n')
  assert (fake_gcs / 'bkt/run/config.json').read_text() == '{}'


def test_checkpoints_set_aside_on_gcs(fake_gcs):
  """A restart's set-aside folder exists on GCS even when nothing moves
  into it (it marks the restart as done), and steps move into it."""
  for step in (2, 4, 6):
    (fake_gcs / f'bkt/run/checkpoints/{step}').mkdir(parents=True)
    (fake_gcs / f'bkt/run/checkpoints/{step}/_CHECKPOINT_METADATA').write_text('{}')
  directory = 'gs://bkt/run/checkpoints'
  aside = checkpoint.move_aside(directory, [4, 6], 'after_2')   # a restart from step 2
  assert aside.startswith('gs://bkt/run/checkpoints.after_2.')
  assert sorted(os.listdir(fake_gcs / aside[len('gs://'):])) == ['4', '6', 'SET_ASIDE.txt']
  assert os.listdir(fake_gcs / 'bkt/run/checkpoints') == ['2']
  assert checkpoint.restarted_from(directory, 2) and not checkpoint.restarted_from(directory, 1)
  empty = checkpoint.move_aside(directory, [], 'after_1')      # nothing newer than 2
  assert os.listdir(fake_gcs / empty[len('gs://'):]) == ['SET_ASIDE.txt']
  assert checkpoint.restarted_from(directory, 1)


def test_a_set_aside_cut_short_is_not_a_restart_done(fake_gcs):
  """On GCS a move copies every object: a preemption can stop it halfway.
  The rerun must set the rest aside again, not take the restart as done."""
  (fake_gcs / 'bkt/run/checkpoints/4').mkdir(parents=True)
  (fake_gcs / 'bkt/run/checkpoints/4/_CHECKPOINT_METADATA').write_text('{}')
  directory = 'gs://bkt/run/checkpoints'
  with pytest.raises(FileNotFoundError):
    checkpoint.move_aside(directory, [4, 6], 'after_2')     # 6 is not there: cut short
  assert not checkpoint.restarted_from(directory, 2)
  # A folder set aside before the notes existed holds steps only: done.
  (fake_gcs / 'bkt/run/checkpoints.after_3.20261101-120000/4/x').mkdir(parents=True)
  (fake_gcs / 'bkt/run/checkpoints.after_3.20261101-120000/4/x/y').write_text('')
  assert checkpoint.restarted_from(directory, 3)


def test_a_failed_upload_is_retried_and_never_loses_metrics(fake_gcs, monkeypatch, caplog):
  failing, upload = [True], run_dir.upload

  def flaky_upload(*args):
    if failing[0]:
      raise OSError('503 Service Unavailable')
    upload(*args)

  def steps(path):
    return [json.loads(line)['step'] for line in open(path)]

  monkeypatch.setattr(run_dir, 'upload', flaky_upload)
  w = M.MetricWriter('gs://bkt/run', enabled=True, total_steps=4, progress=False)
  w.write(1, {'loss': 4.0})
  w.sync()                                       # logged; training goes on
  assert ('could not upload metrics to gs://bkt/run (OSError: 503 Service '
          'Unavailable); trying again at the next checkpoint') in caplog.text
  failing[0] = False
  w.write(2, {'loss': 3.0})
  w.sync()                                       # the next checkpoint uploads it all
  assert steps(fake_gcs / 'bkt/run/metrics.jsonl') == [1, 2]
  failing[0] = True
  w.write(3, {'loss': 2.0})
  w.close()                                      # fails too: the local copy stays
  assert f'they are kept in {w._staging}' in caplog.text
  assert steps(os.path.join(w._staging, 'metrics.jsonl')) == [1, 2, 3]
  shutil.rmtree(w._staging)


@pytest.mark.parametrize('path, match', [
    ('s3://bkt/run', "workdir='s3://bkt/run': the only URL scheme supported is gs://"),
    ('gs://bkt/run', r"workdir='gs://bkt/run' is on GCS, which needs the gcsfs "
                     r"package without TensorFlow: pip install 'moe\[gcs\]'"),
])
def test_unreachable_workdir_is_refused(path, match, monkeypatch):
  monkeypatch.setattr(run_dir, 'gcs_client_installed', lambda: False)
  with pytest.raises(ConfigError, match=match):
    run_dir.check_writable(path)


def test_local_workdir_needs_no_package(tmp_path, monkeypatch):
  monkeypatch.setattr(run_dir, 'gcs_client_installed', lambda: False)
  run_dir.check_writable(str(tmp_path / 'new' / 'run'))
  assert os.listdir(tmp_path / 'new' / 'run') == []
  assert epath.Path(tmp_path / 'new' / 'run').is_dir()
