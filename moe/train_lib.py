"""Train state, sharded initialization and the jitted train/eval steps.

Data flow: config -> validate -> mesh -> abstract init (eval_shape) ->
shardings from logical names -> jit(init, out_shardings) ->
train_step(state, batch) with the state donated.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
import zlib
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from moe import config_drift, data, disk_space, run_config, run_dir, run_lock, sharding
from moe import metrics as metrics_lib
from moe.checkpoint import Checkpointer, CheckpointError, latest_step
from moe.config import ModelConfig
from moe.model import Transformer, lm_loss


class TrainState(NamedTuple):
  step: jax.Array   # int32 scalar
  params: Any       # nnx.State of nnx.Param
  extra: Any        # nnx.State of the other variables (balance bias)
  opt_state: Any


class Setup(NamedTuple):
  """Everything the loop needs to run steps on a mesh."""
  mesh: jax.sharding.Mesh
  abstract_state: TrainState                      # ShapeDtypeStructs
  state_shardings: TrainState
  batch_sharding: NamedSharding
  init: Callable[[jax.Array], TrainState]         # key -> sharded TrainState
  train_step: Callable                            # (state, tokens) -> (state, metrics)
  eval_step: Callable                             # (state, tokens, cf=None, routes=False,
                                                  #  compute=None) -> metrics
  loss_and_grads: Callable                        # (state, tokens) -> (loss, metrics, grads)


def new_state(cfg: ModelConfig, tx, key):
  """(graphdef, TrainState at step 0) of a freshly initialized model."""
  graphdef, params, extra = nnx.split(Transformer(cfg, key), nnx.Param, ...)
  return graphdef, TrainState(jnp.zeros((), jnp.int32), params, extra,
                              tx.init(params))


def _merge(graphdef, state: TrainState) -> Transformer:
  return nnx.merge(graphdef, state.params, state.extra)


def step_rng(seed: int, step) -> jax.Array:
  """The router-noise key of a step: a function of (seed, step) only, so a
  resumed or re-sharded run draws the same noise."""
  return jax.random.fold_in(jax.random.key(seed), step)


def setup(cfg: ModelConfig, tx: optax.GradientTransformation, mesh, *,
          seed: int = 0, fsdp: bool = False) -> Setup:
  """Abstract-first init and the jitted steps for `cfg` on `mesh`."""
  tx = optax.with_extra_args_support(tx)   # the step passes grad_norm=
  # Abstract init: shapes and logical names, no memory.
  graphdef = None

  def new(key):
    nonlocal graphdef
    graphdef, state = new_state(cfg, tx, key)
    return state

  abstract = jax.eval_shape(new, jax.random.key(0))  # also sets graphdef
  rule_table = sharding.rules(fsdp)
  state_shardings = sharding.tree_shardings(abstract, mesh, rule_table)
  batch_sharding = NamedSharding(mesh, P(sharding.BATCH_AXES, None))
  replicated = NamedSharding(mesh, P())

  def loss_and_grads(state: TrainState, tokens):
    rng = step_rng(seed, state.step)

    def loss_fn(params):
      model = nnx.merge(graphdef, params, state.extra)
      return lm_loss(model, tokens, train=True, rng=rng)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return loss, metrics, grads

  def train_step(state: TrainState, tokens):
    loss, metrics, grads = loss_and_grads(state, tokens)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update(state):
      updates, opt_state = tx.update(grads, state.opt_state, state.params,
                                     grad_norm=grad_norm)
      model = nnx.merge(graphdef, optax.apply_updates(state.params, updates), state.extra)
      if 'router' in metrics:
        model.update_balance_bias(metrics['router'])
      _, params, extra = nnx.split(model, nnx.Param, ...)
      return state._replace(params=params, extra=extra, opt_state=opt_state)

    # A non-finite loss or gradient never reaches the state: the update is
    # skipped (the loop then goes on or stops, as configured). A cond, as in
    # optax.apply_if_finite, not a select of new against old: with the
    # select XLA copied every optimizer moment each step, to keep the old
    # value alive through the in-place update.
    state = jax.lax.cond(finite, update, lambda state: state, state)
    metrics = dict(metrics, total_loss=loss, grad_norm=grad_norm,
                   update_skipped=jnp.logical_not(finite))
    return state._replace(step=state.step + 1), metrics

  def eval_step(state: TrainState, tokens, capacity_factor=None, routes=False,
                compute=None):
    _, metrics = lm_loss(_merge(graphdef, state), tokens, train=False,
                         capacity_factor=capacity_factor, routes=routes, compute=compute)
    return metrics

  with jax.set_mesh(mesh):
    init = jax.jit(new, out_shardings=state_shardings)
    jit_train = jax.jit(train_step, in_shardings=(state_shardings, batch_sharding),
                        out_shardings=(state_shardings, replicated), donate_argnums=0)
    jit_eval = jax.jit(eval_step, in_shardings=(state_shardings, batch_sharding),
                       out_shardings=replicated, static_argnums=(2, 3, 4))
    jit_grads = jax.jit(loss_and_grads, in_shardings=(state_shardings, batch_sharding),
                        out_shardings=(replicated, replicated, state_shardings.params))

  def under_mesh(fn):
    """Traces and runs `fn` with the mesh set (constraints, shard_map)."""
    def call(*args):
      with jax.set_mesh(mesh):
        return fn(*args)

    def lower(*args):
      with jax.set_mesh(mesh):
        return fn.lower(*args)

    call.lower = lower
    return call

  return Setup(mesh, abstract, state_shardings, batch_sharding,
               under_mesh(init), under_mesh(jit_train), under_mesh(jit_eval),
               under_mesh(jit_grads))


# --- Optimizer -------------------------------------------------------------------

def learning_rate_schedule(opt, num_steps: int) -> optax.Schedule:
  """Linear warmup to the peak, then cosine/linear decay to min_lr_ratio."""
  peak, warmup = opt.learning_rate, opt.warmup_steps
  end = peak * opt.min_lr_ratio
  decay_steps = max(num_steps - warmup, 1)
  if opt.decay == 'cosine':
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=opt.min_lr_ratio)
  elif opt.decay == 'linear':
    decay = optax.linear_schedule(peak, end, decay_steps)
  else:
    decay = optax.constant_schedule(peak)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def decay_mask(params):
  """Weight decay on matrices only: not on norm scales (or biases; the router
  bias is not a parameter at all)."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
  """`optax.clip_by_global_norm` that takes the norm from its caller
  (`grad_norm=`). The train step computes that norm anyway, to log it and to
  skip non-finite steps; computed again inside the update's `cond`, it would
  be a second pass over every gradient that XLA cannot merge.

  The clip multiplies by one scalar, min(1, max_norm / norm), where optax
  selects between each gradient and its scaled copy: XLA:CPU fuses the
  product into AdamW's moment updates, but wrote the selected copy out as
  one more pass over every gradient (measured on the 64-expert step of
  scripts/bench.py: docs/performance.md)."""

  def update(updates, state, params=None, *, grad_norm, **extra_args):
    del params, extra_args
    scale = jnp.where(grad_norm < max_norm, 1.0, max_norm / grad_norm)
    return jax.tree.map(lambda t: t * scale.astype(t.dtype), updates), state

  return optax.GradientTransformationExtraArgs(optax.init_empty_state, update)


