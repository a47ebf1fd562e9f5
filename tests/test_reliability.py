"""Reliability: exact resume, crashes, preemption, re-sharded restores,
non-finite steps, bad input and damaged checkpoints.

Runs that must start in a fresh process use tests/reliability_worker.py
(`train_lib.train()` on its tiny 2-layer MoE config, 4 CPU devices, mesh
(data=2, expert=2, model=1), 6 steps, a checkpoint every 2). Faults are
injected at fixed points of the run, so every leg stops at the same step on
any machine:
  * preemption: the worker sends itself SIGTERM right after step k (or the
    test sends it from outside, at whatever step the run has reached);
  * crash: kill -9 after step 3 once step 2 has committed, or inside the
    asynchronous save of step 4, after its files are written and before its
    commit (the rename of the temporary directory).
The subprocesses share a persistent XLA compilation cache (a fresh directory
per test session) so that each program compiles once; a cached executable is
the same program, so results stay bitwise comparable.

In-process runs use the 8 fake CPU devices of conftest.py.
"""

import glob
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from moe import data, run_config, sharding, steps, train_lib
from moe.checkpoint import Checkpointer, CheckpointError, checkpoint_steps
from moe.config import ConfigError, ModelConfig, MoeConfig

from reliability_worker import tiny_config
from tiny import read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, 'tests', 'reliability_worker.py')
MESH4 = {'mesh': [2, 2, 1]}          # the subprocess runs: 4 devices
NUM_STEPS = 6


# --- Fixtures and helpers ------------------------------------------------------------

@pytest.fixture(scope='session')
def xla_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp('xla_cache'))


def _env(cache):
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  env.pop('JAX_NUM_CPU_DEVICES', None)
  env['XLA_FLAGS'] = re.sub(r'--xla_force_host_platform_device_count=\d+', '',
                            env.get('XLA_FLAGS', ''))
  return env


class Worker:
  """One reliability_worker.py process, its output in a file (never a pipe)."""

  def __init__(self, workdir, data_dir, cache, overrides, *flags, log=None):
    self.log = str(log or f'{workdir}.log{time.monotonic_ns()}')
    cmd = [sys.executable, WORKER, '--workdir', str(workdir), '--data_dir',
           data_dir, '--overrides', json.dumps(overrides), *map(str, flags)]
    with open(self.log, 'w') as f:
      self.proc = subprocess.Popen(cmd, cwd=REPO, env=_env(cache), stdout=f,
                                   stderr=subprocess.STDOUT)

  def wait(self, timeout=240) -> int:
    try:
      return self.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      self.proc.wait()
      pytest.fail(f'worker timed out after {timeout} s:\n{self.output()[-4000:]}')

  def output(self) -> str:
    with open(self.log) as f:
      return f.read()

  def kill(self):
    if self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait()


def run(workdir, data_dir, cache, overrides, *flags, expect_rc=0) -> str:
  w = Worker(workdir, data_dir, cache, overrides, *flags)
  rc = w.wait()
  out = w.output()
  assert rc == expect_rc, f'rc={rc}, expected {expect_rc}:\n{out[-4000:]}'
  return out


def train_lines(workdir):
  return [l for l in read_jsonl(workdir) if 'loss' in l]


def by_step(workdir, last=False) -> dict:
  """step -> (loss, data_crc, lr); a step run twice (after a crash) must have
  given the same values both times, unless `last` (take the last run's)."""
  out = {}
  for l in train_lines(workdir):
    v = (l['loss'], l['data_crc'], l['lr'])
    if last:
      out[l['step']] = v
    else:
      assert out.setdefault(l['step'], v) == v, (l['step'], out[l['step']], v)
  return out


def eval_loss(workdir, step):
  """The eval loss logged at `step` (the same each time it was logged)."""
  losses = {l['eval/loss'] for l in read_jsonl(workdir)
            if 'eval/loss' in l and l['step'] == step}
  assert len(losses) == 1, losses
  return losses.pop()


def tmp_dirs(workdir):
  return glob.glob(os.path.join(workdir, 'checkpoints', '*orbax-checkpoint-tmp*'))


def state_arrays(step_dir) -> dict:
  """Every array of a checkpoint's train state, as numpy, by tree path."""
  path = os.path.join(step_dir, 'state')
  ckptr = ocp.PyTreeCheckpointer()
  meta = ckptr.metadata(path)
  tree = getattr(meta, 'item_metadata', meta)
  tree = getattr(tree, 'tree', tree)
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  out = ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(out)[0]}


