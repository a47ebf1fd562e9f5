"""The train state and the jitted steps of a run on a mesh (`build`: the
one way to build a trainer, for training, eval, upcycling, planner and
benchmark): RunConfig -> abstract init (shapes and logical names, no memory)
-> shardings from the rules table -> jit(init), train_step (state donated)
and eval_step; `evaluate` runs eval_step over an eval set."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from moe import checkpoint, data, optimizer, process_sync, run_config, sharding, upcycle
from moe.model import Transformer, lm_loss
from moe.run_config import RunConfig


class TrainState(NamedTuple):
  step: jax.Array   # int32 scalar
  params: Any       # nnx.State of nnx.Param
  extra: Any        # nnx.State of the other variables (balance bias)
  opt_state: Any


class Trainer(NamedTuple):
  """Everything the loop needs to run steps on a mesh."""
  mesh: jax.sharding.Mesh
  graphdef: Any                                   # the model's nnx GraphDef
  abstract_state: TrainState                      # ShapeDtypeStructs
  state_shardings: TrainState
  batch_sharding: NamedSharding
  init: Callable[[jax.Array], TrainState]         # key -> sharded TrainState
  train_step: Callable                            # (state, tokens) -> (state, metrics)
  eval_step: Callable                             # (state, tokens, cf=None, routes=False,
                                                  #  compute=None) -> metrics


def _transformation(run: RunConfig) -> optax.GradientTransformationExtraArgs:
  return optax.with_extra_args_support(   # the step passes grad_norm=
      optimizer.make(run.optimizer, run.loop.num_steps))


def _new_state(run: RunConfig, tx, key) -> TrainState:
  """The TrainState at step 0 of a freshly initialized model."""
  _, params, extra = nnx.split(Transformer(run.model, key), nnx.Param, ...)
  return TrainState(jnp.zeros((), jnp.int32), params, extra, tx.init(params))


def abstract_state(run: RunConfig) -> tuple[Any, TrainState]:
  """(the model's graphdef, the TrainState's ShapeDtypeStructs with their
  logical names): what a checkpoint of `run` holds, without memory."""
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(run.model, jax.random.key(0))))
  return graphdef, jax.eval_shape(lambda k: _new_state(run, _transformation(run), k),
                                  jax.random.key(0))


def step_rng(seed: int, step) -> jax.Array:
  """The router-noise key of a step: a function of (seed, step) only, so a
  resumed or re-sharded run draws the same noise."""
  return jax.random.fold_in(jax.random.key(seed), step)


def loss_and_grads(graphdef, seed: int) -> Callable:
  """(state, tokens) -> (loss, metrics, grads) of a train step, unjitted:
  the training loss with the step's router noise (`step_rng`)."""

  def fn(state: TrainState, tokens):
    def loss_fn(params):
      return lm_loss(nnx.merge(graphdef, params, state.extra), tokens, train=True,
                     rng=step_rng(seed, state.step))

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return loss, metrics, grads
  return fn


def _step_functions(graphdef, tx, seed: int):
  """The (unjitted) train and eval steps."""
  grads_of = loss_and_grads(graphdef, seed)

  def train_step(state: TrainState, tokens):
    loss, metrics, grads = grads_of(state, tokens)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update(state):
      updates, opt_state = tx.update(grads, state.opt_state, state.params, grad_norm=grad_norm)
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
    model = nnx.merge(graphdef, state.params, state.extra)
    _, metrics = lm_loss(model, tokens, train=False, capacity_factor=capacity_factor,
                         routes=routes, compute=compute)
    return metrics

  return train_step, eval_step


def under_mesh(mesh, fn):
  """`fn` (a jitted function) traced and run with the mesh set
  (constraints, shard_map); `.lower` too."""
  def call(*args):
    with jax.set_mesh(mesh):
      return fn(*args)

  def lower(*args):
    with jax.set_mesh(mesh):
      return fn.lower(*args)

  call.lower = lower
  return call


def build(run: RunConfig, mesh: jax.sharding.Mesh) -> Trainer:
  """Abstract-first init and the jitted steps of `run` on `mesh`."""
  tx = _transformation(run)
  graphdef, abstract = abstract_state(run)
  state_shardings = sharding.tree_shardings(abstract, mesh, sharding.rules(run.layout.fsdp))
  batch_sharding = NamedSharding(mesh, P(sharding.BATCH_AXES, None))
  replicated = NamedSharding(mesh, P())
  train_step, eval_step = _step_functions(graphdef, tx, run.seed)
  with jax.set_mesh(mesh):
    init = jax.jit(lambda key: _new_state(run, tx, key), out_shardings=state_shardings)
    jit_train = jax.jit(train_step, in_shardings=(state_shardings, batch_sharding),
                        out_shardings=(state_shardings, replicated), donate_argnums=0)
    jit_eval = jax.jit(eval_step, in_shardings=(state_shardings, batch_sharding),
                       out_shardings=replicated, static_argnums=(2, 3, 4))
  return Trainer(mesh, graphdef, abstract, state_shardings, batch_sharding,
                 under_mesh(mesh, init), under_mesh(mesh, jit_train),
                 under_mesh(mesh, jit_eval))


def fresh_state(t: Trainer, run: RunConfig) -> TrainState:
  """The state of a run's step 0: initialized from its seed; with
  `resume.init_from`, its parameters upcycled from the newest checkpoint of
  that dense run (read-only), laid out on the same mesh (moe/upcycle.py).
  Step, optimizer state and balance bias stay fresh."""
  state = t.init(jax.random.key(run.seed))
  source = run.resume.init_from
  if not source:
    return state
  dense_run = run_config.saved(source, 'init_from')
  upcycle.check_compatible(dense_run.model, run.model, source)
  dense = build(dataclasses.replace(dense_run, layout=run.layout), t.mesh)
  step = checkpoint.latest_step(source)
  dense_state = checkpoint.read_state(source, step, dense.abstract_state, dense.state_shardings)

  def upcycled(dense_params, moe_params):   # moe_params donated
    new = upcycle.upcycle_params(nnx.to_pure_dict(dense_params),
                                 nnx.to_pure_dict(moe_params), run.model)
    nnx.replace_by_pure_dict(moe_params, new)
    return moe_params
  with jax.set_mesh(t.mesh):
    params = jax.jit(upcycled, out_shardings=t.state_shardings.params,
                     donate_argnums=1)(dense_state.params, state.params)
  process_sync.print0(
      f'upcycled from {source} (dense step {step}): {run.model.moe.num_experts} '
      f'copies of the dense MLP in each of {run.model.num_moe_layers} MoE layers, '
      'router at zero')
  return state._replace(params=params)


class DocumentLosses(NamedTuple):
  """An evaluation's loss per document of its set (data.EvalSet)."""
  loss_sum: np.ndarray   # float64 [num_documents]: summed target losses
  tokens: np.ndarray     # float64 [num_documents]: targets evaluated

  def to_json(self) -> str:
    return json.dumps({'loss_sum': self.loss_sum.tolist(),
                       'tokens': self.tokens.astype(np.int64).tolist()})


def evaluate(t: Trainer, state: TrainState, eval_set: data.EvalSet,
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
    tokens_in = data.global_batch(batch.tokens, t.batch_sharding)
    m = jax.device_get(t.eval_step(state, tokens_in, capacity_factor, False, compute))
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
