"""Everyday accidents (issue 21): two trainers on one workdir, a stale lock,
config drift on resume, a full disk, a damaged corpus.

The trainers run as real processes (tests/reliability_worker.py, or
train.py where the one-line error is what is tested); the full disk is a
real small tmpfs, mounted in a private mount namespace (`unshare`), so
orbax's own writes fail as they would on a full volume.
"""

import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from moe import checkpoint, config_drift, data, disk_space, run_config, run_lock
from moe import sharding, steps, train_lib
from moe.config import ConfigError
from moe.checkpoint import checkpoint_steps
from moe.corpus_check import CorpusDamagedError

from reliability_worker import tiny_config
from test_reliability import Worker, _env, run, tmp_dirs, wait_for_step, xla_cache  # noqa: F401
from tiny import SWITCH_OVERRIDES, read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESH4 = {'mesh': [2, 2, 1]}


def _one_error_line(output: str, error: str) -> str:
  """The line `<error>: ...` of a failed run; it must be the only
  traceback-free report (no 'Traceback' anywhere)."""
  assert 'Traceback' not in output, output[-4000:]
  lines = [l for l in output.splitlines() if error in l]
  assert len(lines) == 1, output[-4000:]
  return lines[0]


# --- 1. One live trainer per workdir ---------------------------------------------------

def test_second_trainer_is_refused_and_the_first_is_unaffected(data_dir, xla_cache, tmp_path):
  """The first trainer runs until the test preempts it (SIGTERM: it saves
  and exits 0), so the second meets it however slowly it starts."""
  workdir = str(tmp_path / 'run')
  overrides = {**MESH4, 'num_steps': 1000, 'checkpoint_every': 1000}
  first = Worker(workdir, data_dir, xla_cache, overrides, '--step_sleep', 0.2)
  try:
    wait_for_step(workdir, 2, [first])
    lock = json.loads(open(os.path.join(workdir, 'LOCK')).read())
    assert lock['pid'] == first.proc.pid and lock['host'] == socket.gethostname()
    out = run(workdir, data_dir, xla_cache, overrides, expect_rc=1)
    assert f'WorkdirLockedError: {workdir} is in use by another trainer' in out, out[-3000:]
    assert f'pid {first.proc.pid}' in out and 'reliability_worker.py' in out
    assert first.proc.poll() is None, 'the first trainer stopped'
    first.proc.send_signal(signal.SIGTERM)
    assert first.wait() == 0, first.output()[-3000:]
  finally:
    first.kill()
  last = checkpoint_steps(workdir)[-1]
  steps = [l['step'] for l in read_jsonl(workdir) if 'loss' in l]
  assert steps == list(range(1, last + 1))   # every step once: nothing of the second
  assert not os.path.exists(os.path.join(workdir, 'LOCK'))   # released
  assert len(open(os.path.join(workdir, 'starts.jsonl')).readlines()) == 1


def test_lock_of_a_killed_trainer_is_taken_over(data_dir, xla_cache, tmp_path):
  workdir = str(tmp_path / 'run')
  overrides = {**MESH4, 'num_steps': 8}
  first = Worker(workdir, data_dir, xla_cache, overrides, '--step_sleep', 0.3)
  wait_for_step(workdir, 3, [first])
  deadline = time.monotonic() + 120
  while not checkpoint_steps(workdir) and time.monotonic() < deadline:
    time.sleep(0.05)
  first.kill()   # kill -9: no release, the lock stays behind
  held = json.loads(open(os.path.join(workdir, 'LOCK')).read())
  assert held['pid'] == first.proc.pid
  committed = checkpoint_steps(workdir)[-1]
  out = run(workdir, data_dir, xla_cache, overrides)
  assert re.search(rf'taking over the stale lock \S+LOCK of host \S+, pid {first.proc.pid}, '
                   rf'.*its process {first.proc.pid} is gone', out), out[-3000:]
  assert f'resumed from step {committed}' in out
  assert checkpoint_steps(workdir)[-1] == 8
  assert not os.path.exists(os.path.join(workdir, 'LOCK'))


def _record(**kw):
  now = time.time()
  return {'token': 'other', 'host': 'another-host', 'pid': 1, 'command': 'train.py',
          'started': now - 3600, 'heartbeat': now, **kw}


