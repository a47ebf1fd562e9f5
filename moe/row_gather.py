"""Row gathers whose gradient is a gather too.

The dispatch paths move token rows to places given by an injective map
(choice -> buffer slot, row -> tile row): each place receives at most one
row, so the inverse map (`inverse_index`) tells, for every input row, which
output rows read it (a token's k slots; a slot's one choice). JAX transposes
a gather into a scatter-add, which XLA:CPU runs as a serial loop and which
serializes on TPUs; given the inverse map, the backward pass is a gather as
well (MegaBlocks and MaxText do the same for their token permutations).

Letters: N input rows, M output rows, J readers per input row, D features.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def inverse_index(dest, size: int):
  """The inverse of an injective map. dest [..., N]: where each of N rows
  goes, in [0, size) or out of range (nowhere) -> [..., size]: which row
  comes to each place, N where none does."""
  n = dest.shape[-1]

  def invert(d):
    return jnp.full((size,), n, jnp.int32).at[d].set(
        jnp.arange(n, dtype=jnp.int32), mode='drop')

  return jnp.vectorize(invert, signature='(n)->(m)')(dest)


def take_rows(x, index):
  """x [..., N, D], index [..., M] -> [..., M, D]; an index outside [0, N)
  reads a zero row."""
  return jnp.take_along_axis(x, index[..., None], axis=-2, mode='fill', fill_value=0)


@jax.custom_vjp
def gather_rows(x, index, readers):
  """`take_rows(x, index)`, differentiated by gathering instead of scattering.

  readers [..., N, J]: for each row n of x, the rows m of the output with
  index[m] == n, padded with out-of-range values (>= M). The caller's maps
  must be each other's inverse; tests/test_dispatch.py checks the gradients
  of every dispatch path against a per-expert loop."""
  return take_rows(x, index)


def _gather_rows_fwd(x, index, readers):
  return take_rows(x, index), readers


def _gather_rows_bwd(readers, dout):
  *batch, n, j = readers.shape
  dx = take_rows(dout, readers.reshape(*batch, n * j))            # [..., N*J, D]
  return dx.reshape(*batch, n, j, dout.shape[-1]).sum(-2), None, None


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)