def assert_bitwise_equal(a: dict, b: dict):
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
    assert a[k].tobytes() == b[k].tobytes(), f'{k} differs'


def wait_for_step(workdir, step, workers, timeout=180):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    for w in workers:
      if w.proc.poll() is not None:
        pytest.fail(f'worker exited early (rc={w.proc.returncode}):\n'
                    f'{w.output()[-4000:]}')
    lines = [l for l in read_jsonl(workdir, complete_lines_only=True) if 'loss' in l]
    if lines and lines[-1]['step'] >= step:
      return
    time.sleep(0.05)
  pytest.fail(f'no step {step} within {timeout} s')


@pytest.fixture(scope='session')
def straight(data_dir, xla_cache, tmp_path_factory):
  """The uninterrupted reference: 6 steps in one process (4 devices)."""
  workdir = str(tmp_path_factory.mktemp('straight') / 'run')
  out = run(workdir, data_dir, xla_cache, MESH4)
  assert checkpoint_steps(workdir) == [2, 4, 6], out[-3000:]
  return {'workdir': workdir, 'steps': by_step(workdir),
          'final': state_arrays(os.path.join(workdir, 'checkpoints', '6')),
          'eval': eval_loss(workdir, NUM_STEPS)}


def assert_matches_straight(workdir, straight):
  steps = by_step(workdir)
  assert sorted(steps) == list(range(1, NUM_STEPS + 1))   # none skipped
  for s in steps:   # bitwise: the same floats, the same batches (data_crc)
    assert steps[s] == straight['steps'][s], (s, steps[s], straight['steps'][s])
  assert eval_loss(workdir, NUM_STEPS) == straight['eval']
  assert_bitwise_equal(
      state_arrays(os.path.join(workdir, 'checkpoints', str(NUM_STEPS))),
      straight['final'])


# --- 1. Exact resume in a fresh process -----------------------------------------------

def test_exact_resume_in_a_fresh_process(straight, data_dir, xla_cache, tmp_path):
  """6 steps straight == 3 steps, exit, restore in a new process, 3 more.

  The first leg runs with num_steps=6 (the learning-rate schedule depends on
  it) and stops after step 3 through the preemption path: the worker sends
  itself SIGTERM right after step 3, the loop saves step 3 (not a
  checkpoint_every multiple) and exits 0."""
  workdir = str(tmp_path / 'run')
  out = run(workdir, data_dir, xla_cache, MESH4, '--sigterm_at_step', 3)
  assert 'preempted: saving step 3 and exiting' in out
  assert checkpoint_steps(workdir) == [2, 3]
  assert [l['step'] for l in train_lines(workdir)] == [1, 2, 3]

  out = run(workdir, data_dir, xla_cache, MESH4)
  assert 'resumed from step 3' in out
  # Each step logged once: no batch repeated or skipped, same data_crc chain.
  assert [l['step'] for l in train_lines(workdir)] == list(range(1, 7))
  assert_matches_straight(workdir, straight)


# --- 2. Crashes -------------------------------------------------------------------------

@pytest.mark.parametrize('where,flags', [
    ('training', ['--kill_at_step', 3]),
    ('async_save', ['--kill_in_save_of', 4]),
], ids=['during_training', 'during_async_save'])
def test_crash_resumes_from_the_last_committed_checkpoint(
    where, flags, straight, data_dir, xla_cache, tmp_path):
  workdir = str(tmp_path / 'run')
  run(workdir, data_dir, xla_cache, MESH4, *flags, expect_rc=-signal.SIGKILL)
  assert checkpoint_steps(workdir) == [2]
  if where == 'async_save':
    # Step 4's files were written but never committed.
    partial = tmp_dirs(workdir)
    assert [os.path.basename(p).split('.')[0] for p in partial] == ['4'], partial

  out = run(workdir, data_dir, xla_cache, MESH4)
  assert 'resumed from step 2' in out
  assert not tmp_dirs(workdir)                 # the partial save is cleaned up
  assert checkpoint_steps(workdir) == [2, 4, 6]
  assert_matches_straight(workdir, straight)   # steps 3.. re-run identically


# --- 3. Preemption ----------------------------------------------------------------------

