"""FROZEN COPY of the tf.data input pipeline that mixbct_jax.data.pipeline replaced (Grain, no TensorFlow).

Kept only so ``benchmarks/input_pipeline.py`` can time old vs new in the same run; nothing in the package imports
it. Needs TensorFlow (``pip install -e ".[tf]"``). Its docstring follows.

The tf.data input pipeline: deterministic, resumable global batches of decoded uint8 images.

Order (docs/data.md (data order), as a global permutation instead of the reference's per-rank strided sampler): epoch
``e`` is the permutation ``np.random.default_rng([seed, e]).permutation(n)`` of the subset, cut into global batches of
``global_batch`` with the remainder dropped; step ``s`` is batch ``s % steps_per_epoch`` of epoch
``s // steps_per_epoch``. The order is a pure function of ``(seed, step)``, so starting at ``start_step`` resumes
exactly, skipping at the index level without decoding. Process ``p`` of ``P`` yields the contiguous slice
``[p·B/P, (p+1)·B/P)`` of every global batch. The horizontal flip (p = 0.5, docs/data.md (augmentation)) is a hash of
``(seed, epoch, subset index)``, so it is reproducible as well.

How images are produced:
* sources that store encoded images (rec, folder, tfds): the bytes of a batch are read in one Python call
  (``os.pread``, which releases the GIL), then every image is decoded and flipped by TensorFlow ops in a parallel
  ``map`` (C++ threads, no GIL) and re-batched;
* array-backed sources (synthetic, npz): ``source.read`` of the whole batch via ``tf.numpy_function``.

Images stay uint8; the [-1, 1] normalisation happens on the device. TensorFlow is imported lazily and never sees
an accelerator.
"""

from __future__ import annotations

import atexit
import threading
import weakref
from collections.abc import Iterator

import numpy as np

from mixbct_jax.data.sources import Source
from mixbct_jax.data.splits import Subset, full

_U64 = (1 << 64) - 1


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


def _tf():
    """TensorFlow with every GPU hidden (TF is only the input pipeline; the accelerator belongs to JAX)."""
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TF already initialised its devices; it was hidden then, or by CUDA_VISIBLE_DEVICES
        pass
    return tf


