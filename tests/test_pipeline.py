"""The Grain training and evaluation pipelines: order, slicing, resume, decoding, workers, bad input.

Most tests decode in the test process (``threads=0``); the worker-process tests check that the batches do not
depend on the worker count and that a bad image is reported by the main process.
"""

import itertools
import json
import pickle

import numpy as np
import pytest

from mixbct_jax.data import pipeline, recordio, sources, splits
from mixbct_jax.data.synthetic import SyntheticFaces

FACES = SyntheticFaces(num_classes=7, min_images=5, max_images=9, image_size=16, seed=1)


@pytest.fixture(scope="module")
def rec_png(tmp_path_factory):
    """A .rec of lossless PNGs, so decoded pixels must equal the originals exactly."""
    prefix = tmp_path_factory.mktemp("rec") / "faces"
    images = FACES.read(np.arange(len(FACES)))
    recordio.write_rec(prefix, images, FACES.labels, encoding=".png")
    return sources.open_source(f"rec:{prefix}"), images


def _reference_batch(encoded, subset_indices, subset_labels, *, seed, step, global_batch, flip=True):
    """Step ``step`` of the training stream, re-implemented from the spec with NumPy and OpenCV alone."""
    import cv2

    n = subset_indices.size
    epoch, k = divmod(step, n // global_batch)
    pos = np.random.default_rng([seed, epoch]).permutation(n)[k * global_batch : (k + 1) * global_batch]
    images = []
    for p in pos:
        image = cv2.imdecode(np.frombuffer(encoded[subset_indices[p]], np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
        images.append(image[:, ::-1] if flip and pipeline.flip_mask(seed, epoch, np.array([p]))[0] else image)
    return pos, subset_labels[pos], np.stack(images)


def _take(it, n):
    out = list(itertools.islice(it, n))
    it.close()
    return out


def _expected_images(images, index, source_index, seed, epoch):
    flips = pipeline.flip_mask(seed, epoch, index)
    return np.where(flips[:, None, None, None], images[source_index][:, :, ::-1], images[source_index])


def test_steps_per_epoch_and_flip_mask():
    assert pipeline.steps_per_epoch(100, 32) == 3 and pipeline.steps_per_epoch(31, 32) == 0
    idx = np.arange(20000)
    a = pipeline.flip_mask(0, 0, idx)
    assert a.dtype == bool and 0.48 < a.mean() < 0.52
    np.testing.assert_array_equal(a, pipeline.flip_mask(0, 0, idx))  # stateless
    assert (a != pipeline.flip_mask(0, 1, idx)).mean() > 0.4  # a new coin every epoch
    assert (a != pipeline.flip_mask(1, 0, idx)).mean() > 0.4  # and every seed
    np.testing.assert_array_equal(pipeline.flip_mask(0, 0, idx[::-1])[::-1], a)  # depends on the index only


def test_train_batches_four_process_slices(rec_png):
    source, images = rec_png
    subset = splits.class_split(source.labels, 0.3)[1]  # relabelled class70
    gb, seed, steps = 12, 5, 7
    spe = pipeline.steps_per_epoch(len(subset), gb)
    kwargs = dict(global_batch=gb, seed=seed, process_count=4)
    per_process = [
        _take(pipeline.train_batches(source, subset, process_index=p, threads=0, **kwargs), steps) for p in range(4)
    ]
    for step in range(steps):
        epoch, k = divmod(step, spe)
        parts = [per_process[p][step] for p in range(4)]
        merged = {key: np.concatenate([b[key] for b in parts]) for key in parts[0]}
        assert all(b["image"].shape == (3, 16, 16, 3) for b in parts)
        perm = np.random.default_rng([seed, epoch]).permutation(len(subset))
        np.testing.assert_array_equal(merged["index"], perm[k * gb : (k + 1) * gb])
        np.testing.assert_array_equal(merged["source_index"], subset.indices[merged["index"]])
        np.testing.assert_array_equal(merged["label"], subset.labels[merged["index"]])
        np.testing.assert_array_equal(merged["label"], source.labels[merged["source_index"]] - 2)  # C30 = round(7·0.3)
        expected = _expected_images(images, merged["index"], merged["source_index"], seed, epoch)
        np.testing.assert_array_equal(merged["image"], expected)
        assert merged["index"].dtype == np.int32 and merged["source_index"].dtype == np.int64
        assert merged["label"].dtype == np.int32 and merged["image"].dtype == np.uint8


def test_every_epoch_is_a_permutation(rec_png):
    source, _ = rec_png
    n, gb = len(source), 8
    spe = pipeline.steps_per_epoch(n, gb)
    batches = _take(pipeline.train_batches(source, None, global_batch=gb, seed=0, flip=False, threads=0), 2 * spe)
    epochs = [np.concatenate([b["index"] for b in batches[e * spe : (e + 1) * spe]]) for e in range(2)]
    for order in epochs:
        assert order.size == spe * gb and np.unique(order).size == order.size  # no repeats, remainder dropped
        assert order.min() >= 0 and order.max() < n
    assert not np.array_equal(epochs[0], epochs[1])


def test_resume_from_start_step_continues_the_same_stream(rec_png):
    source, _ = rec_png
    kwargs = dict(global_batch=8, seed=3, process_index=1, process_count=2, threads=0)
    continuous = _take(pipeline.train_batches(source, None, **kwargs), 13)
    resumed = _take(pipeline.train_batches(source, None, start_step=9, **kwargs), 4)  # crosses an epoch boundary
    assert pipeline.steps_per_epoch(len(source), 8) < 13
    for a, b in zip(continuous[9:], resumed):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_array_source_matches_encoded_source(rec_png):
    source, images = rec_png
    synthetic = sources.SyntheticSource("synthetic", FACES)
    kwargs = dict(global_batch=10, seed=2, threads=0)
    for a, b in zip(
        _take(pipeline.train_batches(source, None, **kwargs), 3),
        _take(pipeline.train_batches(synthetic, None, **kwargs), 3),
    ):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


@pytest.fixture(scope="module")
def rec_jpeg(tmp_path_factory):
    """A .rec of real JPEGs (synthetic faces and Omniglot-like strokes, 4:2:0 chroma) and their encoded bytes."""
    prefix = tmp_path_factory.mktemp("jpeg") / "faces"
    faces = SyntheticFaces(num_classes=6, min_images=4, max_images=6, image_size=24, seed=3)
    images = faces.read(np.arange(len(faces)))
    images[::3] = 255 - images[::3] // 2  # other tones and colours than the faces alone
    recordio.write_rec(prefix, images, faces.labels, encoding=".jpg", quality=85)
    encoded = [recordio.RecFile(prefix).read_example(i)[1] for i in range(len(faces))]
    return prefix, encoded, faces.labels


def test_jpeg_batches_are_bit_identical_to_a_numpy_opencv_reference(rec_jpeg):
    prefix, encoded, _ = rec_jpeg
    source = sources.open_source(f"rec:{prefix}")
    subset = splits.class_split(source.labels, 0.5)[1]
    gb, seed = 8, 11
    batches = _take(pipeline.train_batches(source, subset, global_batch=gb, seed=seed, threads=0), 5)
    assert pipeline.steps_per_epoch(len(subset), gb) < 5  # crosses an epoch
    for step, batch in enumerate(batches):
        pos, label, images = _reference_batch(
            encoded, subset.indices, subset.labels, seed=seed, step=step, global_batch=gb
        )
        np.testing.assert_array_equal(batch["index"], pos)
        np.testing.assert_array_equal(batch["label"], label)
        np.testing.assert_array_equal(batch["image"], images)  # simplejpeg gives OpenCV's pixels exactly
        assert batch["image"].dtype == np.uint8 and set(batch) == {"image", "label", "index", "source_index"}


def test_worker_processes_give_the_same_batches_and_resume(rec_jpeg):
    """Two spawned workers (the .rec is pickled and reopened there) vs decoding in this process."""
    prefix, _, _ = rec_jpeg
    source = sources.open_source(f"rec:{prefix},classes=1:6")  # a ClassRangeSource over a RecSource
    pickle.loads(pickle.dumps(source)).read([0])  # reopens the file
    kwargs = {"global_batch": 6, "seed": 1, "process_index": 1, "process_count": 2}
    inline = _take(pipeline.train_batches(source, None, threads=0, **kwargs), 7)
    workers = _take(pipeline.train_batches(source, None, threads=2, start_step=3, **kwargs), 4)
    for a, b in zip(inline[3:], workers):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    evals = list(pipeline.eval_batches(source, None, batch_size=4, threads=1))
    np.testing.assert_array_equal(np.concatenate([b["image"] for b in evals]), source.read(np.arange(len(source))))


def _rec_with_bad_image(prefix, bad: bytes):
    images = FACES.read(np.arange(6))
    with recordio.RecordWriter(prefix) as w:
        w.write(0, recordio.pack_header([7, 7]))
        for i in range(6):
            data = bytes(cv2_encode(images[i])) if i != 4 else bad
            w.write(i + 1, recordio.pack_header([i % 2, 0], id=i + 1) + data)


def cv2_encode(image):
    import cv2

    return cv2.imencode(".jpg", image[:, :, ::-1])[1].tobytes()


@pytest.mark.parametrize("threads", [0, 1])
@pytest.mark.parametrize("kind", ["not an image", "truncated jpeg"])
def test_bad_image_names_file_and_key_in_the_main_process(tmp_path, kind, threads):
    jpeg = cv2_encode(FACES.read([4])[0])
    bad = b"this is not an image at all" if kind == "not an image" else jpeg[: len(jpeg) * 3 // 4]
    _rec_with_bad_image(tmp_path / "bad", bad)
    source = sources.open_source(f"rec:{tmp_path / 'bad'}")  # opens: labels are fine, image 0 decodes
    message = r"bad\.rec record key 5 \(example 4\): cannot decode the " + (
        "image bytes" if kind == "not an image" else r"JPEG.*Premature end"
    )
    with pytest.raises(pipeline.BadInputError, match=message):
        list(pipeline.eval_batches(source, None, batch_size=3, threads=threads))


def test_eval_batches_cover_every_index_once_in_order(rec_png):
    source, images = rec_png
    n = len(source)
    batches = list(pipeline.eval_batches(source, None, batch_size=9, threads=0))
    assert n % 9 != 0 and len(batches) == -(-n // 9) and batches[-1]["image"].shape[0] == n % 9
    index = np.concatenate([b["index"] for b in batches])
    np.testing.assert_array_equal(index, np.arange(n))
    assert all(b["mask"].all() for b in batches)
    np.testing.assert_array_equal(np.concatenate([b["image"] for b in batches]), images)  # no flip
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), source.labels)

    # Four processes: padded to full global batches, masks mark the real rows.
    subset = splits.data_split(source.labels)[1]
    per_process = [
        list(
            pipeline.eval_batches(
                source, subset, batch_size=8, flip=True, seed=4, process_index=p, process_count=4, threads=0
            )
        )
        for p in range(4)
    ]
    assert len({len(b) for b in per_process}) == 1 and len(per_process[0]) == -(-len(subset) // 8)
    merged = [
        {k: np.concatenate([per_process[p][s][k] for p in range(4)]) for k in per_process[0][s]}
        for s in range(len(per_process[0]))
    ]
    index = np.concatenate([m["index"] for m in merged])
    mask = np.concatenate([m["mask"] for m in merged])
    np.testing.assert_array_equal(index[mask], np.arange(len(subset)))
    assert (~mask).sum() == (-len(subset)) % 8 and np.all(index[~mask] == -1)
    for m in merged:
        valid = m["mask"]
        np.testing.assert_array_equal(m["source_index"][valid], subset.indices[m["index"][valid]])
        expected = _expected_images(images, m["index"][valid], m["source_index"][valid], 4, 0)
        np.testing.assert_array_equal(m["image"][valid], expected)
        assert np.all(m["label"][~valid] == -1)


def test_bad_arguments(rec_png):
    source, _ = rec_png
    with pytest.raises(ValueError, match="divisible by process_count 4"):
        pipeline.train_batches(source, None, global_batch=10, seed=0, process_count=4)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        pipeline.train_batches(source, None, global_batch=10_000, seed=0)
    with pytest.raises(ValueError, match="process_index 4"):
        pipeline.eval_batches(source, None, batch_size=8, process_index=4, process_count=4)


def test_wrong_sized_image_names_its_row(tmp_path):
    import cv2

    for cls, sizes in {"a": [6, 6], "b": [6, 7]}.items():
        (tmp_path / cls).mkdir()
        for i, h in enumerate(sizes):
            cv2.imwrite(str(tmp_path / cls / f"{i}.png"), np.zeros((h, 6, 3), np.uint8))
    # A folder is checked when it is opened (every image's header)...
    with pytest.raises(ValueError, match=r"b/1\.png is 6x7 but .*a/0\.png is 6x6"):
        sources.open_source(f"folder:{tmp_path}")
    # ... a .rec when its batch is read: the odd record is named with its file and key.
    with recordio.RecordWriter(tmp_path / "odd") as w:  # no header record: keys 1..4, the last one 7x6
        for key, h in enumerate([6, 6, 6, 7], start=1):
            png = cv2.imencode(".png", np.zeros((h, 6, 3), np.uint8))[1].tobytes()
            w.write(key, recordio.pack_header([float(key > 2), 0], id=key) + png)
    source = sources.open_source(f"rec:{tmp_path / 'odd'}")
    with pytest.raises(
        pipeline.BadInputError, match=r"odd\.rec record key 4 \(example 3\): the image decodes to shape \(7, 6, 3\)"
    ):
        list(pipeline.eval_batches(source, None, batch_size=4, threads=0))


def test_resume_state_is_checked():
    state = pipeline.data_state(
        step=30,
        seed=1,
        global_batch=64,
        num_examples=900,
        flip=True,
        process_count=2,
        source="rec:/d/train",
        subset="opclass/old/0.3",
    )
    assert json.loads(json.dumps(state)) == state  # stored as a JSON item in the checkpoint
    pipeline.check_resume(state, dict(state, process_count=4))  # other process counts slice the same batches
    pipeline.check_resume(None, state)  # a checkpoint from before the state was stored
    with pytest.raises(ValueError, match=r"global_batch: checkpoint 64 vs now 128.*original config"):
        pipeline.check_resume(state, dict(state, global_batch=128))
    with pytest.raises(ValueError, match=r"seed: checkpoint 1 vs now 2"):
        pipeline.check_resume(state, dict(state, seed=2))
    pipeline.check_resume(state, dict(state, seed=2), allowed={"seed": (1, 2)})  # changed on purpose
    with pytest.raises(ValueError, match=r"global_batch: checkpoint 64 vs now 128"):  # only that field is let go
        pipeline.check_resume(state, dict(state, seed=2, global_batch=128), allowed={"seed": (1, 2)})


def test_default_workers():
    assert [pipeline.default_workers(c) for c in (1, 2, 4, 16, 64)] == [0, 1, 3, 8, 8]
