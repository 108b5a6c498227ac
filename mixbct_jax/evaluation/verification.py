"""Pair verification on insightface `.bin` sets (LFW, CFP-FP, AgeDB-30; docs/deviations.md §5 (.bin)).

A `.bin` file is a pickle of `(bins, issame_list)`: 2P encoded images (pairs are rows 2k, 2k+1) and P bools.
Each image is embedded together with its mirror image; the pair feature is the L2-normalised sum of the two
raw embeddings and pairs are compared by squared Euclidean distance with 10-fold threshold selection.

Rows: a row (query, gallery) embeds the first image of every pair with the `gallery` model and the second with
the `query` model, so ('new', 'old') is the cross (backward-compatibility) test and ('new', 'new') the self test.
"""

from __future__ import annotations

import os
import pickle
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np

from mixbct_jax.evaluation.embedding import Embedder, embed_with_flip, image_size_of
from mixbct_jax.progress import Progress

ACCURACY_THRESHOLDS = np.arange(0, 4, 0.01)  # the reference's grid for accuracy
VAL_THRESHOLDS = np.arange(0, 4, 0.001)  # and for VAL@FAR


# ------------------------------------------------------------------------------------------------ loading


def _decode(data: bytes, image_size: int, where: str) -> np.ndarray:
    buf = np.frombuffer(bytes(data), dtype=np.uint8)
    bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"{where}: could not decode the image bytes (expected JPEG or PNG)")
    img = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    h, w = img.shape[:2]
    if (h, w) != (image_size, image_size):
        # Reference: resize so the short side is image_size (mxnet resize_short, bicubic).
        s = image_size / min(h, w)
        nh, nw = max(image_size, round(h * s)), max(image_size, round(w * s))
        img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_CUBIC)
        # The reference cannot stack non-square results; we centre-crop (docs/deviations.md, section 5).
        top, left = (nh - image_size) // 2, (nw - image_size) // 2
        img = img[top : top + image_size, left : left + image_size]
    return img


