"""Statistics of the stored old embeddings: credible mask, class means and AdvBCT class meta (docs/methods.md).

Each is a plain NumPy function over a (possibly memory-mapped) ``[N, D]`` feature array; ``mixbct_jax.prepare``
is their command line::

    python -m mixbct_jax.prepare denoise     --features F.npy --labels L.npy --keep 0.9 --out credible.npy
    python -m mixbct_jax.prepare class-means --features F.npy --labels L.npy --out prototypes.npy
    python -m mixbct_jax.prepare advbct-meta --features F.npy --labels L.npy --out meta.npz

The functions stream the features in row chunks (a float64 buffer of ``chunk_rows`` rows), so a
5,000,000 x 512 float16 file is processed without a full float32/float64 copy; per-class work is
vectorised (sparse one-hot sums, one lexsort), never a Python loop over classes or rows.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
import warnings
from collections.abc import Callable, Iterator

import numpy as np
import scipy.sparse

from mixbct_jax.progress import Progress

# Row- and column-normalisation guard, as the reference's "row-L2-normalise": x / max(||x||, 1e-12).
_EPS = 1e-12
# 2048 x 512 float64 = 8 MiB per buffer: the several operations on a chunk find it in the CPU cache (16384 rows,
# 64 MiB, made each one a trip to memory; the results do not depend on it).
DEFAULT_CHUNK_ROWS = 2048


# ------------------------------------------------------------------------------------------------
# Progress reporting.
# ------------------------------------------------------------------------------------------------
def _chunks(num_rows: int, chunk_rows: int, label: str, verbose: bool) -> Iterator[tuple[int, int]]:
    with Progress(num_rows, label, unit="rows", enabled=verbose) as progress:
        for start in range(0, num_rows, chunk_rows):
            stop = min(start + chunk_rows, num_rows)
            yield start, stop
            progress.update(stop - start)


def default_threads() -> int:
    """Worker threads of the streaming passes: the cores this process may use, at most 4.

    Beyond 4 the passes wait on memory.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cpus))


def _map_chunks(
    num_rows: int,
    chunk_rows: int,
    label: str,
    verbose: bool,
    threads: int | None,
    work: Callable[[int, int, dict], object],
) -> Iterator[tuple[int, int, object]]:
    """``(start, stop, work(start, stop, scratch))`` for each row chunk, in chunk order.

    The chunks run on up to ``threads`` threads (NumPy releases the GIL in the arithmetic); each thread has its
    own ``scratch`` dict for reusable buffers. Results come back in chunk order and the caller reduces them in
    that order, so every sum is the same, bit for bit, whatever the thread count.
    """
    threads = default_threads() if threads is None else max(1, int(threads))
    local = threading.local()

    def run(start: int, stop: int) -> object:
        if not hasattr(local, "scratch"):
            local.scratch = {}
        return work(start, stop, local.scratch)

    ranges = _chunks(num_rows, chunk_rows, label, verbose)
    if threads == 1:
        for start, stop in ranges:
            yield start, stop, run(start, stop)
        return
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        pending: list = []
        for start, stop in ranges:  # the progress bar advances as chunks are submitted, 2 per thread ahead
            pending.append((start, stop, pool.submit(run, start, stop)))
            if len(pending) > 2 * threads:
                a, b, future = pending.pop(0)
                yield a, b, future.result()
        for a, b, future in pending:
            yield a, b, future.result()


def _buffer(scratch: dict, name: str, rows: int, dim: int) -> np.ndarray:
    if name not in scratch or scratch[name].shape[0] < rows:
        scratch[name] = np.empty((rows, dim), np.float64)
    return scratch[name]


