"""Tests run on CPU with 8 fake devices, in float32, before JAX starts.

Every test and every process a test starts shares one persistent XLA
compilation cache, a fresh directory per session: the suite compiles the
same small programs many times (each `train()` builds its jit functions
anew, and a model's initializer alone takes ~8 s to compile on this CPU),
and a cached executable is the same program, so results are unchanged.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _cache = tempfile.mkdtemp(prefix='moe_tests_xla_cache_')
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ.update(JAX_COMPILATION_CACHE_DIR=_cache,
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')

import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8)


import pytest  # noqa: E402


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """The embedded stdlib corpus, prepared once for the whole session."""
  from moe import data
  d = str(tmp_path_factory.mktemp('tfds'))
  data.prepare(data.DataConfig(data_dir=d))
  return d
