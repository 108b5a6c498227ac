"""Numerics and collectives that several compatibility methods share (run inside the per-device program).

Each function is pure; those taking ``axis_name`` run under ``shard_map`` or ``pmap`` with that named axis.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def safe_norm(x: jax.Array, axis: int = -1) -> jax.Array:
    """``||x||_2`` along ``axis`` with a zero (not NaN) gradient at ``x = 0``, as PyTorch's ``norm`` backward."""
    sq = jnp.sum(jnp.square(x), axis=axis)
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def global_mean_share(value: jax.Array, axis_name: str) -> jax.Array:
    """A loss replicated on every device -> this device's share: value ``value / W``, gradient of ``value``.

    The distributed cross-entropy's custom VJPs give each device the complete gradient of the replicated loss for
    its own rows, so the gradient must not be divided; the value is, so that the step's sum of the loss shares
    over devices reports the loss once.
    """
    w = jax.lax.psum(1, axis_name)
    return value + jax.lax.stop_gradient(value / w - value)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def sum_over_shards(x: jax.Array, axis_name: str) -> jax.Array:
    """``psum`` whose result feeds a computation replicated on every device: the backward is the identity.

    Each device's ``x`` is one term of the sum, so the gradient of the (single, replicated) downstream loss with
    respect to it is the cotangent itself, not its sum over devices.
    """
    return jax.lax.psum(x, axis_name)


def _sum_fwd(x, axis_name):
    return sum_over_shards(x, axis_name), None


def _sum_bwd(axis_name, _, ct):
    return (ct,)


sum_over_shards.defvjp(_sum_fwd, _sum_bwd)


def scale_grad(x: jax.Array, factor: float | jax.Array) -> jax.Array:
    """Value ``x``, gradient ``factor * dx``."""
    return x * factor + jax.lax.stop_gradient(x - x * factor)