def make_optimizer(opt, num_steps: int) -> optax.GradientTransformation:
  """AdamW (default) or Adafactor, with global-norm clipping.

  Weight decay means the same for both: each step subtracts
  lr * weight_decay * p from the matrices (decoupled, as AdamW). optax's
  Adafactor adds its `weight_decay_rate * p` after the learning rate, so
  weight_decay=0.1 there would shrink every matrix by 10% a step; the decay
  is added here before the learning rate instead."""
  lr = learning_rate_schedule(opt, num_steps)
  if opt.name == 'adamw':
    core = optax.adamw(lr, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay,
                       mask=decay_mask)
  else:
    core = optax.chain(
        optax.adafactor(learning_rate=None),   # the descent direction, -u
        optax.scale(-1.0),                     # u
        optax.add_decayed_weights(opt.weight_decay, decay_mask),
        optax.scale_by_learning_rate(lr))      # -lr * (u + wd * p)
  clip = [clip_by_global_norm(opt.grad_clip)] if opt.grad_clip else []
  return optax.chain(*clip, core)


# --- The loop ----------------------------------------------------------------------

class DocumentLosses(NamedTuple):
  """An evaluation's loss per document of its set (data.EvalSet)."""
  loss_sum: np.ndarray   # float64 [num_documents]: summed target losses
  tokens: np.ndarray     # float64 [num_documents]: targets evaluated

  def to_json(self) -> str:
    return json.dumps({'loss_sum': self.loss_sum.tolist(),
                       'tokens': self.tokens.astype(np.int64).tolist()})


