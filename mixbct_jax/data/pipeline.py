"""The input pipeline on Grain: deterministic, resumable global batches of decoded uint8 images, no TensorFlow.

Order (docs/data.md (data order), as a global permutation instead of the reference's per-rank strided sampler): epoch
``e`` is the permutation ``np.random.default_rng([seed, e]).permutation(n)`` of the subset, cut into global batches of
``global_batch`` with the remainder dropped; step ``s`` is batch ``s % steps_per_epoch`` of epoch
``s // steps_per_epoch``. The order is a pure function of ``(seed, step)``, so starting at ``start_step`` resumes
exactly, skipping at the index level without decoding; the state a checkpoint needs is :func:`data_state`. Process ``p``
of ``P`` yields the contiguous slice ``[p·B/P, (p+1)·B/P)`` of every global batch. The horizontal flip (p = 0.5,
docs/data.md (augmentation)) is a hash of ``(seed, epoch, subset index)``, so it is reproducible as well.

How batches are produced: a ``grain.MapDataset`` over step numbers maps each step to its whole local batch
(:class:`_BatchReader`: plan the indices, read the encoded bytes, decode with :func:`sources.decode_rgb`, flip).
With ``workers > 0`` Grain runs that map in spawned worker processes (``mp_prefetch``), each producing every
``workers``-th batch, and hands them back in step order, so the output does not depend on the worker count. A
source pickles to the workers (a ``.rec`` reopens its file there). A bad image does not raise inside a worker:
its batch carries the message, and the main process raises :class:`BadInputError` naming the file and key.

Images stay uint8; the [-1, 1] normalisation happens on the device.
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np

from mixbct_jax.data.sources import Source, decode_rgb
from mixbct_jax.data.splits import Subset, full

_U64 = (1 << 64) - 1
_ENDLESS = 1 << 48  # steps in the "endless" training range (a MapDataset needs a length)
_ERROR = "__error__"


class BadInputError(ValueError):
    """An example of the data set cannot be served (undecodable or wrong-sized image); names the file and key."""


def steps_per_epoch(n: int, global_batch: int) -> int:
    """Number of full global batches in an epoch of ``n`` examples (the remainder is dropped)."""
    if global_batch < 1:
        raise ValueError(f"global_batch must be >= 1; got {global_batch}")
    return int(n) // int(global_batch)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The SplitMix64 finaliser on a uint64 array (wrapping arithmetic)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def flip_mask(seed: int, epoch: int, index: np.ndarray) -> np.ndarray:
    """Whether example ``index`` is flipped in ``epoch``: a stateless fair coin of ``(seed, epoch, index)``.

    Returns:
      bool array shaped like ``index``.
    """
    key = _splitmix64(np.array([seed & _U64], np.uint64))
    key = _splitmix64(key ^ np.uint64(epoch & _U64))
    h = _splitmix64(key ^ np.asarray(index).astype(np.uint64))
    return (h >> np.uint64(63)).astype(bool)


def default_workers(cpus: int | None = None) -> int:
    """Worker processes when none are configured: one core stays with the trainer, at most 8 workers.

    A 2-core box gets 1 worker, a 16-core GPU host 8 (each worker decodes ~8,000 112×112 JPEGs/s, so 8 feed
    far more than one accelerator consumes); a 1-core machine decodes in the main process.
    """
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cpus - 1))


def _workers(threads: int | None, reader: _BatchReader) -> int:
    """Worker processes for ``threads``: as given when >= 0, else automatic.

    Automatic (None or < 0): :func:`default_workers` when there are images to decode, 0 for in-memory sources
    (synthetic, npz), whose reads are a cheap array gather.
    """
    if threads is None or threads < 0:
        return default_workers() if reader.encoded else 0
    return int(threads)


def _check_processes(batch: int, process_index: int, process_count: int, what: str) -> int:
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} must lie in [0, process_count={process_count})")
    if batch % process_count:
        raise ValueError(f"{what} {batch} must be divisible by process_count {process_count}")
    return batch // process_count


# ---- the per-step work (runs in the workers; everything here pickles) -----------------------------------------


class _TrainPlan:
    """Step -> (subset rows, source rows, labels, flips) of this process's slice of the global batch."""

    def __init__(self, subset: Subset, *, global_batch: int, seed: int, flip: bool, lo: int, local: int):
        self.indices, self.labels = subset.indices, subset.labels
        self.n, self.spe = len(subset), steps_per_epoch(len(subset), global_batch)
        self.global_batch, self.seed, self.flip, self.lo, self.local = global_batch, seed, flip, lo, local
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:  # a worker moves forward through the epochs
                del self._perms[min(self._perms)]
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perms[epoch]

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        epoch, k = divmod(int(step), self.spe)
        start = k * self.global_batch + self.lo
        pos = self._perm(epoch)[start : start + self.local]  # [b] subset rows
        flips = flip_mask(self.seed, epoch, pos) if self.flip else np.zeros(self.local, bool)
        return {
            "index": pos.astype(np.int32),
            "source_index": self.indices[pos].astype(np.int64),
            "label": self.labels[pos].astype(np.int32),
            "flip": flips,
        }


