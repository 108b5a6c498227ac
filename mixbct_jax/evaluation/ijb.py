"""IJB-B / IJB-C template-based 1:1 verification and 1:N identification (docs/deviations.md §5 (IJB-C)).

Data layout (the insightface IJB release), for subset IJBC (IJBB: `ijbb_` prefix, `IJBB/`, galleries S1/S2):
```
<root>/IJBC/meta/ijbc_face_tid_mid.txt        img_name template_id media_id
<root>/IJBC/meta/ijbc_name_5pts_score.txt     img_name x1 y1 ... x5 y5 det_score
<root>/IJBC/meta/ijbc_template_pair_label.txt t1 t2 label
<root>/IJBC/meta/ijbc_1N_gallery_G1.csv       header; TEMPLATE_ID,SUBJECT_ID,... (one row per image)
<root>/IJBC/meta/ijbc_1N_gallery_G2.csv
<root>/IJBC/meta/ijbc_1N_probe_mixed.csv
<root>/IJBC/loose_crop/<img_name>
```
Pipeline: align each image to 112x112 with a similarity transform of its 5 landmarks; image feature =
(emb + emb_of_mirror) * detector score; media feature = mean of its images; template feature = L2-normalised
sum of its media features; cosine scores between templates.

Rows: a row (query, gallery) embeds the p1 column of the pair list and the 1:N galleries with the `gallery`
model and the p2 column and the 1:N probes with the `query` model; ('new', 'old') is the cross test.
"""

from __future__ import annotations

import collections
import csv
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
from sklearn.metrics import auc

from mixbct_jax.evaluation.embedding import Embedder, Scale, embed_with_flip, image_size_of
from mixbct_jax.evaluation.roc import roc_points
from mixbct_jax.progress import Progress

# Landmark template of the standard 112x112 ArcFace crop: eyes, nose tip, mouth corners (x, y).
REFERENCE_LANDMARKS = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.729904, 92.2041],
    ],
    dtype=np.float64,
)

FARS_1TO1 = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
# The reference's FPIR grid, built exactly as it does: its float values (e.g. 10**-2.999999999999999) decide
# int(n*far) at the boundaries, so they are kept bit for bit. Reported at indices 0, 25, 50, 75, 100.
FPIR_GRID = tuple(10**x for x in np.arange(-4, 0, 0.04)) + (1.0,)
FPIRS_1TON = tuple(FPIR_GRID[i] for i in (0, 25, 50, 75, 100))
TOPK = (1, 5, 10)

FarIndex = Literal["reference", "ceil"]

_GALLERIES = {"IJBC": ("G1", "G2"), "IJBB": ("S1", "S2")}


def far_label(far: float) -> str:
    """'1e-04' style key for a FAR/FPIR value (the reference grid's 1.0000000000000002e-03 -> '1e-03')."""
    return f"{far:.0e}"


# ------------------------------------------------------------------------------------------------ alignment


def estimate_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform (rotation, uniform scale, translation) mapping src onto dst.

    Umeyama's closed form: with centred point sets, the rotation comes from the SVD of the cross-covariance
    (with a sign flip on the smallest singular direction when that would otherwise be a reflection), and the
    scale is trace(S·d) / var(src). Same result as skimage's `SimilarityTransform.estimate`.

    Args:
      src: [N,2] points (e.g. detected landmarks).
      dst: [N,2] target points (e.g. REFERENCE_LANDMARKS).

    Returns:
      float64 [3,3] homogeneous matrix M with dst ≈ M @ [x, y, 1].

    References:
      Umeyama, "Least-squares estimation of transformation parameters between two point patterns", TPAMI 1991.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or src.shape[0] < 2:
        raise ValueError(f"src {src.shape} and dst {dst.shape} must both be [N>=2, 2]")
    mu_src, mu_dst = src.mean(axis=0), dst.mean(axis=0)
    xs, xd = src - mu_src, dst - mu_dst  # [N,2]
    var_src = np.mean(np.sum(xs**2, axis=1))
    if var_src == 0:
        raise ValueError("degenerate landmarks: all source points coincide")
    cov = xd.T @ xs / src.shape[0]  # [2,2]
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:  # the best orthogonal map would be a reflection
        d[-1] = -1.0
    rot = u @ np.diag(d) @ vt
    scale = float(s @ d) / var_src
    m = np.eye(3)
    m[:2, :2] = scale * rot
    m[:2, 2] = mu_dst - scale * rot @ mu_src
    return m