def evaluate(s: Setup, state: TrainState, eval_set: data.EvalSet,
             capacity_factor=None, compute=None) -> tuple[dict, DocumentLosses]:
  """Eval metrics over `eval_set`, and its losses per document
  (`capacity_factor`, `compute`: the what-ifs' overrides, moe.eval_lib).

  `loss` is exact over the set's target tokens (padding rows weigh 0); the
  router statistics are means over its batches. `tokens` and `documents`
  give the set's size."""
  n_docs = eval_set.num_documents
  loss_sum, tokens = np.zeros(n_docs), np.zeros(n_docs)
  totals, n = None, 0
  for batch in eval_set:
    tokens_in = data.global_batch(batch.tokens, s.batch_sharding)
    m = jax.device_get(s.eval_step(state, tokens_in, capacity_factor, False, compute))
    weights = np.broadcast_to(batch.weights[:, None], m['token_loss'].shape)
    loss_sum += np.bincount(batch.documents.ravel(),
                            (m.pop('token_loss') * weights).ravel(), n_docs)
    tokens += np.bincount(batch.documents.ravel(), weights.ravel(), n_docs)
    del m['loss']   # recomputed exactly, below
    totals = m if totals is None else jax.tree.map(np.add, totals, m)
    n += 1
  metrics = jax.tree.map(lambda x: x / n, totals)
  metrics.update(loss=float(loss_sum.sum() / tokens.sum()),
                 tokens=eval_set.tokens, documents=eval_set.documents)
  return metrics, DocumentLosses(loss_sum, tokens)


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


def _per_process(obj) -> list:
  """The JSON-serializable `obj` of every process, in process order. The
  checkpoint's data item is written by process 0 alone, but every process
  reads its own shard of the training data, so all iterator states go in."""
  if jax.process_count() == 1:
    return [obj]
  raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.int32(raw.size)))
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:raw.size] = raw
  rows = np.asarray(multihost_utils.process_allgather(padded))
  return [json.loads(rows[i, :sizes[i]].tobytes()) for i in range(len(sizes))]


def _own_iterator_state(data_state: dict, step: int) -> dict:
  """This process's data-iterator state from a checkpoint's data item."""
  states = data_state['iterators']
  if len(states) != jax.process_count():
    raise CheckpointError(
        f'checkpoint step {step} was written by {len(states)} process(es) and '
        f'this run has {jax.process_count()}: the training data is sharded by '
        'process, so its data position cannot be restored exactly. Resume '
        f'with {len(states)} process(es).')
  return states[jax.process_index()]


def _restore_iterator(it, state: dict, step: int, order: str) -> None:
  """Puts the training iterator where checkpoint `step` left it; a state
  of another row order (another data.row_shuffle, or a checkpoint from
  before rows were shuffled) is a CheckpointError, not a KeyError."""
  try:
    it.set_state(state)
  except (KeyError, TypeError, ValueError) as e:
    raise CheckpointError(
        f'checkpoint step {step} holds a data-iterator state that does not fit '
        f"this run's '{order}' row order (state keys {sorted(state)}): it was "
        'written with another data.row_shuffle, or by a version that did not '
        'shuffle rows. Resume with the row order it was written with, or '
        'train in a new workdir.') from e


def _print(msg: str) -> None:
  """A progress line on process 0 (absl's INFO log is orbax's chatter)."""
  if jax.process_index() == 0:
    print(msg, flush=True)


def _raise_on_all(message: str | None, error: type[Exception]) -> None:
  """Raises `error` on every process with the first message any process
  has (each from its own check), so that all stop together."""
  message = next((m for m in _per_process(message) if m), None)
  if message:
    raise error(message)


def _refused_by_any(check: Callable[[], Any], error: type[Exception]):
  """Runs `check` here; if it raised `error` on any process, raises it on
  every process with that process's message. Returns check's result."""
  result, message = None, None
  try:
    result = check()
  except error as e:
    message = str(e)
  _raise_on_all(message, error)
  return result


