"""MoeFeedForward: router + dispatch + experts (+ shared experts).

Switch Transformer (Fedus et al. 2021, arXiv 2101.03961) and GShard
(Lepikhin et al. 2020): the layer replaces a dense SwiGLU; each token goes to
k of E experts within its routing group; a token whose expert is full is
dropped (its MoE output is zero and the residual carries it).

  1. group: [B, T, D] -> [G, S, D], S = group_size tokens = whole sequences,
     laid out time-major (position t of every sequence before t+1), so
     capacity priority by position keeps top-1 routing causal across the
     group (and top-k with moe.priority='position'; see moe.routing).
  2. route: float32 logits (+ noise in training) -> Routing, RouterStats.
  3. dispatch, run experts, combine (moe.dispatch).
  4. add the cheap experts' outputs (adaptive compute, below), ungroup, add
     the shared experts (always active).

Adaptive compute (MoE++, Jin et al. 2025; threshold routing, Huang et al.
2024): the router's choice set may hold cheap experts after the E FFN
experts: zero experts (output 0), copy experts (output the token's input)
and constant experts (output a learned vector). A cheap choice never enters
an expert buffer or the all-to-all and takes no capacity: its output, gate
times x or gate times the vector, is added here, elementwise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe import dispatch, routing, sharding
from moe.config import ModelConfig
from moe.layers import Mlp, fan_in_init, project


# Each expert is its own SwiGLU: fan-in is D (or F), not E * D; the expert
# axis is a batch axis. (Over (E, D) the experts started sqrt(E) too small.)
_expert_init = nnx.initializers.variance_scaling(
    1.0, 'fan_in', 'truncated_normal', in_axis=1, out_axis=2, batch_axis=(0,))


class BalanceBias(nnx.Variable):
  """Aux-loss-free balancing bias (DeepSeek-V3): state, not a parameter."""


def to_groups(x, seqs_per_group: int):
  """[B, T, D] -> [G, S, D] with S = seqs_per_group * T, time-major."""
  b, t, d = x.shape
  x = x.reshape(b // seqs_per_group, seqs_per_group, t, d)
  return x.transpose(0, 2, 1, 3).reshape(b // seqs_per_group, t * seqs_per_group, d)


def from_groups(x, seqs_per_group: int, t: int):
  """Inverse of `to_groups` (any trailing width: D, or K choices)."""
  g, s, d = x.shape
  x = x.reshape(g, t, seqs_per_group, d).transpose(0, 2, 1, 3)
  return x.reshape(g * seqs_per_group, t, d)


class MoeFeedForward(nnx.Module):

  def __init__(self, cfg: ModelConfig, key: jax.Array):
    m = cfg.moe
    d, e, f = cfg.d_model, m.num_experts, m.expert_dim
    kr, kg, ku, kd, ks = jax.random.split(key, 5)
    self.moe_cfg = m   # (a Transformer's .cfg is its ModelConfig)
    self.dtype = jnp.dtype(cfg.dtype)
    self.w_router = sharding.param(fan_in_init(1), kr, (d, m.num_choices),
                                   ('embed', 'router'))
    self.w_gate = sharding.param(_expert_init, kg, (e, d, f), ('expert', 'embed', 'expert_mlp'))
    self.w_up = sharding.param(_expert_init, ku, (e, d, f), ('expert', 'embed', 'expert_mlp'))
    self.w_down = sharding.param(_expert_init, kd, (e, f, d), ('expert', 'expert_mlp', 'embed'))
    self.balance_bias = BalanceBias(jnp.zeros((e,), jnp.float32), logical_axes=('router',))
    # Constant experts' vectors [N_const, D] (MoE++ initializes them at zero too).
    self.const_vectors = (sharding.param(nnx.initializers.zeros, kr,
                                         (m.num_const_experts, d), (None, 'embed'))
                          if m.num_const_experts else None)
    # k shared experts of width F == one SwiGLU of width k*F.
    self.shared = (Mlp(d, m.num_shared_experts * f, cfg.dtype, ks)
                   if m.num_shared_experts else None)

  def expert_weights(self) -> dispatch.ExpertWeights:
    return dispatch.ExpertWeights(self.w_gate[...], self.w_up[...], self.w_down[...])

  def __call__(self, x, *, train: bool, rng: jax.Array | None = None,
               capacity_factor: float | str | None = None, routes: bool = False,
               compute: routing.ComputeOverride | None = None):
    """x: [B, T, D] -> ([B, T, D], RouterStats). `capacity_factor` overrides
    the configured train/eval factor ('dropless': no token is dropped);
    `routes` adds each token's routing to the stats (TokenRoutes);
    `compute` changes the routing's compute in evaluation (eval.py)."""
    b, t, _ = x.shape
    cfg = self.moe_cfg if compute is None else compute.routing_config(self.moe_cfg)
    spg = cfg.seqs_per_group(b, t)
    xg = sharding.constrain(to_groups(x, spg), ('group', 'length', 'act_embed'))
    logits = routing.router_logits(xg, self.w_router[...], cfg=cfg,
                                   train=train, rng=rng)          # [G, S, N] f32
    logits = logits[..., :cfg.num_choices]   # cheap experts switched off: gone
    bias = self.balance_bias[...] if cfg.balance_bias_rate > 0 else None
    r, stats = routing.route(logits, cfg, cfg.capacity(xg.shape[1], train, capacity_factor),
                             bias)
    if routes:
      stats = stats._replace(routes=routing.TokenRoutes(
          *(from_groups(a, spg, t) for a in (r.expert_index, r.kept, r.gate))))
    yg = dispatch.DISPATCHES[cfg.dispatch](xg, r, self.expert_weights(), self.dtype)
    if cfg.num_cheap_experts:
      yg = yg + self._cheap_outputs(xg, r, cfg)
    y = from_groups(sharding.constrain(yg, ('group', 'length', 'act_embed')), spg, t)
    if self.shared is not None:
      y = y + self.shared(x)
    return y, stats

  def _cheap_outputs(self, xg, r: routing.Routing, cfg):
    """The cheap experts' share of the output [G, S, D]: each copy choice
    adds gate * x, each constant choice gate * its vector, a zero choice
    nothing. Elementwise: no buffer, no all-to-all."""
    e, z, c = cfg.num_experts, cfg.num_zero_experts, cfg.num_copy_experts
    copy_start, const_start = e + z, e + z + c
    is_copy = (r.expert_index >= copy_start) & (r.expert_index < const_start)
    copy_gate = jnp.sum(jnp.where(is_copy, r.gate, 0.0), axis=-1)            # [G, S]
    y = xg * copy_gate[..., None].astype(xg.dtype)
    if cfg.num_const_experts:
      const_gate = jnp.einsum('GSKN,GSK->GSN', jax.nn.one_hot(      # [G, S, N_const]
          r.expert_index - const_start, cfg.num_const_experts, dtype=jnp.float32), r.gate)
      y = y + project(const_gate.astype(self.dtype), self.const_vectors[...].astype(self.dtype))
    return y

  def update_balance_bias(self, expert_load):
    """Applies the aux-loss-free bias rule for this step's load [E]."""
    if self.moe_cfg.balance_bias_rate > 0:
      self.balance_bias[...] = routing.balance_bias_update(
          self.balance_bias[...], expert_load, self.moe_cfg.balance_bias_rate)
