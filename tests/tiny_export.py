"""A tiny random-weights segmentation network saved as an mgd_jax.weights checkpoint (test helper
for test_predict / test_eval_main)."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from mgd_jax import models, weights

NUM_CLASSES = 5
OPTIONS = {"width": 0.125, "depths": (1, 1, 1, 1)}


def save_tiny_network(directory, *, num_classes=NUM_CLASSES, seed=0):
    """Writes the checkpoint; returns (model, variables)."""
    model = models.build("resnet18", num_classes, **OPTIONS)
    # Shapes by tracing only: a real init compiles for ~20 s on the shared CPUs.
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
    )
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path[-1:])
        if "kernel" in name:  # He-like scale keeps activations finite and varied
            fan_in = math.prod(leaf.shape[:-1])
            return rng.normal(0, math.sqrt(2.0 / fan_in), leaf.shape).astype(np.float32)
        if "var" in name:  # non-trivial running statistics: a wrong BN mode would show
            return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
        if "scale" in name:
            return rng.uniform(0.8, 1.2, leaf.shape).astype(np.float32)
        return rng.normal(0, 0.1, leaf.shape).astype(np.float32)  # biases, means

    variables = {c: jax.tree_util.tree_map_with_path(fill, shapes[c])
                 for c in ("params", "batch_stats")}
    weights.save_variables(
        str(directory), variables,
        {"backbone": "resnet18", "num_classes": num_classes, "build_options": OPTIONS},
    )
    return model, variables