def test_sigterm_saves_at_the_step_boundary_and_exits_0(
    straight, data_dir, xla_cache, tmp_path):
  """SIGTERM from outside, at whatever step the run has reached."""
  workdir = str(tmp_path / 'run')
  overrides = dict(MESH4, checkpoint_every=100)   # only the preemption save
  w = Worker(workdir, data_dir, xla_cache, overrides, '--step_sleep', 0.5)
  try:
    wait_for_step(workdir, 2, [w])
    w.proc.send_signal(signal.SIGTERM)
    rc = w.wait(120)
  finally:
    w.kill()
  out = w.output()
  assert rc == 0, out[-4000:]
  assert 'SIGTERM' in out
  last = train_lines(workdir)[-1]['step']
  assert 2 <= last < NUM_STEPS, last
  assert checkpoint_steps(workdir) == [last]          # saved the step it stopped at
  assert f'preempted: saving step {last} and exiting' in out

  out = run(workdir, data_dir, xla_cache, overrides)
  assert f'resumed from step {last}' in out
  assert_matches_straight(workdir, straight)


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _pair(workdir, data_dir, cache, overrides, *flags):
  coordinator = f'127.0.0.1:{_free_port()}'
  return [Worker(workdir, data_dir, cache, overrides, *flags,
                 '--coordinator', coordinator, '--num_processes', 2,
                 '--process_id', i, log=f'{workdir}.p{i}.{time.monotonic_ns()}')
          for i in range(2)]


def _wait_pair(workers, timeout=240):
  try:
    return [w.wait(timeout) for w in workers]
  finally:
    for w in workers:
      w.kill()


def test_sigterm_to_one_of_two_processes(data_dir, xla_cache, tmp_path):
  """2 processes x 4 CPU devices under jax.distributed: SIGTERM to process 1
  alone; JAX's preemption sync point makes both save the same step and exit
  0; both resume from it and match an uninterrupted 2-process run."""
  overrides = {'mesh': [2, 4, 1], 'num_steps': 10, 'eval_every': 10,
               'checkpoint_every': 100}
  ref = str(tmp_path / 'straight')
  rcs = _wait_pair(_pair(ref, data_dir, xla_cache, overrides))
  assert rcs == [0, 0]

  workdir = str(tmp_path / 'run')
  workers = _pair(workdir, data_dir, xla_cache, overrides, '--step_sleep', 0.25)
  try:
    wait_for_step(workdir, 2, workers)
    workers[1].proc.send_signal(signal.SIGTERM)
  finally:
    rcs = _wait_pair(workers)
  outs = [w.output() for w in workers]
  assert rcs == [0, 0], outs[0][-3000:] + outs[1][-3000:]
  done = [int(re.search(r'worker: done at step (\d+)', o).group(1)) for o in outs]
  assert done[0] == done[1] < 10, done
  step = done[0]
  for i, o in enumerate(outs):
    assert f'[process={i}][thread=MainThread] Reached preemption sync point, step={step}' in o
  assert checkpoint_steps(workdir) == [step]
  assert train_lines(workdir)[-1]['step'] == step
  timing = re.findall(r'preemption check ([\d.]+) us/step', outs[0])
  print(f'preempted at step {step}; preemption check (2 processes): {timing} us/step')

  rcs = _wait_pair(_pair(workdir, data_dir, xla_cache, overrides))
  assert rcs == [0, 0]
  got, want = by_step(workdir), by_step(ref)
  assert got == want       # losses, lr and process 0's data_crc, every step
  assert_bitwise_equal(state_arrays(os.path.join(workdir, 'checkpoints', '10')),
                       state_arrays(os.path.join(ref, 'checkpoints', '10')))


# --- 4. Restore under another mesh ----------------------------------------------------

@pytest.fixture(scope='module')
def expert4_run(data_dir, tmp_path_factory):
  """2 steps in-process on mesh (data=2, expert=4, model=1)."""
  c = tiny_config(data_dir, {'mesh': (2, 4, 1), 'num_steps': 2, 'eval_every': 2})
  workdir = str(tmp_path_factory.mktemp('expert4') / 'run')
  train_lib.train(run_config.build(c), workdir)
  return c, workdir


def _expert_spec_axes(spec):
  axes = []
  for entry in spec:
    axes += list(entry) if isinstance(entry, tuple) else [entry]
  return [a for a in axes if a]


@pytest.mark.parametrize('mesh', [(8, 1, 1), (2, 2, 2), (1, 8, 1), (4, 2, 1)],
                         ids=['expert1', 'expert2_model2', 'expert8',
                              'data_expert_swapped'])
