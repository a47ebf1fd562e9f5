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
# XLA:CPU's LLVM at -O0: the suite compiles hundreds of small programs that
# run a few steps each (README, "Tests": the suite's time with and without).
# HLO passes are unchanged; the switch.py:cpu eval losses the tests check
# came out the same. Processes the tests start inherit it.
if '--xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                             + ' --xla_backend_optimization_level=0').strip()
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


# The order in which `--dist loadfile` hands whole files to the two workers:
# heaviest first (worker-seconds measured on the 2-core CI machine), so the
# workers finish together. By default xdist orders files by their number of
# tests, which put the few but slow end-to-end files (bench, sweep, token
# budget, compare) last, one worker running them while the other idled.
HEAVIEST_FIRST = (
    'test_reliability.py', 'test_train.py', 'test_sharding.py',
    'test_accidents.py', 'test_sweep.py', 'test_compare.py', 'test_bench.py',
    'test_adaptive.py',
    'test_model.py', 'test_plan.py', 'test_token_budget.py', 'test_upcycle.py',
    'test_moe_layer.py', 'test_routes.py', 'test_dispatch.py',
    'test_gpu_check.py', 'test_launchers.py')


def pytest_configure(config):
  if hasattr(config.option, 'loadscopereorder'):   # xdist: keep our order
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(HEAVIEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable
