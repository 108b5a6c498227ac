"""The ROC of a verification protocol, equal to sklearn's `roc_curve` but without sorting the pairs' labels.

IJB-C's 1:1 protocol has 15.66M pairs of which about 20k are genuine. `sklearn.metrics.roc_curve` sorts all
scores with a stable argsort and carries the labels along (≈ 7 s on two cores). An ROC point only depends on
how many genuine and impostor scores lie at or above each distinct score, so here the two groups are sorted
apart (a plain float sort, no index array) and counted with binary searches into the small genuine set.

The output is the same points as `roc_curve(labels, scores)` with its default `drop_intermediate=True`,
bit for bit (tests/test_eval_roc.py): the counts are exact integers in float64 in both, and the same
collinear points are dropped.
"""

from __future__ import annotations

import numpy as np


def roc_points(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) float64, thresholds descending from (0, 0), as `sklearn.metrics.roc_curve(labels, scores)`.

    Args:
      scores: float [P] similarity per pair; higher means more alike.
      labels: [P] 1 for a genuine pair, 0 for an impostor pair.

    Returns:
      fpr, tpr: float64 [K], the ROC's corners from (0, 0) to (1, 1).
    """
    scores, labels = np.asarray(scores), np.asarray(labels)
    if scores.shape != labels.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must be two vectors of one length")
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    if not np.isfinite(scores).all():
        raise ValueError("scores hold NaN or infinite values: check the features that produced them")
    genuine = labels == 1
    if np.count_nonzero(genuine) + np.count_nonzero(labels == 0) != labels.size:
        raise ValueError(f"labels must be 0 (impostor) or 1 (genuine); got values {np.unique(labels)[:5].tolist()}")
    pos = np.sort(scores[genuine])  # ascending, small
    neg = scores[~genuine]
    neg.sort()  # ascending, large; in place (the mask made a copy)
    if pos.size == 0 or neg.size == 0:
        raise ValueError("verification needs both genuine (1) and impostor (0) pairs")

    # Distinct impostor scores: where each first appears in `neg` gives how many impostors lie at or above it.
    first = np.flatnonzero(np.r_[True, neg[1:] != neg[:-1]])
    values = neg[first]
    fps = (neg.size - first).astype(np.float64)
    tps = (pos.size - np.searchsorted(pos, values, side="left")).astype(np.float64)
    # Genuine-only scores are thresholds too: insert them at their place among the impostor values.
    pos_values = pos[np.r_[True, pos[1:] != pos[:-1]]]
    at = np.searchsorted(values, pos_values, side="left")
    only = (at == values.size) | (values[np.minimum(at, values.size - 1)] != pos_values)
    at, extra = at[only], pos_values[only]
    fps = np.insert(fps, at, neg.size - np.searchsorted(neg, extra, side="left"))
    tps = np.insert(tps, at, pos.size - np.searchsorted(pos, extra, side="left"))
    fps, tps = fps[::-1], tps[::-1]  # thresholds descending, counts rising

    # roc_curve's drop_intermediate: keep the ends and every point where either count bends.
    if fps.size > 2:
        keep = np.r_[True, (np.diff(fps, 2) != 0) | (np.diff(tps, 2) != 0), True]
        fps, tps = fps[keep], tps[keep]
    fps, tps = np.r_[0.0, fps], np.r_[0.0, tps]
    return fps / fps[-1], tps / tps[-1]
