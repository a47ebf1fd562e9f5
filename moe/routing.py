"""Routers: router logits (with training noise) -> a `Routing` assignment.

Every router produces the same token-major `Routing` so every dispatch path
takes one interface: for each token s of group g and each of its K choices,
the expert, the buffer slot in that expert, whether it was kept, and its gate.

Tokens-choose top-k (Switch k=1, GShard k=2, any k <= E):
  1. probs = softmax(logits) in float32                          # [G, S, E]
  2. choose the top-k of probs (+ the balance bias, for selection only)
  3. gates = probs of the chosen experts (optionally renormalized over k)
  4. slots: a choice's slot is its rank among its expert's choices, ranked
     (priority='choice', GShard) every first choice before any second choice,
     then by token position; or (priority='position') by position, then
     choice. The group is laid out time-major, so top-1 routing is causal
     with either; for k > 1 only 'position' is: under 'choice' a later
     token's first choice can take an earlier token's second-choice slot
  5. kept = slot < C; dropped choices get gate 0 (the residual carries them)

Experts-choose (Zhou et al. 2022): each expert takes its top-C tokens by
probability. K = E in the Routing (choice e is expert e). Not causal: a
token's routing depends on later tokens.

Losses (DESIGN.md section 4):
  aux = (E / k) * sum_e f_e * P_e, f_e = fraction of tokens whose top-k
        includes e (before capacity drops), P_e = mean router prob of e.
        moe.balance_scope='group': f_e, P_e per routing group, then the mean
        over groups; 'batch': f_e, P_e over every token of the (global) batch
        (Qiu et al. 2025, "Demons in the Detail"), so a group may lean on a
        few experts as long as the batch as a whole is balanced. With one
        group the two are equal. Exactly 1.0 at uniform routing for any k, E
        at collapse.
  z   = mean over tokens of logsumexp(logits)^2 (ST-MoE).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from moe.config import MoeConfig
from moe.layers import project


class Routing(NamedTuple):
  expert_index: jax.Array  # [G, S, K] int32
  slot: jax.Array          # [G, S, K] int32 position in the expert's buffer
  kept: jax.Array          # [G, S, K] bool, False where the expert was full
  gate: jax.Array          # [G, S, K] float32 combine weight, 0 where dropped
  capacity: int            # C, buffer slots per expert per group


class TokenRoutes(NamedTuple):
  """Each token's routing, token-major (the routes analysis, moe.routes).
  K choices per token; experts-choose: K = E, choice e is expert e."""
  expert_index: jax.Array  # [B, T, K] int32
  kept: jax.Array          # [B, T, K] bool
  gate: jax.Array          # [B, T, K] float32, 0 where dropped


class RouterStats(NamedTuple):
  """Per-layer router losses and metrics (scalars unless noted)."""
  aux_loss: jax.Array
  z_loss: jax.Array
  expert_load: jax.Array       # [E] fraction of routed choices per expert
  dropped_fraction: jax.Array  # fraction of routed choices that were dropped
  router_entropy: jax.Array    # mean over tokens of -sum_e p log p
  routes: TokenRoutes | None = None  # only when the caller asks (routes=True)


def router_logits(x, w_router, *, cfg: MoeConfig, train: bool,
                  rng: jax.Array | None):
  """float32 logits [G, S, E] from tokens x [G, S, D]; noise only in training.

  Jitter multiplies the inputs by U(1-eps, 1+eps) (Switch); Gaussian noise is
  added to the logits. Each draws from its own stream folded from `rng`.
  """
  x = x.astype(jnp.float32)
  noisy = train and (cfg.jitter_eps > 0 or cfg.logit_noise_std > 0)
  if noisy and rng is None:
    raise ValueError('router noise is on (moe.jitter_eps or '
                     'moe.logit_noise_std > 0): training needs an rng key.')
  if train and cfg.jitter_eps > 0:
    x = x * jax.random.uniform(jax.random.fold_in(rng, 0), x.shape, jnp.float32,
                               1.0 - cfg.jitter_eps, 1.0 + cfg.jitter_eps)
  logits = project(x, w_router.astype(jnp.float32))              # [G, S, E]
  if train and cfg.logit_noise_std > 0:
    logits = logits + cfg.logit_noise_std * jax.random.normal(
        jax.random.fold_in(rng, 1), logits.shape, jnp.float32)
  return logits


def rank_within(keys, num_keys: int):
  """Stable rank of each entry among the entries with the same key, and the
  count of each key. keys: [N] ints in [0, num_keys) -> rank [N], counts [K].
  Sort-based (O(N log N)), so the cost does not grow with num_keys."""
  order = jnp.argsort(keys, stable=True)                          # grouped by key
  counts = jnp.bincount(keys, length=num_keys)
  rank_sorted = jnp.arange(keys.shape[0]) - (jnp.cumsum(counts) - counts)[keys[order]]
  rank = jnp.zeros(keys.shape, jnp.int32).at[order].set(rank_sorted.astype(jnp.int32))
  return rank, counts


def _slots_by_priority(expert_index, num_experts, priority: str):
  """Rank of each choice among its expert's choices.

  priority 'choice': every first choice before any second choice, then by
  position (GShard); 'position': by position, then choice (causal for any k).
  expert_index: [S, K] -> slots [S, K] and per-expert counts [E].
  """
  s, k = expert_index.shape
  if priority == 'choice':
    flat = expert_index.T.reshape(k * s)            # k-major, then s
  else:
    flat = expert_index.reshape(s * k)              # s-major, then k
  rank, counts = rank_within(flat, num_experts)     # [KS], [E]
  rank = rank.reshape(k, s).T if priority == 'choice' else rank.reshape(s, k)
  return rank, counts


def _entropy(probs):
  return jnp.mean(-jnp.sum(probs * jnp.log(probs + 1e-9), axis=-1))


def _z_loss(logits):
  return jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2)


def aux_loss(probs, expert_index, num_experts, scope: str = 'group'):
  """Unit-normalized load-balancing loss; probs [G,S,E], expert_index [G,S,K].

  scope 'group': f and P per group, mean over groups; 'batch': f and P over
  all G*S tokens (under a mesh the means reduce across the data and expert
  shards before the product)."""
  k = expert_index.shape[-1]
  chosen = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.float32).sum(2)  # [G,S,E]
  axes = (1,) if scope == 'group' else (0, 1)
  f = chosen.mean(axis=axes)               # [G, E] or [E]: fraction choosing e
  p = probs.mean(axis=axes)                # [G, E] or [E]
  return jnp.mean((num_experts / k) * jnp.sum(f * p, axis=-1))


def tokens_choose(logits, cfg: MoeConfig, capacity: int,
                  balance_bias: jax.Array | None = None):
  """Top-k tokens-choose routing with capacity. logits: [G, S, E] float32."""
  e, k = cfg.num_experts, cfg.top_k
  probs = jax.nn.softmax(logits, axis=-1)                        # [G, S, E]
  scores = probs if balance_bias is None else probs + balance_bias
  _, expert_index = jax.lax.top_k(scores, k)                     # [G, S, K]
  gate = jnp.take_along_axis(probs, expert_index, axis=-1)       # [G, S, K]
  if cfg.renormalize_gates:
    gate = gate / jnp.sum(gate, axis=-1, keepdims=True)
  slot, counts = jax.vmap(
      lambda i: _slots_by_priority(i, e, cfg.priority))(expert_index)
  kept = slot < capacity
  routing = Routing(expert_index.astype(jnp.int32), slot, kept,
                    jnp.where(kept, gate, 0.0), capacity)
  stats = RouterStats(
      aux_loss=aux_loss(probs, expert_index, e, cfg.balance_scope),
      z_loss=_z_loss(logits),
      expert_load=counts.sum(0) / counts.sum(),
      dropped_fraction=jnp.mean(~kept, dtype=jnp.float32),  # exactly 0 without drops
      router_entropy=_entropy(probs))
  return routing, stats


def experts_choose(logits, cfg: MoeConfig, capacity: int):
  """Each expert takes its top-C tokens of the group. NOT causal."""
  g, s, e = logits.shape
  capacity = min(capacity, s)
  probs = jax.nn.softmax(logits, axis=-1)                        # [G, S, E]
  top_p, top_token = jax.lax.top_k(jnp.swapaxes(probs, 1, 2), capacity)  # [G, E, C]
  gi = jnp.arange(g)[:, None, None]
  ei = jnp.arange(e)[None, :, None]
  ci = jnp.broadcast_to(jnp.arange(capacity, dtype=jnp.int32), top_token.shape)
  kept = jnp.zeros((g, s, e), bool).at[gi, top_token, ei].set(True)
  slot = jnp.zeros((g, s, e), jnp.int32).at[gi, top_token, ei].set(ci)
  gate = jnp.zeros((g, s, e), jnp.float32).at[gi, top_token, ei].set(top_p)
  expert_index = jnp.broadcast_to(jnp.arange(e, dtype=jnp.int32), (g, s, e))
  routing = Routing(expert_index, slot, kept, gate, capacity)
  load = kept.astype(jnp.float32).sum((0, 1))
  stats = RouterStats(
      aux_loss=jnp.zeros((), jnp.float32),   # balanced by construction
      z_loss=_z_loss(logits),
      expert_load=load / load.sum(),
      dropped_fraction=jnp.mean(~jnp.any(kept, axis=-1), dtype=jnp.float32),
      router_entropy=_entropy(probs))
  return routing, stats


def route(logits, cfg: MoeConfig, capacity: int, balance_bias=None):
  """Dispatches to the configured router."""
  if cfg.router == 'tokens_choose':
    return tokens_choose(logits, cfg, capacity, balance_bias)
  return experts_choose(logits, cfg, capacity)


def balance_bias_update(bias, expert_load, rate: float):
  """DeepSeek-V3 aux-loss-free rule: raise under-loaded experts' bias, lower
  over-loaded ones', by `rate` each step; outside the optimizer."""
  return bias + rate * jnp.sign(jnp.mean(expert_load) - expert_load)