def test_restore_under_another_mesh(mesh, expert4_run):
  c, workdir = expert4_run
  c = c.copy_and_resolve_references()
  c.mesh = mesh
  run = run_config.build(c)
  m = sharding.make_mesh(run.mesh_shapes(jax.device_count())[0])
  s = steps.build(run, m)
  ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'), max_to_keep=10)
  try:
    state, _ = ckpt.restore(2, s.abstract_state, s.state_shardings)
  finally:
    ckpt.close()
  batches = data.eval_set(run.data, seq_len=c.seq_len, batch_size=c.batch_size,
                          max_batches=1)
  loss = steps.evaluate(s, state, batches)[0]['loss']
  assert loss == pytest.approx(eval_loss(workdir, 2), rel=1e-5, abs=1e-6)

  # The optimizer state follows the new expert axis.
  sizes = dict(zip(m.axis_names, m.devices.shape))
  flat_state = jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
  flat_shard = jax.tree.leaves(s.state_shardings.opt_state)
  checked = 0
  for (path, x), want in zip(flat_state, flat_shard):
    key = jax.tree_util.keystr(path)
    assert x.sharding == want, key
    axes = _expert_spec_axes(want.spec)
    if 'expert' not in axes or not re.search(r'\.(mu|nu)\b', key):
      continue
    per_device = x.addressable_shards[0].data.nbytes
    split = math.prod(sizes[a] for a in axes)
    assert per_device * split == x.nbytes, (key, per_device, x.nbytes, axes)
    if sizes['model'] == 1:
      assert per_device == x.nbytes // sizes['expert'], key
    checked += 1
  assert checked >= 4, 'no expert mu/nu found'   # w_in/w_gate/w_out (+ more)


# --- 5. Non-finite values ----------------------------------------------------------------

@jax.custom_vjp
def _poison_grad(x, bad):
  return x


def _poison_fwd(x, bad):
  return x, bad


def _poison_bwd(bad, g):
  return jnp.where(bad > 0, jnp.nan, g), jnp.zeros_like(bad)


_poison_grad.defvjp(_poison_fwd, _poison_bwd)


def _inject_nonfinite(monkeypatch, seed, *, loss_at=(), grads_at=()):
  """Wraps steps.lm_loss: at the given steps (1-based, as logged) the
  loss (and the logged cross-entropy) becomes NaN, or only its gradient
  does. The step is recognised by its router-noise key, a function of
  (seed, step) only (steps.step_rng), so the injection is exact."""
  real = steps.lm_loss

  def at(rng, at_steps):
    hit = jnp.zeros((), bool)
    for s in at_steps:
      want = jax.random.key_data(steps.step_rng(seed, s - 1))
      hit |= jnp.all(jax.random.key_data(rng) == want)
    return hit

  def lm_loss(model, tokens, *, train, rng=None, **kw):
    loss, metrics = real(model, tokens, train=train, rng=rng, **kw)
    if train:
      bad_loss = at(rng, loss_at)
      loss = jnp.where(bad_loss, jnp.nan, loss)
      metrics = dict(metrics, loss=jnp.where(bad_loss, jnp.nan, metrics['loss']))
      loss = _poison_grad(loss, at(rng, grads_at).astype(jnp.float32))
    return loss, metrics

  monkeypatch.setattr(steps, 'lm_loss', lm_loss)


def _all_finite(arrays: dict) -> bool:
  return all(np.all(np.isfinite(a)) for a in arrays.values()
             if np.issubdtype(a.dtype, np.floating))


