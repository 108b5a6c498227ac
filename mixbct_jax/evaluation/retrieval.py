"""Query/gallery retrieval on any labelled embeddings: top-k accuracy and mAP, self and cross.

Similarity is cosine. A query's relevant gallery items are those with its label; queries whose label has no
gallery item are excluded (they have no answer). Ties between scores are resolved against the query: an item
tied with a relevant one counts as ranked before it, which makes average precision identical to
`sklearn.metrics.average_precision_score` on the query's gallery scores.

Rows: a row (query, gallery) embeds queries with the `query` model and the gallery with the `gallery` model;
('new', 'old') is the backward-compatibility (cross) test.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Protocol

import cv2
import numpy as np

from mixbct_jax.evaluation.embedding import Embedder, embed, image_size_of
from mixbct_jax.progress import Progress

TOPK = (1, 5)


class LabelledImages(Protocol):
    """What `mixbct_jax.data.sources.open_source` returns (only the parts used here)."""

    labels: np.ndarray  # int32 [N]

    def __len__(self) -> int: ...

    def read(self, indices: np.ndarray) -> np.ndarray: ...  # uint8 [n,H,W,3] RGB


def split_query_gallery(labels: np.ndarray, *, gallery_fraction: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic per-class split into gallery and queries.

    The first ceil(fraction * n_c) images of class c (in index order) form the gallery and the remaining ones are
    queries.

    Every class therefore has at least one gallery image; a class with one image contributes only a gallery
    item (a distractor for the other queries) and no query.

    Args:
      labels: int [N].
      gallery_fraction: in (0, 1).

    Returns:
      (query indices, gallery indices), each sorted int64.
    """
    if not 0.0 < gallery_fraction < 1.0:
        raise ValueError(f"gallery_fraction must be in (0, 1), got {gallery_fraction}")
    labels = np.asarray(labels)
    order = np.argsort(labels, kind="stable")  # groups classes, index order within a class
    sorted_labels = labels[order]
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    counts = np.diff(np.r_[starts, labels.size])
    n_gallery = np.ceil(gallery_fraction * counts).astype(np.int64)
    pos_in_class = np.arange(labels.size) - np.repeat(starts, counts)
    is_gallery = pos_in_class < np.repeat(n_gallery, counts)
    return np.sort(order[~is_gallery]), np.sort(order[is_gallery])


