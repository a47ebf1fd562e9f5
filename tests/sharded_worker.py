"""One process of a multi-process run (tests/test_sharding.py starts two).

Each process owns 4 CPU devices and is one domain of a two-level mesh: data
across the two processes (dcn_mesh (2, 1, 1)), experts inside each (mesh
(1, 4, 1)). Every process feeds only its own rows of the global batch. It
writes, from process 0: the loss and the gradients of the first batch, and for the two-level mesh and for a flat (1, 8, 1) mesh (the
expert axis across both processes) the processes in each replica group of
every all-to-all of the compiled step, with the warnings building each mesh
gave.
"""

import argparse
import json
import os
import warnings

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 4)

import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from moe import data, sharding  # noqa: E402
import sharded_setup  # noqa: E402


def _built(mesh_shape, dispatch, dcn_shape):
  """(Trainer, state, warnings, processes of each all-to-all replica group,
  the compiled loss-and-gradients step, the first batch)."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    s, state = sharded_setup.build(mesh_shape, dispatch, dcn_shape=dcn_shape)
  tokens = data.global_batch(_rows(sharded_setup.batches(1)[0]), s.batch_sharding)
  compiled = sharded_setup.loss_and_grads(s).lower(state, tokens).compile()
  devices = s.mesh.devices.flat        # partition id -> device
  groups = [[[devices[p].process_index for p in g] for g in op_groups]
            for _, op_groups in sharded_setup.all_to_alls(compiled.as_text())]
  return s, state, [str(w.message) for w in caught], groups, compiled, tokens


def _rows(step_tokens):
  return np.split(step_tokens, jax.process_count())[jax.process_index()]


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--coordinator', required=True)
  p.add_argument('--num_processes', type=int, required=True)
  p.add_argument('--process_id', type=int, required=True)
  p.add_argument('--dispatch', default='gather')
  p.add_argument('--out', required=True)
  a = p.parse_args()
  sharding.init_distributed(a.coordinator, a.num_processes, a.process_id)
  assert jax.process_count() == a.num_processes and len(jax.devices()) == 8
  _, state, hybrid_warnings, hybrid_groups, compiled, tokens = _built(
      (2, 4, 1), a.dispatch, (2, 1, 1))
  loss, _, grads = compiled(state, tokens)
  grads = {jax.tree_util.keystr(k): np.asarray(multihost_utils.process_allgather(g, tiled=True))
           for k, g in jax.tree_util.tree_flatten_with_path(grads)[0]}
  *_, flat_warnings, flat_groups, _, _ = _built((1, 8, 1), a.dispatch, (1, 1, 1))
  if jax.process_index() == 0:
    np.savez(a.out + '.grads.npz', **grads)
    with open(a.out, 'w') as f:
      json.dump({'loss': float(loss), 'hybrid_warnings': hybrid_warnings,
                 'hybrid_groups': hybrid_groups, 'flat_warnings': flat_warnings,
                 'flat_groups': flat_groups}, f)


if __name__ == '__main__':
  main()
