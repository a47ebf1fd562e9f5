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

Adaptive compute (a token takes a varying number of FFN experts):
  * cheap experts: the router scores N = E + zero + copy + constant
    choices; a top-k choice of a cheap expert (index >= E) takes no buffer
    slot and no capacity and never reaches the dispatch (moe.moe_layer adds
    its output elementwise). Capacity is sized for the expected FFN choices
    per token (MoeConfig.ffn_choices), not for k.
  * threshold routing (moe.top_p = p > 0, Huang et al. 2024): of its top_k
    choices in order of probability, a token takes each while the
    probability of those before it is below p (the first always; p = 1
    takes all top_k: fixed top-k). An untaken choice is neither routed nor
    counted as dropped.
  * statistics: dropped_fraction is over the FFN choices made;
    ffn_per_token, ffn_count_share (tokens with 0..K FFN experts) and
    cheap_share say where the compute went.

Losses (DESIGN.md section 4):
  aux = (E / k) * sum_e f_e * P_e, f_e = fraction of tokens whose top-k
        includes e (before capacity drops), P_e = mean router prob of e.
        moe.balance_scope='group': f_e, P_e per routing group, then the mean
        over groups; 'batch': f_e, P_e over every token of the (global) batch
        (Qiu et al. 2025, "Demons in the Detail"), so a group may lean on a
        few experts as long as the batch as a whole is balanced. With one
        group the two are equal. Exactly 1.0 at uniform routing for any k, E
        at collapse.
        With adaptive compute the loss balances the FFN experts only: f_e is
        the share of the FFN choices made that went to e (times E: the mean
        number of FFN choices per token replaces k) and P_e the router
        probability renormalized over the FFN experts. Why: the cheap
        experts hold no buffer and no device, so spreading tokens evenly
        onto them balances nothing and would force (zero+copy+const)/N of
        all choices to be cheap whatever the token; with the cheap experts
        in f and P the loss would also push tokens off a cheap expert that
        is chosen often, i.e. towards more compute. How much goes to the
        cheap experts is left to the LM loss and the compute regularizer.
        (MoE++ weighs its zero-computation experts by a factor tau in the
        balance loss instead; tau = 0 is this rule.)
  compute = (n - target)^2, n the mean FFN experts per token, with a
        straight-through gradient (`compute_loss`); weighted by
        moe.compute_loss_coef.
  z   = mean over tokens of logsumexp(logits)^2 (ST-MoE).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from moe.config import ConfigError, MoeConfig
from moe.layers import project


class Routing(NamedTuple):
  expert_index: jax.Array  # [G, S, K] int32; -1: a choice threshold routing did not take
  slot: jax.Array          # [G, S, K] int32 position in the expert's buffer
  kept: jax.Array          # [G, S, K] bool, False where the expert was full
  gate: jax.Array          # [G, S, K] float32 combine weight, 0 where dropped
  capacity: int            # C, buffer slots per expert per group


