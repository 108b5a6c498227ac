"""Type aliases used across the package, defined once."""

from __future__ import annotations

from typing import Any

PyTree = Any  # a nested dict/list/tuple of arrays (params, optimizer state, the train state)
Dtype = Any  # a jnp.dtype or anything jnp.dtype() accepts
