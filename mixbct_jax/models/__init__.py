"""Backbones. ``build(arch, ...)`` maps the reference's architecture names to Flax modules."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mixbct_jax.models import iresnet, mobilefacenet

ARCHS = {
    "r18": iresnet.IResNet18,
    "r34": iresnet.IResNet34,
    "r50": iresnet.IResNet50,
    "r100": iresnet.IResNet100,
    "r200": iresnet.IResNet200,
    "r_tiny": iresnet.IResNetTiny,
    "mbf": mobilefacenet.MobileFaceNetSmall,
    "mbf_large": mobilefacenet.MobileFaceNetLarge,
}


def normalize_images(images):
    """uint8 RGB -> float32 in [-1, 1], ``(x / 255 - 0.5) / 0.5``: every backbone's input (SPEC §1.3).

    Works on NumPy arrays (host-side embedding) and on jax arrays (inside the train step) alike.
    """
    return (images.astype(np.float32) / 255.0 - 0.5) / 0.5


def build(arch: str, *, embedding_size: int, input_size: int = 112, width: float = 1.0,
          dtype: str | Any = "float32") -> nn.Module:
    """Returns the backbone ``arch`` (one of ``ARCHS``); ``width`` applies to IResNets only."""
    if arch not in ARCHS:
        raise ValueError(f"config.model.arch={arch!r} is not a known backbone; choose one of {sorted(ARCHS)}")
    kwargs: dict[str, Any] = dict(embedding_size=embedding_size, input_size=input_size, dtype=jnp.dtype(dtype))
    if arch.startswith("r"):
        kwargs["width"] = width
    elif width != 1.0:
        raise ValueError(f"config.model.width={width} is only supported for IResNets, not {arch!r}")
    return ARCHS[arch](**kwargs)