def align_face(image: np.ndarray, landmarks: np.ndarray, image_size: int = 112) -> np.ndarray:
    """Warps a face so its 5 landmarks land on the standard template (bilinear, border 0).

    For image_size != 112 the template is scaled by image_size/112.

    Args:
      image: uint8 [H,W,C] or [H,W].
      landmarks: [5,2] (x, y) in image pixels.
      image_size: output side.

    Returns:
      uint8 [image_size, image_size, C] (or [.., ..] for a grey input), same channel order as the input.
    """
    m = estimate_similarity(landmarks, REFERENCE_LANDMARKS * (image_size / 112.0))
    return cv2.warpAffine(image, m[:2], (image_size, image_size), flags=cv2.INTER_LINEAR, borderValue=0.0)


def _read_aligned(path: str, landmarks: np.ndarray, sizes: Sequence[int]) -> list[np.ndarray]:
    img = cv2.imread(path, cv2.IMREAD_COLOR)  # BGR, as the reference
    if img is None:
        raise FileNotFoundError(f"{path}: missing or not a decodable image")
    out = []
    for size in sizes:
        face = align_face(img, landmarks, size)
        if face.ndim == 2:  # grey: stack to 3 channels
            face = np.stack([face] * 3, axis=-1)
        out.append(face[:, :, ::-1])  # BGR -> RGB
    return out


def iter_aligned_batches(
    paths: Sequence[str],
    landmarks: np.ndarray,
    *,
    sizes: Sequence[int],
    batch_size: int,
    num_workers: int = 8,
) -> Iterator[tuple[int, list[np.ndarray]]]:
    """Reads and aligns images on a thread pool, yielding batches in order.

    cv2 releases the GIL in imread and warpAffine, so threads scale; at most 2*num_workers batches are in
    flight, which bounds memory.

    Yields:
      (start, [uint8 [b,S,S,3] RGB for each S in sizes]) for consecutive slices [start, start+b).
    """

    def load(start: int) -> list[np.ndarray]:
        stop = min(start + batch_size, len(paths))
        batch = [np.empty((stop - start, s, s, 3), dtype=np.uint8) for s in sizes]
        for i in range(start, stop):
            for arr, face in zip(batch, _read_aligned(paths[i], landmarks[i], sizes)):
                arr[i - start] = face
        return batch

    with ThreadPoolExecutor(max_workers=num_workers) as pool:
        pending: collections.deque = collections.deque()
        starts = iter(range(0, len(paths), batch_size))
        for start in starts:
            pending.append((start, pool.submit(load, start)))
            if len(pending) >= 2 * num_workers:
                break
        while pending:
            start, fut = pending.popleft()
            batch = fut.result()
            nxt = next(starts, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(load, nxt)))
            yield start, batch


# ------------------------------------------------------------------------------------------------ meta


@dataclass(frozen=True)
class IJBMeta:
    """Parsed IJB meta files; arrays are aligned per image (M) or per pair (P)."""

    subset: str
    image_dir: str
    names: np.ndarray  # [M] str
    templates: np.ndarray  # [M] int64
    medias: np.ndarray  # [M] int64
    landmarks: np.ndarray  # [M,5,2] float64
    scores: np.ndarray  # [M] float32 detector scores
    pairs: np.ndarray  # [P,2] int64 template ids (p1, p2)
    labels: np.ndarray  # [P] int64 (1 = same subject)
    galleries: dict  # name -> (template ids [T] sorted unique, subject ids [T])
    probes: tuple | None  # (template ids [T], subject ids [T]) or None


def _subset_dir(root: str, subset: str) -> str:
    nested = os.path.join(root, subset)
    if os.path.isdir(os.path.join(nested, "meta")):
        return nested
    if os.path.isdir(os.path.join(root, "meta")):  # root already is the IJBC/ folder
        return root
    raise FileNotFoundError(
        f"{root}: expected {nested}/meta (the insightface IJB release layout); pass the folder that holds {subset}/"
    )


def _read_rows(path: str, ncols: int) -> list[list[str]]:
    rows = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < ncols:
                raise ValueError(f"{path}:{lineno}: expected {ncols} space-separated fields, got {len(parts)}")
            rows.append(parts[:ncols])
    if not rows:
        raise ValueError(f"{path}: empty file")
    return rows


