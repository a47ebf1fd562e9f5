"""Pre-flight: what a RunConfig needs of this machine, checked by train and
eval before anything expensive: the platform's attention kernel, the devices
for the mesh, the workdir's filesystem, the data and `init_from`'s dense run."""

from __future__ import annotations

import jax

from moe import data, layers, run_dir, sharding, upcycle
from moe.run_config import RunConfig


def check(run: RunConfig, workdir: str, *, writes: bool) -> jax.sharding.Mesh:
  """Refuses (a UserError naming the value) what this machine cannot run;
  returns the run's mesh on its devices. `writes`: the workdir must be
  writable (training), else only reachable (eval)."""
  run.model.attention_kernel(layers.platform())   # 'cudnn' where it cannot run: refused
  shape, dcn_shape = run.mesh_shapes(jax.device_count())
  if run.resume.init_from:
    run_dir.check_filesystem(run.resume.init_from, 'init_from')
    upcycle.check_init_from(run.resume.init_from, run.model)
  data.check_source(run.data)
  run_dir.check_writable(workdir) if writes else run_dir.check_filesystem(workdir, 'workdir')
  # The devices' domains (processes, slices) must fit the two-level layout.
  return sharding.make_mesh(shape, dcn_shape=dcn_shape)
