"""Building blocks shared by the backbones, matching the PyTorch layers the reference uses."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from mixbct_jax.aliases import Dtype

# PyTorch BatchNorm: eps 1e-5, running = 0.9 * running + 0.1 * batch (flax's momentum is the keep factor).
BatchNorm = functools.partial(nn.BatchNorm, momentum=0.9, epsilon=1e-5)


def conv_normal_init(std: float = 0.1):
    """IResNet initialises every conv weight with N(0, std^2).

    std 0.1, as the reference MixBCT code's backbones/iresnet.py.
    """
    return nn.initializers.normal(stddev=std)


class PReLU(nn.Module):
    """Per-channel PReLU with slopes initialised to 0.25 (PyTorch's nn.PReLU(num_parameters=C))."""

    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        slope = self.param("slope", nn.initializers.constant(0.25), (x.shape[-1],), self.param_dtype)
        return jnp.where(x >= 0, x, slope.astype(x.dtype) * x)