def _row_keys(values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """uint64 keys that sort like (row, value) for float32 values.

    One global `searchsorted` can then answer per-row queries for many rows at once (exact, unlike adding a float
    offset per row).

    `rows` broadcasts against `values`.
    """
    bits = (values.astype(np.float32) + np.float32(0.0)).view(np.uint32)  # +0.0 turns -0.0 into 0.0
    # IEEE floats order like sign-magnitude integers: flip all bits of negatives, set the sign bit of others.
    negative = (bits >> np.uint32(31)).astype(bool)
    ordered = np.where(negative, ~bits, bits | np.uint32(0x80000000)).astype(np.uint64)
    return (np.asarray(rows).astype(np.uint64) << np.uint64(32)) | ordered


def retrieval_metrics(
    query: np.ndarray,
    query_labels: np.ndarray,
    gallery: np.ndarray,
    gallery_labels: np.ndarray,
    *,
    topk: Sequence[int] = TOPK,
    memory_mb: int = 512,
    desc: str = "retrieval",
) -> dict:
    """Top-k accuracy and mAP of cosine retrieval, computed in query chunks of bounded memory.

    Args:
      query: float [Q,D] embeddings (normalised here).
      query_labels: int [Q].
      gallery: float [G,D] embeddings (normalised here).
      gallery_labels: int [G].
      topk: k values for top-k accuracy (a hit: fewer than k non-relevant items score >= the best relevant).
      memory_mb: rough budget for the per-chunk [chunk, G] work arrays.
      desc: the label of the progress lines (``progress.Progress``).

    Returns:
      dict with `top{k}`, `mAP` (mean over kept queries of average precision), `num_queries` (kept),
      `num_excluded` (queries whose label is absent from the gallery), `num_gallery`.
    """
    query_labels = np.asarray(query_labels)
    gallery_labels = np.asarray(gallery_labels)
    if query.shape[0] != query_labels.shape[0] or gallery.shape[0] != gallery_labels.shape[0]:
        raise ValueError(
            f"query {query.shape} / labels {query_labels.shape} or gallery {gallery.shape} / labels "
            f"{gallery_labels.shape} disagree in length"
        )
    keep = np.isin(query_labels, gallery_labels)
    q = np.asarray(query, dtype=np.float32)[keep]
    q_labels = query_labels[keep]
    g = np.asarray(gallery, dtype=np.float32)
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    g = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
    n_q, n_g = q.shape[0], g.shape[0]

    # ~32 bytes per [chunk, G] entry: scores, sorted scores, uint64 keys, masks and temporaries.
    chunk = max(1, min(n_q, (memory_mb << 20) // max(32 * n_g, 1)))
    ap = np.empty(n_q, dtype=np.float64)
    best_rank = np.empty(n_q, dtype=np.int64)
    with Progress(n_q, desc, unit="query") as bar:
        for s in range(0, n_q, chunk):
            e = min(s + chunk, n_q)
            sim = q[s:e] @ g.T  # [c,G]
            relevant = q_labels[s:e, None] == gallery_labels[None, :]  # [c,G]
            rel_rows, rel_cols = np.nonzero(relevant)  # row-major: grouped by query
            rel_scores = sim[rel_rows, rel_cols]
            n_rel = np.count_nonzero(relevant, axis=1)  # [c] > 0 for kept queries
            # Precision at relevant item j = #relevant scoring >= s_j / #all scoring >= s_j.
            keys = _row_keys(rel_scores, rel_rows)  # [R] grouped by row
            all_keys = _row_keys(np.sort(sim, axis=1), np.arange(e - s)[:, None]).ravel()  # sorted
            all_ge = (rel_rows + 1) * n_g - np.searchsorted(all_keys, keys, side="left")
            rel_end = np.cumsum(n_rel)[rel_rows]  # end of each row's block in the sorted relevant keys
            rel_ge = rel_end - np.searchsorted(np.sort(keys), keys, side="left")
            ap[s:e] = np.bincount(rel_rows, weights=rel_ge / all_ge, minlength=e - s) / n_rel
            # Rank of the best relevant item among the non-relevant ones.
            best = np.where(relevant, sim, -np.inf).max(axis=1)  # [c]
            best_rank[s:e] = np.count_nonzero((sim >= best[:, None]) & ~relevant, axis=1)
            bar.update(e - s)

    out = {f"top{k}": float(np.mean(best_rank < k)) if n_q else math.nan for k in topk}
    out.update(
        mAP=float(ap.mean()) if n_q else math.nan,
        num_queries=int(n_q),
        num_excluded=int(np.count_nonzero(~keep)),
        num_gallery=int(n_g),
    )
    return out


def embed_source(
    source: LabelledImages,
    embedder: Embedder,
    indices: np.ndarray | None = None,
    *,
    batch_size: int = 256,
    desc: str = "embed",
) -> np.ndarray:
    """Embeds images of a source, scaled (x/255 - 0.5)/0.5 and resized to the embedder's image_size.

    Returns:
      float32 [n,D] raw embeddings in the order of `indices` (default: all).
    """
    indices = np.arange(len(source)) if indices is None else np.asarray(indices)
    size = image_size_of(embedder)
    parts = []
    with Progress(indices.size, desc, unit="img") as bar:
        for s in range(0, indices.size, batch_size):
            images = np.asarray(source.read(indices[s : s + batch_size]))
            if images.ndim != 4 or images.shape[-1] != 3:
                raise ValueError(f"source.read returned shape {images.shape}; expected uint8 [n,H,W,3] RGB")
            if images.shape[1:3] != (size, size):
                images = np.stack([cv2.resize(im, (size, size), interpolation=cv2.INTER_LINEAR) for im in images])
            parts.append(embed(embedder, images, scale="clean"))
            bar.update(images.shape[0])
    return np.concatenate(parts)


def evaluate_retrieval(
    source: LabelledImages,
    embedders: Mapping[str, Embedder],
    rows: Sequence[tuple[str, str]],
    *,
    gallery_fraction: float = 0.5,
    batch_size: int = 256,
    topk: Sequence[int] = TOPK,
) -> dict[str, dict]:
    """Splits a labelled source into query/gallery and evaluates each (query, gallery) row.

    Each model embeds every image once; rows then pick query rows from the query model and gallery rows from
    the gallery model.

    Returns:
      {'query/gallery': retrieval_metrics dict}.
    """
    labels = np.asarray(source.labels)
    if labels.shape != (len(source),):
        raise ValueError(f"source.labels has shape {labels.shape}; expected [{len(source)}]")
    q_idx, g_idx = split_query_gallery(labels, gallery_fraction=gallery_fraction)
    models = list(dict.fromkeys(m for row in rows for m in row))
    missing = [m for m in models if m not in embedders]
    if missing:
        raise KeyError(f"rows use models {missing} but embedders has only {sorted(embedders)}")
    feats = {m: embed_source(source, embedders[m], batch_size=batch_size, desc=f"embed {m}") for m in models}
    return {
        f"{query}/{gallery}": retrieval_metrics(
            feats[query][q_idx],
            labels[q_idx],
            feats[gallery][g_idx],
            labels[g_idx],
            topk=topk,
            desc=f"retrieval {query}/{gallery}",
        )
        for query, gallery in rows
    }
