"""Naive per-expert loop oracle for MoE routing + dispatch (tests only).

Written from DESIGN.md section 4 without reusing library code:
  * tokens-choose: each token's top-k experts by router probability (ties to
    the lower expert index); buffers filled in priority order: all first
    choices (by token position), then all second choices, ...; a choice is
    dropped only when its expert already holds C tokens;
  * experts-choose: each expert takes its top-C tokens by probability;
  * output: for each expert, the tokens in its buffer, each through that
    expert's SwiGLU, times the gate (the router probability of that expert,
    optionally renormalized over the token's k choices).

The assignment is computed in numpy from concrete values (it is piecewise
constant); the forward pass given an assignment is plain jax, so jax.grad of
`oracle_moe` gives the reference gradients.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass
class Assignment:
  choices: np.ndarray        # [G, S, K] expert of each choice
  kept: np.ndarray           # [G, S, K] bool
  slot: np.ndarray           # [G, S, K] position in the expert's buffer (-1 dropped)
  buffers: list              # buffers[g][e] = [(s, kk), ...] in slot order
  capacity: int

  @property
  def num_dropped(self) -> int:
    return int((~self.kept).sum())


def probs_of(x, w_router):
  """Router probabilities [G, S, E] in float32, written out by hand."""
  logits = jnp.matmul(x.astype(jnp.float32), w_router.astype(jnp.float32))
  z = logits - logits.max(-1, keepdims=True)
  ez = jnp.exp(z)
  return ez / ez.sum(-1, keepdims=True)


def assign_tokens_choose(probs, k: int, capacity: int, bias=None,
                         priority: str = 'choice') -> Assignment:
  probs = np.asarray(probs, np.float64)
  g_, s_, e_ = probs.shape
  scores = probs if bias is None else probs + np.asarray(bias)[None, None, :]
  choices = np.zeros((g_, s_, k), np.int64)
  for g in range(g_):
    for s in range(s_):
      order = sorted(range(e_), key=lambda e: -scores[g, s, e])  # stable: ties -> low e
      choices[g, s] = order[:k]
  kept = np.zeros((g_, s_, k), bool)
  slot = -np.ones((g_, s_, k), np.int64)
  buffers = [[[] for _ in range(e_)] for _ in range(g_)]
  if priority == 'choice':       # all first choices before any second choice,
    visit = [(s, kk) for kk in range(k) for s in range(s_)]   # then position
  else:                          # by position, then choice
    visit = [(s, kk) for s in range(s_) for kk in range(k)]
  for g in range(g_):
    for s, kk in visit:
        e = choices[g, s, kk]
        if len(buffers[g][e]) < capacity:
          slot[g, s, kk] = len(buffers[g][e])
          buffers[g][e].append((s, kk))
          kept[g, s, kk] = True
  return Assignment(choices, kept, slot, buffers, capacity)


def assign_experts_choose(probs, capacity: int) -> Assignment:
  probs = np.asarray(probs, np.float64)
  g_, s_, e_ = probs.shape
  c = min(capacity, s_)
  choices = np.broadcast_to(np.arange(e_), (g_, s_, e_)).copy()
  kept = np.zeros((g_, s_, e_), bool)
  slot = -np.ones((g_, s_, e_), np.int64)
  buffers = [[[] for _ in range(e_)] for _ in range(g_)]
  for g in range(g_):
    for e in range(e_):
      top = sorted(range(s_), key=lambda s: -probs[g, s, e])[:c]
      for j, s in enumerate(top):
        buffers[g][e].append((s, e))
        kept[g, s, e] = True
        slot[g, s, e] = j
  return Assignment(choices, kept, slot, buffers, c)


def swiglu_ref(x, wg, wu, wd):
  """(silu(x Wg) * x Wu) Wd with silu(a) = a * sigmoid(a)."""
  a = x @ wg
  return ((a * (1.0 / (1.0 + jnp.exp(-a)))) * (x @ wu)) @ wd


def oracle_moe(x, w_router, wg, wu, wd, asg: Assignment, renormalize=False):
  """y [G, S, D]: per group, per expert, its buffered tokens through its SwiGLU x gate.

  Each expert's SwiGLU runs on the whole group and a 0/1 membership vector
  (from `asg.buffers`) selects its tokens: fixed shapes keep eager jax fast.
  """
  probs = probs_of(x, w_router)                                   # [G, S, E]
  if renormalize:   # divide by the sum of the probs of the token's k choices
    chosen = jnp.asarray(np.eye(wg.shape[0], dtype=np.float32)[asg.choices].sum(2))
    probs = probs / jnp.sum(probs * chosen, -1, keepdims=True)
  g_, s_, d = x.shape
  member = np.zeros((g_, s_, wg.shape[0]), np.float32)
  for g in range(g_):
    for e in range(wg.shape[0]):
      for s, _ in asg.buffers[g][e]:
        member[g, s, e] = 1.0
  y = jnp.zeros((g_, s_, d), jnp.float32)
  for g in range(g_):
    for e in range(wg.shape[0]):
      if not asg.buffers[g][e]:
        continue
      h = swiglu_ref(x[g], wg[e], wu[e], wd[e])                   # [S, D]
      y = y.at[g].add(h * (probs[g, :, e] * member[g, :, e])[:, None])
  return y


def random_problem(seed, g, s, d, e, f, router_scale=1.0):
  """x [G,S,D], router [D,E], expert weights [E,D,F],[E,D,F],[E,F,D] (numpy
  RNG: no jax.random compilations)."""
  rs = np.random.RandomState(seed)
  n = lambda *shape: jnp.asarray(rs.standard_normal(shape), jnp.float32)
  return (n(g, s, d), router_scale * n(d, e) / np.sqrt(d), n(e, d, f) / np.sqrt(d),
          n(e, d, f) / np.sqrt(d), n(e, f, d) / np.sqrt(f))


# --- Adaptive compute: cheap experts and threshold routing -------------------------

@dataclasses.dataclass
class AdaptiveAssignment:
  choices: np.ndarray        # [G, S, K] index into the choice set (FFN experts first)
  taken: np.ndarray          # [G, S, K] bool: the threshold kept this choice
  kept: np.ndarray           # [G, S, K] bool: an FFN choice that got a buffer slot
  buffers: list              # buffers[g][e] = [(s, kk), ...], FFN experts only
  capacity: int


def assign_adaptive(probs, num_experts: int, k: int, capacity: int,
                    top_p: float = 0.0) -> AdaptiveAssignment:
  """Tokens-choose over the whole choice set [G, S, N]: each token's k most
  likely choices; with top_p, a choice is taken only while the probabilities
  of the choices before it sum to less than p (the first always). Only taken
  choices of FFN experts (< num_experts) fill buffers, all first choices
  before any second choice."""
  probs = np.asarray(probs, np.float64)
  g_, s_, n_ = probs.shape
  choices = np.zeros((g_, s_, k), np.int64)
  taken = np.ones((g_, s_, k), bool)
  for g in range(g_):
    for s in range(s_):
      order = sorted(range(n_), key=lambda e: -probs[g, s, e])[:k]
      choices[g, s] = order
      if 0 < top_p < 1:
        before = 0.0
        for kk, e in enumerate(order):
          taken[g, s, kk] = before < top_p
          before += probs[g, s, e]
  kept = np.zeros((g_, s_, k), bool)
  buffers = [[[] for _ in range(num_experts)] for _ in range(g_)]
  for g in range(g_):
    for kk in range(k):
      for s in range(s_):
        e = choices[g, s, kk]
        if taken[g, s, kk] and e < num_experts and len(buffers[g][e]) < capacity:
          buffers[g][e].append((s, kk))
          kept[g, s, kk] = True
  return AdaptiveAssignment(choices, taken, kept, buffers, capacity)


def oracle_adaptive(x, w_router, wg, wu, wd, const, asg: AdaptiveAssignment,
                    num_zero: int, num_copy: int):
  """y [G, S, D]: FFN experts as in `oracle_moe` (gates = router probs), plus
  for every taken cheap choice: nothing (zero), prob * x (copy) or
  prob * vector (constant)."""
  probs = probs_of(x, w_router)                                   # [G, S, N]
  e_ = wg.shape[0]
  y = jnp.zeros(x.shape, jnp.float32)
  for g in range(x.shape[0]):
    for e in range(e_):
      member = np.zeros((x.shape[1],), np.float32)
      for s, _ in asg.buffers[g][e]:
        member[s] = 1.0
      if member.any():
        h = swiglu_ref(x[g], wg[e], wu[e], wd[e])
        y = y.at[g].add(h * (probs[g, :, e] * member)[:, None])
    for s in range(x.shape[1]):
      for kk in range(asg.choices.shape[-1]):
        c = int(asg.choices[g, s, kk]) - e_
        if c < 0 or not asg.taken[g, s, kk] or c < num_zero:
          continue
        if c < num_zero + num_copy:
          y = y.at[g, s].add(probs[g, s, e_ + c] * x[g, s])
        else:
          y = y.at[g, s].add(probs[g, s, e_ + c] * const[c - num_zero - num_copy])
  return y
