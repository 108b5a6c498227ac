"""Backbones. ``build(arch, ...)`` maps the reference's architecture names to Flax modules."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mixbct_jax.models import iresnet, mobilefacenet, vit

ARCHS = {
    "r18": iresnet.IResNet18,
    "r34": iresnet.IResNet34,
    "r50": iresnet.IResNet50,
    "r100": iresnet.IResNet100,
    "r200": iresnet.IResNet200,
    "r_tiny": iresnet.IResNetTiny,
    "mbf": mobilefacenet.MobileFaceNetSmall,
    "mbf_large": mobilefacenet.MobileFaceNetLarge,
    **{name: functools.partial(vit.vit, name) for name in vit.VARIANTS},
}
REMAT = ("auto", "on", "off")


def normalize_images(images):
    """uint8 RGB -> float32 in [-1, 1], ``(x / 255 - 0.5) / 0.5``: every backbone's input (docs/data.md (augmentation)).

    Works on NumPy arrays (host-side embedding) and on jax arrays (inside the train step) alike.
    """
    return (images.astype(np.float32) / 255.0 - 0.5) / 0.5


def build(
    arch: str,
    *,
    embedding_size: int,
    input_size: int = 112,
    width: float = 1.0,
    dtype: str | Any = "float32",
    patch_size: int = 0,
    remat: str = "auto",
) -> nn.Module:
    """Returns the backbone ``arch`` (one of ``ARCHS``).

    ``width`` applies to IResNets only; ``patch_size`` (0: the variant's own, 9 for the insightface ViTs) and
    ``remat`` ('auto': as the reference registers the variant, on for the 24-block ViTs; 'on'; 'off') to ViTs only.
    """
    if arch not in ARCHS:
        raise ValueError(f"config.model.arch={arch!r} is not a known backbone; choose one of {sorted(ARCHS)}")
    kwargs: dict[str, Any] = dict(embedding_size=embedding_size, input_size=input_size, dtype=jnp.dtype(dtype))
    if arch.startswith("r"):
        kwargs["width"] = width
    elif width != 1.0:
        raise ValueError(f"config.model.width={width} is only supported for IResNets, not {arch!r}")
    if remat not in REMAT:
        raise ValueError(f"config.model.remat={remat!r}: choose one of {REMAT}")
    if arch in vit.VARIANTS:
        kwargs.update(patch_size=int(patch_size), remat=None if remat == "auto" else remat == "on")
    elif patch_size or remat != "auto":
        raise ValueError(
            f"config.model.patch_size / config.model.remat apply to the ViTs only, not {arch!r}; "
            f"leave them at 0 / 'auto'"
        )
    return ARCHS[arch](**kwargs)


def build_from_config(model_config) -> nn.Module:
    """``build`` from a run's ``config.model`` (fields added later default, so older run directories load)."""
    m = model_config
    return build(
        m.arch,
        embedding_size=m.embedding_size,
        input_size=m.input_size,
        width=m.get("width", 1.0),
        dtype=m.get("dtype", "float32"),
        patch_size=m.get("patch_size", 0),
        remat=m.get("remat", "auto"),
    )
