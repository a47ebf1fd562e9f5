"""A run's directory, local or on GCS (gs://), read and written through
etils.epath, as orbax does for the checkpoints in it.

A TPU pod slice needs `--workdir gs://BUCKET/run`: every worker and every
restart must see the same run. Plain `open`/`os.makedirs` would instead write
a local directory named 'gs:' on each worker. Without TensorFlow, epath
reaches gs:// through gcsfs (`pip install 'moe[gcs]'`), checked here before
anything expensive.

Object stores have no append: a file that grows (command.txt) is read and
written whole; metrics.MetricWriter keeps its growing files in a local copy
and uploads them at each checkpoint (`MetricWriter.sync`).
"""

from __future__ import annotations

import importlib.util
import io
import os
import uuid

from etils import epath

from moe.config import ConfigError

GCS = 'gs://'


def is_remote(path: str) -> bool:
  """True for a URL (gs://...), False for a local path."""
  return '://' in str(path)


def gcs_client_installed() -> bool:
  """Whether epath can reach gs:// here: through gcsfs, or TensorFlow."""
  return bool(importlib.util.find_spec('gcsfs') or importlib.util.find_spec('tensorflow'))


def check_filesystem(path: str, what: str) -> None:
  """Refuses a URL this machine cannot reach: any scheme but gs://, or gs://
  without gcsfs (or TensorFlow, epath's other way to GCS)."""
  path = str(path)
  if not is_remote(path):
    return
  if not path.startswith(GCS):
    raise ConfigError(f'{what}={path!r}: the only URL scheme supported is '
                      f'{GCS}; otherwise give a local or mounted path.')
  if not gcs_client_installed():
    raise ConfigError(
        f'{what}={path!r} is on GCS, which needs the gcsfs package without '
        "TensorFlow: pip install 'moe[gcs]' (or mount the bucket with gcsfuse "
        'and pass the local path).')


def check_writable(workdir: str) -> None:
  """Refuses a workdir we cannot write, before anything expensive."""
  check_filesystem(workdir, 'workdir')
  probe = epath.Path(workdir) / f'.write_probe_{uuid.uuid4().hex}'   # unique across hosts
  try:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    probe.write_text('ok')
    probe.unlink()
  except OSError as e:
    raise ConfigError(f'workdir {workdir!r} is not writable ({e.strerror or e}); '
                      'choose a directory you can write to.') from e


def write_text(workdir: str, name: str, text: str) -> None:
  """workdir/name := text (created or replaced)."""
  (epath.Path(workdir) / name).write_text(text)


def write_figure(path: str, fig, dpi: int = 110) -> None:
  """A matplotlib figure as a PNG at `path` (local or gs://; its directory
  is created). The caller closes the figure."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=dpi)
  out = epath.Path(path)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_bytes(buffer.getvalue())


def append_text(workdir: str, name: str, text: str) -> None:
  """workdir/name += text, by rewriting it whole (object stores cannot
  append); for small files only."""
  path = epath.Path(workdir) / name
  path.write_text((path.read_text() if path.exists() else '') + text)


def download(workdir: str, name: str, local_dir: str) -> None:
  """workdir/name -> local_dir/name, if it exists."""
  src = epath.Path(workdir) / name
  if src.exists():   # bytes, not Path.copy: the two paths' filesystems differ
    epath.Path(local_dir, name).write_bytes(src.read_bytes())


def upload(local_dir: str, workdir: str) -> None:
  """Every file under local_dir -> the same relative path under workdir
  (replacing it)."""
  for root, _, files in os.walk(local_dir):
    for f in files:
      src = epath.Path(root, f)
      dst = epath.Path(workdir) / os.path.relpath(src, local_dir)
      dst.parent.mkdir(parents=True, exist_ok=True)
      dst.write_bytes(src.read_bytes())
