"""Tests run on CPU with 8 fake devices, in float32, before JAX starts."""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8)
