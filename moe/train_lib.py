"""The training loop: `train(run, workdir)` pretrains a RunConfig in a
workdir, resuming from its latest checkpoint; its sections call the
pre-flight, lock, checkpoint, steps and data modules in that order."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
import zlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from moe import checkpoint, config_drift, data, disk_space, optimizer, preflight
from moe import process_sync, run_dir, run_lock, sharding, steps
from moe import metrics as metrics_lib
from moe.checkpoint import Checkpointer
from moe.process_sync import print0
from moe.run_config import RunConfig


def train(run: RunConfig, workdir: str, *, command: str | None = None) -> dict:
  """Pretrains `run` in `workdir`, resuming from its latest checkpoint.

  Returns the last logged train metrics and the last eval metrics. Process
  0 holds the workdir's lock (moe.run_lock) for the run's life."""
  # --- Pre-flight: every check before anything expensive ---------------------------
  mesh = preflight.check(run, workdir, writes=True)
  command = command or ' '.join(sys.argv)

  # --- The workdir's lock, held by process 0 -------------------------------------------
  lock = run_lock.RunLock(workdir, command)
  notice = process_sync.refused_by_any(
      lock.acquire if jax.process_index() == 0 else lambda: None,
      run_lock.WorkdirLockedError)
  if notice:
    print0(notice)
  try:
    ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'), max_to_keep=run.loop.max_to_keep)
    try:
      # --- Resume point and config drift; the trainer; disk space ---------------------
      at_most, resume_step = checkpoint.resume_point(ckpt, run.resume.restore_step)
      changes = _config_changes(run, ckpt, resume_step)
      trainer = steps.build(run, mesh)
      ckpt_bytes = disk_space.checkpoint_bytes(trainer.abstract_state)
      process_sync.refused_by_any(lambda: disk_space.check_before_training(
          ckpt.directory, ckpt_bytes, kept=len(ckpt.all_steps()),
          max_to_keep=run.loop.max_to_keep, saves=disk_space.saves_left(
              resume_step or 0, run.loop.num_steps, run.loop.checkpoint_every)),
                                  disk_space.DiskFullError)

      # --- Input pipeline --------------------------------------------------------------
      inputs = _open_inputs(run)

      # --- Restore or initialize ---------------------------------------------------------
      restored = checkpoint.restore_for_training(
          ckpt, trainer.abstract_state, trainer.state_shardings, at_most=at_most,
          fallback=run.resume.restore_fallback)
      step, state, progress = _start(run, trainer, restored, inputs.train_it, workdir)
      if jax.process_index() == 0:
        _record_start(workdir, run.config_json, command,
                      None if restored is None else step, changes)

      # --- Train -------------------------------------------------------------------------
      loop = _Loop(run, trainer, inputs, ckpt, lock, workdir, progress, ckpt_bytes)
      return loop.train(step, state)
    finally:
      ckpt.close()   # waits for the last save
  finally:
    if jax.process_index() == 0:
      lock.release()


def _config_changes(run: RunConfig, ckpt: Checkpointer, step: int | None) -> dict:
  """Refuses (config_drift.check) resuming `step` under a config that
  differs from the one it was saved with; returns the differences."""
  saved = None if step is None else ckpt.saved_config(step)
  if saved is None:   # a fresh run, or unreadable: restore reports the damage
    return {}
  changes, notice = config_drift.check(saved, run.config_json, step=step,
                                       accept=run.resume.accept_config_change)
  if notice:
    print0(notice)
  return changes


class _Inputs(NamedTuple):
  train_it: Any             # this process's training batches
  eval_set: data.EvalSet    # the periodic evaluations'
  final_set: data.EvalSet   # the last step's (eval_set itself when the same)


def _open_inputs(run: RunConfig) -> _Inputs:
  """Prepares the data (process 0) and opens this process's iterators.
  Periodic evaluations read `eval_batches` batches spread over the
  validation split; the last step's reads `final_eval_batches` (0: both the
  whole split). Too small a split for one batch fails here."""
  if jax.process_index() == 0:
    data.prepare(run.data)
  multihost_utils.sync_global_devices('data prepared')
  loop = run.loop
  local_batch = loop.batch_size // jax.process_count()
  train_it = data.train_iterator(run.data, seq_len=loop.seq_len,
                                 batch_size=local_batch, seed=run.seed)

  def eval_rows(batches: int) -> data.EvalSet:
    return data.eval_set(run.data, seq_len=loop.seq_len, batch_size=local_batch,
                         max_batches=batches or None)

  eval_set = eval_rows(loop.eval_batches)
  same = loop.final_eval_batches == loop.eval_batches
  return _Inputs(train_it, eval_set, eval_set if same else eval_rows(loop.final_eval_batches))


def _start(run: RunConfig, trainer: steps.Trainer, restored, train_it,
           workdir: str) -> tuple[int, steps.TrainState, dict]:
  """(step, state, progress) to start from: the restored checkpoint's, its
  training iterator put back where it was, or a fresh state at step 0."""
  # Host-side progress that must survive a restart: wall-clock seconds spent
  # in train steps, and a running CRC of every batch seen (equal CRCs mean
  # equal data order, e.g. across the MoE and its dense twins).
  progress = {'train_seconds': 0.0, 'data_crc': 0}
  if restored is None:
    step, state = 0, steps.fresh_state(trainer, run)
  else:
    step, state, data_state = restored
    checkpoint.restore_iterator(train_it, data_state, step,
                                data.row_shuffle(run.data, run.data.train_split))
    progress = data_state['progress']
    print0(f'resumed from step {step} in {workdir}')
  sharding.check_sharded(state.params, trainer.state_shardings.params)
  # skip_batches belongs to the restart from restore_step: it is applied on
  # top of the checkpoint that restart rewound to, and recorded in the
  # progress, so a later re-run of the same command that resumes from a newer
  # checkpoint does not skip again (one that finds no newer one does).
  restarts = progress.setdefault('restarts', {})
  restore_step, skip = run.resume.restore_step, run.resume.skip_batches
  if restore_step >= 0 and str(restore_step) not in restarts:
    for _ in range(skip):
      next(train_it)
    restarts[str(restore_step)] = skip
  return step, state, progress


def _record_start(workdir: str, config_json: dict, command: str,
                  step: int | None, changes: dict) -> None:
  """config.json := this start's config; starts.jsonl += one line with the
  config, the step it resumes (null: fresh) and its differences from the
  checkpoint's config."""
  run_dir.write_text(workdir, 'config.json', json.dumps(config_json, indent=2))
  run_dir.append_text(workdir, 'command.txt', command + '\n')
  line = {'time': time.strftime('%Y-%m-%dT%H:%M:%S%z'), 'step': step,
          'command': command,
          'changes': {k: list(v) for k, v in changes.items()},
          'config': config_json}
  run_dir.append_text(workdir, 'starts.jsonl', json.dumps(line) + '\n')