class _EvalPlan:
    """Step -> rows ``[k·B, (k+1)·B)`` of the subset, this process's slice, padded rows masked."""

    def __init__(self, subset: Subset, *, batch_size: int, seed: int, flip: bool, pad: bool, lo: int, local: int):
        self.indices, self.labels, self.n = subset.indices, subset.labels, len(subset)
        self.batch_size, self.seed, self.flip, self.pad, self.lo, self.local = batch_size, seed, flip, pad, lo, local

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        start = int(step) * self.batch_size
        pos = np.arange(start, min(start + self.batch_size, self.n), dtype=np.int64)
        if self.pad:
            pos = np.concatenate([pos, np.full(self.batch_size - pos.size, -1, np.int64)])
        pos = pos[self.lo : self.lo + self.local]  # [b] (smaller in an unpadded last batch; then one process)
        mask = pos >= 0
        safe = np.where(mask, pos, self.n - 1)  # padded rows re-read the last example
        src = self.indices[safe].astype(np.int64)
        flips = flip_mask(self.seed, 0, safe) if self.flip else np.zeros(pos.size, bool)
        return {
            "index": pos.astype(np.int32),
            "source_index": np.where(mask, src, -1),
            "read": src,
            "label": np.where(mask, self.labels[safe], -1).astype(np.int32),
            "mask": mask,
            "flip": flips,
        }


class _BatchReader:
    """Step -> a whole local batch with decoded, flipped images (or an error message for the main process)."""

    def __init__(self, source: Source, plan):
        self.source, self.plan = source, plan
        self.shape = tuple(source.image_shape)
        self.encoded = len(source) > 0 and source.read_encoded(0) is not None
        self.shared = False  # set when the reader runs in worker processes (see _run)

    def _images(self, rows: np.ndarray, flips: np.ndarray, out: np.ndarray) -> np.ndarray:
        for j, i in enumerate(rows.tolist()):
            # An unflipped JPEG is decoded in place; a flipped one comes back as a fast-to-copy reversed view.
            image = decode_rgb(self.source.read_encoded(i), self.source.where(i), out=out[j], flip=bool(flips[j]))
            if image.shape != self.shape:
                raise BadInputError(
                    f"{self.source.where(i)}: the image decodes to shape {image.shape}, but the "
                    f"source serves {self.shape}; images of one source must share a size (add "
                    "',size=N' to the spec to resize)"
                )
            if not np.shares_memory(image, out[j]):
                out[j] = image
        return out

    def __call__(self, step: int) -> dict[str, Any]:
        batch = self.plan(step)
        rows, flips = batch.pop("read", batch["source_index"]), batch.pop("flip")
        if not self.encoded:
            images = self.source.read(rows)
            batch["image"] = np.where(flips[:, None, None, None], images[:, :, ::-1], images)
            return batch
        shape = (rows.size, *self.shape)
        if self.shared:  # decode straight into shared memory: Grain then sends it to the trainer without a copy
            import grain

            out = grain.multiprocessing.SharedMemoryArray(shape, np.uint8)
        else:
            out = np.empty(shape, np.uint8)
        try:
            batch["image"] = self._images(rows, flips, out)
        except (ValueError, OSError) as e:  # decode errors, wrong sizes, corrupt or vanished files
            if self.shared:
                out.unlink_on_del()  # never sent: this process frees the segment
            del out
            return {_ERROR: str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"}
        return batch


# ---- running it ------------------------------------------------------------------------------------------------

# Live batch generators. Grain's worker processes are stopped when their iterator is closed; the generators still
# open at interpreter exit are closed by this hook, so no worker outlives the run and exit never waits on one.
_LIVE: weakref.WeakSet = weakref.WeakSet()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _close_live() -> None:
    with _LIVE_LOCK:
        gens = list(_LIVE)
    for gen in gens:
        gen.close()


def _run(reader: _BatchReader, start: int, stop: int, workers: int) -> Iterator[dict[str, np.ndarray]]:
    import grain

    reader.shared = workers > 0
    dataset = grain.MapDataset.range(start, stop).map(reader)
    # In-process: one prefetch thread overlaps decoding (which releases the GIL) with the consumer. Workers run
    # ahead by themselves (per_worker_buffer_size), and must not hold shared-memory batches in a private buffer
    # that Grain would not free at shutdown.
    threads = 0 if workers > 0 else 1
    it_ds = dataset.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads))
    if workers > 0:
        from absl import flags

        if sys.version_info < (3, 13):
            # Before Python 3.13 every process that attaches to a shared-memory segment registers it with the
            # resource tracker again, so at exit the tracker reports the batches Grain already unlinked as
            # "leaked" and fails to unlink them twice (a false report: /dev/shm is clean). The tracker process
            # starts with the first worker and inherits this environment; the filter only hides its
            # UserWarnings.
            os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning:multiprocessing.resource_tracker")

        if not flags.FLAGS.is_parsed():  # Grain reads its absl flags; outside absl.app (pytest, notebooks) use
            flags.FLAGS.mark_as_parsed()  # their defaults instead of failing
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2))

    def batches():
        it = iter(it_ds)
        try:
            for batch in it:
                if _ERROR in batch:
                    raise BadInputError(str(batch[_ERROR]))
                # A worker's arrays arrive in shared memory (Grain's ndarray subclass, unlinked when dropped):
                # hand out plain ndarray views of them, no copy.
                yield {k: v if type(v) is np.ndarray else np.asarray(v).view(np.ndarray) for k, v in batch.items()}
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()  # stops the worker processes now, not at some later garbage collection
            del it
            gc.collect()  # Grain's iterator holds its last shared-memory batch in a cycle: release it now

    gen = batches()
    with _LIVE_LOCK:
        _LIVE.add(gen)
    return gen