class TokenRoutes(NamedTuple):
  """Each token's routing, token-major (the routes analysis, moe.routes).
  K choices per token; experts-choose: K = E, choice e is expert e.
  With cheap experts, indices >= E are cheap ones (never kept: they take no
  slot); -1 marks a choice threshold routing did not take."""
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
  ffn_per_token: jax.Array     # mean FFN experts a token took (routed, before drops)
  ffn_count_share: jax.Array   # [K+1] share of tokens that took 0, 1, ..., K FFN experts
  cheap_share: jax.Array       # [zero + copy + const] share of taken choices per cheap expert
  compute_loss: jax.Array      # the compute regularizer (0 unless moe.compute_loss_coef)
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
  expert_index: [S, K], a value >= num_experts for a choice that takes no
  slot (a cheap expert, an untaken threshold choice) -> slots [S, K] and
  per-expert counts [E].
  """
  s, k = expert_index.shape
  key = jnp.minimum(expert_index, num_experts)      # num_experts: no slot
  if priority == 'choice':
    flat = key.T.reshape(k * s)                     # k-major, then s
  else:
    flat = key.reshape(s * k)                       # s-major, then k
  rank, counts = rank_within(flat, num_experts + 1)  # [KS], [E + 1]
  rank = rank.reshape(k, s).T if priority == 'choice' else rank.reshape(s, k)
  return rank, counts[:num_experts]


def _entropy(probs):
  return jnp.mean(-jnp.sum(probs * jnp.log(probs + 1e-9), axis=-1))


def _z_loss(logits):
  return jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2)


def aux_loss(probs, expert_index, num_experts, scope: str = 'group', ffn=None):
  """Unit-normalized load-balancing loss over the FFN experts.

  probs [G,S,N] (N >= E router choices), expert_index [G,S,K]; ffn [G,S,K]
  marks the choices that reached an FFN expert (None: all K, fixed top-k
  without cheap experts). scope 'group': f and P per group, mean over
  groups; 'batch': f and P over all G*S tokens (under a mesh the means
  reduce across the data and expert shards before the product)."""
  k = expert_index.shape[-1]
  chosen = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.float32)   # [G,S,K,E]
  if ffn is not None:
    chosen = chosen * ffn[..., None]
  chosen = chosen.sum(2)                                                 # [G,S,E]
  axes = (1,) if scope == 'group' else (0, 1)
  f = chosen.mean(axis=axes)               # [G, E] or [E]: fraction choosing e
  if ffn is None:
    p = probs.mean(axis=axes)              # [G, E] or [E]
    return jnp.mean((num_experts / k) * jnp.sum(f * p, axis=-1))
  # Adaptive compute: balance among the FFN experts only. f over the FFN
  # choices actually made (their mean number per token replaces k), P
  # renormalized over the FFN experts, so the loss neither pulls tokens
  # onto the cheap experts nor away from them.
  ffn_probs = probs[..., :num_experts]
  p = (ffn_probs / jnp.sum(ffn_probs, -1, keepdims=True)).mean(axis=axes)
  n = jnp.maximum(jnp.sum(f, axis=-1), 1e-9)                              # [G] or []
  return jnp.mean(num_experts / n * jnp.sum(f * p, axis=-1))


def compute_loss(probs, gate_sorted, ffn, cfg: MoeConfig):
  """The compute regularizer: (n - target)^2 in value, n the FFN experts per
  token (mean over tokens; discrete), with the gradient of a smooth stand-in
  (straight-through). The stand-in per token is k_soft * (router mass on FFN
  experts): k_soft = top_k for fixed top-k, and 1 + sum_{j<k} (1 - c_j) for
  threshold routing, c_j the cumulative probability of the j most likely
  choices (k_soft = 1 when one choice holds all the mass, top_k when none
  does). Too many FFN experts (n > target) sharpens the router and moves
  mass onto the cheap experts; too few does the opposite.

  probs [G,S,N], gate_sorted [G,S,K] (the top-K probabilities, descending),
  ffn [G,S,K] bool."""
  e, k = cfg.num_experts, cfg.top_k
  n = jnp.mean(jnp.sum(ffn, -1, dtype=jnp.float32))
  ffn_mass = jnp.sum(probs[..., :e], -1)                                  # [G,S]
  if cfg.top_p > 0:
    c = jnp.cumsum(gate_sorted, -1)[..., :k - 1]                          # [G,S,K-1]
    k_soft = 1.0 + jnp.sum(1.0 - c, -1)
  else:
    k_soft = float(k)
  soft = jnp.mean(k_soft * ffn_mass)
  gap = n - cfg.compute_target
  return gap ** 2 + 2.0 * jax.lax.stop_gradient(gap) * (soft - jax.lax.stop_gradient(soft))


def _count_share(count, k: int):
  """Share of tokens with 0..k FFN experts; count [G,S] ints -> [k+1]."""
  return jnp.mean(jax.nn.one_hot(count, k + 1, dtype=jnp.float32), axis=(0, 1))


def tokens_choose(logits, cfg: MoeConfig, capacity: int,
                  balance_bias: jax.Array | None = None):
  """Top-k tokens-choose routing with capacity. logits: [G, S, N] float32,
  N = cfg.num_choices (FFN experts, then cheap experts).

  With threshold routing (cfg.top_p > 0) a token takes its choices in order
  of probability while the probability of those before stays below p, at
  most top_k (p = 1 takes all top_k). Cheap choices (zero, copy, constant)
  and untaken ones take no capacity slot and enter no expert buffer; a
  cheap choice keeps its gate (the layer applies it: moe.moe_layer)."""
  e, k = cfg.num_experts, cfg.top_k
  probs = jax.nn.softmax(logits, axis=-1)                        # [G, S, N]
  if balance_bias is not None:   # FFN experts only; cheap ones are not balanced
    balance_bias = jnp.pad(balance_bias, (0, probs.shape[-1] - e))
  scores = probs if balance_bias is None else probs + balance_bias
  _, expert_index = jax.lax.top_k(scores, k)                     # [G, S, K]
  gate = jnp.take_along_axis(probs, expert_index, axis=-1)       # [G, S, K]
  taken = None
  if cfg.top_p > 0 and cfg.top_p < 1:
    before = jnp.cumsum(gate, -1) - gate                         # exclusive
    taken = before < cfg.top_p                                   # the first always
  ffn = None
  if cfg.adaptive:
    ffn = expert_index < e
    if taken is not None:
      ffn = ffn & taken
  gate_all = gate if taken is None else jnp.where(taken, gate, 0.0)
  if cfg.renormalize_gates:
    gate_all = gate_all / jnp.sum(gate_all, axis=-1, keepdims=True)
  slot_index = expert_index if ffn is None else jnp.where(ffn, expert_index, e)
  slot, counts = jax.vmap(
      lambda i: _slots_by_priority(i, e, cfg.priority))(slot_index)
  if ffn is None:
    kept = slot < capacity
    out_gate = jnp.where(kept, gate_all, 0.0)
    dropped = jnp.mean(~kept, dtype=jnp.float32)       # exactly 0 without drops
    count = jnp.full(kept.shape[:2], k, jnp.int32)
  else:
    kept = ffn & (slot < capacity)
    # A cheap choice is applied by the layer with its gate; a dropped FFN
    # choice (or an untaken one) weighs 0.
    out_gate = jnp.where(kept | (expert_index >= e), gate_all, 0.0)
    dropped = (jnp.sum(ffn & ~kept, dtype=jnp.float32)
               / jnp.maximum(jnp.sum(ffn, dtype=jnp.float32), 1.0))
    count = jnp.sum(ffn, -1, dtype=jnp.int32)                    # [G, S]
  if taken is not None:   # a choice the threshold did not take: no expert
    expert_index = jnp.where(taken, expert_index, -1)
  routing = Routing(expert_index.astype(jnp.int32), slot, kept, out_gate, capacity)
  cheap = jnp.zeros((cfg.num_cheap_experts,), jnp.float32)
  if cfg.num_cheap_experts:
    taken_all = jnp.ones_like(kept) if taken is None else taken
    chosen = jax.nn.one_hot(expert_index - e, cfg.num_cheap_experts,
                            dtype=jnp.float32) * taken_all[..., None]
    cheap = chosen.sum((0, 1, 2)) / jnp.sum(taken_all, dtype=jnp.float32)
  stats = RouterStats(
      aux_loss=aux_loss(probs, expert_index, e, cfg.balance_scope, ffn),
      z_loss=_z_loss(logits),
      expert_load=counts.sum(0) / jnp.maximum(counts.sum(), 1),
      dropped_fraction=dropped,
      router_entropy=_entropy(probs),
      ffn_per_token=jnp.mean(count, dtype=jnp.float32),
      ffn_count_share=_count_share(count, k),
      cheap_share=cheap,
      compute_loss=(compute_loss(probs, gate, ffn, cfg) if cfg.compute_loss_coef
                    else jnp.zeros((), jnp.float32)))
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
  count = jnp.sum(kept, -1, dtype=jnp.int32)                      # [G, S]
  stats = RouterStats(
      aux_loss=jnp.zeros((), jnp.float32),   # balanced by construction
      z_loss=_z_loss(logits),
      expert_load=load / load.sum(),
      dropped_fraction=jnp.mean(~jnp.any(kept, axis=-1), dtype=jnp.float32),
      router_entropy=_entropy(probs),
      ffn_per_token=jnp.mean(count, dtype=jnp.float32),
      ffn_count_share=_count_share(count, e),
      cheap_share=jnp.zeros((0,), jnp.float32),
      compute_loss=jnp.zeros((), jnp.float32))
  return routing, stats


class ComputeOverride(NamedTuple):
  """An evaluation-time change of a token's compute (eval.py's compute
  what-if): threshold routing at `top_p` (at most moe.top_k choices) instead
  of the configured routing, and/or the cheap experts switched off (their
  router outputs removed, so every choice is an FFN expert). Hashable: a
  static argument of the eval step."""
  top_p: float | None = None
  cheap_experts: bool = True

  def routing_config(self, cfg: MoeConfig) -> MoeConfig:
    """The MoeConfig the router runs with (ConfigError if it cannot)."""
    changes = {}
    if self.top_p is not None:
      changes['top_p'] = self.top_p
    if not self.cheap_experts:
      changes.update(num_zero_experts=0, num_copy_experts=0, num_const_experts=0)
    if changes:   # the regularizer's target belongs to training
      changes.update(compute_target=0.0, compute_loss_coef=0.0)
    return dataclasses.replace(cfg, **changes)


AUTO_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)


def compute_what_if(cfg: MoeConfig, spec) -> list[tuple[str, ComputeOverride | None]]:
  """The rows of eval.py's compute what-if: (label, override) per entry of
  `eval.compute_what_if`. Entries: 'as_trained' (no override), a threshold
  p in (0, 1] (threshold routing at p, at most moe.top_k choices) or
  'no_cheap' (cheap experts switched off). ('auto',): for a model with
  adaptive compute (cheap experts or threshold routing), as trained, then
  AUTO_THRESHOLDS, then 'no_cheap' where it has cheap experts; nothing for
  fixed top-k (each row is a pass over the eval set; ask for thresholds
  explicitly). Refuses (ConfigError) what cannot run."""
  if isinstance(spec, (str, int, float)):
    spec = (spec,)
  if tuple(spec) == ('auto',):
    if not cfg.adaptive:
      return []
    spec = ('as_trained', *AUTO_THRESHOLDS) + (('no_cheap',) if cfg.num_cheap_experts else ())
  rows = []
  for entry in spec:
    if entry == 'as_trained':
      rows.append(('as trained', None))
      continue
    if entry == 'no_cheap':
      override = ComputeOverride(cheap_experts=False)
      if not cfg.num_cheap_experts:
        raise ConfigError("eval.compute_what_if has 'no_cheap', but the model has "
                          'no cheap experts (moe.num_zero/copy/const_experts).')
    elif (isinstance(entry, (int, float)) and not isinstance(entry, bool)
          and 0 < entry <= 1):
      override = ComputeOverride(top_p=float(entry))
    else:
      raise ConfigError(f"eval.compute_what_if has {entry!r}; each entry must be "
                        "'as_trained', 'no_cheap' or a threshold in (0, 1]; or "
                        "the whole of it ('auto',).")
    if cfg.router != 'tokens_choose':
      raise ConfigError(f'eval.compute_what_if={tuple(spec)} needs '
                        "moe.router='tokens_choose'; use 'auto' or ().")
    override.routing_config(cfg)   # refuses what the router cannot run
    rows.append((f'top_p={entry}' if override.top_p else 'no cheap experts', override))
  return rows


def route(logits, cfg: MoeConfig, capacity: int, balance_bias=None):
  """Dispatches to the configured router."""
  if cfg.router == 'tokens_choose':
    return tokens_choose(logits, cfg, capacity, balance_bias)
  return experts_choose(logits, cfg, capacity)


def balance_bias_update(bias, expert_load, rate: float):
  """DeepSeek-V3 aux-loss-free rule: raise under-loaded experts' bias, lower
  over-loaded ones', by `rate` each step; outside the optimizer."""
  return bias + rate * jnp.sign(jnp.mean(expert_load) - expert_load)