def test_nonfinite_skip(data_dir, tmp_path, monkeypatch, caplog):
  c = tiny_config(data_dir, {'num_steps': 5, 'eval_every': 5,
                             'checkpoint_every': 1, 'nonfinite': 'skip'})
  _inject_nonfinite(monkeypatch, c.seed, loss_at=[2], grads_at=[4])
  workdir = str(tmp_path / 'run')
  with caplog.at_level('WARNING'):
    result = train_lib.train(run_config.build(c), workdir)
  assert result['step'] == 5
  lines = {l['step']: l for l in train_lines(workdir)}
  assert [s for s, l in lines.items() if l['update_skipped']] == [2, 4]
  # (metrics.jsonl writes non-finite values as strings: strict JSON)
  assert math.isnan(float(lines[2]['loss'])) and math.isfinite(lines[4]['loss'])
  assert not math.isfinite(float(lines[4]['grad_norm']))
  warnings = [r.getMessage() for r in caplog.records if 'non-finite' in r.getMessage()]
  assert len(warnings) == 2, warnings
  assert 'at step 2' in warnings[0] and 'at step 4' in warnings[1]
  assert 'skipping it (nonfinite=skip)' in warnings[0]
  # The skipped steps left the state as it was; no checkpoint holds a NaN.
  ck = {s: state_arrays(os.path.join(workdir, 'checkpoints', str(s)))
        for s in checkpoint_steps(workdir)}
  assert sorted(ck) == [1, 2, 3, 4, 5]
  assert all(_all_finite(a) for a in ck.values())
  def same(a, b):   # params, optimizer state, balance bias: all but the step
    diff = [k for k in a if k != "['step']" and a[k].tobytes() != b[k].tobytes()]
    return not diff
  assert same(ck[2], ck[1]) and same(ck[4], ck[3])
  assert not same(ck[3], ck[2]) and not same(ck[5], ck[4])
  assert [int(ck[s]["['step']"]) for s in sorted(ck)] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize('bad_step,log_every,logged', [
    (4, 1, [1, 2, 3]),   # a checkpoint step: checked before its save
    (3, 5, [1]),         # between logs: checked while step 4 runs, before its save
])
def test_nonfinite_stop(bad_step, log_every, logged, data_dir, tmp_path, monkeypatch):
  c = tiny_config(data_dir, {'num_steps': 5, 'eval_every': 5, 'log_every': log_every,
                             'checkpoint_every': 2, 'nonfinite': 'stop'})
  _inject_nonfinite(monkeypatch, c.seed, loss_at=[bad_step])
  workdir = str(tmp_path / 'run')
  with pytest.raises(FloatingPointError, match=rf'at step {bad_step} .*nonfinite=stop'):
    train_lib.train(run_config.build(c), workdir)
  assert checkpoint_steps(workdir) == [2]          # step 4 was never saved
  assert not tmp_dirs(workdir)
  assert _all_finite(state_arrays(os.path.join(workdir, 'checkpoints', '2')))
  assert [l['step'] for l in train_lines(workdir)] == logged


def test_nonfinite_skip_between_logs(data_dir, tmp_path, monkeypatch, caplog):
  """Steps that neither log, evaluate nor save are checked one step late
  (while the next one runs); each skip is still reported, in order, with its
  own step, and the run goes on."""
  c = tiny_config(data_dir, {'num_steps': 6, 'eval_every': 6, 'log_every': 6,
                             'checkpoint_every': 6, 'nonfinite': 'skip'})
  _inject_nonfinite(monkeypatch, c.seed, loss_at=[2], grads_at=[4])
  workdir = str(tmp_path / 'run')
  with caplog.at_level('WARNING'):
    result = train_lib.train(run_config.build(c), workdir)
  assert result['step'] == 6 and math.isfinite(result['train']['loss'])
  warnings = [r.getMessage() for r in caplog.records if 'non-finite' in r.getMessage()]
  assert len(warnings) == 2, warnings
  assert 'at step 2 ' in warnings[0] and 'at step 4 ' in warnings[1]
  assert checkpoint_steps(workdir) == [6]
  assert _all_finite(state_arrays(os.path.join(workdir, 'checkpoints', '6')))


# --- 6. Bad input, refused before compilation --------------------------------------------

def _text_dir(tmp_path, empty_files: bool):
  d = tmp_path / 'corpus'
  d.mkdir()
  if empty_files:
    for name in ('a.txt', 'b.txt', 'c.txt'):
      (d / name).write_text('  \n')
  return str(d)