# ------------------------------------------------------------------------------------------------
# Input checks.
# ------------------------------------------------------------------------------------------------
def _check_inputs(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Checks shapes/dtypes and returns the labels as an in-memory int64 array [N]."""
    if features.ndim != 2 or not np.issubdtype(features.dtype, np.floating):
        raise ValueError(
            f"features must be a 2-D float array [N, D]; got shape {features.shape} dtype {features.dtype}"
        )
    if features.shape[0] == 0:
        raise ValueError("features has no rows; extract the old embeddings first")
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array [N]; got shape {labels.shape} dtype {labels.dtype}")
    if labels.shape[0] != features.shape[0]:
        raise ValueError(
            f"features has {features.shape[0]} rows but labels has {labels.shape[0]} entries; both must "
            "come from the same `python -m mixbct_jax.extract` run"
        )
    return np.array(labels, dtype=np.int64)  # in memory (40 MB at 5M rows), not a memory map


def _check_class_labels(labels: np.ndarray, num_classes: int | None) -> int:
    """Checks that labels are class ids in [0, num_classes) and returns num_classes."""
    low, high = int(labels.min()), int(labels.max())
    if low < 0:
        raise ValueError(f"labels must be class ids >= 0; found {low} at row {int(np.argmin(labels))}")
    if num_classes is None:
        return high + 1
    if high >= num_classes:
        raise ValueError(
            f"label {high} at row {int(np.argmax(labels))} is >= num_classes={num_classes}; "
            "pass the training set's class count"
        )
    return num_classes


def _run_ids(labels: np.ndarray) -> np.ndarray:
    """Class id per row = index of its maximal run of equal consecutive labels (docs/methods.md (MixBCT) step 3).

    Raises:
      ValueError: a label value occurs in two separate runs (the reference would silently treat
        them as two classes).
    """
    change = labels[1:] != labels[:-1]  # [N-1]
    run_ids = np.concatenate([[0], np.cumsum(change)])  # [N]
    starts = np.concatenate([[0], np.flatnonzero(change) + 1])  # [R]
    run_labels = labels[starts]
    order = np.argsort(run_labels, kind="stable")
    repeated = np.flatnonzero(run_labels[order][1:] == run_labels[order][:-1])
    if repeated.size:
        second = int(order[1:][repeated].min())  # the earliest run that repeats an earlier label
        label = run_labels[second]
        first = int(np.flatnonzero(run_labels[:second] == label)[0])
        raise ValueError(
            f"label {label} appears in two separate runs of rows (starting at rows {int(starts[first])} "
            f"and {int(starts[second])}); the reference denoiser takes each run of equal consecutive "
            "labels as one class, so rows of a class must be contiguous. Pass --group_by_label "
            "(group_by_label=True) to group rows by label value instead."
        )
    return run_ids


# ------------------------------------------------------------------------------------------------
# Streaming passes over the features.
# ------------------------------------------------------------------------------------------------
def _load_chunk(
    features: np.ndarray,
    start: int,
    stop: int,
    buffer: np.ndarray,
    row_div: np.ndarray | None,
    col_div: np.ndarray | None,
) -> np.ndarray:
    """Rows [start, stop) as float64, divided by row_div[rows] and col_div (when given)."""
    chunk = buffer[: stop - start]  # [m, D]
    chunk[...] = features[start:stop]
    if row_div is not None:
        chunk /= row_div[start:stop, None]
    if col_div is not None:
        chunk /= col_div[None, :]
    return chunk


def _row_norms(
    features: np.ndarray,
    *,
    with_col_sumsq: bool,
    chunk_rows: int,
    verbose: bool,
    label: str,
    class_ids: np.ndarray | None = None,
    num_classes: int = 0,
    threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """One pass: row divisors max(||x||, eps) [N] and, optionally, column and per-class sums.

    The optional sums are column sums of squares [D] and per-class sums [C, D] (``class_ids`` given) of the
    row-normalised features (float64).

    The class sums ride along on this pass instead of a pass of their own: the features are read and converted
    once less, which is most of the cost of the tools at scale.
    """
    num_rows, dim = features.shape
    row_div = np.empty(num_rows, np.float64)
    col_sumsq = np.zeros(dim, np.float64) if with_col_sumsq else None
    sums = np.zeros((num_classes, dim), np.float64) if class_ids is not None else None

    def work(start: int, stop: int, scratch: dict):
        buffer = _buffer(scratch, "chunk", min(chunk_rows, num_rows), dim)
        chunk = _load_chunk(features, start, stop, buffer, None, None)
        norms = np.sqrt(np.einsum("ij,ij->i", chunk, chunk))  # [m]
        if not np.all(np.isfinite(norms)):
            return start + int(np.flatnonzero(~np.isfinite(norms))[0])  # the first bad row
        row_div[start:stop] = np.maximum(norms, _EPS)  # each chunk writes its own rows
        col_part = class_part = None
        if col_sumsq is not None or sums is not None:
            chunk /= row_div[start:stop, None]
        if col_sumsq is not None:
            col_part = np.einsum("ij,ij->j", chunk, chunk)
        if sums is not None:
            present, local = np.unique(class_ids[start:stop], return_inverse=True)
            class_part = present, _segment_sums(chunk, local, present.size)
        return col_part, class_part

    for _, _, result in _map_chunks(num_rows, chunk_rows, label, verbose, threads, work):
        if not isinstance(result, tuple):
            raise ValueError(
                f"features row {result} contains NaN or Inf; the old model produced non-finite "
                "embeddings, fix the model or the extraction before preparing them"
            )
        col_part, class_part = result
        if col_part is not None:
            col_sumsq += col_part
        if class_part is not None:
            sums[class_part[0]] += class_part[1]
    return row_div, col_sumsq, sums


def _segment_sums(values: np.ndarray, segment: np.ndarray, num_segments: int) -> np.ndarray:
    """Sums of values' rows per segment id, as a sparse one-hot product ([S, m] @ [m, D])."""
    counts = np.bincount(segment, minlength=num_segments)
    indptr = np.concatenate([[0], np.cumsum(counts)])
    columns = np.argsort(segment, kind="stable")
    one_hot = scipy.sparse.csr_matrix(
        (np.ones(segment.size, values.dtype), columns, indptr), shape=(num_segments, segment.size)
    )
    return one_hot @ values  # [S, D]


def _class_sums(
    features: np.ndarray,
    class_ids: np.ndarray,
    num_classes: int,
    *,
    row_div: np.ndarray | None,
    col_div: np.ndarray | None,
    chunk_rows: int,
    verbose: bool,
    label: str,
    threads: int | None = None,
) -> np.ndarray:
    """One pass: float64 per-class sums [C, D] of the (optionally row/column-scaled) features."""
    num_rows, dim = features.shape
    sums = np.zeros((num_classes, dim), np.float64)

    def work(start: int, stop: int, scratch: dict):
        buffer = _buffer(scratch, "chunk", min(chunk_rows, num_rows), dim)
        chunk = _load_chunk(features, start, stop, buffer, row_div, col_div)
        present, local = np.unique(class_ids[start:stop], return_inverse=True)
        return present, _segment_sums(chunk, local, present.size)

    for _, _, (present, part) in _map_chunks(num_rows, chunk_rows, label, verbose, threads, work):
        sums[present] += part
    return sums


def _distances(
    features: np.ndarray,
    class_ids: np.ndarray,
    centres: np.ndarray,
    *,
    row_div: np.ndarray | None,
    col_div: np.ndarray | None,
    chunk_rows: int,
    verbose: bool,
    label: str,
    threads: int | None = None,
) -> np.ndarray:
    """One pass: float64 Euclidean distance of each (scaled) row to its class centre [N]."""
    num_rows, dim = features.shape
    distances = np.empty(num_rows, np.float64)

    def work(start: int, stop: int, scratch: dict) -> None:
        rows = min(chunk_rows, num_rows)
        chunk = _load_chunk(features, start, stop, _buffer(scratch, "chunk", rows, dim), row_div, col_div)
        # Reused for the gathered centres: a fresh array per chunk costs more in page faults than the arithmetic.
        # mode="clip" (ids are valid) because mode="raise" buffers `out`, which is what we avoid.
        gathered = _buffer(scratch, "gathered", rows, dim)[: stop - start]
        chunk -= np.take(centres, class_ids[start:stop], axis=0, out=gathered, mode="clip")
        distances[start:stop] = np.sqrt(np.einsum("ij,ij->i", chunk, chunk))  # each chunk writes its own rows

    for _ in _map_chunks(num_rows, chunk_rows, label, verbose, threads, work):
        pass
    return distances


# ------------------------------------------------------------------------------------------------
# The tools.
# ------------------------------------------------------------------------------------------------
def denoise(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    keep: float = 0.9,
    group_by_label: bool = False,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    verbose: bool = False,
    threads: int | None = None,
) -> np.ndarray:
    """MixBCT's credible mask: the ``ceil(keep * n)`` rows of each class nearest its mean (docs/methods.md (MixBCT)).

    The features are row-L2-normalised, then each column is divided by its L2 norm over all N rows
    (zero columns unchanged). A class is a maximal run of equal consecutive labels in file order (or,
    with ``group_by_label``, all rows sharing a label). Per class, rows are ranked by the float64
    Euclidean distance to the class mean (not renormalised) and the ``ceil(keep * n)`` nearest are
    kept (``keep * n`` in float64, as the reference: n=1 keeps 1, n=10 keeps 9, n=11 keeps 10).

    Tie rule: rows at equal distance are ranked in file order, so the earlier row is kept (the
    reference's unstable argsort leaves this unspecified).

    Args:
      features: [N, D] float array, typically a read-only memory map of the old embeddings.
      labels: [N] integer labels in the same row order.
      keep: fraction T in [0, 1] of each class to keep.
      group_by_label: group rows by label value instead of by runs of consecutive equal labels.
      chunk_rows: rows per streaming chunk (two passes over the features are made).
      verbose: print per-pass progress with an ETA to stderr.
      threads: threads that process chunks at once (None: :func:`default_threads`); the result does not
        depend on it.

    Returns:
      [N] bool mask, True for credible rows.

    Raises:
      ValueError: bad shapes/dtypes, keep outside [0, 1], a non-finite row, or (without
        ``group_by_label``) a label that occurs in two separate runs.
    """
    labels = _check_inputs(features, labels)
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"keep must lie in [0, 1]; got {keep}")
    if group_by_label:
        _, class_ids = np.unique(labels, return_inverse=True)
        class_ids = class_ids.reshape(-1)
    else:
        class_ids = _run_ids(labels)
    num_classes = int(class_ids.max()) + 1
    counts = np.bincount(class_ids, minlength=num_classes)  # [C], all >= 1
    common = dict(chunk_rows=chunk_rows, verbose=verbose, threads=threads)

    row_div, col_sumsq, sums = _row_norms(
        features,
        with_col_sumsq=True,
        class_ids=class_ids,
        num_classes=num_classes,
        label="denoise pass 1/2 (norms, class sums)",
        **common,
    )
    # Column norms over ALL rows, as sklearn's normalize(axis=0): zero columns are left unchanged.
    col_div = np.sqrt(col_sumsq)
    col_div[col_div == 0.0] = 1.0
    scale = dict(row_div=row_div, col_div=col_div)
    # The class means of the column-scaled rows: the column scale is one constant per column, so it divides the
    # sums of the row-normalised rows (equal up to float64 rounding to summing the scaled rows; no extra pass).
    means = sums / col_div[None, :] / counts[:, None]  # [C, D]
    del sums
    distances = _distances(features, class_ids, means, label="denoise pass 2/2 (distances)", **scale, **common)
    del means

    # Rank within each class by (distance, row index): lexsort is stable, which gives the tie rule.
    order = np.lexsort((distances, class_ids))  # [N]
    starts = np.cumsum(counts) - counts  # [C] first sorted position of each class
    sorted_ids = class_ids[order]
    rank = np.arange(order.size) - starts[sorted_ids]
    num_keep = np.ceil(np.float64(keep) * counts.astype(np.float64)).astype(np.int64)  # [C]
    mask = np.empty(order.size, bool)
    mask[order] = rank < num_keep[sorted_ids]
    return mask


