"""Decode + flip throughput of ``train_batches`` on a ``.rec`` of 112x112 JPEGs.

Writes ``--images`` synthetic 112x112 faces with :func:`write_rec` into a temporary folder (or reuses
``--rec PREFIX``), then times ``train_batches`` with 1, 2, ... threads and prints img/s, img/s per thread and
images per CPU-second consumed by the process (the per-core cost, robust to other load on the machine).
For reference it also times a plain single-threaded OpenCV decode loop (what the reference's DataLoader
workers do per image).

    python benchmarks/input_pipeline.py --images 4096 --threads 1 2
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np  # noqa: E402

from mixbct_jax.data import pipeline, recordio, sources  # noqa: E402
from mixbct_jax.data.synthetic import SyntheticFaces  # noqa: E402


def make_rec(prefix: str, n: int) -> None:
    """Writes about ``n`` synthetic 112x112 images as JPEG (quality 95, like insightface files)."""
    faces = SyntheticFaces(num_classes=-(-n // 20), min_images=20, max_images=20, image_size=112, seed=0)
    labels = faces.labels[:n]
    images = np.concatenate([faces.read(np.arange(s, min(n, s + 512))) for s in range(0, n, 512)])
    recordio.write_rec(prefix, images, labels)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def time_pipeline(source, threads: int, batch: int, steps: int, warmup: int) -> tuple[float, float]:
    """(img/s wall clock, img per CPU-second of this process) of ``steps`` batches after ``warmup``."""
    it = pipeline.train_batches(source, None, global_batch=batch, seed=0, threads=threads)
    for _ in range(warmup):
        next(it)
    t0, c0 = time.perf_counter(), _cpu_seconds()
    for _ in range(steps):
        next(it)
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    it.close()
    return steps * batch / wall, steps * batch / cpu


def time_cv2(source, n: int) -> float:
    encoded = [source.read_encoded(i) for i in range(n)]
    t0 = time.perf_counter()
    for i, data in enumerate(encoded):
        sources.decode_rgb(data, str(i))
    return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--rec", help="an existing .rec prefix to read instead of writing one")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--warmup", type=int, default=4)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        prefix = args.rec
        if prefix is None:
            prefix = os.path.join(tmp, "bench")
            t0 = time.perf_counter()
            make_rec(prefix, args.images)
            print(f"wrote {args.images} JPEGs in {time.perf_counter() - t0:.1f} s "
                  f"({os.path.getsize(prefix + '.rec') / args.images / 1024:.1f} KiB/image)")
        source = sources.open_source(f"rec:{prefix}")
        print(f"source: {len(source)} images {source.image_shape}; cpus: {os.cpu_count()}")
        print(f"cv2 decode loop, 1 thread: {time_cv2(source, min(len(source), 2048)):8.0f} img/s")
        for threads in args.threads:
            rate, per_cpu = time_pipeline(source, threads, args.batch, args.steps, args.warmup)
            print(f"train_batches threads={threads}: {rate:8.0f} img/s wall, {rate / threads:6.0f} img/s per thread, "
                  f"{per_cpu:6.0f} img per CPU-second (= img/s per fully used core)")


if __name__ == "__main__":
    main()