class _EpochPermutations:
    """``default_rng([seed, e]).permutation(n)``, keeping the two most recent epochs (parallel readers overlap)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._cache: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def __call__(self, epoch: int) -> np.ndarray:
        with self._lock:
            if epoch not in self._cache:
                if len(self._cache) >= 2:
                    del self._cache[min(self._cache)]
                self._cache[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            return self._cache[epoch]


def _check_processes(batch: int, process_index: int, process_count: int, what: str) -> int:
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} must lie in [0, process_count={process_count})")
    if batch % process_count:
        raise ValueError(f"{what} {batch} must be divisible by process_count {process_count}")
    return batch // process_count


def _options(tf, threads: int | None):
    opts = tf.data.Options()
    opts.deterministic = True
    if threads:
        opts.threading.private_threadpool_size = threads
        opts.threading.max_intra_op_parallelism = 1
    return opts


def _images(tf, ds, source: Source, local_batch: int, threads: int | None):
    """Maps a dataset of index batches to the same batches with an ``'image'`` uint8 [b, H, W, 3] field.

    Elements in: dicts with ``source_index`` int64 [b] and ``flip`` bool [b] (and pass-through fields); the last
    batch may be smaller.
    """
    parallel = threads or tf.data.AUTOTUNE
    shape = tuple(source.image_shape)
    probe = int(source.read_encoded(0) is not None) if len(source) else 0

    if probe:

        def read_bytes(src):  # [b] int64 -> [b] encoded bytes
            return np.array([source.read_encoded(int(i)) for i in src], dtype=object)

        def with_bytes(ex):
            data = tf.numpy_function(read_bytes, [ex["source_index"]], tf.string, stateful=False)
            return {**ex, "data": tf.ensure_shape(data, [None])}

        def decode(ex):
            data = ex.pop("data")
            image = tf.cond(
                tf.io.is_jpeg(data),
                # INTEGER_ACCURATE is libjpeg's ISLOW DCT, the one OpenCV (mx.image.imdecode) uses.
                lambda: tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE"),
                lambda: tf.io.decode_image(data, channels=3, expand_animations=False),
            )
            # A wrong-sized image fails here, naming its source row, not later in the model.
            check = tf.debugging.Assert(
                tf.reduce_all(tf.shape(image) == shape),
                [
                    f"{source.name}: the image of source row",
                    ex["source_index"],
                    "decodes to shape",
                    tf.shape(image),
                    f"but the source serves {shape}; add ',size=N' to the spec to resize",
                ],
            )
            with tf.control_dependencies([check]):
                image = tf.ensure_shape(tf.identity(image), shape)
            image = tf.cond(ex["flip"], lambda: tf.reverse(image, axis=[1]), lambda: image)
            return {**ex, "image": image}

        ds = ds.map(with_bytes, num_parallel_calls=parallel).unbatch()
        ds = ds.map(decode, num_parallel_calls=parallel).batch(local_batch)
        return ds

    def read(src, flip):  # [b], [b] -> [b, H, W, 3]
        images = source.read(src)
        return np.where(flip[:, None, None, None], images[:, :, ::-1], images)

    def with_images(ex):
        images = tf.numpy_function(read, [ex["source_index"], ex["flip"]], tf.uint8, stateful=False)
        return {**ex, "image": tf.ensure_shape(images, (None, *shape))}

    return ds.map(with_images, num_parallel_calls=parallel)


# Live batch generators. A tf.data iterator with numpy_function calls in flight deadlocks if it is destroyed
# during interpreter finalisation (its threads wait for a GIL that is never handed out again), so the
# generators still open at exit are closed by an atexit hook, while the interpreter still works.
_LIVE: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_live() -> None:
    for gen in list(_LIVE):
        gen.close()


def _finish(tf, ds, threads: int | None, drop: tuple[str, ...] = ("flip",)) -> Iterator[dict[str, np.ndarray]]:
    ds = ds.map(lambda ex: {k: v for k, v in ex.items() if k not in drop}).prefetch(tf.data.AUTOTUNE)
    ds = ds.with_options(_options(tf, threads))

    def batches():
        it = ds.as_numpy_iterator()
        try:
            yield from it
        finally:
            del it  # stops the tf.data threads now, not at some later garbage collection

    gen = batches()
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
      threads: tf.data parallelism (None: AUTOTUNE and TF's default thread pool).

    Yields:
      dicts with ``image`` uint8 [b, H, W, 3], ``label`` int32 [b] (subset labels), ``index`` int32 [b] (row in
      the subset, i.e. in per-example arrays such as old features) and ``source_index`` int64 [b], where
      ``b = global_batch // process_count``.
    """
    tf = _tf()
    subset = subset if subset is not None else full(source.labels)
    local = _check_processes(global_batch, process_index, process_count, "global_batch")
    spe = steps_per_epoch(len(subset), global_batch)
    if spe == 0:
        raise ValueError(f"the subset has {len(subset)} examples, fewer than one global batch of {global_batch}")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0; got {start_step}")
    perms = _EpochPermutations(len(subset), seed)
    lo = process_index * local

    def plan(step):  # the index-level batch of one step; nothing is read here
        epoch, k = divmod(int(step), spe)
        pos = perms(epoch)[k * global_batch + lo : k * global_batch + lo + local]  # [b] subset rows
        flips = flip_mask(seed, epoch, pos) if flip else np.zeros(local, bool)
        return pos.astype(np.int32), subset.indices[pos], subset.labels[pos].astype(np.int32), flips

    def planned(step):
        dtypes = [tf.int32, tf.int64, tf.int32, tf.bool]
        pos, src, label, flips = tf.numpy_function(plan, [step], dtypes, stateful=False)
        fix = lambda t: tf.ensure_shape(t, [local])  # noqa: E731
        return {"index": fix(pos), "source_index": fix(src), "label": fix(label), "flip": fix(flips)}

    ds = tf.data.Dataset.counter(start=start_step).map(planned)
    return _finish(tf, _images(tf, ds, source, local, threads), threads)


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
      threads: tf.data parallelism (None: AUTOTUNE).

    Yields:
      dicts with ``image`` uint8 [b, H, W, 3], ``label`` int32 [b], ``index`` int32 [b] (subset row),
      ``source_index`` int64 [b] and ``mask`` bool [b]; padded rows have mask False, label/index/source_index -1
      and a copy of a real image.
    """
    tf = _tf()
    subset = subset if subset is not None else full(source.labels)
    local = _check_processes(batch_size, process_index, process_count, "batch_size")
    n = len(subset)
    pad = pad_last or process_count > 1
    steps = -(-n // batch_size)
    lo = process_index * local

    def plan(step):
        start = int(step) * batch_size
        pos = np.arange(start, min(start + batch_size, n), dtype=np.int64)
        if pad:
            pos = np.concatenate([pos, np.full(batch_size - pos.size, -1, np.int64)])
        pos = pos[lo : lo + local]  # [b] (smaller in an unpadded last batch; then process_count == 1)
        mask = pos >= 0
        safe = np.where(mask, pos, n - 1)  # padded rows re-read the last example
        src = subset.indices[safe]
        label = np.where(mask, subset.labels[safe], -1).astype(np.int32)
        flips = flip_mask(seed, 0, safe) if flip else np.zeros(pos.size, bool)
        return pos.astype(np.int32), src, np.where(mask, src, -1), label, mask, flips

    def planned(step):
        pos, src, src_out, label, mask, flips = tf.numpy_function(
            plan, [step], [tf.int32, tf.int64, tf.int64, tf.int32, tf.bool, tf.bool], stateful=False
        )
        fix = lambda t: tf.ensure_shape(t, [None])  # noqa: E731
        return {
            "index": fix(pos),
            "source_index": fix(src),
            "reported_source_index": fix(src_out),
            "label": fix(label),
            "mask": fix(mask),
            "flip": fix(flips),
        }

    def rename(ex):
        ex = dict(ex)
        ex["source_index"] = ex.pop("reported_source_index")
        return ex

    ds = tf.data.Dataset.range(steps).map(planned)
    ds = _images(tf, ds, source, local, threads).map(rename)
    return _finish(tf, ds, threads)