def test_lock_lease_from_another_host(tmp_path):
  """Another host's lock: obeyed while its heartbeat is fresh, taken over
  once it is older than the lease; a garbled one is taken over."""
  path = tmp_path / run_lock.LOCK_NAME
  path.write_text(json.dumps(_record(heartbeat=time.time() - 5)))
  with pytest.raises(run_lock.WorkdirLockedError,
                     match=r'in use by another trainer \(host another-host, pid 1, '
                           r'started .*, last heartbeat [56] s ago; command: train.py\)'):
    run_lock.RunLock(str(tmp_path), 'me').acquire()
  assert json.loads(path.read_text())['token'] == 'other'   # untouched

  for stale, reason in ((_record(heartbeat=time.time() - run_lock.LEASE_SECONDS - 1),
                         r'no heartbeat for 6\d s \(lease 60 s\)'),
                        ('{"token": "half-writ', r'last heartbeat')):
    path.write_text(stale if isinstance(stale, str) else json.dumps(stale))
    lock = run_lock.RunLock(str(tmp_path), 'me')
    assert re.search(reason, lock.acquire())
    assert json.loads(path.read_text())['token'] == lock.record['token']
    lock.release()
    assert not path.exists()


def test_holder_notices_a_lost_lock(tmp_path, monkeypatch):
  """A holder whose lock was taken over (it stalled past the lease) learns
  it at its next heartbeat; release() then leaves the new holder's lock."""
  monkeypatch.setattr(run_lock, 'HEARTBEAT_SECONDS', 0.05)
  lock = run_lock.RunLock(str(tmp_path), 'me')
  assert lock.acquire() is None and lock.check() is None
  beat = lock.read()['heartbeat']
  deadline = time.monotonic() + 30     # a loaded machine may delay the thread
  while lock.read()['heartbeat'] <= beat and time.monotonic() < deadline:
    time.sleep(0.05)
  assert lock.read()['heartbeat'] > beat   # renewed
  # The new holder's record, replaced whole as run_lock writes it (a
  # truncate-then-write could be read half-written: a garbled record).
  (tmp_path / 'LOCK.new').write_text(json.dumps(_record()))
  os.replace(tmp_path / 'LOCK.new', tmp_path / 'LOCK')
  while lock.check() is None and time.monotonic() < deadline:
    time.sleep(0.05)
  assert re.search(r'was taken over \(host another-host, pid 1, .*command: train.py\)',
                   lock.check())
  lock.release()
  assert json.loads((tmp_path / 'LOCK').read_text())['token'] == 'other'


# --- 2. Config drift on resume -----------------------------------------------------------

def test_config_drift_differences():
  saved = {'seed': 0, 'mesh': [1, 8, 1], 'optimizer': {'learning_rate': 3e-3},
           'eval': {'checkpoint_step': -1}}
  new = {'seed': 5, 'mesh': [1, 8, 1], 'optimizer': {'learning_rate': 1e-2},
         'eval': {'checkpoint_step': 4}, 'num_steps': 9}
  assert config_drift.differences(saved, new) == {
      'eval.checkpoint_step': (-1, 4), 'num_steps': (None, 9),
      'optimizer.learning_rate': (3e-3, 1e-2), 'seed': (0, 5)}
  with pytest.raises(ConfigError, match=r'resuming step 7 .*: optimizer.learning_rate: '
                     r'0.003 -> 0.01; seed: 0 -> 5\. .*accept_config_change=True'):
    config_drift.check(saved, new, step=7, accept=False)
  _, notice = config_drift.check(saved, new, step=7, accept=True)
  assert 'eval.checkpoint_step: -1 -> 4; num_steps: None -> 9' in notice
  assert 'ACCEPTED config changes' in notice and 'seed: 0 -> 5' in notice


def test_a_field_added_since_the_checkpoint_passes_at_its_default():
  # A checkpoint written before moe.balance_scope existed resumes under
  # code that has it: at its default ('group', the old behaviour) that is
  # no change; set to 'batch' it is one. (Mutation: treating an absent key
  # like any other difference refuses the first resume.)
  saved = {'seed': 0, 'moe': {'top_k': 1}}
  same = {'seed': 0, 'moe': {'top_k': 1, 'balance_scope': 'group'}}
  _, notice = config_drift.check(saved, same, step=3, accept=False)
  assert notice == ('config fields added since this checkpoint was saved, at '
                    "their defaults: moe.balance_scope='group'")
  other = {'seed': 0, 'moe': {'top_k': 1, 'balance_scope': 'batch'}}
  with pytest.raises(ConfigError, match=r"moe.balance_scope: None -> 'batch'"):
    config_drift.check(saved, other, step=3, accept=False)
  # A dense run (moe None) resumed as an MoE: its MoE fields are not "added".
  with pytest.raises(ConfigError, match=r"moe.balance_scope: None -> 'group'"):
    config_drift.check({'seed': 0, 'moe': None}, same, step=3, accept=False)


