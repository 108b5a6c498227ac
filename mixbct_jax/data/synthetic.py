"""The embedded default data set: deterministic synthetic "identities".

Every identity has a fixed appearance (a few coloured Gaussian blobs on a tinted background, the way a face has
a fixed layout of features), and every image of it varies that appearance the way photos of one face vary: a
shift and a small rotation (pose), brightness and contrast (illumination), and pixel noise. A small network
learns to tell the identities apart in a few hundred steps, yet the task is not trivially separable, so
old/new/cross accuracies differ in the way they do on real data.

Nothing is stored: image ``i`` is rendered on demand from ``(seed, i)``, so the set costs no disk, and any
subset, batch or order gives bit-identical pixels. Examples are grouped by identity in index order (labels
non-decreasing), like an insightface ``.rec`` file, and identities have uneven image counts.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

_BLOBS_PER_IDENTITY = 6


@dataclasses.dataclass(frozen=True)
class SyntheticFaces:
    """A deterministic labelled image set; see the module docstring.

    Attributes:
      num_classes: number of identities.
      min_images, max_images: each identity has a count drawn uniformly from this closed range.
      image_size: H == W of the square RGB images.
      seed: everything (appearances, counts, per-image variation) derives from it.
    """

    num_classes: int = 64
    min_images: int = 12
    max_images: int = 28
    image_size: int = 32
    seed: int = 0

    def __post_init__(self):
        if self.num_classes < 1 or not 1 <= self.min_images <= self.max_images or self.image_size < 8:
            raise ValueError(
                f"SyntheticFaces: need num_classes >= 1, 1 <= min_images <= max_images and image_size >= 8; got {self}"
            )

    # ---- labels -------------------------------------------------------------------------------------------
    @functools.cached_property
    def counts(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 1])
        return rng.integers(self.min_images, self.max_images + 1, size=self.num_classes)

    @functools.cached_property
    def labels(self) -> np.ndarray:
        """int32 [N]: label of example i (non-decreasing)."""
        return np.repeat(np.arange(self.num_classes, dtype=np.int32), self.counts)

    def __len__(self) -> int:
        return int(self.counts.sum())

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.image_size, self.image_size, 3)

    # ---- appearance -----------------------------------------------------------------------------------------
    @functools.cached_property
    def _appearance(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, 2])
        c, k = self.num_classes, _BLOBS_PER_IDENTITY
        return {
            "centre": rng.uniform(0.2, 0.8, size=(c, k, 2)),  # [C, K, (y, x)] in units of the image side
            "sigma": rng.uniform(0.06, 0.16, size=(c, k)),  # [C, K]
            "colour": rng.uniform(-0.7, 0.7, size=(c, k, 3)),  # [C, K, 3]
            "background": rng.uniform(0.25, 0.6, size=(c, 3)),  # [C, 3]
        }

    def read(self, indices: np.ndarray | list[int]) -> np.ndarray:
        """Renders examples ``indices`` as uint8 [n, H, W, 3] RGB."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"SyntheticFaces: index out of range [0, {len(self)}): {idx.min()}..{idx.max()}")
        labels = self.labels[idx]
        app = self._appearance
        n, s = idx.size, self.image_size

        # Per-image variation, a pure function of (seed, index).
        var = (
            np.stack([np.random.default_rng([self.seed, 3, int(i)]).random(6) for i in idx]) if n else np.zeros((0, 6))
        )
        shift = (var[:, 0:2] - 0.5) * 0.24  # up to ±12% of the side
        angle = (var[:, 2] - 0.5) * 0.8  # about ±23 degrees
        gain = 0.6 + 0.8 * var[:, 3]  # contrast
        bias = (var[:, 4] - 0.5) * 0.4  # brightness

        grid = (np.arange(s) + 0.5) / s  # [S]
        yy, xx = np.meshgrid(grid, grid, indexing="ij")  # [S, S]
        # Inverse pose: rotate and shift the sampling grid around the image centre.
        cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
        y0, x0 = yy[None] - 0.5 - shift[:, 0, None, None], xx[None] - 0.5 - shift[:, 1, None, None]
        ys, xs = cos * y0 - sin * x0 + 0.5, sin * y0 + cos * x0 + 0.5  # [n, S, S]

        centre = app["centre"][labels]  # [n, K, 2]
        sigma = app["sigma"][labels]  # [n, K]
        d2 = (ys[:, None] - centre[:, :, 0, None, None]) ** 2 + (xs[:, None] - centre[:, :, 1, None, None]) ** 2
        weight = np.exp(-d2 / (2 * sigma[:, :, None, None] ** 2))  # [n, K, S, S]
        img = app["background"][labels][:, None, None, :] + np.einsum("nkhw,nkc->nhwc", weight, app["colour"][labels])
        img = gain[:, None, None, None] * (img - 0.5) + 0.5 + bias[:, None, None, None]

        noise = (
            np.stack([np.random.default_rng([self.seed, 4, int(i)]).normal(0, 0.15, (s, s, 3)) for i in idx])
            if n
            else 0.0
        )
        return np.clip((img + noise) * 255.0, 0, 255).round().astype(np.uint8)
