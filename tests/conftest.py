"""Test-wide setup: 8 simulated CPU devices (set before jax is imported) and parsed absl flags."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import tempfile  # noqa: E402

# One persistent compilation cache for the session: the end-to-end tests compile the same
# programs several times (straight vs resumed runs, subprocesses of `python -m mgd_jax.main`).
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="mgd_jax_test_jax_cache_")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

from absl import flags  # noqa: E402

# grain / orbax read absl flags; under pytest nobody parses them.
flags.FLAGS.mark_as_parsed()


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    """A tiny prepared synthetic dataset shared by the end-to-end tests: (data_dir, name)."""
    from mgd_jax.data import prepare

    data_dir = str(tmp_path_factory.mktemp("synthetic_data"))
    name = prepare.ensure_synthetic(
        data_dir, num_classes=5, num_train=48, num_val=12, image_size=32
    )
    return data_dir, name
