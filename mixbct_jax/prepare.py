"""Command line for the old-embedding statistics of ``mixbct_jax.data.old_stats`` (docs/methods.md).

Usage::

python -m mixbct_jax.prepare denoise     --features F.npy --labels L.npy --keep 0.9 --out credible.npy
python -m mixbct_jax.prepare class-means --features F.npy --labels L.npy --out prototypes.npy
python -m mixbct_jax.prepare advbct-meta --features F.npy --labels L.npy --out meta.npz
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import BinaryIO

import numpy as np

from mixbct_jax.data.old_stats import DEFAULT_CHUNK_ROWS, advbct_meta, class_means, denoise
from mixbct_jax.files import atomic_write

__all__ = ["advbct_meta", "class_means", "denoise", "main"]


# ------------------------------------------------------------------------------------------------
# Command line.
# ------------------------------------------------------------------------------------------------
def _save_atomic(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Writes a file through ``write(fileobj)`` atomically (fsync'ed before the rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write_path(tmp: str) -> None:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write_path)


def _fail(command: str, message: str) -> SystemExit:
    return SystemExit(f"prepare {command}: {message}")


def _load_inputs(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """Memory-maps the features and labels files, with errors that name the file."""
    arrays = []
    for flag, path in (("--features", args.features), ("--labels", args.labels)):
        if not os.path.isfile(path):
            raise _fail(
                args.command,
                f"{flag} {path} does not exist; write it with `python -m mixbct_jax.extract` "
                "(features.npy and labels.npy) on the new model's training set",
            )
        try:
            arrays.append(np.load(path, mmap_mode="r"))
        except ValueError as err:
            raise _fail(args.command, f"{flag} {path} is not a .npy array file ({err})") from None
    features, labels = arrays
    if features.ndim != 2 or not np.issubdtype(features.dtype, np.floating):
        raise _fail(
            args.command,
            f"{args.features} must hold a 2-D float array [N, D]; it holds shape {features.shape} "
            f"dtype {features.dtype}",
        )
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise _fail(
            args.command,
            f"{args.labels} must hold a 1-D integer array [N]; it holds shape {labels.shape} dtype {labels.dtype}",
        )
    if labels.shape[0] != features.shape[0]:
        raise _fail(
            args.command,
            f"{args.features} has {features.shape[0]} rows but {args.labels} has {labels.shape[0]} "
            "labels; both must come from the same extraction run",
        )
    return features, labels


def _check_out(args: argparse.Namespace, suffix: str) -> None:
    if not args.out.endswith(suffix):
        raise _fail(args.command, f"--out {args.out} must end with {suffix}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mixbct_jax.prepare",
        description="Pre-process old embeddings (docs/methods.md: MixBCT, BCT, AdvBCT).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--features", required=True, help="[N, D] float .npy of old embeddings")
        p.add_argument("--labels", required=True, help="[N] integer .npy of labels, same row order")
        p.add_argument("--chunk_rows", type=int, default=DEFAULT_CHUNK_ROWS, help="rows per pass chunk")
        p.add_argument("--quiet", action="store_true", help="no progress on stderr")
        return p

    p = add("denoise", "MixBCT credible mask (bool [N] .npy)")
    p.add_argument("--keep", type=float, default=0.9, help="fraction T of each class kept (default 0.9)")
    p.add_argument("--group_by_label", action="store_true", help="classes by label value, not by runs")
    p.add_argument("--out", required=True, help="output .npy, e.g. credible.npy")

    p = add("class-means", "class-mean prototypes for BCT/UniBCT (float32 [C, D] .npy)")
    p.add_argument("--num_classes", type=int, default=None, help="C (default: max label + 1)")
    p.add_argument("--no_normalize", action="store_true", help="unnormalised means (UniBCT)")
    p.add_argument("--out", required=True, help="output .npy, e.g. prototypes.npy")

    p = add("advbct-meta", "AdvBCT class centres and radii (.npz)")
    p.add_argument("--num_classes", type=int, default=None, help="C (default: max label + 1)")
    p.add_argument("--out", required=True, help="output .npz, e.g. advbct_meta.npz")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point (see the module docstring)."""
    from mixbct_jax import cli

    args = _parser().parse_args(None if argv is None else cli.snake_case_flags(argv))
    _check_out(args, ".npz" if args.command == "advbct-meta" else ".npy")
    if args.chunk_rows < 1:
        raise _fail(args.command, f"--chunk_rows must be >= 1; got {args.chunk_rows}")
    features, labels = _load_inputs(args)
    common = dict(chunk_rows=args.chunk_rows, verbose=not args.quiet)
    start = time.monotonic()
    try:
        if args.command == "denoise":
            mask = denoise(features, labels, keep=args.keep, group_by_label=args.group_by_label, **common)
            _save_atomic(args.out, lambda f: np.save(f, mask))
            summary = f"{int(mask.sum()):,} of {mask.size:,} rows credible"
        elif args.command == "class-means":
            means = class_means(features, labels, args.num_classes, normalize=not args.no_normalize, **common)
            _save_atomic(args.out, lambda f: np.save(f, means))
            summary = f"{means.shape[0]:,} class means of dimension {means.shape[1]}"
        else:
            meta = advbct_meta(features, labels, args.num_classes, **common)
            _save_atomic(args.out, lambda f: np.savez(f, **meta))
            summary = f"{meta['centers'].shape[0]:,} class centres and radii"
    except ValueError as err:
        raise _fail(args.command, f"{args.features} / {args.labels}: {err}") from None
    print(f"wrote {args.out}: {summary} in {time.monotonic() - start:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    from mixbct_jax import cli

    cli.run(main)
