"""One training process for tests/test_reliability.py: `train_lib.train()` on
the tiny config of `tiny_config()` plus JSON overrides, with optional,
deterministic fault injection.

  python tests/reliability_worker.py --workdir W --data_dir D \
      [--overrides '{"num_steps": 6, "mesh": [2, 2, 1]}'] [--devices 4] \
      [--sigterm_at_step K]        # SIGTERM to itself right after step K
      [--kill_at_step K]           # kill -9 itself after step K, once the
                                   # newest checkpoint before K has committed
      [--kill_in_save_of K]        # kill -9 itself inside the async save of
                                   # step K: after its files are written,
                                   # before the commit (rename of the tmp dir)
      [--step_sleep S]             # sleep S seconds after every step, so a
                                   # signal from outside lands mid-run
      [--coordinator H:P --num_processes N --process_id I]

The injections hook the step's metrics line (`MetricWriter.write`, called
after every step with log_every=1) and orbax's commit
(`AtomicRenameTemporaryPath.finalize`), so they fire at the same point of the
run every time, whatever the machine's speed.

Importing this module changes nothing (the tests read `tiny_config` from it);
JAX's device count is set in main(), before JAX starts.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(data_dir: str, overrides: dict | None = None):
  """configs/base.py shrunk to a 2-layer MoE (one MoE layer, 8 experts,
  top-2, router jitter on) that trains a step in milliseconds; `overrides`
  maps dotted keys ('moe.num_experts') to values."""
  if REPO not in sys.path:
    sys.path.insert(0, REPO)
  from configs import base  # pylint: disable=g-import-not-at-top
  c = base.get_config()
  c.model.update(d_model=16, num_layers=2, num_heads=2, head_dim=8, mlp_dim=32,
                 max_seq_len=16, moe_every=2)
  c.moe.update(num_experts=8, top_k=2, expert_dim=16, group_size=16,
               min_capacity=1, jitter_eps=0.01)
  c.data.data_dir = data_dir
  c.update(batch_size=8, seq_len=16, num_steps=6, log_every=1, eval_every=6,
           eval_batches=1, final_eval_batches=1, checkpoint_every=2, max_to_keep=10,
           progress_bar=False, peak_flops_per_device=1e12)
  c.optimizer.warmup_steps = 2
  c.update_from_flattened_dict({k: tuple(v) if isinstance(v, list) else v
                                for k, v in (overrides or {}).items()})
  return c


def _committed(workdir: str, step: int) -> bool:
  return os.path.isdir(os.path.join(workdir, 'checkpoints', str(step)))


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--workdir', required=True)
  p.add_argument('--data_dir', required=True)
  p.add_argument('--overrides', default='{}')
  p.add_argument('--devices', type=int, default=4)
  p.add_argument('--sigterm_at_step', type=int)
  p.add_argument('--kill_at_step', type=int)
  p.add_argument('--kill_in_save_of', type=int)
  p.add_argument('--step_sleep', type=float, default=0.0)
  p.add_argument('--coordinator')
  p.add_argument('--num_processes', type=int)
  p.add_argument('--process_id', type=int)
  a = p.parse_args()

  os.environ['JAX_PLATFORMS'] = 'cpu'
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_num_cpu_devices', a.devices)
  # pylint: disable-next=g-import-not-at-top
  from moe import checkpoint, metrics, run_config, sharding, train_lib
  from orbax.checkpoint._src.path import atomicity  # pylint: disable=g-import-not-at-top

  config = tiny_config(a.data_dir, json.loads(a.overrides))
  every = config.checkpoint_every

  write = metrics.MetricWriter.write

  def hooked_write(self, step, values):
    write(self, step, values)
    if 'loss' not in values:        # the start-up info line
      return
    time.sleep(a.step_sleep)
    if step == a.sigterm_at_step:
      print(f'worker: SIGTERM to myself after step {step}', flush=True)
      os.kill(os.getpid(), signal.SIGTERM)   # handled before kill returns
    if step == a.kill_at_step:
      last = (step - 1) // every * every
      deadline = time.monotonic() + 120
      while last and not _committed(a.workdir, last) and time.monotonic() < deadline:
        time.sleep(0.01)
      print(f'worker: kill -9 after step {step} (step {last} committed)', flush=True)
      os.kill(os.getpid(), signal.SIGKILL)

  metrics.MetricWriter.write = hooked_write

  finalize = atomicity.AtomicRenameTemporaryPath.finalize

  async def hooked_finalize(self, *args, **kwargs):
    if self.get_final().name == str(a.kill_in_save_of):
      print(f'worker: kill -9 inside the save of step {a.kill_in_save_of} '
            f'(written to {self.get().name}, not committed)', flush=True)
      os.kill(os.getpid(), signal.SIGKILL)
    return await finalize(self, *args, **kwargs)

  atomicity.AtomicRenameTemporaryPath.finalize = hooked_finalize

  # Times the per-step preemption check (JAX's sync point when distributed).
  reached, timing = checkpoint.Checkpointer.reached_preemption, [0, 0.0]

  def timed_reached(self, step):
    t = time.perf_counter()
    out = reached(self, step)
    timing[0] += 1
    timing[1] += time.perf_counter() - t
    return out

  checkpoint.Checkpointer.reached_preemption = timed_reached

  sharding.init_distributed(a.coordinator, a.num_processes, a.process_id)
  t0 = time.perf_counter()
  result = train_lib.train(run_config.build(config), a.workdir)
  print(f"worker: done at step {result['step']} in "
        f'{time.perf_counter() - t0:.1f} s; preemption check '
        f'{1e6 * timing[1] / max(timing[0], 1):.1f} us/step', flush=True)


if __name__ == '__main__':
  main()