BAD_INPUT = {
    'unknown_key': ({'model.d_modle': 16}, ConfigError,
                    [r'unknown config key model\.d_modle', r'Did you mean model\.d_model\?']),
    'unknown_top_level_key': ({'num_step': 5}, ConfigError,
                              [r'unknown config key num_step\.', r'Did you mean num_steps\?']),
    'top_k_above_experts': ({'moe.top_k': 9}, ConfigError,
                            [r'moe\.top_k=9', r'between 1 and moe\.num_experts=8']),
    'capacity_factor_zero': ({'moe.train_capacity_factor': 0.0}, ConfigError,
                             [r'moe\.train_capacity_factor=0\.0 must be > 0']),
    'capacity_factor_negative': ({'moe.eval_capacity_factor': -1.0}, ConfigError,
                                 [r'moe\.eval_capacity_factor=-1\.0 must be > 0']),
    'experts_vs_expert_axis': ({'moe.num_experts': 12, 'mesh': (1, 8, 1)}, ConfigError,
                               [r'moe\.num_experts=12 is not divisible by the expert axis \(8\)']),
    'batch_vs_devices': ({'batch_size': 12, 'mesh': (2, 4, 1)}, ConfigError,
                         [r'batch_size=12 is not divisible by data x expert = 2 x 4 = 8']),
    'seq_len_above_max': ({'seq_len': 32}, ConfigError,
                          [r'sequence length 32 exceeds model\.max_seq_len=16']),
    'unknown_router': ({'moe.router': 'token_choose'}, ConfigError,
                       [r"moe\.router='token_choose' is not valid", 'tokens_choose']),
    'unknown_dispatch': ({'moe.dispatch': 'gathr'}, ConfigError,
                         [r"moe\.dispatch='gathr' is not valid", "'gather'"]),
    'cudnn_attention_on_cpu': ({'model.attention': 'cudnn'}, ConfigError,
                               [r"model\.attention='cudnn' needs a CUDA GPU",
                                r"the platform is 'cpu'", r"'auto'"]),
    'skip_batches_without_restore_step': ({'skip_batches': 3}, ConfigError,
                                          [r'skip_batches=3 needs restore_step']),
    'unknown_dataset': ({'data.name': 'no_such_corpus', 'data.data_dir': '{tmp}/tfds'},
                        data.DatasetNotPreparedError,
                        [r"data\.name='no_such_corpus'",
                         r'tfds build no_such_corpus --file_format=array_record --data_dir=\S+/tfds']),
    'unprepared_dataset': ({'data.name': 'lm1b', 'data.data_dir': '{tmp}/tfds'},
                           data.DatasetNotPreparedError,
                           [r"'lm1b' is not prepared",
                            r'tfds build lm1b --file_format=array_record --data_dir=\S+/tfds']),
    'empty_text_corpus': ({'data.name': 'text_files', 'data.text_files': '{corpus}',
                           'data.data_dir': '{tmp}/tfds'}, ValueError,
                          [r'text_files=\S+corpus\S* matches no files', 'Pass a directory or a glob']),
    'not_writable_workdir': ({}, ConfigError, [r'workdir .* is not writable']),
    'dcn_mesh_not_dividing': ({'dcn_mesh': (3, 1, 1)}, ConfigError,
                              [r'dcn_mesh \(3, 1, 1\) makes 3 domains, but 8 devices']),
    'dcn_mesh_without_domains': ({'dcn_mesh': (2, 1, 1)}, ConfigError,
                                 [r'dcn_mesh asks for 2 domains, but the devices belong '
                                  r'to 1 processes']),
}


@pytest.mark.parametrize('case', list(BAD_INPUT))
def test_bad_input_is_refused_before_compilation(case, data_dir, tmp_path, monkeypatch):
  overrides, error, patterns = BAD_INPUT[case]
  corpus = _text_dir(tmp_path, empty_files=False)
  overrides = {k: v.format(tmp=tmp_path, corpus=corpus) if isinstance(v, str) else v
               for k, v in overrides.items()}
  c = tiny_config(data_dir, overrides)
  workdir = str(tmp_path / 'run')
  if case == 'not_writable_workdir':
    (tmp_path / 'a_file').write_text('')
    workdir = str(tmp_path / 'a_file' / 'run')   # under a file: even root cannot

  def no_setup(*a, **k):
    raise AssertionError('the trainer (model building, jit) was reached')
  monkeypatch.setattr(train_lib.steps, 'build', no_setup)
  with pytest.raises(error) as e:
    train_lib.train(run_config.build(c), workdir)
  for p in patterns:
    assert re.search(p, str(e.value)), (p, str(e.value))
  assert not os.path.exists(os.path.join(workdir, 'checkpoints'))


def test_text_corpus_of_empty_files_is_refused(data_dir, tmp_path):
  corpus = _text_dir(tmp_path, empty_files=True)
  c = tiny_config(data_dir, {'data.name': 'text_files', 'data.text_files': corpus,
                             'data.data_dir': str(tmp_path / 'tfds')})
  with pytest.raises(ValueError, match='empty'):
    train_lib.train(run_config.build(c), str(tmp_path / 'run'))


def test_base_config_is_every_run_config_field_at_its_default():
  # configs/base.py is made from the RunConfig sections' defaults: built
  # back, it is exactly the RunConfig of those defaults (the byte
  # tokenizer's vocabulary), and every section's typo is refused by name.
  sys.path.insert(0, REPO)
  from configs import base  # pylint: disable=g-import-not-at-top
  c = base.get_config()
  assert run_config.build(c) == run_config.RunConfig(
      model=ModelConfig(vocab_size=384, moe=MoeConfig()), data=data.DataConfig())
  for key in ('batch_sizes', 'optimizer.warmup', 'eval.checkpoint', 'data.text',
              'moe.top', 'model.d_mode'):
    c = base.get_config()
    section, _, leaf = key.rpartition('.')
    (c[section] if section else c)[leaf] = 1
    with pytest.raises(ConfigError, match=f'unknown config key {re.escape(key)}\\.'):
      run_config.build(c)


