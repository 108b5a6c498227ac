"""Running an embedder on uint8 images: input scaling, flip views, output checks.

An embedder is any callable `float32 [n,H,W,3] (already scaled) -> float32 [n,D]` (raw, unnormalised
embeddings), e.g. `mixbct_jax.embed.load_embedder(workdir)` or, in tests, a fixed random projection. If it
has an `image_size` attribute the protocols produce images of that size; otherwise 112 (the face default).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np

Embedder = Callable[[np.ndarray], np.ndarray]
Scale = Literal["clean", "reference"]

DEFAULT_IMAGE_SIZE = 112


def image_size_of(embedder: Embedder, default: int = DEFAULT_IMAGE_SIZE) -> int:
    """Returns the embedder's `image_size` attribute, or `default` for a bare callable."""
    return int(getattr(embedder, "image_size", default))


def scale_images(images: np.ndarray, *, scale: Scale = "clean") -> np.ndarray:
    """Maps uint8 pixels to the model's input range.

    Args:
      images: uint8 [n,H,W,3] RGB.
      scale: 'clean' = (x - 127.5) / 127.5, i.e. (x/255 - 0.5)/0.5 as in training; 'reference' =
        (x - 127.5) * 0.0078125 (= /128), the input scale of the reference IJB-C script (docs/deviations.md §8.19).

    Returns:
      float32 [n,H,W,3].
    """
    x = images.astype(np.float32) - np.float32(127.5)
    if scale == "clean":
        return x / np.float32(127.5)
    if scale == "reference":
        return x * np.float32(0.0078125)
    raise ValueError(f"scale must be 'clean' or 'reference', got {scale!r}")


def embed(embedder: Embedder, images: np.ndarray, *, scale: Scale = "clean") -> np.ndarray:
    """Scales uint8 images and embeds them; checks the embedder returned one float row per image.

    Returns:
      float32 [n,D] raw embeddings.
    """
    out = np.asarray(embedder(scale_images(images, scale=scale)), dtype=np.float32)
    if out.ndim != 2 or out.shape[0] != images.shape[0]:
        raise ValueError(f"the embedder returned shape {out.shape} for {images.shape[0]} images; it must return [n, D]")
    return out


def embed_with_flip(embedder: Embedder, images: np.ndarray, *, scale: Scale = "clean") -> tuple[np.ndarray, np.ndarray]:
    """Embeds images and their horizontal mirror images in one call.

    Returns:
      (original, flipped), each float32 [n,D] raw embeddings.
    """
    n = images.shape[0]
    both = np.concatenate([images, images[:, :, ::-1]], axis=0)  # [2n,H,W,3]
    out = embed(embedder, both, scale=scale)
    return out[:n], out[n:]
