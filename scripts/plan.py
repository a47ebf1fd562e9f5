"""Pre-flight plan of a config on a target mesh; trains nothing.

  python scripts/plan.py --config configs/switch.py:1b --mesh=4,8,1
  python scripts/plan.py --config configs/switch.py:1b_4nodes    # 4 nodes x 8 GPUs
  python scripts/plan.py --config configs/gshard.py:cpu --config.moe.num_experts=16 \\
      --mesh=1,8,1 --check          # also compile here and print XLA's figure

Prints total and active parameters, training FLOPs per token, per-device
bytes of parameters, optimizer state, gradients and activations, and the
all-to-all bytes per step of each MoE layer, split into traffic inside a
domain (node, slice) and across domains with an estimated time for each
(moe/plan.py says how each is computed). The mesh may be larger than this
machine: nothing is allocated.
Exits 1 with the reason when the layout does not fit the mesh.
"""

import json
import os
import sys

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # configs/

import jax  # noqa: E402

from moe import config_flag, plan, run_config  # noqa: E402

_CONFIG = config_flag.define(
    os.path.join(ROOT, 'configs', 'switch.py:cpu'),
    'Config file and variant, e.g. configs/switch.py:1b.')
_MESH = flags.DEFINE_string(
    'mesh', None, 'Target mesh "data,expert,model", e.g. 4,8,1 (default: '
    'config.mesh).')
_DCN_MESH = flags.DEFINE_string(
    'dcn_mesh', None, 'Domains (nodes, TPU slices) per axis "data,expert,model", '
    'e.g. 4,1,1; the whole mesh is mesh x dcn_mesh (default: config.dcn_mesh).')
_ICI_GBPS = flags.DEFINE_float(
    'ici_gbps', None, 'Bandwidth inside a domain, Gb/s per device one way '
    '(default moe.plan.ICI_GBPS: H100/H200 NVLink 4, 450 GB/s; TPU v5p: 4800).')
_DCN_GBPS = flags.DEFINE_float(
    'dcn_gbps', None, 'Bandwidth across domains, Gb/s per device one way '
    '(default moe.plan.DCN_GBPS: one 400 Gb/s InfiniBand NIC per GPU; TPU v5p: 50).')
_NUM_DEVICES = flags.DEFINE_integer(
    'num_devices', None, 'Devices of the target, to resolve a -1 in the mesh '
    '(default: the mesh product, or this machine\'s device count).')
_JSON = flags.DEFINE_string('json', None, 'Also write the plan to this JSON file.')
_CHECK = flags.DEFINE_bool(
    'check', False, 'Also compile the train step on this machine\'s devices '
    '(the mesh must fit them) and print the compiler\'s memory figure.')


def parse_mesh(text: str) -> tuple[int, int, int]:
  parts = [p for p in text.replace('(', '').replace(')', '').split(',') if p.strip()]
  if len(parts) != 3:
    raise app.UsageError(f'--mesh={text!r}: give three sizes data,expert,model.')
  return tuple(int(p) for p in parts)


def main(argv):
  del argv
  config = _CONFIG.value
  if _MESH.value:
    config.mesh = parse_mesh(_MESH.value)
  if _DCN_MESH.value:
    config.dcn_mesh = parse_mesh(_DCN_MESH.value)
  run = run_config.build(config)
  num_devices = _NUM_DEVICES.value
  if num_devices is None and -1 in tuple(int(s) for s in config.mesh):
    num_devices = jax.device_count()
  bandwidths = {k: v for k, v in (('ici_gbps', _ICI_GBPS.value),
                                  ('dcn_gbps', _DCN_GBPS.value)) if v is not None}
  p = plan.make_plan(run, num_devices, **bandwidths)
  print(plan.format_plan(p))
  if _CHECK.value:
    m = plan.compiled_bytes(run)
    print(f'\ncompiler (this machine, {jax.device_count()} devices): '
          f'{m["total"] / 2**20:.2f} MiB per device (arguments {m["argument"]} + '
          f'outputs {m["output"]} - aliased {m["alias"]} + temporaries '
          f'{m["temp"]} bytes); plan {p.total_bytes / 2**20:.2f} MiB '
          f'({100 * (p.total_bytes / m["total"] - 1):+.1f}%)')
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump(p.to_dict(), f, indent=2)
  return 0


if __name__ == '__main__':
  config_flag.run(main)
