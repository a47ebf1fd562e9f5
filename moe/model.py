"""Decoder-only Transformer LM with dense or MoE feed-forward layers.

Pre-norm blocks: x + Attn(RMSNorm(x)), then x + FFN(RMSNorm(x)), where FFN is
an MoE layer on every `moe_every`-th layer (Switch/GShard: every other layer)
and a dense SwiGLU elsewhere. Untied input embedding and output projection.

`lm_loss` is next-token cross-entropy plus the MoE losses:
  total = ce + aux_loss_coef * aux + z_loss_coef * z
          (+ compute_loss_coef * compute, with adaptive compute),
aux, z and compute averaged over MoE layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe import sharding
from moe.config import ModelConfig
from moe.layers import Attention, Mlp, RMSNorm, fan_in_init, project
from moe.moe_layer import MoeFeedForward
from moe.routing import ComputeOverride, RouterStats


class Block(nnx.Module):

  def __init__(self, cfg: ModelConfig, index: int, key: jax.Array):
    ka, kf = jax.random.split(key)
    self.attn_norm = RMSNorm(cfg.d_model)
    self.attn = Attention(cfg, ka)
    self.ffn_norm = RMSNorm(cfg.d_model)
    self.ffn = (MoeFeedForward(cfg, kf) if cfg.is_moe_layer(index)
                else Mlp(cfg.d_model, cfg.mlp_dim, cfg.dtype, kf))

  def __call__(self, x, *, train: bool, rng, capacity_factor=None, routes=False,
               compute=None):
    x = x + self.attn(self.attn_norm(x))
    h = self.ffn_norm(x)
    if isinstance(self.ffn, MoeFeedForward):
      y, stats = self.ffn(h, train=train, rng=rng, capacity_factor=capacity_factor,
                          routes=routes, compute=compute)
    else:
      y, stats = self.ffn(h), None
    return sharding.constrain(x + y, ('batch', 'length', 'act_embed')), stats


class Transformer(nnx.Module):

  def __init__(self, cfg: ModelConfig, key: jax.Array):
    ke, ku, *kb = jax.random.split(key, cfg.num_layers + 2)
    self.cfg = cfg
    self.embed = sharding.param(nnx.initializers.normal(1.0), ke,
                                (cfg.vocab_size, cfg.d_model), ('vocab', 'embed'))
    self.blocks = nnx.List([Block(cfg, i, kb[i]) for i in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.d_model)
    self.unembed = sharding.param(fan_in_init(1), ku, (cfg.d_model, cfg.vocab_size),
                                  ('embed', 'vocab'))

  def __call__(self, tokens, *, train: bool = False, rng: jax.Array | None = None,
               capacity_factor: float | str | None = None, routes: bool = False,
               compute: ComputeOverride | None = None):
    """tokens: [B, T] int -> (logits [B, T, V] float32, RouterStats stacked
    over MoE layers, or None for a dense model). `capacity_factor` overrides
    the configured one ('dropless': no drops); `routes` adds every token's
    routing (RouterStats.routes, [L, B, T, K]); `compute` changes the
    routing's compute (evaluation's what-if)."""
    dt = jnp.dtype(self.cfg.dtype)
    x = jnp.take(self.embed[...], tokens, axis=0).astype(dt)        # [B, T, D]
    x = sharding.constrain(x, ('batch', 'length', 'act_embed'))
    stats = []
    def run_block(block, x, rng):
      kw = dict(train=train, capacity_factor=capacity_factor, routes=routes,
                compute=compute)
      if not self.cfg.remat:
        return block(x, rng=rng, **kw)
      graphdef, state = nnx.split(block)

      @jax.checkpoint  # keep only the block's inputs for the backward pass
      def pure(state, x, rng):
        return nnx.merge(graphdef, state)(x, rng=rng, **kw)
      return pure(state, x, rng)
    for i, block in enumerate(self.blocks):
      layer_rng = None if rng is None else jax.random.fold_in(rng, i)
      x, s = run_block(block, x, layer_rng)
      if s is not None:
        stats.append(s)
    x = self.final_norm(x)
    logits = project(x, self.unembed[...].astype(dt))             # [B, T, V]
    logits = sharding.constrain(logits.astype(jnp.float32), ('batch', 'length', 'vocab'))
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *stats) if stats else None
    return logits, stacked

  def moe_layers(self) -> list[MoeFeedForward]:
    return [b.ffn for b in self.blocks if isinstance(b.ffn, MoeFeedForward)]

  def update_balance_bias(self, stats: RouterStats):
    """Aux-loss-free bias step for every MoE layer from this step's loads."""
    for layer, load in zip(self.moe_layers(), stats.expert_load):
      layer.update_balance_bias(load)


def lm_loss(model: Transformer, tokens, *, train: bool,
            rng: jax.Array | None = None, capacity_factor=None, routes=False,
            compute=None):
  """Next-token loss. tokens: [B, T+1] -> (total loss, metrics dict).

  metrics: `loss` (cross-entropy), `aux_loss`, `z_loss` (means over MoE
  layers), and `router` (RouterStats stacked over MoE layers, with every
  token's routing if `routes`) for MoE models; in evaluation (train=False)
  also `token_loss`, each target's cross-entropy [B, T], for losses over a
  padded set or per document.
  """
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  logits, stats = model(inputs, train=train, rng=rng,
                        capacity_factor=capacity_factor, routes=routes, compute=compute)
  logp = jax.nn.log_softmax(logits, axis=-1)
  token_ce = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # [B, T]
  ce = jnp.mean(token_ce)
  metrics = {'loss': ce} if train else {'loss': ce, 'token_loss': token_ce}
  total = ce
  if stats is not None:
    m = model.cfg.moe
    aux, z = jnp.mean(stats.aux_loss), jnp.mean(stats.z_loss)
    total = ce + m.aux_loss_coef * aux + m.z_loss_coef * z
    metrics.update(aux_loss=aux, z_loss=z, router=stats)
    if m.compute_loss_coef:
      compute_loss = jnp.mean(stats.compute_loss)
      total = total + m.compute_loss_coef * compute_loss
      metrics.update(compute_loss=compute_loss)
  return total, metrics
