"""Times IJB-C-sized scoring on random features (no images, no model).

    .venv/bin/python benchmarks/ijb_scoring.py [--pairs 15658489] [--templates 23124] [--dim 512]

1:1: 15.6M random template pairs over 23k templates x 512-d, scored both ways (blocks of template rows x
matmul; chunked gather + einsum), and the TAR@FAR/AUC metrics (sklearn roc_curve). 1:N: 20k probes against a
3.5k-template gallery (similarity blocks, TPIR and rank-k). Figures are recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from mixbct_jax.evaluation import ijb


def _timed(label: str, fn):
    start = time.perf_counter()
    out = fn()
    print(f"{label}: {time.perf_counter() - start:.2f} s", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--templates", type=int, default=23124)  # IJB-C 1:1 templates
    p.add_argument("--pairs", type=int, default=15658489)  # IJB-C 1:1 pairs
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--probes", type=int, default=19593)
    p.add_argument("--gallery", type=int, default=3531)  # G1 1772 + G2 1759
    p.add_argument("--methods", default="auto,blocks,gather")
    args = p.parse_args()
    print(f"numpy {np.__version__}, {os.cpu_count()} CPUs, python {sys.version.split()[0]}")

    rng = np.random.default_rng(0)
    feats = rng.standard_normal((args.templates, args.dim), dtype=np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    feats2 = rng.standard_normal((args.templates, args.dim), dtype=np.float32)
    feats2 /= np.linalg.norm(feats2, axis=1, keepdims=True)
    r1 = rng.integers(0, args.templates, args.pairs)
    r2 = rng.integers(0, args.templates, args.pairs)
    labels = (rng.random(args.pairs) < 0.0013).astype(np.int64)  # ~20k genuine pairs, as IJB-C

    print(f"1:1 scoring, {args.pairs:,} pairs over {args.templates:,} x {args.dim} templates")
    scores = None
    for method in args.methods.split(","):
        scores = _timed(
            f"  pair_scores method={method}", lambda m=method: ijb.pair_scores(feats, feats2, r1, r2, method=m)
        )
    # The limit of the blocks method, in the same run: the [T1, T2] similarity matmul alone (float32 BLAS).
    out = np.empty((1024, args.templates), np.float32)
    feats2_t = np.ascontiguousarray(feats2.T)

    def matmul_only():
        for b in range(0, args.templates, 1024):
            np.matmul(feats[b : b + 1024], feats2_t, out=out[: min(1024, args.templates - b)])

    _timed("  limit: the dense similarity matmul alone", matmul_only)
    print(f"  load average {os.getloadavg()[0]:.1f}")
    scores += 0.3 * labels  # give the metric a non-trivial ROC
    _timed("  verification_metrics (roc_curve, TAR@FAR, AUC)", lambda: ijb.verification_metrics(scores, labels))

    print(f"1:N, {args.probes:,} probes x {args.gallery:,} gallery templates")
    gallery_ids = np.arange(args.gallery)
    probe_ids = rng.integers(0, 2 * args.gallery, args.probes)  # about half non-mated
    _timed(
        "  identification_metrics",
        lambda: ijb.identification_metrics(feats[: args.probes], probe_ids, feats2[: args.gallery], gallery_ids),
    )


if __name__ == "__main__":
    main()
