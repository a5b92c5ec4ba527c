"""Test-wide setup: 8 simulated CPU devices (set before jax is imported) and parsed absl flags."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402

# grain / orbax read absl flags; under pytest nobody parses them.
flags.FLAGS.mark_as_parsed()