def class_means(
    features: np.ndarray,
    labels: np.ndarray,
    num_classes: int | None = None,
    *,
    normalize: bool = True,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    verbose: bool = False,
    threads: int | None = None,
) -> np.ndarray:
    """Per-class mean of the raw old features, row-L2-normalised (docs/methods.md (BCT); BCT/UniBCT prototypes).

    Row c is class c. A class without any example gets a zero row and a warning. (The reference
    divides its last class by n-1; the normalisation makes that irrelevant, so plain means are used.)

    Args:
      features: [N, D] float array (raw, unnormalised old embeddings; may be a memory map).
      labels: [N] integer class ids in [0, num_classes).
      num_classes: C; defaults to max(labels) + 1.
      normalize: row-L2-normalise the means (BCT); False gives the unnormalised means that UniBCT's
        refined prototypes equal (docs/methods.md (UniBCT)).
      chunk_rows: rows per streaming chunk.
      verbose: print progress with an ETA to stderr.
      threads: threads that process chunks at once (None: :func:`default_threads`).

    Returns:
      [C, D] float32 class means.
    """
    labels = _check_inputs(features, labels)
    num_classes = _check_class_labels(labels, num_classes)
    counts = np.bincount(labels, minlength=num_classes)
    sums = _class_sums(
        features,
        labels,
        num_classes,
        row_div=None,
        col_div=None,
        chunk_rows=chunk_rows,
        verbose=verbose,
        label="class-means",
        threads=threads,
    )
    means = sums / np.maximum(counts, 1)[:, None]  # [C, D]
    if normalize:
        means /= np.maximum(np.linalg.norm(means, axis=1, keepdims=True), _EPS)
    _warn_missing(counts)
    return means.astype(np.float32)


