"""Decode + flip throughput of ``train_batches`` on a ``.rec`` of 112x112 JPEGs: Grain workers vs the old tf.data.

Writes ``--images`` synthetic 112x112 faces as JPEG (quality 95) with :func:`write_rec` into a temporary folder (or
reuses ``--rec PREFIX``), then times:

* the bound: a plain single-thread loop of simplejpeg decode + flip (and the same with OpenCV);
* ``pipeline.train_batches`` (Grain) with each ``--workers`` count (0: decoding in this process);
* the old tf.data pipeline (``benchmarks/legacy_tfdata_pipeline.py``) with each ``--tf-threads`` count, when
  TensorFlow is installed (the ``[tf]`` extra); skipped otherwise.

For each it prints img/s (wall clock) and images per CPU-second, where the CPU time is that of this process *and
all its worker processes* (read from /proc), so the figure is the per-core cost and is robust to other load on the
machine.

    python benchmarks/input_pipeline.py --images 4096 --workers 0 1 2 --tf-threads 1 2
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

from mixbct_jax.data import pipeline, recordio, sources  # noqa: E402
from mixbct_jax.data.synthetic import SyntheticFaces  # noqa: E402

_TICK = os.sysconf("SC_CLK_TCK")


def make_rec(prefix: str, n: int) -> None:
    """Writes about ``n`` synthetic 112x112 images as JPEG (quality 95, like insightface files)."""
    faces = SyntheticFaces(num_classes=-(-n // 20), min_images=20, max_images=20, image_size=112, seed=0)
    labels = faces.labels[:n]
    images = np.concatenate([faces.read(np.arange(s, min(n, s + 512))) for s in range(0, n, 512)])
    recordio.write_rec(prefix, images, labels)


def tree_cpu_seconds(root: int | None = None) -> float:
    """User + system CPU seconds of process ``root`` (this one) and all its live descendants, from /proc."""
    root = os.getpid() if root is None else root
    children: dict[int, list[int]] = {}
    ticks: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        pid = int(entry)
        children.setdefault(int(fields[1]), []).append(pid)
        ticks[pid] = int(fields[11]) + int(fields[12])  # utime, stime
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += ticks.get(pid, 0)
        todo += children.get(pid, [])
    return total / _TICK


def time_batches(make_iterator, batch: int, steps: int, warmup: int) -> tuple[float, float]:
    """(img/s wall clock, img per CPU-second of the process tree) over ``steps`` batches after ``warmup``."""
    it = make_iterator()
    for _ in range(warmup):
        next(it)
    t0, c0 = time.perf_counter(), tree_cpu_seconds()
    for _ in range(steps):
        next(it)
    wall, cpu = time.perf_counter() - t0, tree_cpu_seconds() - c0
    it.close()
    return steps * batch / wall, steps * batch / max(cpu, 1e-9)


def time_loop(decode, encoded: list[bytes]) -> tuple[float, float]:
    """A plain single-thread loop decoding every image and flipping every other: (img/s, img per CPU-second).

    ``decode(data, flip)`` returns an RGB image, mirrored when ``flip``.
    """
    t0, c0 = time.perf_counter(), time.process_time()
    for k, data in enumerate(encoded):
        np.ascontiguousarray(decode(data, k % 2 == 1))
    n = len(encoded)
    return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--rec", help="an existing .rec prefix to read instead of writing one")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="Grain worker processes")
    parser.add_argument("--tf-threads", type=int, nargs="*", default=[1, 2], help="old tf.data threads")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=4)
    args = parser.parse_args()

    import cv2
    import simplejpeg

    with tempfile.TemporaryDirectory() as tmp:
        prefix = args.rec
        if prefix is None:
            prefix = os.path.join(tmp, "bench")
            t0 = time.perf_counter()
            make_rec(prefix, args.images)
            print(
                f"wrote {args.images} JPEGs in {time.perf_counter() - t0:.1f} s "
                f"({os.path.getsize(prefix + '.rec') / args.images / 1024:.1f} KiB/image)"
            )
        source = sources.open_source(f"rec:{prefix}")
        cpus = len(os.sched_getaffinity(0))
        print(f"source: {len(source)} images {source.image_shape}; cpus: {cpus}; batch {args.batch}")
        encoded = [source.read_encoded(i) for i in range(min(len(source), 2048))]
        rows = []

        def simple(data, flip):  # the fastest flip: BGR with width and channels reversed (one run per row)
            if flip:
                return simplejpeg.decode_jpeg(data, "BGR", fastdct=False, fastupsample=False)[:, ::-1, ::-1]
            return simplejpeg.decode_jpeg(data, "RGB", fastdct=False, fastupsample=False)

        def opencv(data, flip):
            bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
            return bgr[:, ::-1, ::-1] if flip else bgr[:, :, ::-1]

        loops = {"simplejpeg": simple, "cv2": opencv}
        best: dict[str, tuple[float, float]] = {}
        for _ in range(3):  # interleaved rounds, best kept: the decoders see the same machine load
            for name, decode in loops.items():
                rate, per_cpu = time_loop(decode, encoded)
                best[name] = max(best.get(name, (0.0, 0.0)), (rate, per_cpu), key=lambda r: r[1])
        for name, (rate, per_cpu) in best.items():
            rows.append((f"plain loop, {name} decode + flip, 1 thread (the bound)", rate, per_cpu))
            print(rows[-1])
        kwargs = {"global_batch": args.batch, "seed": 0}
        for workers in args.workers:
            rate, per_cpu = time_batches(
                lambda w=workers: pipeline.train_batches(source, None, threads=w, **kwargs),
                args.batch,
                args.steps,
                args.warmup,
            )
            rows.append((f"Grain train_batches, {workers} worker processes", rate, per_cpu))
            print(rows[-1])
        if args.tf_threads:
            try:
                sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
                import legacy_tfdata_pipeline as legacy

                legacy._tf()
            except ImportError as e:
                print(f"old tf.data pipeline skipped: TensorFlow is not installed ({e}); pip install -e '.[tf]'")
            else:
                for threads in args.tf_threads:
                    rate, per_cpu = time_batches(
                        lambda t=threads: legacy.train_batches(source, None, threads=t, **kwargs),
                        args.batch,
                        args.steps,
                        args.warmup,
                    )
                    rows.append((f"old tf.data train_batches, {threads} threads", rate, per_cpu))
                    print(rows[-1])

    print("\n| pipeline | img/s (wall) | img per CPU-second |\n|---|---|---|")
    for name, rate, per_cpu in rows:
        print(f"| {name} | {rate:,.0f} | {per_cpu:,.0f} |")


if __name__ == "__main__":
    main()
