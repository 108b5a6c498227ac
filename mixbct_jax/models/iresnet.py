"""IResNet (insightface's face-recognition ResNet) in Flax linen.

Exactly as the reference MixBCT code's backbones/iresnet.py.

NHWC layout. Block: BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus shortcut, with no activation
after the addition; the stride sits on the second conv. Head: BN2d -> flatten -> Linear(bias) -> BN1d whose
scale is fixed to 1 (not a parameter). The embedding is the raw BN1d output, not L2-normalised.

Depth variants are one-line ``functools.partial`` aliases; ``input_size`` (112 for the recipes, 32-64 for
tiny runs) fixes the flatten size, and ``width`` scales the stage widths for tiny test models.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mixbct_jax.aliases import Dtype
from mixbct_jax.initializers import torch_linear_uniform
from mixbct_jax.models.layers import BatchNorm, PReLU, conv_normal_init


class IBasicBlock(nn.Module):
    planes: int
    stride: int
    downsample: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv = functools.partial(
            nn.Conv, use_bias=False, dtype=self.dtype, kernel_init=conv_normal_init(), padding=((1, 1), (1, 1))
        )
        bn = functools.partial(BatchNorm, use_running_average=not train, dtype=self.dtype)
        y = bn(name="bn1")(x)
        y = conv(self.planes, (3, 3), name="conv1")(y)
        y = bn(name="bn2")(y)
        y = PReLU(name="prelu")(y)
        y = conv(self.planes, (3, 3), strides=(self.stride, self.stride), name="conv2")(y)
        y = bn(name="bn3")(y)
        if self.downsample:
            x = nn.Conv(
                self.planes,
                (1, 1),
                strides=(self.stride, self.stride),
                use_bias=False,
                dtype=self.dtype,
                kernel_init=conv_normal_init(),
                padding="VALID",
                name="downsample_conv",
            )(x)
            x = bn(name="downsample_bn")(x)
        return y + x


class IResNet(nn.Module):
    """IResNet backbone returning the raw embedding [B, embedding_size].

    Attributes:
      stage_sizes: blocks per stage (r18 [2,2,2,2], r50 [3,4,14,3], ...).
      embedding_size: D.
      input_size: H == W of the input; must be divisible by 16.
      width: multiplier on the stage widths 64/128/256/512 (1.0 for the real models).
      dtype: compute dtype (bfloat16 for mixed precision); parameters stay float32.
    """

    stage_sizes: Sequence[int]
    embedding_size: int = 512
    input_size: int = 112
    width: float = 1.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:  # x: [B, H, W, 3]
        if x.shape[1] != self.input_size or x.shape[2] != self.input_size:
            raise ValueError(f"IResNet built for {self.input_size}x{self.input_size} inputs, got {x.shape[1:3]}")
        if self.input_size % 16:
            raise ValueError(
                f"IResNet input_size must be divisible by 16 (four stride-2 stages), got {self.input_size}"
            )
        bn = functools.partial(BatchNorm, use_running_average=not train, dtype=self.dtype)
        widths = [max(1, int(round(c * self.width))) for c in (64, 128, 256, 512)]
        x = x.astype(self.dtype)
        x = nn.Conv(
            widths[0],
            (3, 3),
            padding=((1, 1), (1, 1)),
            use_bias=False,
            dtype=self.dtype,
            kernel_init=conv_normal_init(),
            name="stem_conv",
        )(x)
        x = bn(name="stem_bn")(x)
        x = PReLU(name="stem_prelu")(x)
        for s, (n_blocks, planes) in enumerate(zip(self.stage_sizes, widths)):
            for b in range(n_blocks):
                # Every stage opens with a stride-2 block, so its shortcut always needs the 1x1 conv + BN.
                x = IBasicBlock(
                    planes, stride=2 if b == 0 else 1, downsample=b == 0, dtype=self.dtype, name=f"layer{s + 1}_{b}"
                )(x, train)
        x = bn(name="features_bn")(x)  # [B, H/16, W/16, C]
        x = x.reshape((x.shape[0], -1))  # NHWC flatten order (the converter permutes PyTorch's CHW order)
        fan_in = x.shape[-1]
        x = nn.Dense(
            self.embedding_size,
            dtype=self.dtype,
            kernel_init=torch_linear_uniform(fan_in),
            bias_init=torch_linear_uniform(fan_in),
            name="fc",
        )(x)
        # BatchNorm1d with gamma frozen at 1 (the reference MixBCT code's backbones/iresnet.py):
        # no scale parameter at all.
        x = BatchNorm(use_running_average=not train, use_scale=False, dtype=jnp.float32, name="features")(
            x.astype(jnp.float32)
        )
        return x  # [B, D] float32, not normalised


IResNet18 = functools.partial(IResNet, stage_sizes=(2, 2, 2, 2))
IResNet34 = functools.partial(IResNet, stage_sizes=(3, 4, 6, 3))
IResNet50 = functools.partial(IResNet, stage_sizes=(3, 4, 14, 3))
IResNet100 = functools.partial(IResNet, stage_sizes=(3, 13, 30, 3))
IResNet200 = functools.partial(IResNet, stage_sizes=(6, 26, 60, 6))
# One block per stage: for tests and the CPU demo only (compiles in seconds), not a published model.
IResNetTiny = functools.partial(IResNet, stage_sizes=(1, 1, 1, 1))
