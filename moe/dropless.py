"""Dropless dispatch: every routed choice reaches its expert, whatever the
routing, with static shapes under jit (MegaBlocks-style block-sparse
grouped matmul in plain JAX).

Grouped matmul (`grouped_ffn`), for N rows each assigned to one of E experts:
  1. rank rows within their expert (stable, `routing.rank_within`);
  2. pad each expert's run of rows to a multiple of the tile T and lay the runs
     one after another in a buffer of B = floor((N + E*(T-1)) / T) + 1 tiles, a
     static bound that holds for ANY assignment (all rows to one expert
     included);
  3. each tile belongs to one expert: gather that expert's weights per tile and
     run the SwiGLU as a batched matmul [B, T, D] x [B, D, F];
  4. gather the rows back into their original order (the backward pass
     gathers too: moe.row_gather).
Padding costs at most E*(T-1) rows: T is chosen so that this stays <= 1/4 of N
(T = clamp(2^floor(log2(N / 4E)), 8, 512); from N >= 32E on), the buffer
bound of capacity factor 1.25. Small tiles cost more than their padding
saves: each tile gathers its expert's weights and scatter-adds their
gradients (the bench's `dropless` layer figure, docs/performance.md).
`jax.lax.ragged_dot` computes the same product but was slower than these
tiles on XLA:CPU when tried (jax 0.10 and 0.11), so it is not used.

Across the `expert` mesh axis (`jax.shard_map`): each device sends each of
its choices to the device owning the chosen expert. Without a ragged
all-to-all the buffers must have static size, so each device sends
[n_expert, N_local, D], room for the worst case (all its choices to one
device): the all-to-all moves n_expert x the bytes and the receiving grouped
matmul computes over n_expert x N_local rows. That worst-case bound is the
price of never dropping; the capacity paths are the bounded alternative.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moe import sharding
from moe.layers import swiglu
from moe.routing import Routing, rank_within
from moe.row_gather import gather_rows, inverse_index


def tile_size(num_rows: int, num_experts: int) -> int:
  rows_per_expert = max(num_rows // (4 * num_experts), 1)
  return int(min(512, max(8, 2 ** math.floor(math.log2(rows_per_expert)))))


def grouped_ffn(rows, expert_of_row, num_experts: int, w_gate, w_up, w_down, dt):
  """SwiGLU of each row with its expert's weights.

  rows: [N, D]; expert_of_row: [N] int, a value >= num_experts marks a row to
  skip (output 0); w_gate, w_up: [E, D, F]; w_down: [E, F, D]. -> [N, D].
  """
  n, d = rows.shape
  e = num_experts
  tile = tile_size(n, e)
  num_tiles = (n + e * (tile - 1)) // tile + 1
  size = num_tiles * tile
  key = jnp.minimum(expert_of_row, e)                        # e = skip
  rank, counts = rank_within(key, e + 1)                     # [N], [E + 1]
  padded = (counts[:e] + tile - 1) // tile * tile            # [E]
  padded_end = jnp.cumsum(padded)
  expert = jnp.minimum(key, e - 1)
  # Each row's place in the buffer; skipped rows get `size`, out of range.
  dest = jnp.where(key < e, padded_end[expert] - padded[expert] + rank, size)  # [N]
  source = inverse_index(dest, size)                                       # [B*T]
  # Out-of-range indices (padding slots, skipped rows) read zeros; each map
  # is the other's inverse, so the backward pass gathers too.
  xb = gather_rows(rows, source, dest[:, None]).reshape(num_tiles, tile, d)  # [B, T, D]
  tile_expert = jnp.minimum(
      jnp.searchsorted(padded_end, jnp.arange(num_tiles) * tile, side='right'), e - 1)
  yb = jax.vmap(functools.partial(swiglu, dt=dt))(                # [B, T, D]
      xb, w_gate[tile_expert], w_up[tile_expert], w_down[tile_expert])
  return gather_rows(yb.reshape(size, d), dest, source[:, None])               # [N, D]


def _expert_parallel(rows, expert_of_row, num_experts, w, dt):
  """grouped_ffn with experts sharded over `expert` (worst-case buffers)."""
  if not sharding.experts_split():
    return grouped_ffn(rows, expert_of_row, num_experts, *w, dt)

  def local(rows, expert_of_row, w_gate, w_up, w_down):
    n, d = rows.shape
    shards = jax.lax.axis_size('expert')
    per_shard = num_experts // shards
    skip = expert_of_row >= num_experts
    device = jnp.where(skip, shards, expert_of_row // per_shard)             # [N]
    slot, _ = rank_within(device, shards + 1)                                # [N]
    # Row -> its place device*N + slot in the send buffer (skipped rows: out
    # of range), and back; both moves gather (moe.row_gather).
    place = device * n + slot                                                # [N]
    row_of_place = inverse_index(place, shards * n)                          # [shards*N]
    send = gather_rows(rows, row_of_place, place[:, None])                   # [shards*N, D]
    send_expert = jnp.where(row_of_place < n, expert_of_row[row_of_place % n] % per_shard,
                            per_shard).astype(jnp.int32)                     # [shards*N]
    recv = jax.lax.all_to_all(send.reshape(shards, n, d), 'expert', 0, 0, tiled=True)
    recv_expert = jax.lax.all_to_all(send_expert.reshape(shards, n), 'expert', 0, 0,
                                     tiled=True)                             # [shards, N]
    out = grouped_ffn(recv.reshape(shards * n, d), recv_expert.reshape(-1),
                      per_shard, w_gate, w_up, w_down, dt)
    out = jax.lax.psum(out, 'model').reshape(shards, n, d)
    back = jax.lax.all_to_all(out, 'expert', 0, 0, tiled=True)               # [shards, N, D]
    return gather_rows(back.reshape(shards * n, d), place, row_of_place[:, None])  # [N, D]

  rows_spec = P(sharding.BATCH_AXES, None)
  return jax.shard_map(
      local, in_specs=(rows_spec, P(sharding.BATCH_AXES), *sharding.EXPERT_WEIGHT_SPECS),
      out_specs=rows_spec)(rows, expert_of_row, *w)


def dropless_dispatch(x, r: Routing, w, dt):
  """x: [G, S, D] -> [G, S, D]; every kept choice (all of them, unless a
  capacity override asked for drops) goes through its expert."""
  g, s, d = x.shape
  k = r.expert_index.shape[-1]
  e = w.w_gate.shape[0]
  rows = jnp.repeat(x.reshape(g * s, d), k, axis=0)                  # [G*S*K, D]
  expert = jnp.where(r.kept, r.expert_index, e).reshape(-1)          # e = dropped
  y = _expert_parallel(rows, expert, e, w, dt).reshape(g, s, k, d)
  return jnp.einsum('GSKD,GSK->GSD', y, r.gate.astype(dt))
