"""Scale benchmark of the old-embedding tools at MS1MV3 size (docs/methods.md (MixBCT)): time and peak memory.

Writes a 5,000,000 x 512 float16 feature file (about 4.9 GiB) with 93,431 classes of uneven,
MS1MV3-like sizes (mean ~54, rows of a class consecutive) to a temporary folder, then, in a fresh
process that memory-maps it as the command line does, times ``old_stats.denoise`` (and the other tools),
``old_embeddings.validate`` and ``old_embeddings.gather`` of 1024 random rows. Peak memory is reported
twice: ``ru_maxrss`` (which also counts the memory-mapped file's pages resident in the page cache) and
the peak anonymous RSS (the process's own allocations), sampled from /proc/self/status.

    .venv/bin/python benchmarks/denoise_scale.py                 # full size, ~5 GiB of disk
    .venv/bin/python benchmarks/denoise_scale.py --rows 200000 --classes 4000   # quick run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np


def write_dataset(folder: str, *, rows: int, dim: int, classes: int, seed: int) -> None:
    """features.npy (float16 [rows, dim]) and labels.npy (int64 [rows], grouped runs)."""
    rng = np.random.default_rng(seed)
    # Uneven class sizes (log-normal weights, every class at least one row), summing to `rows`.
    weights = rng.lognormal(mean=0.0, sigma=0.7, size=classes)
    sizes = 1 + rng.multinomial(rows - classes, weights / weights.sum())
    labels = np.repeat(np.arange(classes, dtype=np.int64), sizes)
    np.save(os.path.join(folder, "labels.npy"), labels)
    centres = rng.standard_normal((classes, dim), dtype=np.float32)
    features = np.lib.format.open_memmap(
        os.path.join(folder, "features.npy"), mode="w+", dtype=np.float16, shape=(rows, dim)
    )
    chunk = 65536
    for start in range(0, rows, chunk):
        stop = min(start + chunk, rows)
        noise = rng.standard_normal((stop - start, dim), dtype=np.float32)
        features[start:stop] = centres[labels[start:stop]] + 0.8 * noise
    features.flush()
    del features
    print(
        f"wrote {rows:,} x {dim} float16 rows, {classes:,} classes "
        f"(sizes min {sizes.min()}, median {int(np.median(sizes))}, mean {sizes.mean():.1f}, "
        f"max {sizes.max()})",
        file=sys.stderr,
    )


class _PeakAnonRss:
    """Samples RssAnon of this process every 20 ms in a background thread."""

    def __init__(self):
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
        return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, self._read())
            self._stop.wait(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_kib = max(self.peak_kib, self._read())


def _floor_pass(features: np.ndarray, *, convert: bool, chunk_rows: int = 2048) -> tuple[float, float]:
    """(seconds, GB/s) of one chunked pass over the rows: XOR of the raw bytes, or a copy into float64."""
    buffer = np.empty((chunk_rows, features.shape[1]), np.float64)
    start = time.perf_counter()
    for lo in range(0, features.shape[0], chunk_rows):
        rows = features[lo : lo + chunk_rows]
        if convert:
            buffer[: rows.shape[0]] = rows
        else:
            np.bitwise_xor.reduce(np.ascontiguousarray(rows).reshape(-1).view(np.uint8), axis=None)
    seconds = time.perf_counter() - start
    return round(seconds, 2), round(features.nbytes / seconds / 1e9, 2)


def measure(folder: str, tools: list[str]) -> dict:
    """Runs in a fresh process: memory-maps the files and times the tools."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from mixbct_jax.data import old_embeddings, old_stats

    features = np.load(os.path.join(folder, "features.npy"), mmap_mode="r")
    labels = np.load(os.path.join(folder, "labels.npy"), mmap_mode="r")
    results: dict = {
        "rows": features.shape[0],
        "dim": features.shape[1],
        "load_avg": os.getloadavg()[0],
        "threads": old_stats.default_threads(),
    }
    # The limits, in the same run: one pass that only reads the file's bytes (memory bandwidth, page cache), and
    # one that converts every value to float64 as the tools must (denoise makes two such passes).
    results["read_pass_s"], results["read_pass_gb_s"] = _floor_pass(features, convert=False)
    results["convert_pass_s"], _ = _floor_pass(features, convert=True)
    with _PeakAnonRss() as anon:
        start, cpu = time.perf_counter(), time.process_time()
        mask = old_stats.denoise(features, labels, keep=0.9, verbose=True)
        results["denoise_s"] = round(time.perf_counter() - start, 1)
        results["denoise_cpu_s"] = round(time.process_time() - cpu, 1)
        results["credible_fraction"] = round(float(mask.mean()), 4)
        results["denoise_peak_anon_rss_gib"] = round(anon.peak_kib / 2**20, 2)
        results["denoise_ru_maxrss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
        if "class-means" in tools:
            start = time.perf_counter()
            old_stats.class_means(features, labels, verbose=True)
            results["class_means_s"] = round(time.perf_counter() - start, 1)
        if "advbct-meta" in tools:
            start = time.perf_counter()
            old_stats.advbct_meta(features, labels, verbose=True)
            results["advbct_meta_s"] = round(time.perf_counter() - start, 1)
    results["all_tools_peak_anon_rss_gib"] = round(anon.peak_kib / 2**20, 2)

    old = old_embeddings.OldEmbeddings(features=features, credible=mask)
    common = dict(num_examples=features.shape[0], source_labels=None, embedding_size=None, num_classes=None)
    for name, check_all in (("validate_sampled_s", False), ("validate_all_rows_s", True)):
        start = time.perf_counter()
        old_embeddings.validate(old, check_all_rows=check_all, **common)
        results[name] = round(time.perf_counter() - start, 2)

    rng = np.random.default_rng(0)
    times = []
    for _ in range(200):
        indices = rng.integers(0, features.shape[0], size=1024)
        start = time.perf_counter()
        old_embeddings.gather(old, indices)
        times.append(time.perf_counter() - start)
    results["gather_1024_first_ms"] = round(1e3 * times[0], 2)
    results["gather_1024_median_ms"] = round(1e3 * float(np.median(times)), 2)
    results["gather_1024_p99_ms"] = round(1e3 * float(np.percentile(times, 99)), 2)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=93_431)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", default=None, help="folder for the data (default: a temp folder, removed)")
    parser.add_argument("--tools", default="denoise,class-means,advbct-meta")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # internal: child process
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.tools.split(","))))
        return

    folder = args.dir or tempfile.mkdtemp(prefix="denoise_scale_")
    try:
        if not os.path.exists(os.path.join(folder, "features.npy")):
            start = time.perf_counter()
            write_dataset(folder, rows=args.rows, dim=args.dim, classes=args.classes, seed=args.seed)
            print(f"generated in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        command = [sys.executable, os.path.abspath(__file__), "--measure", folder, "--tools", args.tools]
        child = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
        print(json.dumps(json.loads(child.stdout), indent=2))
    finally:
        if args.dir is None:
            shutil.rmtree(folder)


if __name__ == "__main__":
    main()