def test_resume_refuses_drift_unless_accepted_and_records_every_start(
    data_dir, tmp_path, monkeypatch, capsys):
  workdir = str(tmp_path / 'run')
  c = tiny_config(data_dir, {'num_steps': 2})
  train_lib.train(run_config.build(c), workdir)

  drifted = tiny_config(data_dir, {'num_steps': 4, 'seed': 5,
                                   'optimizer.learning_rate': 0.01})

  def no_setup(*a, **k):
    raise AssertionError('the trainer (model building, jit) was reached')
  with monkeypatch.context() as m:
    m.setattr(train_lib.steps, 'build', no_setup)
    with pytest.raises(ConfigError) as e:
      train_lib.train(run_config.build(drifted), workdir)
  assert ('resuming step 2 with a config that differs from the one it was trained '
          'with: optimizer.learning_rate: 0.003 -> 0.01; seed: 0 -> 5.') in str(e.value)
  assert 'num_steps' not in str(e.value)   # a restart key is no drift
  assert json.load(open(os.path.join(workdir, 'config.json')))['seed'] == 0

  # Accepted: the drift goes on, with the restart keys' changes, in one
  # notice, and every start keeps its config.
  drifted.num_steps, drifted.eval_every, drifted.accept_config_change = 4, 4, True
  capsys.readouterr()
  train_lib.train(run_config.build(drifted), workdir)
  notice = capsys.readouterr().out
  assert ('resuming step 2 with new settings: accept_config_change: False -> True; '
          'eval_every: 6 -> 4; num_steps: 2 -> 4; ACCEPTED config changes') in notice
  assert 'optimizer.learning_rate: 0.003 -> 0.01; seed: 0 -> 5' in notice
  starts = [json.loads(l) for l in open(os.path.join(workdir, 'starts.jsonl'))]
  assert [s['step'] for s in starts] == [None, 2]
  assert [s['config']['seed'] for s in starts] == [0, 5]
  assert starts[1]['changes'] == {
      'accept_config_change': [False, True], 'eval_every': [6, 4], 'num_steps': [2, 4],
      'optimizer.learning_rate': [0.003, 0.01], 'seed': [0, 5]}
  assert json.load(open(os.path.join(workdir, 'config.json')))['seed'] == 5
  assert checkpoint_steps(workdir)[-1] == 4


FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures',
                       'run_before_run_config')