def _no_compile(monkeypatch):
  def compile_(*a, **k):
    raise AssertionError('compilation was reached')
  monkeypatch.setattr(jax.stages.Lowered, 'compile', compile_)


def test_checkpoint_of_another_model_shape_is_refused(expert4_run, tmp_path, monkeypatch):
  c, source = expert4_run
  workdir = str(tmp_path / 'run')
  shutil.copytree(source, workdir)
  c = c.copy_and_resolve_references()
  c.model.d_model = 32
  c.accept_config_change = True   # past the config-drift refusal (test_accidents.py)
  _no_compile(monkeypatch)
  with pytest.raises(CheckpointError) as e:
    train_lib.train(run_config.build(c), workdir)
  msg = str(e.value)
  assert 'checkpoint step 2' in msg and 'does not match the model config' in msg
  assert re.search(r'checkpoint \([^)]*16[^)]*\) vs config \([^)]*32', msg), msg
  assert checkpoint_steps(workdir) == [2] and not tmp_dirs(workdir)


def test_checkpoint_of_another_row_order_is_refused(expert4_run, tmp_path, monkeypatch):
  """expert4_run trained with the 'global' row order; its data position
  means nothing to a 'window' iterator: one CheckpointError, before
  compilation, naming both."""
  c, source = expert4_run
  workdir = str(tmp_path / 'run')
  shutil.copytree(source, workdir)
  c = c.copy_and_resolve_references()
  c.data.row_shuffle = 'window'
  c.accept_config_change = True   # past the config-drift refusal (test_accidents.py)
  _no_compile(monkeypatch)
  with pytest.raises(CheckpointError) as e:
    train_lib.train(run_config.build(c), workdir)
  msg = str(e.value)
  assert "checkpoint step 2 holds a data-iterator state that does not fit this run's 'window' row order" in msg
  assert "['next_index']" in msg and 'data.row_shuffle' in msg
  assert checkpoint_steps(workdir) == [2] and not tmp_dirs(workdir)


def test_checkpoint_of_another_process_count_is_refused(expert4_run, tmp_path, monkeypatch):
  """A checkpoint written by two processes holds two data positions; one
  process cannot continue both shards' orders: one CheckpointError, before
  compilation, that says how many processes to resume with."""
  c, source = expert4_run
  workdir = str(tmp_path / 'run')
  shutil.copytree(source, workdir)
  item = os.path.join(workdir, 'checkpoints', '2', 'data', 'metadata')
  with open(item) as f:
    data_state = json.load(f)
  (own,) = data_state['iterators']
  data_state['iterators'] = [own, own]
  with open(item, 'w') as f:
    json.dump(data_state, f)
  _no_compile(monkeypatch)
  with pytest.raises(CheckpointError) as e:
    train_lib.train(run_config.build(c.copy_and_resolve_references()), workdir)
  msg = str(e.value)
  assert ('checkpoint step 2 was written by 2 process(es) and this run has 1' in msg
          and 'Resume with 2 process(es).' in msg), msg
  assert checkpoint_steps(workdir) == [2] and not tmp_dirs(workdir)


# --- 7. Damaged checkpoints --------------------------------------------------------------

