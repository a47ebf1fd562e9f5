"""Train state, sharded initialization and the jitted train/eval steps.

Data flow: config -> validate -> mesh -> abstract init (eval_shape) ->
shardings from logical names -> jit(init, out_shardings) ->
train_step(state, batch) with the state donated.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from moe import sharding
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
  graphdef: nnx.GraphDef
  state_shardings: TrainState
  batch_sharding: NamedSharding
  init: Callable[[jax.Array], TrainState]         # key -> sharded TrainState
  train_step: Callable                            # (state, tokens) -> (state, metrics)
  eval_step: Callable                             # (state, tokens) -> metrics
  loss_and_grads: Callable                        # (state, tokens) -> (loss, metrics, grads)


def _new_state(cfg: ModelConfig, tx, key):
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
  # Abstract init: shapes and logical names, no memory.
  graphdef = None

  def new(key):
    nonlocal graphdef
    graphdef, state = _new_state(cfg, tx, key)
    return state

  abstract = jax.eval_shape(new, jax.random.key(0))
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
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    model = nnx.merge(graphdef, params, state.extra)
    if 'router' in metrics:
      model.update_balance_bias(metrics['router'])
    _, params, extra = nnx.split(model, nnx.Param, ...)
    metrics = dict(metrics, total_loss=loss, grad_norm=optax.tree.norm(grads))
    return TrainState(state.step + 1, params, extra, opt_state), metrics

  def eval_step(state: TrainState, tokens):
    _, metrics = lm_loss(_merge(graphdef, state), tokens, train=False)
    return metrics

  with jax.set_mesh(mesh):
    init = jax.jit(new, out_shardings=state_shardings)
    jit_train = jax.jit(train_step, in_shardings=(state_shardings, batch_sharding),
                        out_shardings=(state_shardings, replicated), donate_argnums=0)
    jit_eval = jax.jit(eval_step, in_shardings=(state_shardings, batch_sharding),
                       out_shardings=replicated)
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

  return Setup(mesh, graphdef, state_shardings, batch_sharding,
               under_mesh(init), under_mesh(jit_train), under_mesh(jit_eval),
               under_mesh(jit_grads))