def advbct_meta(
    features: np.ndarray,
    labels: np.ndarray,
    num_classes: int | None = None,
    *,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    verbose: bool = False,
    threads: int | None = None,
) -> dict[str, np.ndarray]:
    """AdvBCT's per-class centre and IQR-filtered radius (docs/methods.md (AdvBCT) "offline meta").

    Features are row-L2-normalised; a class centre is the mean of its normalised rows (not
    renormalised); radii are distances to the centre. For a class of n >= 4 rows with sorted radii r,
    ``q1 = r[n // 4]``, ``q3 = r[3n // 4]`` and the radii within ``[q1 - 1.5 IQR, q3 + 1.5 IQR]``
    (bounds inclusive) are kept; if none is kept (or n < 4) all are kept.

    Args:
      features: [N, D] float array of old embeddings (may be a memory map).
      labels: [N] integer class ids in [0, num_classes).
      num_classes: C; defaults to max(labels) + 1.
      chunk_rows: rows per streaming chunk.
      verbose: print progress with an ETA to stderr.
      threads: threads that process chunks at once (None: :func:`default_threads`).

    Returns:
      ``centers`` float32 [C, D], ``radius_max`` float32 [C] (largest kept radius) and ``num_kept``
      int32 [C] (length of the kept radius list; the loss uses a class only when it is > 1). A class
      without examples has a zero centre, radius_max 0 and num_kept 0 (the reference's meta would
      not list it).
    """
    labels = _check_inputs(features, labels)
    num_classes = _check_class_labels(labels, num_classes)
    counts = np.bincount(labels, minlength=num_classes)  # [C]
    common = dict(chunk_rows=chunk_rows, verbose=verbose, threads=threads)
    row_div, _, sums = _row_norms(
        features,
        with_col_sumsq=False,
        class_ids=labels,
        num_classes=num_classes,
        label="advbct-meta pass 1/2 (norms, centres)",
        **common,
    )
    scale = dict(row_div=row_div, col_div=None)
    centers = sums / np.maximum(counts, 1)[:, None]  # [C, D]
    del sums
    radii = _distances(features, labels, centers, label="advbct-meta pass 2/2 (radii)", **scale, **common)

    order = np.lexsort((radii, labels))
    sorted_radii, sorted_ids = radii[order], labels[order]  # [N], grouped by class, ascending radius
    starts = np.cumsum(counts) - counts
    large = counts >= 4
    q1 = np.where(large, sorted_radii[np.where(large, starts + counts // 4, 0)], 0.0)
    q3 = np.where(large, sorted_radii[np.where(large, starts + (3 * counts) // 4, 0)], 0.0)
    iqr = q3 - q1
    low = np.where(large, q1 - 1.5 * iqr, -np.inf)  # [C]
    high = np.where(large, q3 + 1.5 * iqr, np.inf)
    kept = (sorted_radii >= low[sorted_ids]) & (sorted_radii <= high[sorted_ids])
    nothing_kept = np.bincount(sorted_ids[kept], minlength=num_classes) == 0
    kept |= nothing_kept[sorted_ids]
    num_kept = np.bincount(sorted_ids[kept], minlength=num_classes)

    # Radii ascend within a class, so the largest kept radius is the class's last kept entry.
    kept_ids, kept_radii = sorted_ids[kept], sorted_radii[kept]
    last = np.flatnonzero(np.append(kept_ids[1:] != kept_ids[:-1], True))
    radius_max = np.zeros(num_classes, np.float64)
    radius_max[kept_ids[last]] = kept_radii[last]
    _warn_missing(counts)
    return {
        "centers": centers.astype(np.float32),
        "radius_max": radius_max.astype(np.float32),
        "num_kept": num_kept.astype(np.int32),
    }


def _warn_missing(counts: np.ndarray) -> None:
    missing = np.flatnonzero(counts == 0)
    if missing.size:
        warnings.warn(
            f"{missing.size} of {counts.size} classes have no example (first ids: "
            f"{missing[:10].tolist()}); their rows are zero",
            stacklevel=3,
        )
