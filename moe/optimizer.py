"""The optimizer of a run (`RunConfig.optimizer`): AdamW or Adafactor with
linear warmup, cosine/linear/constant decay and global-norm clipping."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from moe.run_config import OptimizerConfig


def learning_rate_schedule(opt: OptimizerConfig, num_steps: int) -> optax.Schedule:
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
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


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


def make(opt: OptimizerConfig, num_steps: int) -> optax.GradientTransformation:
  """AdamW (default) or Adafactor, with global-norm clipping.

  Weight decay means the same for both: each step subtracts
  lr * weight_decay * p from the matrices (decoupled, as AdamW). optax's
  Adafactor adds its `weight_decay_rate * p` after the learning rate, so
  weight_decay=0.1 there would shrink every matrix by 10% a step; the decay
  is added here before the learning rate instead."""
  lr = learning_rate_schedule(opt, num_steps)
  if opt.name == 'adamw':
    core = optax.adamw(lr, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay, mask=decay_mask)
  else:
    core = optax.chain(
        optax.adafactor(learning_rate=None),   # the descent direction, -u
        optax.scale(-1.0),                     # u
        optax.add_decayed_weights(opt.weight_decay, decay_mask),
        optax.scale_by_learning_rate(lr))      # -lr * (u + wd * p)
  clip = [clip_by_global_norm(opt.grad_clip)] if opt.grad_clip else []
  return optax.chain(*clip, core)
