"""Test set-up: 8 fake CPU devices (for sharding tests), quiet TensorFlow.

Both must be set before JAX or TensorFlow start, hence here.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