def train_batches(
    source: Source,
    subset: Subset | None,
    *,
    global_batch: int,
    seed: int,
    start_step: int = 0,
    flip: bool = True,
    process_index: int = 0,
    process_count: int = 1,
    threads: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Endless training batches of this process, starting at global step ``start_step``.

    Args:
      source: the images.
      subset: which examples and labels (None: the whole source with its own labels).
      global_batch: examples per step over all processes; must be divisible by ``process_count``.
      seed: the data-order and flip seed.
      start_step: the first step yielded; resuming at step s gives the batches a continuous run gives there.
      flip: random horizontal flip with p = 0.5.
      process_index: this process's rank.
      process_count: number of processes sharing each global batch.
      threads: decoding worker processes (0: decode in this process; None or < 0: automatic, see
        :func:`_workers`). The batches do not depend on it.

    Yields:
      dicts with ``image`` uint8 [b, H, W, 3], ``label`` int32 [b] (subset labels), ``index`` int32 [b] (row in
      the subset, i.e. in per-example arrays such as old features) and ``source_index`` int64 [b], where
      ``b = global_batch // process_count``.

    Raises:
      BadInputError: (while iterating) an image cannot be decoded or has the wrong size; names file and key.
    """
    subset = subset if subset is not None else full(source.labels)
    local = _check_processes(global_batch, process_index, process_count, "global_batch")
    spe = steps_per_epoch(len(subset), global_batch)
    if spe == 0:
        raise ValueError(f"the subset has {len(subset)} examples, fewer than one global batch of {global_batch}")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0; got {start_step}")
    plan = _TrainPlan(subset, global_batch=global_batch, seed=seed, flip=flip, lo=process_index * local, local=local)
    reader = _BatchReader(source, plan)
    return _run(reader, start_step, start_step + _ENDLESS, _workers(threads, reader))


def eval_batches(
    source: Source,
    subset: Subset | None,
    *,
    batch_size: int,
    flip: bool = False,
    seed: int = 0,
    pad_last: bool = False,
    process_index: int = 0,
    process_count: int = 1,
    threads: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Every example of the subset exactly once, in order (for feature extraction).

    Global batch ``k`` holds subset rows ``[k·batch_size, (k+1)·batch_size)``; process ``p`` gets its contiguous
    slice of it. The last global batch is padded to ``batch_size`` when ``pad_last`` or when
    ``process_count > 1`` (every process must run the same number of steps); otherwise it is smaller.

    Args:
      source: the images.
      subset: which examples (None: the whole source).
      batch_size: global batch size; must be divisible by ``process_count``.
      flip: flip with the stateless coin of ``(seed, 0, index)`` (the reference extracts old features with the
        training flip on, docs/deviations.md §8.7).
      seed: the flip seed.
      pad_last: pad the last batch to full size.
      process_index: this process's rank.
      process_count: number of processes.
      threads: decoding worker processes (0: in this process; None or < 0: automatic, as for training).

    Yields:
      dicts with ``image`` uint8 [b, H, W, 3], ``label`` int32 [b], ``index`` int32 [b] (subset row),
      ``source_index`` int64 [b] and ``mask`` bool [b]; padded rows have mask False, label/index/source_index -1
      and a copy of a real image.
    """
    subset = subset if subset is not None else full(source.labels)
    local = _check_processes(batch_size, process_index, process_count, "batch_size")
    n = len(subset)
    plan = _EvalPlan(
        subset,
        batch_size=batch_size,
        seed=seed,
        flip=flip,
        pad=pad_last or process_count > 1,
        lo=process_index * local,
        local=local,
    )
    reader = _BatchReader(source, plan)
    return _run(reader, 0, -(-n // batch_size), _workers(threads, reader))


# ---- checkpointed iterator state -------------------------------------------------------------------------------


def data_state(
    *,
    step: int,
    seed: int,
    global_batch: int,
    num_examples: int,
    flip: bool,
    process_count: int,
    source: str,
    subset: str,
) -> dict[str, Any]:
    """The whole input-iterator state at global ``step`` (JSON-serialisable; saved beside the train state).

    The order is a pure function of these fields, so this is all a resumed run needs to continue with exactly the
    batches it would have seen.
    """
    return {
        "version": 1,
        "step": int(step),
        "seed": int(seed),
        "global_batch": int(global_batch),
        "num_examples": int(num_examples),
        "flip": bool(flip),
        "process_count": int(process_count),
        "source": str(source),
        "subset": str(subset),
    }


# The config fields that set a data-state field: a resume that changes one of them on purpose
# (config.resume_allow) starts a new order at the restored step, so that field is not compared.
_CONFIG_FIELDS = {"seed": "seed", "data.global_batch": "global_batch", "data.flip": "flip", "data.source": "source"}


def check_resume(saved: dict[str, Any] | None, expected: dict[str, Any], *, allowed: Any = ()) -> None:
    """Raises a clear error when a checkpoint's input state does not match this run's.

    Args:
      saved: the checkpoint's input state (same fields as :func:`data_state`); None (a checkpoint written before
        the state was stored) passes.
      expected: this run's input state (:func:`data_state`).
      allowed: config fields the resume changes on purpose (``guard.check_resume``'s result); the state fields
        they set are not compared.
    """
    if saved is None:
        return
    # process_count may change (batches are global, processes take slices), so it is not compared.
    skip = {_CONFIG_FIELDS[f] for f in allowed if f in _CONFIG_FIELDS}
    fields = [k for k in ("step", "seed", "global_batch", "num_examples", "flip", "source", "subset") if k not in skip]
    diff = {k: (saved.get(k), expected[k]) for k in fields if saved.get(k) != expected[k]}
    if diff:
        what = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise ValueError(
            f"the checkpoint's input-pipeline state does not match this run ({what}); resuming would "
            "train on other batches than the interrupted run. Resume with the run's original config "
            "(config.json in the workdir) or start a new --workdir."
        )


def run_data_state(config, num_examples: int, step: int) -> dict[str, Any]:
    """``data_state`` of a training run of ``config`` over ``num_examples`` examples at ``step``."""
    import jax

    return data_state(
        step=step,
        seed=config.seed,
        global_batch=config.data.global_batch,
        num_examples=num_examples,
        flip=config.data.flip,
        process_count=jax.process_count(),
        source=config.data.source,
        subset=f"{config.data.scenario}/{config.data.role}/{config.data.split_ratio}",
    )


def run_train_batches(config, source, subset, start_step: int) -> Iterator[dict[str, np.ndarray]]:
    """``train_batches`` of a training run of ``config`` (this process's rows), from ``start_step`` on."""
    import jax

    return train_batches(
        source,
        subset,
        global_batch=config.data.global_batch,
        seed=config.seed,
        start_step=start_step,
        flip=config.data.flip,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        threads=None if config.data.threads < 0 else config.data.threads,
    )
