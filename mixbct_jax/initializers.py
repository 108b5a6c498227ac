"""Parameter initialisers that reproduce PyTorch's defaults, shared by the backbones, the heads and the methods."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def torch_linear_uniform(fan_in: int):
    """PyTorch's nn.Linear default: weight and bias ~ U(-1/sqrt(fan_in), +1/sqrt(fan_in))."""
    bound = 1.0 / fan_in**0.5

    def init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init
