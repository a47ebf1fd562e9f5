"""Row gathers whose gradient is a gather too.

The dispatch paths move token rows by index maps that are injective: every
output row reads at most one input row, and the rows that read a given input
row are known (a token's k buffer slots; a slot's one token choice). JAX
transposes a gather into a scatter-add, which XLA:CPU runs as a serial loop
and which serializes on TPUs; given the inverse map, the backward pass is a
gather as well (MegaBlocks and MaxText do the same for their token
permutations).

Letters: N input rows, M output rows, J readers per input row, D features.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
