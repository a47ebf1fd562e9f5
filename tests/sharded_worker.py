"""One process of a multi-process run (tests/test_sharding.py starts two).

Each process owns 4 CPU devices; together they form one (data=2, expert=4)
mesh. Every process feeds only its own rows of the global batch.
"""

import argparse
import json
import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 4)

import numpy as np  # noqa: E402

from moe import data, sharding  # noqa: E402
import sharded_setup  # noqa: E402


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
  s, state = sharded_setup.build((2, 4, 1), a.dispatch)
  losses = []
  for step_tokens in sharded_setup.batches():
    rows = np.split(step_tokens, jax.process_count())[jax.process_index()]
    state, metrics = s.train_step(state, data.global_batch(rows, s.batch_sharding))
    losses.append(float(metrics['loss']))
  if jax.process_index() == 0:
    with open(a.out, 'w') as f:
      json.dump({'losses': losses}, f)


if __name__ == '__main__':
  main()