def train(config, workdir: str, *, command: str | None = None) -> dict:
  """Pretrains `config` in `workdir`, resuming from its latest checkpoint.

  Returns the last logged train metrics and the last eval metrics. Process
  0 holds the workdir's lock (moe.run_lock) for the run's life."""
  # --- Validate everything before anything expensive -------------------------
  run = run_config.validate(config, jax.device_count())
  data.check_source(run.data)   # here, not in validate: a sweep's launcher may lack the data
  run_dir.check_writable(workdir)
  # The devices' domains (processes, slices) must fit the two-level layout.
  mesh = sharding.make_mesh(run.mesh_shape, dcn_shape=run.dcn_mesh_shape)
  command = command or ' '.join(sys.argv)
  lock = run_lock.RunLock(workdir, command)
  notice = _refused_by_any(
      lock.acquire if jax.process_index() == 0 else lambda: None,
      run_lock.WorkdirLockedError)
  if notice:
    _print(notice)
  try:
    ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'),
                        max_to_keep=config.max_to_keep)
    try:
      return _train(config, run, mesh, workdir, command, ckpt, lock)
    finally:
      ckpt.close()   # waits for the last save
  finally:
    if jax.process_index() == 0:
      lock.release()


def _resume_point(config, ckpt: Checkpointer) -> tuple[int | None, int | None]:
  """(at_most, step): the restore_step bound still to honour (None: the
  newest step) and the checkpoint step a restore will start from (None:
  a fresh run; a damaged newest step may make a fall-back restore older)."""
  at_most = None if config.restore_step < 0 else config.restore_step
  if at_most is not None and ckpt.restarted_from(at_most):
    # This restart already happened (a preempted restart re-runs the same
    # command): resume from the newest checkpoint instead of rewinding again.
    _print(f'restore_step={at_most} was already honoured; resuming from the newest step')
    at_most = None
  steps = [s for s in ckpt.all_steps() if at_most is None or s <= at_most]
  return at_most, max(steps, default=None)


def _check_config_drift(config_json: dict, ckpt: Checkpointer, step: int | None,
                        accept: bool) -> dict:
  """Refuses (config_drift.check) resuming `step` under a config that
  differs from the one it was saved with; returns the differences."""
  saved = None if step is None else ckpt.saved_config(step)
  if saved is None:   # a fresh run, or unreadable: restore reports the damage
    return {}
  changes, notice = config_drift.check(saved, config_json, step=step,
                                       accept=accept)
  if notice:
    _print(notice)
  return changes


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