def load_bin(path: str | os.PathLike, image_size: int = 112, *, num_workers: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Reads an insightface `.bin` pair set.

    Args:
      path: the `.bin` file.
      image_size: output H == W; images of another size are resized so the short side is `image_size`
        (then centre-cropped if not square).
      num_workers: decoding threads.

    Returns:
      images: uint8 [2P,H,W,3] RGB, pairs at rows (2k, 2k+1).
      issame: bool [P].
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        try:
            try:
                obj = pickle.load(f)
            except UnicodeDecodeError:  # a Python 2 pickle: str payloads must stay bytes
                f.seek(0)
                obj = pickle.load(f, encoding="bytes")
        except (
            pickle.UnpicklingError,
            EOFError,
            ValueError,
            TypeError,
            AttributeError,
            ImportError,
            IndexError,
            KeyError,
        ) as err:  # what unpickling non-pickle or truncated bytes raises
            raise ValueError(
                f"{path} is not a .bin pair set (a pickle of (images, issame)): {type(err).__name__}: "
                f"{err}; pass an insightface .bin file such as lfw.bin"
            ) from None
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise ValueError(f"{path}: expected a pickle of (bins, issame_list), got {type(obj).__name__}")
    bins, issame = obj
    issame = np.asarray(issame, dtype=bool).reshape(-1)
    if len(bins) != 2 * len(issame):
        raise ValueError(f"{path}: {len(bins)} images for {len(issame)} pairs; a .bin needs exactly 2 images per pair")

    images = np.empty((len(bins), image_size, image_size, 3), dtype=np.uint8)

    def work(i: int) -> None:
        images[i] = _decode(bins[i], image_size, f"{path} image {i}")

    with Progress(len(bins), f"decode {os.path.basename(path)}", unit="img") as bar:
        # cv2 releases the GIL while decoding, so threads scale.
        with ThreadPoolExecutor(max_workers=num_workers) as pool:
            for _ in pool.map(work, range(len(bins))):
                bar.update()
    return images, issame


# ------------------------------------------------------------------------------------------------ embedding


def embed_flip_sum(embedder: Embedder, images: np.ndarray, *, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Embeds images with the flip-sum rule of the reference.

    Args:
      embedder: float32 [n,H,W,3] in [-1, 1] -> float32 [n,D].
      images: uint8 [n,H,W,3] RGB.
      batch_size: images per call (the flipped copies double it).

    Returns:
      embeddings: float32 [n,D], row-L2-normalised (original + flipped raw embeddings).
      norms: float32 [n], mean L2 norm of the two raw embeddings of each image (for xnorm).
    """
    n = images.shape[0]
    sums, norms = [], []
    with Progress(n, "embed pairs", unit="img") as bar:
        for start in range(0, n, batch_size):
            orig, flip = embed_with_flip(embedder, images[start : start + batch_size])  # [b,D] each
            sums.append(orig + flip)
            norms.append(0.5 * (np.linalg.norm(orig, axis=1) + np.linalg.norm(flip, axis=1)))
            bar.update(orig.shape[0])
    emb = np.concatenate(sums)
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    return emb, np.concatenate(norms)


# ------------------------------------------------------------------------------------------------ metrics


def kfold_indices(n: int, nfolds: int) -> list[np.ndarray]:
    """Test indices of contiguous folds, as `sklearn.model_selection.KFold(nfolds, shuffle=False)`.

    The first `n % nfolds` folds get one extra element.
    """
    if not 2 <= nfolds <= n:
        raise ValueError(f"nfolds must be in [2, {n}] for {n} pairs, got {nfolds}")
    return np.array_split(np.arange(n), nfolds)


def _accept_counts(dist: np.ndarray, issame: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(true accepts, false accepts) per threshold, accepting a pair iff dist < threshold."""
    tp = np.searchsorted(np.sort(dist[issame]), thresholds, side="left")
    fp = np.searchsorted(np.sort(dist[~issame]), thresholds, side="left")
    return tp, fp


def _threshold_at_far(far: np.ndarray, thresholds: np.ndarray, far_target: float) -> float:
    # Reference: interp1d(far, thr, kind='slinear') if max(far) >= target, else 0. `far` is non-decreasing
    # with long flat runs; the reference's scipy (sorted knots, duplicates allowed) evaluates on the segment
    # that starts at the LAST point with far <= target, which is exactly what np.interp does.
    if far.max() < far_target:
        return 0.0
    return float(np.interp(far_target, far, thresholds))


def evaluate_pairs(
    emb1: np.ndarray,
    emb2: np.ndarray,
    issame: np.ndarray,
    *,
    nfolds: int = 10,
    far_target: float = 1e-3,
) -> dict:
    """10-fold verification accuracy and VAL@FAR, as the insightface/reference `evaluate`.

    Args:
      emb1: float [P,D] features of the first image of each pair (row-L2-normalised).
      emb2: float [P,D] features of the second image.
      issame: bool [P].
      nfolds: contiguous folds (KFold without shuffling).
      far_target: FAR at which VAL is reported.

    Returns:
      dict with `accuracy` (mean over folds), `accuracy_std`, `accuracy_folds`, `best_thresholds` (per fold,
      chosen on the training folds over arange(0, 4, 0.01), first argmax), `val`, `val_std`, `far` (mean test
      FAR at the interpolated thresholds), `num_pairs`.
    """
    emb1 = np.asarray(emb1, dtype=np.float64)
    emb2 = np.asarray(emb2, dtype=np.float64)
    issame = np.asarray(issame, dtype=bool)
    if emb1.shape != emb2.shape or emb1.ndim != 2 or issame.shape != (emb1.shape[0],):
        raise ValueError(f"emb1 {emb1.shape}, emb2 {emb2.shape} and issame {issame.shape} must be [P,D], [P,D], [P]")
    dist = np.sum((emb1 - emb2) ** 2, axis=1)  # [P]
    p = dist.shape[0]
    acc, best_thr, val, far = [], [], [], []
    folds = kfold_indices(p, nfolds)
    single = single_kind_folds(issame, nfolds)
    if single:
        warnings.warn(
            f"{len(single)} of {nfolds} verification folds hold only one kind of pair (folds "
            f"{single}): the pairs are ordered by kind, so accuracy is meaningless; interleave matched "
            f"and mismatched pairs (LFW's own pairs.txt holds 10 sets of 300 matched + 300 mismatched)",
            stacklevel=2,
        )
    for test in folds:
        train = np.ones(p, dtype=bool)
        train[test] = False
        d_tr, s_tr, d_te, s_te = dist[train], issame[train], dist[test], issame[test]

        tp, fp = _accept_counts(d_tr, s_tr, ACCURACY_THRESHOLDS)
        acc_train = (tp + (np.count_nonzero(~s_tr) - fp)) / d_tr.size
        thr = ACCURACY_THRESHOLDS[np.argmax(acc_train)]
        pred = d_te < thr
        acc.append(np.count_nonzero(pred == s_te) / d_te.size)
        best_thr.append(float(thr))

        n_same_tr, n_diff_tr = np.count_nonzero(s_tr), np.count_nonzero(~s_tr)
        n_same_te, n_diff_te = np.count_nonzero(s_te), np.count_nonzero(~s_te)
        if min(n_same_tr, n_diff_tr, n_same_te, n_diff_te) == 0:
            # The reference divides by zero here; a fold without both kinds of pairs has no VAL/FAR.
            val.append(np.nan)
            far.append(np.nan)
            continue
        _, fp = _accept_counts(d_tr, s_tr, VAL_THRESHOLDS)
        thr = _threshold_at_far(fp / n_diff_tr, VAL_THRESHOLDS, far_target)
        pred = d_te < thr
        val.append(np.count_nonzero(pred & s_te) / n_same_te)
        far.append(np.count_nonzero(pred & ~s_te) / n_diff_te)

    acc, val, far = np.asarray(acc), np.asarray(val), np.asarray(far)
    return {
        "accuracy": float(acc.mean()),
        "accuracy_std": float(acc.std()),
        "accuracy_folds": acc.tolist(),
        "best_thresholds": best_thr,
        "val": float(val.mean()),
        "val_std": float(val.std()),
        "far": float(far.mean()),
        "far_target": far_target,
        "num_pairs": int(p),
        "single_kind_folds": len(single),
    }


def single_kind_folds(issame: np.ndarray, nfolds: int = 10) -> list[int]:
    """Indices of the contiguous folds whose pairs are all matched or all mismatched.

    Threshold selection on such a fold's complement and accuracy on the fold itself measure nothing: a .bin whose
    pairs are ordered all-matched then all-mismatched gives accuracy 0 on every fold.
    """
    issame = np.asarray(issame, dtype=bool)
    return [
        k for k, test in enumerate(kfold_indices(issame.size, nfolds)) if issame[test].all() or not issame[test].any()
    ]


# ------------------------------------------------------------------------------------------------ protocol


def evaluate_bin(
    images: np.ndarray,
    issame: np.ndarray,
    embedders: Mapping[str, Embedder],
    rows: Sequence[tuple[str, str]],
    *,
    batch_size: int = 64,
    nfolds: int = 10,
) -> dict[str, dict]:
    """Evaluates a loaded `.bin` set for each (query, gallery) row.

    Every model named in `rows` embeds all images once; a row then takes the first image of each pair from
    the gallery model and the second from the query model.

    Args:
      images: uint8 [2P,H,W,3] RGB from `load_bin`.
      issame: bool [P].
      embedders: model name -> embedder.
      rows: (query model, gallery model) pairs, e.g. [('old','old'), ('new','new'), ('new','old')].
      batch_size: images per embedder call.
      nfolds: folds for `evaluate_pairs`.

    Returns:
      {'query/gallery': evaluate_pairs(...) dict plus `xnorm`}.
    """
    feats: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name in dict.fromkeys(m for row in rows for m in row):
        if name not in embedders:
            raise KeyError(f"row uses model {name!r} but embedders has only {sorted(embedders)}")
        size = image_size_of(embedders[name])
        if images.shape[1:3] != (size, size):
            raise ValueError(
                f"model {name!r} expects {size}x{size} images but the pair set was loaded at "
                f"{images.shape[1]}x{images.shape[2]}; load it with load_bin(path, image_size={size})"
            )
        feats[name] = embed_flip_sum(embedders[name], images, batch_size=batch_size)
    results = {}
    for query, gallery in rows:
        (e_gal, n_gal), (e_q, n_q) = feats[gallery], feats[query]
        res = evaluate_pairs(e_gal[0::2], e_q[1::2], issame, nfolds=nfolds)
        res["xnorm"] = float(np.concatenate([n_gal[0::2], n_q[1::2]]).mean())
        results[f"{query}/{gallery}"] = res
    return results
