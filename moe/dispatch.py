"""Dispatch tokens to expert buffers, run the experts, combine the results.

Three paths behind one interface, `DISPATCHES[name](x, routing, weights, dtype)`:

* `einsum`: one-hot dispatch and combine tensors [G, S, E, C]; with experts
  sharded, the sharding constraints on the expert buffers make the compiler
  insert the all-to-all. Simple, the reference; costs ~4*C*E*d = 4*cf*k*S*d
  extra FLOPs per token.
* `gather`: index-based. The inverse map slot -> choice is built by an
  integer scatter (moe.row_gather.inverse_index), tokens are gathered into [G, E, C, D] buffers and
  gathered back per choice, and the backward pass gathers too (no
  scatter-add: moe.row_gather); O(k*d) memory traffic per token, no
  S-proportional FLOPs.

* `dropless`: no capacity: sort-based block-sparse grouped matmul
  (moe.dropless).

All equal a naive per-expert loop (tests/test_dispatch.py).
Letters: G groups, S tokens per group, K choices, E experts, C capacity,
D d_model, F expert hidden.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moe import sharding
from moe.dropless import dropless_dispatch
from moe.layers import swiglu
from moe.routing import Routing
from moe.row_gather import gather_rows, inverse_index


class ExpertWeights(NamedTuple):
  w_gate: jax.Array  # [E, D, F]
  w_up: jax.Array    # [E, D, F]
  w_down: jax.Array  # [E, F, D]


# Expert buffers: groups over `data` only, experts over `expert`.
EXPERT_BUFFER = ('expert_group', 'expert', 'capacity', 'act_embed')


def expert_ffn(xe, w: ExpertWeights, dt):
  """Each expert's SwiGLU on its buffer. xe: [G, E, C, D] -> [G, E, C, D].

  `layers.swiglu` vmapped over experts: per expert one [G*C, D] row matrix,
  so batched matmuls with the expert as their only batch axis.
  """
  return jax.vmap(functools.partial(swiglu, dt=dt), in_axes=(1, 0, 0, 0),
                  out_axes=1)(xe, *w)


def _experts_by_constraint(xe, w, dt):
  """Expert FFN on buffers re-laid from group-sharded to expert-sharded: the
  compiler inserts the all-to-all (and its inverse on the way back)."""
  xe = sharding.constrain(xe, EXPERT_BUFFER)
  return sharding.constrain(expert_ffn(xe, w, dt), EXPERT_BUFFER)


def _experts_all_to_all(xe, w, dt):
  """Expert FFN with explicit collectives (`jax.shard_map`).

  Each device holds the buffers of its own groups for all experts,
  [G/(data*expert), E, C, D]. An all-to-all over `expert` sends each expert's
  slice to the device that owns it, [G/data, E/expert, C, D]; the FFN runs
  with F split over `model` (psum); a second all-to-all brings results back.
  Without experts split over devices this is the plain FFN.
  """
  if not sharding.experts_split():
    return expert_ffn(xe, w, dt)

  def local(xe, w_gate, w_up, w_down):
    xe = jax.lax.all_to_all(xe, 'expert', split_axis=1, concat_axis=0, tiled=True)
    ye = expert_ffn(xe, ExpertWeights(w_gate, w_up, w_down), dt)
    ye = jax.lax.psum(ye, 'model')
    return jax.lax.all_to_all(ye, 'expert', split_axis=0, concat_axis=1, tiled=True)

  buf = P(sharding.BATCH_AXES, None, None, None)
  return jax.shard_map(local, in_specs=(buf, *sharding.EXPERT_WEIGHT_SPECS),
                       out_specs=buf)(xe, *w)


def einsum_dispatch(x, r: Routing, w: ExpertWeights, dt):
  """x: [G, S, D] -> [G, S, D] through one-hot dispatch/combine einsums."""
  e = w.w_gate.shape[0]
  slot_1h = jax.nn.one_hot(jnp.where(r.kept, r.slot, r.capacity), r.capacity,
                           dtype=dt)                              # [G, S, K, C]
  expert_1h = jax.nn.one_hot(r.expert_index, e, dtype=dt)         # [G, S, K, E]
  dispatch = jnp.einsum('GSKE,GSKC->GSEC', expert_1h, slot_1h)    # [G, S, E, C]
  # A token's k choices are distinct experts: its gate per expert scales its
  # one dispatch slot in that expert.
  gate = jnp.einsum('GSKE,GSK->GSE', expert_1h, r.gate.astype(dt))    # [G, S, E]
  combine = dispatch * gate[..., None]                            # [G, S, E, C]
  xe = jnp.einsum('GSEC,GSD->GECD', dispatch, x)
  ye = _experts_by_constraint(xe, w, dt)
  return jnp.einsum('GSEC,GECD->GSD', combine, ye)


def gather_dispatch(x, r: Routing, w: ExpertWeights, dt):
  """x: [G, S, D] -> [G, S, D] through index gathers (and gathers back in
  the backward pass: moe.row_gather)."""
  g, s, d = x.shape
  k = r.expert_index.shape[-1]
  e, c = w.w_gate.shape[0], r.capacity
  # choice (s, k) -> its slot e*C + c; a dropped choice gets E*C, out of range.
  slot_of_choice = jnp.where(r.kept, r.expert_index * c + r.slot, e * c).reshape(g, s * k)
  # slot -> its choice s*K + k; an empty slot gets S*K, whose token S is out
  # of range too.
  choice_of_slot = inverse_index(slot_of_choice, e * c)                    # [G, E*C]
  xe = gather_rows(x, choice_of_slot // k, slot_of_choice.reshape(g, s, k))  # [G, E*C, D]
  ye = _experts_all_to_all(xe.reshape(g, e, c, d), w, dt).reshape(g, e * c, d)
  yk = gather_rows(ye, slot_of_choice, choice_of_slot[..., None])          # [G, S*K, D]
  return jnp.einsum('GSKD,GSK->GSD', yk.reshape(g, s, k, d), r.gate.astype(dt))


DISPATCHES = {'einsum': einsum_dispatch, 'gather': gather_dispatch,
              'dropless': dropless_dispatch}
