"""The tf.data training and evaluation pipelines: order, slicing, resume, decoding, coverage."""

import itertools

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
    per_process = [_take(pipeline.train_batches(source, subset, process_index=p, **kwargs), steps) for p in range(4)]
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
    batches = _take(pipeline.train_batches(source, None, global_batch=gb, seed=0, flip=False), 2 * spe)
    epochs = [np.concatenate([b["index"] for b in batches[e * spe : (e + 1) * spe]]) for e in range(2)]
    for order in epochs:
        assert order.size == spe * gb and np.unique(order).size == order.size  # no repeats, remainder dropped
        assert order.min() >= 0 and order.max() < n
    assert not np.array_equal(epochs[0], epochs[1])


def test_resume_from_start_step_continues_the_same_stream(rec_png):
    source, _ = rec_png
    kwargs = dict(global_batch=8, seed=3, process_index=1, process_count=2)
    continuous = _take(pipeline.train_batches(source, None, **kwargs), 13)
    resumed = _take(pipeline.train_batches(source, None, start_step=9, **kwargs), 4)  # crosses an epoch boundary
    assert pipeline.steps_per_epoch(len(source), 8) < 13
    for a, b in zip(continuous[9:], resumed):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_array_source_matches_encoded_source(rec_png):
    source, images = rec_png
    synthetic = sources.SyntheticSource("synthetic", FACES)
    kwargs = dict(global_batch=10, seed=2, threads=2)
    for a, b in zip(_take(pipeline.train_batches(source, None, **kwargs), 3),
                    _take(pipeline.train_batches(synthetic, None, **kwargs), 3)):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_jpeg_decoded_in_graph_equals_tf_decode(tmp_path):
    images = FACES.read(np.arange(20))
    recordio.write_rec(tmp_path / "j", images, FACES.labels[:20], encoding=".jpg", quality=80)
    source = sources.open_source(f"rec:{tmp_path / 'j'}")
    tf = pipeline._tf()
    batch = _take(pipeline.train_batches(source, None, global_batch=20, seed=0), 1)[0]
    for row, (i, flip) in enumerate(zip(batch["source_index"], pipeline.flip_mask(0, 0, batch["index"]))):
        ref = tf.io.decode_jpeg(source.read_encoded(i), channels=3, dct_method="INTEGER_ACCURATE").numpy()
        np.testing.assert_array_equal(batch["image"][row], ref[:, ::-1] if flip else ref)
        # OpenCV (the reference's decoder) agrees up to IDCT implementation differences.
        cv = source.read([i])[0]
        assert np.abs(cv.astype(int) - ref).max() <= 2


def test_eval_batches_cover_every_index_once_in_order(rec_png):
    source, images = rec_png
    n = len(source)
    batches = list(pipeline.eval_batches(source, None, batch_size=9))
    assert n % 9 != 0 and len(batches) == -(-n // 9) and batches[-1]["image"].shape[0] == n % 9
    index = np.concatenate([b["index"] for b in batches])
    np.testing.assert_array_equal(index, np.arange(n))
    assert all(b["mask"].all() for b in batches)
    np.testing.assert_array_equal(np.concatenate([b["image"] for b in batches]), images)  # no flip
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), source.labels)

    # Four processes: padded to full global batches, masks mark the real rows.
    subset = splits.data_split(source.labels)[1]
    per_process = [
        list(pipeline.eval_batches(source, subset, batch_size=8, flip=True, seed=4, process_index=p, process_count=4))
        for p in range(4)
    ]
    assert len({len(b) for b in per_process}) == 1 and len(per_process[0]) == -(-len(subset) // 8)
    merged = [{k: np.concatenate([per_process[p][s][k] for p in range(4)]) for k in per_process[0][s]}
              for s in range(len(per_process[0]))]
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
    source = sources.open_source(f"folder:{tmp_path}")
    tf = pipeline._tf()
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"source row\] \[3\] \[decodes to shape\] \[7 6 3\]"):
        list(pipeline.eval_batches(source, None, batch_size=4))
