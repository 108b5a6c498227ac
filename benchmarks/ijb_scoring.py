"""Times IJB-C-sized scoring on random features (no images, no model).

    .venv/bin/python benchmarks/ijb_scoring.py [--pairs 15658489] [--templates 23124] [--dim 512]

1:1: 15.6M template pairs over 23k templates x 512-d, laid out as IJB-C's (3,531 enrollment x 19,593
verification templates) and at random over all templates, scored both ways (blocks of template rows x matmul;
chunked gather + einsum) next to the matmul they are bound by, and the TAR@FAR/AUC metrics. 1:N: 20k probes
against a 3.5k-template gallery (similarity blocks, TPIR and rank-k). Figures are recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from sklearn.metrics import roc_curve

from mixbct_jax.evaluation import ijb


def _timed(label: str, fn, reps: int = 1):
    """Runs fn `reps` times; prints every wall time (the first includes first-touch page faults)."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    print(f"{label}: {' / '.join(f'{t:.2f}' for t in times)} s", flush=True)
    return out


def _pairs(rng, layout: str, pairs: int, templates: int, enrollment: int) -> tuple[np.ndarray, np.ndarray]:
    """Template rows of both pair columns.

    IJB-C's 1:1 protocol compares enrollment templates (G1 1,772 + G2 1,759 = 3,531) with verification
    templates (19,593); together they are the 23,124 templates of the pair list. Their ids interleave, so the
    enrollment rows are a random subset here.
    """
    if layout == "random":
        return rng.integers(0, templates, pairs), rng.integers(0, templates, pairs)
    if layout != "ijbc":
        raise SystemExit(f"--layouts: unknown layout {layout!r}; use 'ijbc' or 'random'")
    perm = rng.permutation(templates)
    enroll, verif = perm[:enrollment], perm[enrollment:]
    return enroll[rng.integers(0, enroll.size, pairs)], verif[rng.integers(0, verif.size, pairs)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--templates", type=int, default=23124)  # IJB-C 1:1 templates
    p.add_argument("--pairs", type=int, default=15658489)  # IJB-C 1:1 pairs
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--probes", type=int, default=19593)
    p.add_argument("--gallery", type=int, default=3531)  # G1 1772 + G2 1759
    p.add_argument("--methods", default="blocks,gather")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions of each fast step (gather runs once)")
    p.add_argument(
        "--layouts",
        default="ijbc,random",
        help="pair layouts: 'ijbc' joins --gallery enrollment templates to the other (verification) templates, as "
        "IJB-C's 1:1 protocol does; 'random' draws both columns from all templates (the worst case for blocks)",
    )
    args = p.parse_args()
    print(f"numpy {np.__version__}, {os.cpu_count()} CPUs, python {sys.version.split()[0]}")

    rng = np.random.default_rng(0)
    feats = rng.standard_normal((args.templates, args.dim), dtype=np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    feats2 = rng.standard_normal((args.templates, args.dim), dtype=np.float32)
    feats2 /= np.linalg.norm(feats2, axis=1, keepdims=True)
    labels = (rng.random(args.pairs) < 0.0013).astype(np.int64)  # ~20k genuine pairs, as IJB-C

    scores = None
    for layout in args.layouts.split(","):
        r1, r2 = _pairs(rng, layout, args.pairs, args.templates, args.gallery)
        u1, u2 = np.unique(r1), np.unique(r2)
        print(
            f"1:1 scoring, layout={layout}: {args.pairs:,} pairs between {u1.size:,} and {u2.size:,} of "
            f"{args.templates:,} x {args.dim} templates"
        )
        for method in args.methods.split(","):
            scores = _timed(
                f"  pair_scores method={method}",
                lambda m=method, a=r1, b=r2: ijb.pair_scores(feats, feats2, a, b, method=m),
                reps=1 if method == "gather" else args.reps,
            )
        # The limit of the blocks method, in the same run: the [U1, U2] similarity matmul of the used templates
        # alone (float32 BLAS), from features already gathered.
        lhs, rhs_t = feats[u1], np.ascontiguousarray(feats2[u2].T)
        out = np.empty((1024, u2.size), np.float32)

        def matmul_only(lhs=lhs, rhs_t=rhs_t, out=out):
            for b in range(0, lhs.shape[0], 1024):
                np.matmul(lhs[b : b + 1024], rhs_t, out=out[: min(1024, lhs.shape[0] - b)])

        _timed(f"  limit: the dense {u1.size:,} x {u2.size:,} similarity matmul alone", matmul_only, args.reps)
    print(f"  load average {os.getloadavg()[0]:.1f}")
    scores += 0.3 * labels  # give the metric a non-trivial ROC
    _timed("  verification_metrics (ROC, TAR@FAR, AUC)", lambda: ijb.verification_metrics(scores, labels), args.reps)
    # The reference for the ROC, in the same run: sklearn's roc_curve, which the reference script calls.
    _timed("  reference: sklearn.metrics.roc_curve alone", lambda: roc_curve(labels, scores), args.reps)

    print(f"1:N, {args.probes:,} probes x {args.gallery:,} gallery templates")
    gallery_ids = np.arange(args.gallery)
    probe_ids = rng.integers(0, 2 * args.gallery, args.probes)  # about half non-mated
    _timed(
        "  identification_metrics",
        lambda: ijb.identification_metrics(feats[: args.probes], probe_ids, feats2[: args.gallery], gallery_ids),
        args.reps,
    )


if __name__ == "__main__":
    main()
