"""Training methods; each is one module with the same small interface (`common.Method`)."""

from __future__ import annotations

import ml_collections

from mgd_jax.methods.common import Method
from mgd_jax.methods.cps import CPS
from mgd_jax.methods.mgd import MGD
from mgd_jax.methods.supervised import Supervised

REGISTRY = {"supervised": Supervised, "cps": CPS, "mgd": MGD}


def get(config: ml_collections.ConfigDict) -> Method:
    """Instantiates the method named by `config.method`."""
    try:
        cls = REGISTRY[config.method]
    except KeyError:
        raise ValueError(
            f"config.method: {config.method!r} is not one of {sorted(REGISTRY)}"
        ) from None
    return cls(config)


__all__ = ["CPS", "MGD", "Method", "REGISTRY", "Supervised", "get"]