def _damage(step_dir, how):
  state = os.path.join(step_dir, 'state')
  if how == 'truncated':
    files = [f for f in glob.glob(os.path.join(state, 'd', '*')) if os.path.isfile(f)]
    biggest = max(files, key=os.path.getsize)
    with open(biggest, 'r+b') as f:
      f.truncate(os.path.getsize(biggest) // 2)
  else:
    os.remove(os.path.join(state, 'manifest.ocdbt'))


# orbax's failed concurrent reads of a damaged step leave futures whose
# exceptions nobody retrieves (noise from orbax, not an error of ours).
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
@pytest.mark.parametrize('how', ['truncated', 'deleted'])
def test_damaged_checkpoint_names_the_step(how, straight, data_dir, tmp_path, monkeypatch):
  workdir = str(tmp_path / 'run')
  shutil.copytree(straight['workdir'], workdir)
  _damage(os.path.join(workdir, 'checkpoints', '6'), how)
  c = tiny_config(data_dir, {'mesh': (2, 2, 2)})   # 8 devices: another mesh
  _no_compile(monkeypatch)
  with pytest.raises(CheckpointError,
                     match=r'(?s)checkpoint step 6 .* cannot be restored .*restore_fallback=True'):
    train_lib.train(run_config.build(c), workdir)
  assert checkpoint_steps(workdir) == [2, 4, 6]      # nothing moved or deleted


def test_damaged_checkpoint_falls_back_when_configured(straight, data_dir, xla_cache, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(straight['workdir'], workdir)
  _damage(os.path.join(workdir, 'checkpoints', '6'), 'truncated')
  out = run(workdir, data_dir, xla_cache, dict(MESH4, restore_fallback=True))
  assert 'skipping damaged checkpoint' in out and 'checkpoint step 6' in out
  assert 'resumed from step 4' in out
  (aside,) = glob.glob(os.path.join(workdir, 'checkpoints.damaged.*'))
  assert sorted(os.listdir(aside)) == ['6', 'SET_ASIDE.txt']   # kept, out of the way
  assert checkpoint_steps(workdir) == [2, 4, 6]      # step 6 saved again
  assert_matches_straight(workdir, straight)


# --- restore_step + skip_batches (PaLM's loss-spike recipe) ------------------------------

def _crc_after(cfg, batches: list[int]) -> int:
  """data_crc after consuming the given (0-based) batches of the stream."""
  it = data.train_iterator(run_config.build(cfg).data, seq_len=cfg.seq_len,
                           batch_size=cfg.batch_size, seed=cfg.seed)
  stream = [next(it) for _ in range(max(batches) + 1)]
  crc = 0
  for i in batches:
    crc = zlib.crc32(np.ascontiguousarray(stream[i]).tobytes(), crc)
  return crc


def test_restart_from_an_earlier_step_skipping_batches(straight, data_dir, xla_cache, tmp_path):
  """restore_step=2 skip_batches=3 on a finished 6-step run. The restart
  crashes before its first save, the re-run (same command) is preempted
  after step 4, the next re-run finishes."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(straight['workdir'], workdir)
  before = len(train_lines(workdir))
  recipe = dict(MESH4, restore_step=2, skip_batches=3)

  out = run(workdir, data_dir, xla_cache, recipe, '--kill_at_step', 3,
            expect_rc=-signal.SIGKILL)
  assert 'restarting from step 2' in out
  (aside,) = glob.glob(os.path.join(workdir, 'checkpoints.after_2.*'))
  assert sorted(os.listdir(aside)) == ['4', '6', 'SET_ASIDE.txt']   # moved, not deleted
  assert checkpoint_steps(workdir) == [2]
  assert_bitwise_equal(state_arrays(os.path.join(aside, '6')), straight['final'])

  # Nothing was saved since the rewind: the same command resumes from step 2
  # and redoes the skip (not a second rewind: nothing more is moved aside).
  out = run(workdir, data_dir, xla_cache, recipe, '--sigterm_at_step', 4)
  assert 'restore_step=2 was already honoured' in out
  assert 'resumed from step 2' in out
  assert checkpoint_steps(workdir) == [2, 4]
  # Step 4 was saved after the skip: the same command resumes from it and
  # does not skip again.
  out = run(workdir, data_dir, xla_cache, recipe)
  assert 'resumed from step 4' in out
  assert checkpoint_steps(workdir) == [2, 4, 6]
  assert glob.glob(os.path.join(workdir, 'checkpoints.after_*')) == [aside]
  assert sorted(os.listdir(aside)) == ['4', '6', 'SET_ASIDE.txt']

  # Every step after the rewind ran on the same data each time it ran.
  steps = {}
  for l in train_lines(workdir)[before:]:
    v = (l['loss'], l['data_crc'])
    assert steps.setdefault(l['step'], v) == v, l['step']
  assert sorted(steps) == [3, 4, 5, 6]
  cfg = tiny_config(data_dir)
  # Steps 1-2 read batches 0-1; batches 2-4 are skipped; step 3 reads batch 5.
  assert straight['steps'][2][1] == _crc_after(cfg, [0, 1])
  assert straight['steps'][3][1] == _crc_after(cfg, [0, 1, 2])
  assert steps[3][1] == _crc_after(cfg, [0, 1, 5])
  assert steps[6][1] == _crc_after(cfg, [0, 1, 5, 6, 7, 8])
  assert steps[3][0] != straight['steps'][3][0]
