"""MobileFaceNet (insightface ``mbf`` / ``mbf_large``) in Flax linen.

As the reference MixBCT code's backbones/mobilefacenet.py.

Init: kaiming-normal (fan_out, ReLU gain) for conv and linear weights, BN 1/0. The final Linear has no bias and
is followed by BatchNorm1d (affine). The GDC kernel equals the last feature map (input_size / 16).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mixbct_jax.aliases import Dtype
from mixbct_jax.models.layers import BatchNorm, PReLU

_kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class ConvBlock(nn.Module):
    """Conv (no bias) + BN + optional PReLU; ``linear=True`` is the reference's LinearBlock."""

    features: int
    kernel: int = 1
    stride: int = 1
    padding: int = 0
    groups: int = 1
    linear: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        p = self.padding
        x = nn.Conv(
            self.features,
            (self.kernel, self.kernel),
            strides=(self.stride, self.stride),
            padding=((p, p), (p, p)),
            feature_group_count=self.groups,
            use_bias=False,
            dtype=self.dtype,
            kernel_init=_kaiming_fan_out,
            name="conv",
        )(x)
        x = BatchNorm(use_running_average=not train, dtype=self.dtype, name="bn")(x)
        return x if self.linear else PReLU(name="prelu")(x)


class DepthWise(nn.Module):
    """1x1 expand to ``groups`` -> 3x3 depthwise (stride) -> 1x1 linear projection, optional residual."""

    features: int
    groups: int
    stride: int = 1
    residual: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        y = ConvBlock(self.groups, dtype=self.dtype, name="expand")(x, train)
        y = ConvBlock(
            self.groups, kernel=3, stride=self.stride, padding=1, groups=self.groups, dtype=self.dtype, name="depthwise"
        )(y, train)
        y = ConvBlock(self.features, linear=True, dtype=self.dtype, name="project")(y, train)
        return x + y if self.residual else y


class MobileFaceNet(nn.Module):
    """MobileFaceNet returning the raw embedding [B, embedding_size]."""

    blocks: Sequence[int] = (1, 4, 6, 2)
    scale: int = 2
    embedding_size: int = 512
    input_size: int = 112
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:  # x: [B, H, W, 3]
        if x.shape[1] != self.input_size or x.shape[2] != self.input_size or self.input_size % 16:
            raise ValueError(
                f"MobileFaceNet built for {self.input_size}x{self.input_size} inputs (divisible by 16), "
                f"got {x.shape[1:3]}"
            )
        c1, c2 = 64 * self.scale, 128 * self.scale
        blk = functools.partial(DepthWise, dtype=self.dtype)

        def residual(x, features, n, groups, name):
            for i in range(n):
                x = blk(features, groups, residual=True, name=f"{name}_{i}")(x, train)
            return x

        x = x.astype(self.dtype)
        x = ConvBlock(c1, kernel=3, stride=2, padding=1, dtype=self.dtype, name="conv1")(x, train)
        if self.blocks[0] == 1:
            x = ConvBlock(c1, kernel=3, padding=1, groups=64, dtype=self.dtype, name="conv2_dw")(x, train)
        else:
            x = residual(x, c1, self.blocks[0], 128, "conv2")
        x = blk(c1, 128, stride=2, name="conv23")(x, train)
        x = residual(x, c1, self.blocks[1], 128, "conv3")
        x = blk(c2, 256, stride=2, name="conv34")(x, train)
        x = residual(x, c2, self.blocks[2], 256, "conv4")
        x = blk(c2, 512, stride=2, name="conv45")(x, train)
        x = residual(x, c2, self.blocks[3], 256, "conv5")
        # conv_sep and the GDC head run in float32 in the reference.
        x = ConvBlock(512, dtype=jnp.float32, name="conv_sep")(x.astype(jnp.float32), train)
        k = self.input_size // 16
        x = ConvBlock(512, kernel=k, groups=512, linear=True, dtype=jnp.float32, name="gdc")(x, train)
        x = x.reshape((x.shape[0], -1))  # [B, 512]
        x = nn.Dense(self.embedding_size, use_bias=False, kernel_init=_kaiming_fan_out, name="fc")(x)
        return BatchNorm(use_running_average=not train, name="features")(x)  # [B, D]


MobileFaceNetSmall = functools.partial(MobileFaceNet, blocks=(1, 4, 6, 2), scale=2)
MobileFaceNetLarge = functools.partial(MobileFaceNet, blocks=(2, 8, 12, 4), scale=4)