def _read_pairs(path: str) -> tuple[np.ndarray, np.ndarray]:
    # 15.6M lines in IJB-C: numpy's C text parser, not Python.
    try:
        flat = np.fromfile(path, dtype=np.int64, sep=" ")
    except ValueError as err:
        raise ValueError(f"{path}: expected integer lines 't1 t2 label' ({err})") from None
    if flat.size == 0 or flat.size % 3:
        raise ValueError(f"{path}: expected lines of 3 integers 't1 t2 label', got {flat.size} numbers")
    table = flat.reshape(-1, 3)
    labels = table[:, 2]
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"{path}: the third column (label) must be 0 or 1")
    return table[:, :2].copy(), labels.copy()


def _read_template_csv(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Unique template ids (sorted) and the subject id of each template's first row."""
    tids, sids = [], []
    with open(path, newline="") as f:
        reader = csv.reader(f)
        next(reader, None)  # header
        for lineno, row in enumerate(reader, 2):
            if not row:
                continue
            try:
                tids.append(int(row[0]))
                sids.append(int(row[1]))
            except (ValueError, IndexError):
                raise ValueError(f"{path}:{lineno}: columns 0 and 1 must be TEMPLATE_ID,SUBJECT_ID") from None
    if not tids:
        raise ValueError(f"{path}: no rows after the header")
    uniq, first = np.unique(np.asarray(tids, dtype=np.int64), return_index=True)
    return uniq, np.asarray(sids, dtype=np.int64)[first]


def load_ijb_meta(root: str | os.PathLike, subset: str = "IJBC", *, identification: bool = True) -> IJBMeta:
    """Parses the IJB meta files of `subset` ('IJBC' or 'IJBB') under `root`.

    Args:
      root: folder holding `<subset>/meta` and `<subset>/loose_crop` (or the `<subset>` folder itself).
      subset: 'IJBC' or 'IJBB'.
      identification: also read the 1:N gallery and probe CSVs.
    """
    subset = subset.upper()
    if subset not in _GALLERIES:
        raise ValueError(f"subset must be 'IJBC' or 'IJBB', got {subset!r}")
    base = _subset_dir(os.fspath(root), subset)
    meta = os.path.join(base, "meta")
    p = subset.lower()

    tid_file = os.path.join(meta, f"{p}_face_tid_mid.txt")
    rows = _read_rows(tid_file, 3)
    names = np.asarray([r[0] for r in rows])
    try:
        templates = np.asarray([int(r[1]) for r in rows], dtype=np.int64)
        medias = np.asarray([int(r[2]) for r in rows], dtype=np.int64)
    except ValueError:
        raise ValueError(f"{tid_file}: columns 2 and 3 (template_id, media_id) must be integers") from None

    lmk_file = os.path.join(meta, f"{p}_name_5pts_score.txt")
    rows = _read_rows(lmk_file, 12)
    lmk_names = np.asarray([r[0] for r in rows])
    try:
        values = np.asarray([r[1:12] for r in rows], dtype=np.float64)  # [M,11]
    except ValueError:
        raise ValueError(f"{lmk_file}: fields 2-12 (5 landmarks x,y and a score) must be numbers") from None
    if not np.array_equal(lmk_names, names):
        # The release lists both files in the same order; otherwise match by name.
        index = {n: i for i, n in enumerate(lmk_names)}
        missing = [n for n in names if n not in index]
        if missing:
            raise ValueError(f"{lmk_file}: no landmarks for {len(missing)} images of {tid_file}, e.g. {missing[:3]}")
        values = values[[index[n] for n in names]]

    pair_file = os.path.join(meta, f"{p}_template_pair_label.txt")
    pairs, labels = _read_pairs(pair_file)
    known = np.unique(templates)
    unknown = ~np.isin(pairs, known)
    if unknown.any():
        raise ValueError(
            f"{pair_file}: {int(unknown.sum())} template ids have no image in {tid_file}, "
            f"e.g. {np.unique(pairs[unknown])[:3].tolist()}"
        )

    galleries, probes = {}, None
    if identification:
        for g in _GALLERIES[subset]:
            galleries[g] = _read_template_csv(os.path.join(meta, f"{p}_1N_gallery_{g}.csv"))
        probes = _read_template_csv(os.path.join(meta, f"{p}_1N_probe_mixed.csv"))
        for what, (tids, _) in [*galleries.items(), ("probe_mixed", probes)]:
            bad = tids[~np.isin(tids, known)]
            if bad.size:
                raise ValueError(
                    f"{meta}/{p}_1N_{what}: {bad.size} templates have no image in {tid_file}, e.g. {bad[:3].tolist()}"
                )

    return IJBMeta(
        subset=subset,
        image_dir=os.path.join(base, "loose_crop"),
        names=names,
        templates=templates,
        medias=medias,
        landmarks=values[:, :10].reshape(-1, 5, 2),
        scores=values[:, 10].astype(np.float32),
        pairs=pairs,
        labels=labels,
        galleries=galleries,
        probes=probes,
    )


# ------------------------------------------------------------------------------------------------ features


def image_features(
    meta: IJBMeta,
    embedders: Mapping[str, Embedder],
    *,
    batch_size: int = 128,
    scale: Scale = "reference",
    num_workers: int = 8,
) -> dict[str, np.ndarray]:
    """Per-image features `(emb + emb_mirror) * det_score` for every model, decoding each image once.

    Args:
      meta: from `load_ijb_meta`.
      embedders: model name -> embedder.
      batch_size: images per batch (the mirror images double each embedder call).
      scale: 'reference' = (x-127.5)*0.0078125 as the reference script; 'clean' = (x-127.5)/127.5 as training.
      num_workers: image reading/alignment threads.

    Returns:
      model name -> float32 [M,D].
    """
    names = list(embedders)
    model_size = {n: image_size_of(embedders[n]) for n in names}
    sizes = sorted(set(model_size.values()))
    paths = [os.path.join(meta.image_dir, n) for n in meta.names]
    out: dict[str, list[np.ndarray]] = {n: [] for n in names}
    with Progress(len(paths), f"{meta.subset} images", unit="img") as bar:
        for start, batch in iter_aligned_batches(
            paths, meta.landmarks, sizes=sizes, batch_size=batch_size, num_workers=num_workers
        ):
            score = meta.scores[start : start + batch[0].shape[0], None]  # [b,1]
            for n in names:
                orig, flip = embed_with_flip(embedders[n], batch[sizes.index(model_size[n])], scale=scale)
                out[n].append((orig + flip) * score)  # no L2 normalisation before aggregation (reference)
            bar.update(batch[0].shape[0])
    return {n: np.concatenate(v) for n, v in out.items()}


def template_features(
    image_feats: np.ndarray,
    templates: np.ndarray,
    medias: np.ndarray,
    choose_templates: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Aggregates image features into template features: media mean, sum over media, L2 normalisation.

    Args:
      image_feats: float [M,D].
      templates: int [M] template id of each image.
      medias: int [M] media id of each image.
      choose_templates: template ids to aggregate (default: all); duplicates are removed.

    Returns:
      template ids: [T] sorted unique.
      features: float32 [T,D] row-L2-normalised (a template without images is a zero row).
    """
    uniq = np.unique(templates if choose_templates is None else choose_templates)
    keep = np.isin(templates, uniq)
    t, m, f = templates[keep], medias[keep], np.asarray(image_feats, dtype=np.float32)[keep]
    order = np.lexsort((m, t))  # by template, then media
    t, m, f = t[order], m[order], f[order]
    out = np.zeros((uniq.size, f.shape[1]), dtype=np.float32)  # [T,D]
    if t.size:
        media_start = np.flatnonzero(np.r_[True, (t[1:] != t[:-1]) | (m[1:] != m[:-1])])
        media_count = np.diff(np.r_[media_start, t.size])
        media_mean = np.add.reduceat(f, media_start, axis=0) / media_count[:, None]  # [G,D]
        media_t = t[media_start]
        tmpl_start = np.flatnonzero(np.r_[True, media_t[1:] != media_t[:-1]])
        out[np.searchsorted(uniq, media_t[tmpl_start])] = np.add.reduceat(media_mean, tmpl_start, axis=0)
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return uniq, out


def _rows_of(uniq: np.ndarray, ids: np.ndarray, what: str) -> np.ndarray:
    rows = np.clip(np.searchsorted(uniq, ids), 0, uniq.size - 1)
    if not np.array_equal(uniq[rows], ids):
        raise KeyError(f"{what}: template ids {np.setdiff1d(ids, uniq)[:3].tolist()} have no features")
    return rows


# ------------------------------------------------------------------------------------------------ 1:1


def pair_scores(
    feats1: np.ndarray,
    feats2: np.ndarray,
    rows1: np.ndarray,
    rows2: np.ndarray,
    *,
    method: Literal["auto", "gather", "blocks"] = "auto",
    chunk_size: int = 4096,
    block_rows: int | None = None,
) -> np.ndarray:
    """Cosine scores `<feats1[rows1[k]], feats2[rows2[k]]>` for P pairs, vectorised and in bounded memory.

    Two exact strategies; 'auto' picks the cheaper one:
      'gather': per chunk of pairs, gather both rows and einsum them (memory-bound; ~2*chunk_size*D floats).
      'blocks': per block of `block_rows` distinct rows1 templates, one matmul against the feats2 rows the
        pairs use, then pick the pairs' entries (BLAS-bound; block_rows*U2 floats). It computes every score
        of the U1 x U2 grid of used templates, so it wins when pairs are dense in that grid: IJB-C's 15.66M
        pairs join 3,531 enrollment to 19,593 verification templates (23% of the grid), and BLAS scales with
        cores (docs/benchmarks.md).

    Args:
      feats1: float32 [T1,D] normalised template features for the first column.
      feats2: float32 [T2,D] for the second column.
      rows1: int [P] rows into feats1.
      rows2: int [P] rows into feats2.
      method: 'auto', 'gather' or 'blocks'.
      chunk_size: pairs per chunk ('gather').
      block_rows: feats1 rows per matmul ('blocks'); None = as many as fit a 512 MiB similarity tile, which
        holds IJB-C's whole [3,531, 19,593] grid (277 MB) in one matmul and one pick.

    Returns:
      float32 [P].
    """
    feats1 = np.asarray(feats1, dtype=np.float32)
    feats2 = np.asarray(feats2, dtype=np.float32)
    rows1, rows2 = np.asarray(rows1), np.asarray(rows2)
    n = rows1.shape[0]
    out = np.empty(n, dtype=np.float32)
    if method not in ("auto", "gather", "blocks"):
        raise ValueError(f"method must be 'auto', 'gather' or 'blocks', got {method!r}")
    if n and method != "gather":  # the used templates of each column: blocks' grid, and auto's cost of it
        ranks = _dense_ranks(rows1, feats1.shape[0]), _dense_ranks(rows2, feats2.shape[0])
    if method == "auto":
        # A matmul score costs ~1/85 of a gathered pair (measured at IJB-C's sizes, benchmarks/ijb_scoring.py);
        # stay conservative at 1/60.
        grid = ranks[0][0].size * ranks[1][0].size if n else 0
        method = "blocks" if grid <= 60 * n else "gather"
    if method == "gather":
        with Progress(n, "score pairs", unit="pair") as bar:
            for s in range(0, n, chunk_size):
                e = min(s + chunk_size, n)
                out[s:e] = np.einsum("ij,ij->i", feats1[rows1[s:e]], feats2[rows2[s:e]])
                bar.update(e - s)
    elif n:
        (used_rows, rank1), (used_cols, rank2) = ranks
        _block_scores(feats1, feats2[used_cols], used_rows, rank1, rank2, block_rows, out)
    return out


_TILE_BYTES = 512 << 20  # the 'blocks' similarity tile when block_rows is None


def _dense_ranks(rows: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(used, rank): the distinct values of `rows` ascending [U], and each entry's position among them [P]."""
    used = np.bincount(rows, minlength=size) > 0
    rank_of_row = (np.cumsum(used) - 1).astype(np.int32 if size < 2**31 else np.int64)
    return np.flatnonzero(used), rank_of_row[rows]


def _block_scores(
    feats1: np.ndarray,
    used_feats2: np.ndarray,
    used_rows: np.ndarray,
    rank1: np.ndarray,
    rank2: np.ndarray,
    block_rows: int | None,
    out: np.ndarray,
) -> None:
    """pair_scores' 'blocks' strategy, written into ``out`` [P].

    Only the templates the pairs use enter the matmul: the used rows of feats1 (`used_rows` [U1]) and of feats2
    (`used_feats2` [U2, D]) with each pair's dense rank among them (`rank1`, `rank2` [P], from a bincount: O(P),
    no sort of the ids), so the product is [U1, U2] rather than [T1, T2]. On IJB-C the first column holds the
    3,531 enrollment templates and the second the 19,593 verification templates, so this is 13% of the 23,124^2
    product. The pairs are grouped by block of U1 ranks with a stable radix sort of the block numbers (small
    integers); each block's [b, U2] similarities go into one reused buffer, and a pair's score is read at its
    flat offset. When the whole grid fits one tile (IJB-C's does), there is no grouping: one matmul, then one
    pick in pair order.
    """
    n, u2 = rank1.shape[0], used_feats2.shape[0]
    if block_rows is None:
        block_rows = max(1, _TILE_BYTES // (4 * u2))
    feats2_t = np.ascontiguousarray(used_feats2.T)  # [D,U2]
    if used_rows.size <= block_rows:  # one tile: no grouping, one pick in pair order
        sim = np.matmul(feats1[used_rows], feats2_t)  # [U1,U2]
        np.take(sim.reshape(-1), rank1.astype(np.int64) * u2 + rank2, out=out)
        return
    num_blocks = -(-used_rows.size // block_rows)
    block = (rank1 // block_rows).astype(np.int16 if num_blocks < 2**15 else np.int64)
    order = np.argsort(block, kind="stable")  # radix sort for int16
    bounds = np.searchsorted(block[order], np.arange(num_blocks + 1), side="left")
    sim = np.empty((block_rows, u2), np.float32)
    with Progress(n, "score pairs", unit="pair") as bar:
        for b in range(num_blocks):
            rows = used_rows[b * block_rows : (b + 1) * block_rows]
            tile = sim[: rows.size]
            np.matmul(feats1[rows], feats2_t, out=tile)  # [b,U2]
            idx = order[bounds[b] : bounds[b + 1]]
            flat = (rank1[idx] - b * block_rows).astype(np.int64) * u2 + rank2[idx]
            out[idx] = np.take(tile.reshape(-1), flat)
            bar.update(idx.size)


def verification_metrics(
    scores: np.ndarray, labels: np.ndarray, *, fars: Sequence[float] = FARS_1TO1, curve_points: int = 141
) -> dict:
    """TAR at the FARs nearest to `fars` and ROC AUC, with the reference's selection rule.

    roc_curve (drop_intermediate=True; here `roc.roc_points`, the same points without the argsort), arrays
    reversed, tpr at argmin |fpr - far| (so ties go to the larger tpr). Also returns a step-interpolated ROC on
    a log-spaced FPR grid for plotting.
    """
    labels = np.asarray(labels)
    fpr, tpr = roc_points(scores, labels)
    roc_auc = float(auc(fpr, tpr))
    fpr_r, tpr_r = fpr[::-1], tpr[::-1]
    tar = {far_label(x): float(tpr_r[np.argmin(np.abs(fpr_r - x))]) for x in fars}
    grid = np.logspace(-7, 0, curve_points)
    curve_tpr = tpr[np.searchsorted(fpr, grid, side="right") - 1]
    return {
        "tar_at_far": tar,
        "auc": roc_auc,
        "num_pairs": int(labels.size),
        "num_genuine": int(np.count_nonzero(labels)),
        "roc": {"fpr": grid.tolist(), "tpr": curve_tpr.tolist()},
    }


# ------------------------------------------------------------------------------------------------ 1:N


def identification_metrics(
    probe_feats: np.ndarray,
    probe_ids: np.ndarray,
    gallery_feats: np.ndarray,
    gallery_ids: np.ndarray,
    *,
    fpirs: Sequence[float] = FPIRS_1TON,
    curve_fpirs: Sequence[float] = FPIR_GRID,
    far_index: FarIndex = "reference",
    topk: Sequence[int] = TOPK,
    chunk_size: int = 4096,
) -> dict:
    """Open-set identification (TPIR at FPIR) and closed-set rank-k of the reference's `evaluation_1N`.

    A probe is mated if its subject is in the gallery; its target is the first gallery row of that subject.
    `correct` = target score > every other-subject score (strict). Non-mated probes give their maximum score;
    sorted descending into s, the threshold at FPIR f is s[max(int(len(s)*f) - 1, 0)] ('reference') or
    s[max(ceil(len(s)*f) - 1, 0)] ('ceil'), and TPIR = mean over mated probes of correct & score > threshold.
    Rank-k hit: fewer than k other gallery rows score >= the target (ties count against the probe).

    Args:
      probe_feats: float [Np,D] normalised.
      probe_ids: int [Np] subject ids.
      gallery_feats: float [Ng,D] normalised.
      gallery_ids: int [Ng] subject ids.
      fpirs: FPIR values reported in `tpir`/`thresholds` (keyed by far_label).
      curve_fpirs: FPIR values of `tpir_curve` (default: the reference's 101-point grid).
      far_index: threshold index rule, 'reference' (int) or 'ceil'.
      topk: ranks for closed-set accuracy over mated probes.
      chunk_size: probes per similarity block ([chunk, Ng] floats).

    Returns:
      dict with `tpir`, `thresholds`, `fpir_curve`, `tpir_curve`, `top{k}` (fraction of mated probes),
      `hits{k}` (counts), `num_mated`, `num_nonmated`.
    """
    if far_index not in ("reference", "ceil"):
        raise ValueError(f"far_index must be 'reference' or 'ceil', got {far_index!r}")
    probe_ids = np.asarray(probe_ids)
    gallery_ids = np.asarray(gallery_ids)
    uniq_g, first_g = np.unique(gallery_ids, return_index=True)
    mated = np.isin(probe_ids, uniq_g)  # [Np]
    target = np.full(probe_ids.shape, -1)
    target[mated] = first_g[np.searchsorted(uniq_g, probe_ids[mated])]

    pos = np.full(probe_ids.shape, np.nan, dtype=np.float32)
    correct = np.zeros(probe_ids.shape, dtype=bool)
    rank = np.full(probe_ids.shape, np.iinfo(np.int64).max)
    top_nonmated = np.full(probe_ids.shape, np.nan, dtype=np.float32)
    gal = np.asarray(gallery_feats, dtype=np.float32)
    for s in range(0, probe_ids.size, chunk_size):
        e = min(s + chunk_size, probe_ids.size)
        sim = np.asarray(probe_feats[s:e], dtype=np.float32) @ gal.T  # [c,Ng]
        m, t = mated[s:e], target[s:e]
        r = np.flatnonzero(m)
        p = sim[r, t[r]]  # [cm]
        other_subject = gallery_ids[None, :] != probe_ids[s:e][r, None]  # [cm,Ng]
        neg_max = np.where(other_subject, sim[r], -np.inf).max(axis=1, initial=-np.inf)
        not_target = np.arange(gal.shape[0])[None, :] != t[r, None]
        pos[s + r] = p
        correct[s + r] = p > neg_max
        rank[s + r] = np.count_nonzero((sim[r] >= p[:, None]) & not_target, axis=1)
        top_nonmated[s + np.flatnonzero(~m)] = sim[~m].max(axis=1, initial=-np.inf)

    pos_m, correct_m = pos[mated], correct[mated]
    nonmated_max = np.sort(top_nonmated[~mated])[::-1]  # descending
    n = nonmated_max.size

    def at(far: float) -> tuple[float, float]:
        if n == 0 or pos_m.size == 0:  # open-set rates need both kinds of probe
            return math.nan, math.nan
        k = int(n * far) if far_index == "reference" else math.ceil(n * far)
        thr = float(nonmated_max[max(k - 1, 0)])
        return thr, float(np.mean(correct_m & (pos_m > thr)))

    reported = {far_label(f): at(f) for f in fpirs}
    out = {
        "tpir": {k: v[1] for k, v in reported.items()},
        "thresholds": {k: v[0] for k, v in reported.items()},
        "fpir_curve": [float(f) for f in curve_fpirs],
        "tpir_curve": [at(f)[1] for f in curve_fpirs],
        "num_mated": int(mated.sum()),
        "num_nonmated": int(n),
    }
    for k in topk:
        hits = int(np.count_nonzero(rank[mated] < k))
        out[f"hits{k}"] = hits
        out[f"top{k}"] = hits / max(int(mated.sum()), 1)
    return out


def _identification(
    feats_g: tuple[np.ndarray, np.ndarray],
    feats_q: tuple[np.ndarray, np.ndarray],
    meta: IJBMeta,
    far_index: FarIndex,
) -> dict:
    """G1/G2 (S1/S2) open-set rates, their mean, and the mixed-gallery rank-k."""
    (uniq_g, tf_g), (uniq_q, tf_q) = feats_g, feats_q
    probe_tids, probe_sids = meta.probes
    probes = tf_q[_rows_of(uniq_q, probe_tids, "probe_mixed")]
    res, gal_feats, gal_sids = {}, [], []
    for g, (tids, sids) in meta.galleries.items():
        gf = tf_g[_rows_of(uniq_g, tids, g)]
        res[g] = identification_metrics(probes, probe_sids, gf, sids, far_index=far_index)
        gal_feats.append(gf)
        gal_sids.append(sids)
    g1, g2 = (res[g] for g in meta.galleries)
    mean = {"tpir": {k: 0.5 * (g1["tpir"][k] + g2["tpir"][k]) for k in g1["tpir"]}}
    for k in TOPK:  # each probe is mated in one gallery, so this is the overall rank-k accuracy
        mean[f"top{k}"] = (g1[f"hits{k}"] + g2[f"hits{k}"]) / probe_tids.size
    res["mean"] = mean
    mixed = identification_metrics(
        probes, probe_sids, np.concatenate(gal_feats), np.concatenate(gal_sids), fpirs=(), curve_fpirs=()
    )
    res["mixed"] = {f"top{k}": mixed[f"top{k}"] for k in TOPK}
    return res


# ------------------------------------------------------------------------------------------------ protocol


def evaluate_ijb(
    root: str | os.PathLike,
    embedders: Mapping[str, Embedder],
    rows: Sequence[tuple[str, str]],
    *,
    subset: str = "IJBC",
    tasks: Sequence[str] = ("1:1", "1:N"),
    batch_size: int = 128,
    scale: Scale = "reference",
    far_index: FarIndex = "reference",
    num_workers: int = 8,
    meta: IJBMeta | None = None,
) -> dict[str, dict]:
    """Runs IJB-B/C 1:1 and/or 1:N for each (query, gallery) row.

    Args:
      root: folder holding `<subset>/meta` and `<subset>/loose_crop`.
      embedders: model name -> embedder.
      rows: (query model, gallery model) pairs; ('new','old') = new p2/probes against old p1/galleries.
      subset: 'IJBC' or 'IJBB'.
      tasks: any of '1:1', '1:N'.
      batch_size: images per embedder batch.
      scale: input scale ('reference' = /128 as the reference script, 'clean' = /127.5).
      far_index: 1:N threshold index rule ('reference' = int(n*far)-1, 'ceil').
      num_workers: image reading threads.
      meta: an already parsed `load_ijb_meta` result (skips parsing).

    Returns:
      {'query/gallery': {'1:1': verification_metrics, '1:N': {'G1':..., 'G2':..., 'mean':..., 'mixed':...}}}.
    """
    unknown = set(tasks) - {"1:1", "1:N"}
    if unknown or not tasks:
        raise ValueError(f"tasks must be a non-empty subset of ('1:1', '1:N'), got {tuple(tasks)}")
    if meta is None:
        meta = load_ijb_meta(root, subset, identification="1:N" in tasks)
    elif "1:N" in tasks and meta.probes is None:
        raise ValueError("1:N needs the gallery/probe lists: load the meta with identification=True")
    models = list(dict.fromkeys(m for row in rows for m in row))
    missing = [m for m in models if m not in embedders]
    if missing:
        raise KeyError(f"rows use models {missing} but embedders has only {sorted(embedders)}")
    img = image_features(
        meta, {m: embedders[m] for m in models}, batch_size=batch_size, scale=scale, num_workers=num_workers
    )
    tmpl = {m: template_features(img[m], meta.templates, meta.medias) for m in models}

    results = {}
    for query, gallery in rows:
        res = {}
        if "1:1" in tasks:
            (uniq_g, tf_g), (uniq_q, tf_q) = tmpl[gallery], tmpl[query]
            r1 = _rows_of(uniq_g, meta.pairs[:, 0], "pair column 1")
            r2 = _rows_of(uniq_q, meta.pairs[:, 1], "pair column 2")
            res["1:1"] = verification_metrics(pair_scores(tf_g, tf_q, r1, r2), meta.labels)
        if "1:N" in tasks:
            res["1:N"] = _identification(tmpl[gallery], tmpl[query], meta, far_index)
        results[f"{query}/{gallery}"] = res
    return results
