"""Training methods: each is one small module with the same interface (`base.Method`), found by
the config's `method` name in `REGISTRY`. A new method is one class and one `register` call."""

from __future__ import annotations

from typing import Any

import ml_collections

from mgd_jax.methods.base import Method
from mgd_jax.methods.cps import CPS
from mgd_jax.methods.mgd import MGD
from mgd_jax.methods.supervised import Supervised
from mgd_jax.runtime.errors import ConfigError

REGISTRY: dict[str, type] = {"supervised": Supervised, "cps": CPS, "mgd": MGD}


def register(name: str, cls: type) -> None:
    """Makes `config.method = name` train with `cls` (a `base.Method`, built as `cls(config)`)."""
    if not name.isidentifier():
        raise ValueError(f"method name {name!r} must be an identifier")
    REGISTRY[name] = cls


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def method_class(name: str) -> type:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"config.method: {name!r} is not one of {sorted(REGISTRY)}"
        ) from None


def check_config(config: ml_collections.ConfigDict) -> None:
    """The method's own config checks (a class may define `check_config(config)`)."""
    check = getattr(method_class(config.method), "check_config", None)
    if check is not None:
        check(config)


def get(config: ml_collections.ConfigDict, **options: Any) -> Method:
    """The method named by `config.method`, built from the config."""
    return method_class(config.method)(config, **options)


__all__ = ["CPS", "MGD", "Method", "REGISTRY", "Supervised", "check_config", "get",
           "method_class", "names", "register"]