def _train(config, run: run_config.Run, mesh: jax.sharding.Mesh, workdir: str,
           command: str, ckpt: Checkpointer, lock: run_lock.RunLock) -> dict:
  cfg, steps = run.model, config.num_steps
  config_json = json.loads(config.to_json_best_effort())
  at_most, resume_step = _resume_point(config, ckpt)
  changes = _check_config_drift(config_json, ckpt, resume_step,
                                config.accept_config_change)

  # --- Model and optimizer; disk space for the checkpoints ----------------------
  tx = make_optimizer(config.optimizer, steps)
  lr = learning_rate_schedule(config.optimizer, steps)
  s = setup(cfg, tx, mesh, seed=config.seed, fsdp=config.fsdp)
  ckpt_bytes = disk_space.checkpoint_bytes(s.abstract_state)
  _refused_by_any(lambda: disk_space.check_before_training(
      ckpt.directory, ckpt_bytes, kept=len(ckpt.all_steps()),
      max_to_keep=config.max_to_keep,
      saves=disk_space.saves_left(resume_step or 0, steps, config.checkpoint_every)),
                  disk_space.DiskFullError)

  # --- Input pipeline ------------------------------------------------------------
  if jax.process_index() == 0:
    data.prepare(run.data)
  multihost_utils.sync_global_devices('data prepared')
  local_batch = config.batch_size // jax.process_count()
  train_it = data.train_iterator(run.data, seq_len=config.seq_len,
                                 batch_size=local_batch, seed=config.seed)
  # Periodic evaluations read `eval_batches` batches spread over the
  # validation split; the last step's reads `final_eval_batches` (0: both the
  # whole split). Too small a split for one batch fails here.
  def eval_rows(batches: int) -> data.EvalSet:
    return data.eval_set(run.data, seq_len=config.seq_len,
                         batch_size=local_batch, max_batches=batches or None)

  eval_set = eval_rows(config.eval_batches)
  same_sets = config.final_eval_batches == config.eval_batches
  final_set = eval_set if same_sets else eval_rows(config.final_eval_batches)

  # --- Restore or initialize ---------------------------------------------------------
  restored = ckpt.restore_latest(s.abstract_state, s.state_shardings,
                                 fallback=config.restore_fallback, at_most=at_most)
  # Every process has looked (restarted_from, restore) before process 0
  # moves any step directory.
  multihost_utils.sync_global_devices('checkpoints restored')
  if at_most is not None and jax.process_index() == 0:
    aside = ckpt.set_aside_after(restored[0], at_most)
    _print(f'restarting from step {restored[0]}: newer checkpoints (if any) '
           f'moved to {aside}')
  elif config.restore_fallback and jax.process_index() == 0:
    # The steps a fall-back skipped as damaged: kept aside, out of the way
    # of this run's saves of the same steps.
    aside = ckpt.set_aside_damaged(None if restored is None else restored[0])
    if aside:
      _print(f'damaged checkpoints moved to {aside}')
  multihost_utils.sync_global_devices('checkpoints set aside')
  ckpt.manager.reload()
  # Host-side progress that must survive a restart: wall-clock seconds spent
  # in train steps, and a running CRC of every batch seen (equal CRCs mean
  # equal data order, e.g. across the MoE and its dense twins).
  progress = {'train_seconds': 0.0, 'data_crc': 0}
  if restored is None:
    step, state = 0, s.init(jax.random.key(config.seed))
    if config.get('init_from'):  # sparse upcycling from a dense run
      from moe import upcycle  # pylint: disable=g-import-not-at-top
      state = upcycle.upcycle_state(config, s, state)
  else:
    step, state, data_state = restored
    _restore_iterator(train_it, _own_iterator_state(data_state, step), step,
                      data.row_shuffle(run.data, run.data.train_split))
    progress = data_state['progress']
    _print(f'resumed from step {step} in {workdir}')
  sharding.check_sharded(state.params, s.state_shardings.params)
  # skip_batches belongs to the restart from restore_step: it is applied on
  # top of the checkpoint that restart rewound to, and recorded in the
  # progress, so a later re-run of the same command that resumes from a newer
  # checkpoint does not skip again (one that finds no newer one does).
  restarts = progress.setdefault('restarts', {})
  if config.restore_step >= 0 and str(config.restore_step) not in restarts:
    for _ in range(config.skip_batches):
      next(train_it)
    restarts[str(config.restore_step)] = config.skip_batches
  if jax.process_index() == 0:
    _record_start(workdir, config_json, command,
                  None if restored is None else step, changes)

  def next_batch():
    local = next(train_it)
    progress['data_crc'] = zlib.crc32(np.ascontiguousarray(local), progress['data_crc'])
    return data.global_batch(local, s.batch_sharding)

  def save(at_step: int) -> None:
    # Every process agrees before any saves: process 0 still holds the lock,
    # and no process's disk is too full for one more checkpoint.
    ckpt.wait_until_finished()
    lost = lock.check() if jax.process_index() == 0 else None
    _raise_on_all(lost and f'stopping without saving step {at_step}: {lost}',
                  run_lock.WorkdirLockedError)
    _refused_by_any(lambda: disk_space.check_before_save(
        ckpt.directory, ckpt_bytes, at_step, ckpt.latest_step()),
                    disk_space.DiskFullError)
    ckpt.save(at_step, state, {'iterators': _per_process(train_it.get_state()),
                               'progress': progress}, config_json)
    writer.sync()   # a remote workdir's metrics, up to this checkpoint

  # --- Metrics; compile and train in one try -------------------------------------------
  # Whatever fails in the try, compilation included, still closes the writer
  # (uploading a remote workdir's metrics); train() closes the checkpointer.
  # A SIGTERM during compilation saves after the first step.
  writer = metrics_lib.MetricWriter(workdir, total_steps=steps,
                                    progress=config.progress_bar or False)
  preempted = _Preemption(ckpt)

  # --- Train loop ------------------------------------------------------------------------
  # The host never waits for the step it has just dispatched, except at a
  # log, eval, checkpoint, preemption or the last step: it checks the step
  # before (finished, or nearly, by then) and fetches the next batch while the
  # device runs. So data loading and dispatch overlap device compute, and no
  # log, eval or checkpoint is of a step whose update was not checked.
  unchecked = []   # the (step, metrics) dispatched but not yet checked: 0 or 1

  adaptive = cfg.is_moe and cfg.moe.adaptive

  def check_updates() -> None:
    while unchecked:
      at_step, step_metrics = unchecked.pop()
      wanted = {k: step_metrics[k] for k in ('loss', 'update_skipped')}
      if adaptive:   # the compute its tokens took, for tokens/s's FLOPs and MFU
        wanted['ffn'] = step_metrics['router'].ffn_per_token            # [L]
      scalars = jax.device_get(wanted)   # one transfer a step
      if adaptive:
        throughput.count(cfg.flops_per_token(config.seq_len, scalars['ffn']))
      if scalars['update_skipped']:
        msg = (f'non-finite loss or gradients at step {at_step} '
               f'(loss={float(scalars["loss"])}); the update was not applied')
        if config.nonfinite == 'stop':
          raise FloatingPointError(msg + '; stopping (nonfinite=stop). The last '
                                   'good checkpoint is untouched.')
        logging.warning('%s; skipping it (nonfinite=skip).', msg)

  last, last_eval = {}, {}
  try:
    # Compile: time to first step and peak memory.
    t0 = time.perf_counter()
    tokens = next_batch()
    compiled_step = s.train_step.lower(state, tokens).compile()
    compile_seconds = time.perf_counter() - t0
    peak, source = metrics_lib.peak_flops(config.peak_flops_per_device,
                                          jnp.dtype(cfg.dtype))
    throughput = metrics_lib.Throughput(
        flops_per_token=cfg.flops_per_token(config.seq_len),
        tokens_per_step=config.batch_size * config.seq_len,
        peak_flops_per_device=peak, peak_source=source)
    writer.write(step, {**throughput.info(), 'compile_seconds': compile_seconds,
                        'peak_memory_mb': metrics_lib.peak_memory_mb(compiled_step),
                        'num_params': cfg.num_params,
                        'num_active_params': cfg.num_active_params})
    throughput.start(step)
    while step < steps:
      t_step = time.perf_counter()
      state, metrics = compiled_step(state, tokens)
      step += 1
      check_updates()   # the step before this one
      unchecked.append((step, metrics))
      log = step == 1 or step % config.log_every == 0 or step == steps
      evaluate_now = step % config.eval_every == 0 or step == steps
      save_now = step % config.checkpoint_every == 0 or step == steps
      if log or evaluate_now or save_now:
        check_updates()
      progress['train_seconds'] += time.perf_counter() - t_step
      if log:
        last = metrics_lib.summarize(jax.device_get(metrics))
        last.update(throughput.measure(step), lr=float(lr(step - 1)),
                    train_seconds=progress['train_seconds'],
                    data_crc=progress['data_crc'])
        writer.write(step, last)
      if evaluate_now:
        last_eval, per_doc = evaluate(s, state, eval_set)
        last_eval = metrics_lib.summarize(last_eval)
        writer.write_eval(step, last_eval)
        if step == steps:
          if not same_sets:
            last_eval, per_doc = evaluate(s, state, final_set)
            last_eval = metrics_lib.summarize(last_eval)
          writer.write_eval(step, last_eval, prefix='final/')
          if jax.process_index() == 0:   # for compare's bootstrap intervals
            run_dir.write_text(workdir, 'final_eval_documents.json', per_doc.to_json())
        throughput.start(step)
      if save_now:
        save(step)
        throughput.start(step)
      if preempted(step):
        _print(f'preempted: saving step {step} and exiting.')
        if not save_now:
          check_updates()
          save(step)
        break
      if step < steps:
        t_data = time.perf_counter()
        tokens = next_batch()
        progress['train_seconds'] += time.perf_counter() - t_data
  finally:
    preempted.close()
    writer.close()
  return {'train': last, 'eval': last_eval, 'step': step}


def train_unfinished(runs: dict[str, Any], *, command: str) -> None:
  """Trains, one after another, each `workdir -> config` of `runs` whose
  newest checkpoint is short of its num_steps (the others are finished),
  after validating every config, so a bad one fails before any trains
  (scripts/compare.py, scripts/token_budget.py)."""
  for config in runs.values():
    run_config.validate(config, jax.device_count())
  for workdir, config in runs.items():
    done = latest_step(workdir)
    if done is not None and done >= config.num_steps:
      _print(f'{workdir}: finished ({done} steps), skipping')
      continue
    _print(f'{workdir}: training to step {config.num_steps}')
    train(config, workdir, command=command)
