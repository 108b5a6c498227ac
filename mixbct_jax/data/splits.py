"""Scenario splits (docs/data.md (scenarios)-1.6) as index subsets of one source; no file is rewritten.

The reference writes four new ``.rec`` files (class30/70, data30/70). Here a split is a :class:`Subset`: the rows
of the underlying source it contains (in source order) and the labels the model sees. Row ``i`` of a subset is
example ``i`` of the reference's split file, so per-example arrays (old features, credible masks) computed on a
subset line up with the reference's ``{SD}_feature.npy``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

SCENARIOS = ("opclass", "opdata", "exclass", "exdata", "full")


@dataclasses.dataclass(frozen=True, eq=False)
class Subset:
    """A subset of a source's examples.

    Attributes:
      indices: int64 [n] rows of the underlying source, in source order.
      labels: int32 [n] labels as the model sees them (class70 is relabelled by -C30).
      num_classes: the number of classes of the model trained on the subset.
    """

    indices: np.ndarray
    labels: np.ndarray
    num_classes: int

    def __post_init__(self):
        if self.indices.shape != self.labels.shape or self.indices.ndim != 1:
            raise ValueError(f"Subset: indices {self.indices.shape} and labels {self.labels.shape} must be equal [n]")

    def __len__(self) -> int:
        return int(self.indices.size)


def _as_labels(labels: np.ndarray | list[int]) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise ValueError(f"labels must be a 1-D integer array; got {labels.dtype} {labels.shape}")
    if labels.size and labels.min() < 0:
        raise ValueError(f"labels must be >= 0; found {labels.min()}")
    return labels.astype(np.int64)


def _check_ratio(ratio: float) -> None:
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"split ratio must lie in (0, 1); got {ratio}")


def full(labels: np.ndarray | list[int]) -> Subset:
    """Every example with its own label; ``num_classes = max(label) + 1``."""
    labels = _as_labels(labels)
    c = int(labels.max()) + 1 if labels.size else 0
    return Subset(np.arange(labels.size, dtype=np.int64), labels.astype(np.int32), c)


def class_split(labels: np.ndarray | list[int], ratio: float = 0.3) -> tuple[Subset, Subset]:
    """The class30/class70 split: the first ``C30 = int(round(C·ratio))`` classes, and the rest relabelled.

    Args:
      labels: int [N], non-decreasing and contiguous from 0 (the insightface record order).
      ratio: the fraction of classes in the first part.

    Returns:
      ``(class30, class70)``; class70's labels are shifted by ``-C30`` to ``0 .. C-C30-1``.
    """
    _check_ratio(ratio)
    labels = _as_labels(labels)
    if labels.size == 0:
        raise ValueError("class_split: labels are empty")
    steps = np.diff(labels)
    if labels[0] != 0 or np.any((steps != 0) & (steps != 1)):
        bad = int(np.flatnonzero((steps != 0) & (steps != 1))[0]) + 1 if labels[0] == 0 else 0
        raise ValueError(
            f"class_split: labels must be non-decreasing and contiguous from 0 (grouped by identity, as in an "
            f"insightface .rec); at position {bad} the label is {labels[bad]} after "
            f"{labels[bad - 1] if bad else 'the start'}. Sort the source by label or use data_split"
        )
    c = int(labels[-1]) + 1
    c30 = int(round(c * ratio))  # Python round: half-to-even, as the reference
    n30 = int(np.searchsorted(labels, c30))  # images of classes 0..C30-1 form a prefix
    idx = np.arange(labels.size, dtype=np.int64)
    class30 = Subset(idx[:n30], labels[:n30].astype(np.int32), c30)
    class70 = Subset(idx[n30:], (labels[n30:] - c30).astype(np.int32), c - c30)
    return class30, class70


def data_split(labels: np.ndarray | list[int], ratio: float = 0.3) -> tuple[Subset, Subset]:
    """The data30/data70 split: per identity, its first ``k30 = max(1, round(c·ratio))`` images and the rest.

    A singleton identity (c == 1) is in both parts. Labels are unchanged and both parts keep
    ``num_classes = max(label) + 1``. Rounding is half-to-even on the float64 product (5 -> 2, 15 -> 4, 25 -> 8).

    Args:
      labels: int [N]; "first" means first in source order, whether or not the labels are grouped.
      ratio: the fraction of each identity's images in the first part.

    Returns:
      ``(data30, data70)``.
    """
    _check_ratio(ratio)
    labels = _as_labels(labels)
    n = labels.size
    c = int(labels.max()) + 1 if n else 0
    counts = np.bincount(labels, minlength=c)  # [C]
    k30 = np.maximum(1, np.rint(counts * ratio).astype(np.int64))  # np.rint is half-to-even like round()
    # rank[i] = how many earlier examples share example i's label.
    order = np.argsort(labels, kind="stable")
    starts = np.cumsum(counts) - counts  # [C]
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n) - starts[labels[order]]
    in30 = rank < k30[labels]
    in70 = ~in30 | (counts[labels] == 1)
    idx = np.arange(n, dtype=np.int64)
    lab = labels.astype(np.int32)
    return Subset(idx[in30], lab[in30], c), Subset(idx[in70], lab[in70], c)


def scenario(name: str, labels: np.ndarray | list[int], ratio: float = 0.3) -> dict[str, Subset]:
    """The old and new training sets of a scenario (docs/data.md (scenarios)).

    | name    | old     | new                   |
    |---------|---------|-----------------------|
    | opclass | class30 | class70 (relabelled)  |
    | opdata  | data30  | data70                |
    | exclass | class30 | full                  |
    | exdata  | data30  | full                  |
    | full    | full    | full                  |

    The old model's embeddings are extracted on ``new`` (the reference's class70/data70/class100/data100).

    Args:
      name: one of :data:`SCENARIOS` (case-insensitive, so ``'OPclass'`` works).
      labels: int [N] labels of the source.
      ratio: the split ratio (0.3 in the reference).

    Returns:
      ``{'old': Subset, 'new': Subset}``.
    """
    key = name.lower()
    if key not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}; choose one of {SCENARIOS}")
    if key == "full":
        everything = full(labels)
        return {"old": everything, "new": everything}
    split = class_split if key.endswith("class") else data_split
    part30, part70 = split(labels, ratio)
    new = part70 if key.startswith("op") else full(labels)
    return {"old": part30, "new": new}