class _Preemption:
  """SIGTERM -> save at the next step boundary and exit 0.

  With several processes, orbax's `reached_preemption` (JAX's preemption
  sync point, active after jax.distributed.initialize; its SIGTERM notifier
  works on CPU too, see tests/test_reliability.py) makes every process agree
  on the step; a single process sets a flag from its own handler."""

  def __init__(self, ckpt: Checkpointer):
    self.ckpt, self.flag, self._previous = ckpt, False, None
    if jax.process_count() == 1:
      self._previous = signal.signal(signal.SIGTERM, self._handler)

  def close(self) -> None:
    """Gives SIGTERM back to whoever handled it before train()."""
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _handler(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM: saving at the next step boundary, then exiting.')
    self.flag = True

  def __call__(self, step: int) -> bool:
    return self.flag or self.ckpt.reached_preemption(step)


class _Loop:
  """The train loop of one start.

  The host never waits for the step it has just dispatched, except at a
  log, eval, checkpoint, preemption or the last step: it checks the step
  before (finished, or nearly, by then) and fetches the next batch while the
  device runs. So data loading and dispatch overlap device compute, and no
  log, eval or checkpoint is of a step whose update was not checked."""

  def __init__(self, run: RunConfig, trainer: steps.Trainer, inputs: _Inputs,
               ckpt: Checkpointer, lock: run_lock.RunLock, workdir: str,
               progress: dict, ckpt_bytes: int):
    self.run, self.trainer, self.inputs, self.ckpt, self.lock = run, trainer, inputs, ckpt, lock
    self.workdir, self.progress, self.ckpt_bytes = workdir, progress, ckpt_bytes
    self.lr = optimizer.learning_rate_schedule(run.optimizer, run.loop.num_steps)
    self.adaptive = run.model.is_moe and run.model.moe.adaptive
    self.unchecked = []    # the (step, metrics) dispatched but not yet checked: 0 or 1
    self.last, self.last_eval = {}, {}
    self.writer = self.throughput = None   # train() makes them

  def train(self, step: int, state: steps.TrainState) -> dict:
    """Trains from `step` to num_steps (or a preemption); returns the last
    train and eval metrics and the step reached. Whatever fails, compilation
    included, still closes the writer (uploading a remote workdir's
    metrics); train() closes the checkpointer. A SIGTERM during compilation
    saves after the first step."""
    loop = self.run.loop
    self.writer = metrics_lib.MetricWriter(self.workdir, total_steps=loop.num_steps,
                                           progress=loop.progress_bar or False)
    preempted = _Preemption(self.ckpt)
    try:
      compiled, tokens = self._compile(step, state)
      while step < loop.num_steps:
        t_step = time.perf_counter()
        state, metrics = compiled(state, tokens)
        step += 1
        self._check_updates()   # the step before this one
        self.unchecked.append((step, metrics))
        last = step == loop.num_steps
        log = step == 1 or step % loop.log_every == 0 or last
        evaluate_now = step % loop.eval_every == 0 or last
        save_now = step % loop.checkpoint_every == 0 or last
        if log or evaluate_now or save_now:
          self._check_updates()
        self.progress['train_seconds'] += time.perf_counter() - t_step
        if log:
          self._log(step, metrics)
        if evaluate_now:
          self._evaluate(step, state, final=last)
        if save_now:
          self._save(step, state)
        if preempted(step):
          print0(f'preempted: saving step {step} and exiting.')
          if not save_now:
            self._check_updates()
            self._save(step, state)
          break
        if not last:
          t_data = time.perf_counter()
          tokens = self._next_batch()
          self.progress['train_seconds'] += time.perf_counter() - t_data
    finally:
      preempted.close()
      self.writer.close()
    return {'train': self.last, 'eval': self.last_eval, 'step': step}

  def _next_batch(self) -> jax.Array:
    local = next(self.inputs.train_it)
    self.progress['data_crc'] = zlib.crc32(np.ascontiguousarray(local), self.progress['data_crc'])
    return data.global_batch(local, self.trainer.batch_sharding)

  def _compile(self, step: int, state):
    """(the compiled train step, the first batch); logs the time to first
    step, peak memory and the model's size, and starts the throughput clock."""
    t0 = time.perf_counter()
    tokens = self._next_batch()
    compiled = self.trainer.train_step.lower(state, tokens).compile()
    compile_seconds = time.perf_counter() - t0
    cfg, loop = self.run.model, self.run.loop
    peak, source = metrics_lib.peak_flops(loop.peak_flops_per_device, jnp.dtype(cfg.dtype))
    self.throughput = metrics_lib.Throughput(
        flops_per_token=cfg.flops_per_token(loop.seq_len),
        tokens_per_step=loop.batch_size * loop.seq_len,
        peak_flops_per_device=peak, peak_source=source)
    self.writer.write(step, {**self.throughput.info(), 'compile_seconds': compile_seconds,
                             'peak_memory_mb': metrics_lib.peak_memory_mb(compiled),
                             'num_params': cfg.num_params,
                             'num_active_params': cfg.num_active_params})
    self.throughput.start(step)
    return compiled, tokens

  def _check_updates(self) -> None:
    """Checks the dispatched step: a non-finite update is skipped (logged)
    or stops the run (nonfinite=stop); an adaptive model's FFN experts per
    token count towards the throughput's FLOPs."""
    while self.unchecked:
      at_step, step_metrics = self.unchecked.pop()
      wanted = {k: step_metrics[k] for k in ('loss', 'update_skipped')}
      if self.adaptive:   # the compute its tokens took, for tokens/s's FLOPs and MFU
        wanted['ffn'] = step_metrics['router'].ffn_per_token            # [L]
      scalars = jax.device_get(wanted)   # one transfer a step
      if self.adaptive:
        self.throughput.count(self.run.model.flops_per_token(self.run.loop.seq_len, scalars['ffn']))
      if scalars['update_skipped']:
        msg = (f'non-finite loss or gradients at step {at_step} '
               f'(loss={float(scalars["loss"])}); the update was not applied')
        if self.run.loop.nonfinite == 'stop':
          raise FloatingPointError(msg + '; stopping (nonfinite=stop). The last '
                                   'good checkpoint is untouched.')
        logging.warning('%s; skipping it (nonfinite=skip).', msg)

  def _log(self, step: int, metrics) -> None:
    self.last = metrics_lib.summarize(jax.device_get(metrics))
    self.last.update(self.throughput.measure(step), lr=float(self.lr(step - 1)),
                     train_seconds=self.progress['train_seconds'],
                     data_crc=self.progress['data_crc'])
    self.writer.write(step, self.last)

  def _evaluate(self, step: int, state, *, final: bool) -> None:
    """The periodic eval; at the last step also the final one (its own set
    when final_eval_batches differs) and its losses per document, for
    compare's bootstrap intervals."""
    last_eval, per_doc = steps.evaluate(self.trainer, state, self.inputs.eval_set)
    self.last_eval = metrics_lib.summarize(last_eval)
    self.writer.write_eval(step, self.last_eval)
    if final:
      if self.inputs.final_set is not self.inputs.eval_set:
        last_eval, per_doc = steps.evaluate(self.trainer, state, self.inputs.final_set)
        self.last_eval = metrics_lib.summarize(last_eval)
      self.writer.write_eval(step, self.last_eval, prefix='final/')
      if jax.process_index() == 0:
        run_dir.write_text(self.workdir, 'final_eval_documents.json', per_doc.to_json())
    self.throughput.start(step)

  def _save(self, step: int, state) -> None:
    """Saves `step` once every process agrees: process 0 still holds the
    lock, and no process's disk is too full for one more checkpoint."""
    self.ckpt.wait_until_finished()
    lost = self.lock.check() if jax.process_index() == 0 else None
    process_sync.raise_on_all(lost and f'stopping without saving step {step}: {lost}',
                              run_lock.WorkdirLockedError)
    process_sync.refused_by_any(lambda: disk_space.check_before_save(
        self.ckpt.directory, self.ckpt_bytes, step, self.ckpt.latest_step()),
                                disk_space.DiskFullError)
    self.ckpt.save(step, state, {'iterators': process_sync.per_process(
        self.inputs.train_it.get_state()), 'progress': self.progress},
                   self.run.config_json)
    self.writer.sync()   # a remote workdir's metrics, up to this checkpoint
    self.throughput.start(step)