def test_a_checkpoint_from_before_the_run_config_restores_and_resumes(data_dir, xla_cache,
                                                                       tmp_path):
  """tests/fixtures/run_before_run_config: a 2-step run of configs/switch.py:cpu
  shrunk to one layer of width 8 with 4 experts on one device, trained by the
  code before the typed RunConfig (commit d0f9b23). Restored today, its model
  gives the old code's loss on a fixed batch (6.3913655..., computed there),
  and train.py resumes it from step 2: the data fields added since
  (text_key, train_split, read_threads) pass at their defaults."""
  sys.path.insert(0, REPO)
  from configs import switch  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / 'run')
  shutil.copytree(FIXTURE, workdir)
  overrides = {
      'model.d_model': 8, 'model.num_layers': 1, 'model.num_heads': 2,
      'model.head_dim': 4, 'model.mlp_dim': 16, 'model.max_seq_len': 16, 'seq_len': 16,
      'moe.num_experts': 4, 'moe.expert_dim': 8, 'moe.group_size': 32, 'batch_size': 4,
      'num_steps': 2, 'log_every': 1, 'eval_every': 2, 'eval_batches': 1,
      'final_eval_batches': 1, 'checkpoint_every': 2, 'peak_flops_per_device': 1e12,
      'progress_bar': False, 'mesh': (1, 1, 1), 'data.data_dir': data_dir}
  c = switch.get_config('cpu')
  c.update_from_flattened_dict(overrides)
  t = steps.build(run_config.build(c), sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
  state = checkpoint.read_state(workdir, 2, t.abstract_state, t.state_shardings)
  tokens = (np.arange(4 * 17, dtype=np.int32).reshape(4, 17) * 37) % 256
  loss = float(t.eval_step(state, jax.device_put(tokens, t.batch_sharding))['loss'])
  assert loss == pytest.approx(6.3913655281066895, rel=1e-6)

  proc = subprocess.run(
      [sys.executable, 'train.py', '--config', 'configs/switch.py:cpu', '--workdir', workdir,
       *[f'--config.{k}={v}' for k, v in {**overrides, 'num_steps': 3}.items()]],
      env=dict(_env(xla_cache), JAX_NUM_CPU_DEVICES='1'), cwd=REPO,
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f'resumed from step 2 in {workdir}' in proc.stdout
  assert ('config fields added since this checkpoint was saved, at their defaults: '
          "data.read_threads=2, data.text_key='text', data.train_split='train'") in proc.stdout
  assert [l['step'] for l in read_jsonl(workdir) if 'loss' in l][-1] == 3


# --- 3. A full disk -------------------------------------------------------------------------

def _can_mount_tmpfs() -> bool:
  if not shutil.which('unshare'):
    return False
  probe = subprocess.run(['unshare', '-rm', 'sh', '-c', 'mount -t tmpfs -o size=1m tmpfs /mnt'],
                         capture_output=True)
  return probe.returncode == 0


needs_tmpfs = pytest.mark.skipif(
    not _can_mount_tmpfs(),
    reason='needs `unshare -rm` and a tmpfs mount (a real small filesystem)')


def _train_py(workdir, data_dir, **overrides):
  over = {**SWITCH_OVERRIDES, 'data.data_dir': data_dir, 'eval_batches': 1,
          'final_eval_batches': 1, **overrides}
  return [sys.executable, os.path.join(REPO, 'train.py'), '--workdir', workdir,
          *[f'--config.{k}={v}' for k, v in over.items()]]


def _in_small_fs(script: str, size: str, mountpoint: str, xla_cache):
  """Runs shell `script` with a fresh tmpfs of `size` at `mountpoint`, in
  a private mount namespace (the mount vanishes with it)."""
  os.makedirs(mountpoint, exist_ok=True)
  full = f'set -e; mount -t tmpfs -o size={size} tmpfs {mountpoint}; {script}'
  env = dict(_env(xla_cache), JAX_NUM_CPU_DEVICES='1')
  return subprocess.run(['unshare', '-rm', 'sh', '-c', full], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=600)


@needs_tmpfs
def test_too_little_space_is_refused_before_training(data_dir, xla_cache, tmp_path):
  small = str(tmp_path / 'small')
  cmd = ' '.join(_train_py(f'{small}/run', data_dir, num_steps=40, checkpoint_every=10))
  proc = _in_small_fs(cmd, '3m', small, xla_cache)
  line = _one_error_line(proc.stdout + proc.stderr, 'DiskFullError')
  assert re.search(r'FATAL DiskFullError: not enough disk space for the checkpoints under '
                   r'\S+/small/run/checkpoints: 3\.0 MB free, 4\.\d MB needed \(3 to keep \+ 1 '
                   r'being written, 1\.\d MB each, 0 already there\)', line), line
  assert proc.returncode == 1


def _abstract_state():
  """The train state of `_train_py`'s run, as ShapeDtypeStructs."""
  sys.path.insert(0, REPO)
  from configs import switch  # pylint: disable=g-import-not-at-top
  c = switch.get_config('cpu')
  c.update_from_flattened_dict(SWITCH_OVERRIDES)
  return steps.abstract_state(run_config.build(c))[1]


# Another file takes all but 300 KB: less than a checkpoint (1 MB), room
# for the metrics lines.
_FILL = ('import os, sys; d = sys.argv[1]; s = os.statvfs(d); '
         "f = open(d + '/filler', 'wb'); "
         'os.posix_fallocate(f.fileno(), 0, s.f_bavail * s.f_frsize - 300000)')


@needs_tmpfs
def test_disk_full_mid_run_ends_in_one_line_and_resumes(data_dir, xla_cache, tmp_path):
  """The disk fills up (another file) right after checkpoint 20 commits:
  one line names the step not saved, the path and the free space; the last
  checkpoint is intact; moved to a disk with room, the same run resumes
  from it and leaves no temporary folder."""
  small, copy = str(tmp_path / 'small'), str(tmp_path / 'copy')
  cmd = ' '.join(_train_py(f'{small}/run', data_dir, num_steps=100, checkpoint_every=20,
                           eval_every=100))
  script = (f'{cmd} > {tmp_path}/out.txt 2>&1 & pid=$!; '
            f'while [ ! -d {small}/run/checkpoints/20 ]; do sleep 0.02; done; '
            f'{sys.executable} -c "{_FILL}" {small}; '
            f'rc=0; wait $pid || rc=$?; echo rc=$rc; cp -a {small}/run {copy}')
  proc = _in_small_fs(script, '8m', small, xla_cache)
  assert 'rc=1' in proc.stdout, proc.stdout + proc.stderr
  out = open(tmp_path / 'out.txt').read()
  line = _one_error_line(out, 'DiskFullError')
  m = re.search(r'FATAL DiskFullError: disk full: checkpoint step (\d+) not saved under '
                r'\S+/small/run/checkpoints \(\d+\.\d MB free[^)]*\); the last checkpoint, '
                r'step (\d+), is intact', line)
  assert m, line
  failed, last = int(m.group(1)), int(m.group(2))
  assert last >= 20 and failed == last + 20
  assert checkpoint_steps(copy)[-1] == last
  # The free-space checks' estimate of a checkpoint against this one on disk.
  on_disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in
                os.walk(os.path.join(copy, 'checkpoints', str(last))) for f in files)
  arrays = disk_space.checkpoint_bytes(_abstract_state()) - disk_space.OVERHEAD_BYTES
  assert 1.0 <= arrays / on_disk < 1.1, (arrays, on_disk)   # never below: no false room
  print(f'checkpoint on disk {on_disk:,} bytes, arrays {arrays:,}')

  resumed = subprocess.run(_train_py(copy, data_dir, num_steps=100, checkpoint_every=20,
                                     eval_every=100),
                           env=dict(_env(xla_cache), JAX_NUM_CPU_DEVICES='1'), cwd=REPO,
                           capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f'resumed from step {last}' in resumed.stdout
  assert not tmp_dirs(copy) and checkpoint_steps(copy)[-1] == 100


# --- 4. A damaged corpus -----------------------------------------------------------------

@pytest.fixture
def damaged_corpus(data_dir, tmp_path):
  """A copy of the prepared corpus with 4 KB overwritten in the middle of
  its train shard: (data_dir, the damaged file)."""
  copy = str(tmp_path / 'tfds')
  shutil.copytree(data_dir, copy)
  (shard,) = glob.glob(f'{copy}/python_stdlib/*/*/python_stdlib-train.array_record-*')
  with open(shard, 'r+b') as f:
    f.seek(os.path.getsize(shard) // 2 // 4096 * 4096)
    f.write(os.urandom(4096))
  return copy, shard


def test_damaged_corpus_is_found_and_named(damaged_corpus, tmp_path, monkeypatch):
  copy, shard = damaged_corpus
  cfg = data.DataConfig(data_dir=copy)
  damage = data.verify(cfg)
  assert damage['validation'] == [] and [d.file for d in damage['train']] == [shard]
  assert damage['train'][0].bad_records >= 1

  proc = subprocess.run([sys.executable, '-m', 'moe.data', f'--data_dir={copy}', '--verify'],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1
  assert f'DAMAGED {shard}' in proc.stdout and 'validation: intact' in proc.stdout
  assert re.search(r'unreadable record\(s\), the first at record \d+', proc.stdout)
  assert f'--data_dir={copy} --rebuild' in proc.stderr

  # Training stops before its first step (the global row order reads the
  # whole split up front), in one error naming the file and the rebuild.
  def no_compile(*a, **k):
    raise AssertionError('compilation was reached')
  monkeypatch.setattr(train_lib.jax.stages.Lowered, 'compile', no_compile)
  with pytest.raises(CorpusDamagedError) as e:
    train_lib.train(run_config.build(tiny_config(copy)), str(tmp_path / 'run'))
  assert re.fullmatch(
      rf"the prepared corpus 'python_stdlib' split 'train' is damaged: record \d+ of "
      rf"{re.escape(shard)} cannot be read \(Corrupted Riegeli/records file: .*\)\. "
      rf"Rebuild it: python -m moe.data --name=python_stdlib --data_dir={re.escape(copy)} "
      r'--rebuild', str(e.value)), str(e.value)

  rebuilt = subprocess.run([sys.executable, '-m', 'moe.data', f'--data_dir={copy}', '--rebuild'],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
  assert rebuilt.returncode == 0, rebuilt.stderr[-2000:]
  assert data.verify(cfg) == {'train': [], 'validation': []}


def test_damaged_corpus_in_the_window_order(damaged_corpus):
  """Read lazily (the window order), the damage surfaces from grain's
  reader threads as the same one error."""
  copy, shard = damaged_corpus
  with open(shard, 'r+b') as f:   # most of the file: the first documents read fail
    f.seek(8192)
    f.write(os.urandom(os.path.getsize(shard) - 16384))
  cfg = data.DataConfig(data_dir=copy, row_shuffle='window', shuffle_window=16)
  it = data.train_iterator(cfg, seq_len=32, batch_size=4, seed=0)
  with pytest.raises(CorpusDamagedError, match=re.escape(shard) + r' cannot be read'):
    for _ in range(50):
      next(it)
