"""The optimizer: learning-rate schedules at their corners, weight decay on
matrices only and scaled by the learning rate, for AdamW and Adafactor, and
an Adafactor step. (Mutations run once, each failing a test here: warmup
ending a step late; decay applied to every parameter; Adafactor's decay
added after the learning rate, as optax.adafactor's weight_decay_rate
does, which made weight_decay=0.1 shrink every matrix 10% a step.)"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from moe import optimizer
from moe.config import ModelConfig
from moe.model import Transformer
from moe.run_config import OptimizerConfig


def _opt(**kw):
  return OptimizerConfig(**{**dict(learning_rate=1.0, warmup_steps=10, min_lr_ratio=0.1), **kw})


@pytest.mark.parametrize('decay', ['cosine', 'linear', 'constant'])
def test_schedule_at_start_end_of_warmup_middle_and_last_step(decay):
  lr = optimizer.learning_rate_schedule(_opt(decay=decay), num_steps=110)
  assert float(lr(0)) == 0.0
  assert float(lr(5)) == pytest.approx(0.5)            # linear warmup
  assert float(lr(10)) == pytest.approx(1.0)           # the peak, at warmup's end
  want = {                     # t steps into the 100 decay steps, from 1 to 0.1
      'cosine': lambda t: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t / 100)),
      'linear': lambda t: 1.0 - 0.9 * t / 100,
      'constant': lambda t: 1.0}[decay]
  for step in (11, 60, 109, 110):
    assert float(lr(step)) == pytest.approx(want(step - 10), rel=1e-5), step


def _params():
  cfg = ModelConfig(vocab_size=16, d_model=8, num_layers=1, num_heads=2,
                    head_dim=4, mlp_dim=8, max_seq_len=4)
  _, params, _ = nnx.split(Transformer(cfg, jax.random.key(0)), nnx.Param, ...)
  return params


@pytest.mark.parametrize('name', ['adamw', 'adafactor'])
def test_weight_decay_on_matrices_not_norm_scales(name):
  # Zero gradients: the only change is weight decay, lr * wd * p after warmup.
  opt = _opt(name=name, weight_decay=0.5, warmup_steps=0, decay='constant',
             learning_rate=0.1)
  tx = optimizer.make(opt, num_steps=10)
  params = _params()
  grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(grads, tx.init(params), params, grad_norm=jnp.zeros(()))
  flat = dict(nnx.to_flat_state(updates))
  values = dict(nnx.to_flat_state(params))
  scales = [k for k in flat if k[-1] == 'scale']
  assert len(scales) == 3                              # two block norms, the final norm
  for key, u in flat.items():
    u, p = np.asarray(u[...]), np.asarray(values[key][...])
    if p.ndim >= 2:
      np.testing.assert_allclose(u, -0.1 * 0.5 * p, rtol=1e-5, atol=1e-8, err_msg=str(key))
    else:
      assert not u.any(), key                          # norm scales: no decay


def test_adafactor_step_without_decay_is_optax_adafactor():
  opt = _opt(name='adafactor', weight_decay=0.0, warmup_steps=0, decay='constant',
             learning_rate=0.01, grad_clip=0.0)
  tx = optimizer.make(opt, num_steps=10)
  params = _params()
  grads = jax.tree.map(lambda p: jnp.cos(3 * p) + 0.1, params)
  got, _ = tx.update(grads, tx.init(params), params, grad_norm=jnp.ones(()))
  ref = optax.adafactor(0.01)
  want, _ = ref.update(grads, ref.init(params), params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9),
               got, want)
  assert any(np.abs(np.asarray(u)).max() > 0 for u in jax.tree.leaves(got))
