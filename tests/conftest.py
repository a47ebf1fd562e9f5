"""Tests run on CPU with 8 fake devices, in float32, before JAX starts."""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

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
