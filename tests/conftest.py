"""Test configuration shared by every test module."""

import os

# Multi-device tests need several CPU devices; set before JAX initialises (tests that need a
# specific count rerun themselves in a subprocess).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import hypothesis  # noqa: E402

hypothesis.settings.register_profile(
    "kdjax", deadline=None, max_examples=30, derandomize=True, print_blob=True)
hypothesis.settings.load_profile("kdjax")
