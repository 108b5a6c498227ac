"""Every source kind behind ``open_source``, on tiny fixtures written in the real formats."""

import cv2
import numpy as np
import pytest

from mixbct_jax.data import recordio, sources
from mixbct_jax.data.synthetic import SyntheticFaces


def _rgb(n, h=6, w=6, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


def _check_protocol(src, n, shape):
    assert isinstance(src, sources.Source)
    assert len(src) == n and src.labels.shape == (n,) and src.labels.dtype == np.int32
    assert tuple(src.image_shape) == shape
    batch = src.read(np.array([n - 1, 0]))
    assert batch.dtype == np.uint8 and batch.shape == (2, *shape)
    assert src.read([]).shape == (0, *shape)
    with pytest.raises(IndexError, match="out of range"):
        src.read([n])


def test_synthetic_spec():
    src = sources.open_source("synthetic:num_classes=5,min_images=2,max_images=3,image_size=16,seed=3")
    ref = SyntheticFaces(num_classes=5, min_images=2, max_images=3, image_size=16, seed=3)
    _check_protocol(src, len(ref), (16, 16, 3))
    np.testing.assert_array_equal(src.read([0, 4]), ref.read([0, 4]))
    np.testing.assert_array_equal(src.labels, ref.labels)
    assert src.num_classes == 5 and src.read_encoded(0) is None
    assert len(sources.open_source("synthetic")) == len(SyntheticFaces())
    with pytest.raises(ValueError, match="synthetic takes only"):
        sources.open_source("synthetic:colour=3")


@pytest.mark.parametrize("encoding", [".png", ".jpg"])
def test_rec_source(tmp_path, encoding):
    images, labels = _rgb(5, 8, 8), np.array([0, 0, 1, 2, 2])
    recordio.write_rec(tmp_path / "train", images, labels, encoding=encoding)
    src = sources.open_source(f"rec:{tmp_path / 'train'}")
    _check_protocol(src, 5, (8, 8, 3))
    np.testing.assert_array_equal(src.labels, labels)
    assert src.num_classes == 3
    encoded = [src.read_encoded(i) for i in range(5)]
    assert encoded[2] == recordio.RecFile(tmp_path / "train").read_example(2)[1]
    reference = np.stack([cv2.imdecode(np.frombuffer(e, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1] for e in encoded])
    np.testing.assert_array_equal(src.read(np.arange(5)), reference)
    if encoding == ".png":
        np.testing.assert_array_equal(src.read(np.arange(5)), images)
    assert len(sources.open_source(f"rec:{tmp_path / 'train.rec'}")) == 5  # an extension is tolerated


def _write_folder(root):
    """Three classes (given out of order), a greyscale PNG, an upper-case .JPG and files to ignore."""
    images = _rgb(5, 6, 6, seed=1)
    layout = {"bob": [0, 1], "alice": [2], "carol": [3, 4]}
    for cls, idx in layout.items():
        (root / cls).mkdir(parents=True)
        for j, i in enumerate(idx):
            cv2.imwrite(str(root / cls / f"{j:02d}.png"), images[i][:, :, ::-1])
    grey = images[0, :, :, 0]
    cv2.imwrite(str(root / "alice" / "05_grey.png"), grey)
    cv2.imwrite(str(root / "carol" / "99.JPG"), images[4][:, :, ::-1])
    (root / "carol" / "notes.txt").write_text("not an image")
    (root / "bob" / ".hidden.png").write_bytes(b"junk")
    (root / "stray.png").write_bytes(b"not a class folder")
    return images, grey


def test_folder_source(tmp_path):
    images, grey = _write_folder(tmp_path / "imgs")
    src = sources.open_source(f"folder:{tmp_path / 'imgs'}")
    assert src.class_names == ["alice", "bob", "carol"]
    np.testing.assert_array_equal(src.labels, [0, 0, 1, 1, 2, 2, 2])
    assert [p.name for p in src.files] == ["00.png", "05_grey.png", "00.png", "01.png", "00.png", "01.png", "99.JPG"]
    _check_protocol(src, 7, (6, 6, 3))
    got = src.read(np.arange(7))
    for i, ref in zip([0, 2, 3, 4, 5], [images[2], images[0], images[1], images[3], images[4]]):
        np.testing.assert_array_equal(got[i], ref)
    np.testing.assert_array_equal(got[1], np.repeat(grey[:, :, None], 3, axis=2))  # greyscale -> 3 channels
    jpg = cv2.imread(str(tmp_path / "imgs" / "carol" / "99.JPG"))[:, :, ::-1]
    np.testing.assert_array_equal(got[6], jpg)
    assert src.read_encoded(6) == (tmp_path / "imgs" / "carol" / "99.JPG").read_bytes()


def test_folder_source_resize_and_errors(tmp_path):
    images, _ = _write_folder(tmp_path / "imgs")
    src = sources.open_source(f"folder:{tmp_path / 'imgs'},size=4")
    assert src.image_shape == (4, 4, 3) and src.read_encoded(0) is None
    ref = cv2.resize(images[2], (4, 4), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(src.read([0])[0], ref)

    cv2.imwrite(str(tmp_path / "imgs" / "carol" / "02.png"), _rgb(1, 9, 9)[0])
    # Every image's size is checked when the folder is opened (headers only), not when training reaches it.
    with pytest.raises(ValueError, match=r"carol/02\.png is 9x9 but .*alice/00\.png is 6x6.*,size=6"):
        sources.open_source(f"folder:{tmp_path / 'imgs'}")
    assert sources.open_source(f"folder:{tmp_path / 'imgs'},size=6").read([6])[0].shape == (6, 6, 3)
    (tmp_path / "imgs" / "carol" / "02.png").unlink()
    (tmp_path / "imgs" / "carol" / "03.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match=r"carol/03\.png is not a readable image"):
        sources.open_source(f"folder:{tmp_path / 'imgs'}")
    (tmp_path / "imgs" / "carol" / "03.png").unlink()
    (tmp_path / "imgs" / "dave").mkdir()
    with pytest.raises(ValueError, match="dave has no"):
        sources.open_source(f"folder:{tmp_path / 'imgs'}")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        sources.open_source(f"folder:{tmp_path / 'missing'}")


def test_npz_source(tmp_path):
    grey = np.random.default_rng(0).integers(0, 256, size=(6, 5, 5), dtype=np.uint8)
    np.savez(tmp_path / "g.npz", images=grey, labels=np.array([0, 1, 1, 2, 3, 3]))
    src = sources.open_source(f"npz:{tmp_path / 'g.npz'}")
    _check_protocol(src, 6, (5, 5, 3))
    np.testing.assert_array_equal(src.read([3])[0], np.repeat(grey[3][:, :, None], 3, axis=2))
    assert src.num_classes == 4 and src.read_encoded(0) is None

    big = sources.open_source(f"npz:{tmp_path / 'g.npz'},size=8")
    ref = cv2.resize(grey[2], (8, 8), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(big.read([2])[0], np.repeat(ref[:, :, None], 3, axis=2))

    np.savez(tmp_path / "bad.npz", pixels=grey)
    with pytest.raises(ValueError, match=r"bad\.npz needs arrays 'images' and 'label'"):
        sources.open_source(f"npz:{tmp_path / 'bad.npz'}")


def test_npz_omniglot(omniglot_dir):
    path = omniglot_dir / "omniglot_small_28.npz"
    src = sources.open_source(f"npz:{path},size=32")
    assert len(src) == 4840 and src.num_classes == 242 and src.image_shape == (32, 32, 3)
    with np.load(path) as z:
        raw, label = z["images"][1234], z["label"]
    np.testing.assert_array_equal(src.labels, label)
    ref = cv2.resize(raw, (32, 32), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(src.read([1234])[0], np.stack([ref] * 3, axis=-1))


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """A tiny TFDS data set prepared as array_record in a temporary data_dir (no download).

    Writing a TFDS data set needs TensorFlow (TFDS serialises examples with it); reading one does not, which
    test_tfds_source_reads_without_tensorflow checks in a fresh interpreter. Without TensorFlow installed (the
    ``[tf]`` extra) these tests are skipped: there is no way to prepare the fixture.
    """
    tfds = pytest.importorskip("tensorflow_datasets")
    pytest.importorskip("tensorflow", reason="preparing a TFDS data set needs TensorFlow (pip install -e '.[tf]')")

    class MixbctTinyFaces(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = {"image": tfds.features.Image(shape=(6, 6, 1)), "label": tfds.features.ClassLabel(num_classes=5)}
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(12), "test": self._generate_examples(3)}

        def _generate_examples(self, n):
            rng = np.random.default_rng(n)
            for i in range(n):
                yield i, {"image": rng.integers(0, 256, (6, 6, 1), dtype=np.uint8), "label": i % 4}

    data_dir = tmp_path_factory.mktemp("tfds")
    builder = MixbctTinyFaces(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return data_dir, builder, MixbctTinyFaces


def test_tfds_prepared_as_tfrecord_is_refused_with_the_build_command(tfds_dir, tmp_path):
    import tensorflow_datasets as tfds

    builder = tfds_dir[2](data_dir=str(tmp_path), file_format="tfrecord")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    message = r"stored as tfrecord.*`tfds build mixbct_tiny_faces --file_format=array_record"
    with pytest.raises(ValueError, match=message):
        sources.open_source(f"tfds:mixbct_tiny_faces,data_dir={tmp_path}")


def test_tfds_source_reads_without_tensorflow(tfds_dir):
    """In a fresh interpreter: open, read and batch the array_record set; TensorFlow is never imported."""
    import subprocess
    import sys

    code = (
        f"import sys; from mixbct_jax.data import pipeline, sources\n"
        f"s = sources.open_source('tfds:mixbct_tiny_faces:train,data_dir={tfds_dir[0]}')\n"
        f"b = next(pipeline.train_batches(s, None, global_batch=4, seed=0, threads=0))\n"
        f"assert b['image'].shape == (4, 6, 6, 3), b['image'].shape\n"
        f"print('TF', sorted(m for m in sys.modules if m.split('.')[0] == 'tensorflow'))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "TF []" in result.stdout, result.stdout


def test_tfds_source(tfds_dir):
    data_dir, builder, _ = tfds_dir
    # Opened by name from the data_dir alone: the builder class is not registered.
    src = sources.open_source(f"tfds:mixbct_tiny_faces:train,data_dir={data_dir}")
    reference = builder.as_data_source("train")
    _check_protocol(src, 12, (6, 6, 3))
    np.testing.assert_array_equal(src.labels, [reference[i]["label"] for i in range(12)])
    assert src.num_classes == 5  # the ClassLabel's declared count, not max + 1
    got = src.read(np.arange(12))
    for i in (0, 7):
        np.testing.assert_array_equal(got[i], np.repeat(reference[i]["image"], 3, axis=2))
        decoded = cv2.imdecode(np.frombuffer(src.read_encoded(i), np.uint8), cv2.IMREAD_GRAYSCALE)
        np.testing.assert_array_equal(decoded, reference[i]["image"][:, :, 0])

    test = sources.open_source(f"tfds:mixbct_tiny_faces:test,data_dir={data_dir},size=4")
    assert len(test) == 3 and test.image_shape == (4, 4, 3) and test.read_encoded(0) is None
    assert len(sources.open_source(f"tfds:mixbct_tiny_faces:1.0.0,data_dir={data_dir}")) == 12  # version, not split

    with pytest.raises(FileNotFoundError, match="'no_such_set' is not prepared.*nothing is downloaded"):
        sources.open_source(f"tfds:no_such_set,data_dir={data_dir}")
    with pytest.raises(ValueError, match="feature 'img' not in"):
        sources.open_source(f"tfds:mixbct_tiny_faces,data_dir={data_dir},image_key=img")


def test_bad_specs():
    with pytest.raises(ValueError, match=r"(?s)unknown source spec 'hdf5:/x'.*rec:/path/prefix.*folder:/dir"):
        sources.open_source("hdf5:/x")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['colour'\]"):
        sources.open_source("folder:/tmp,colour=1")
    with pytest.raises(ValueError, match="size must be an integer"):
        sources.open_source("npz:/x.npz,size=big")
    with pytest.raises(ValueError, match="needs a location"):
        sources.open_source("rec:")


def test_classes_option_restricts_any_source_and_relabels():
    from mixbct_jax.data.sources import open_source

    base = open_source("synthetic:num_classes=10,min_images=2,max_images=4,image_size=16,seed=3")
    held = open_source("synthetic:num_classes=10,min_images=2,max_images=4,image_size=16,seed=3,classes=7:10")
    rows = np.flatnonzero(base.labels >= 7)
    np.testing.assert_array_equal(held.labels, base.labels[rows] - 7)
    assert held.num_classes == 3 and len(held) == rows.size
    np.testing.assert_array_equal(held.read([0, len(held) - 1]), base.read(rows[[0, -1]]))
    with pytest.raises(ValueError, match="A:B"):
        open_source("synthetic:num_classes=10,classes=5")
    with pytest.raises(ValueError, match="no example"):
        open_source("synthetic:num_classes=10,classes=50:60")


@pytest.mark.parametrize(
    "label, why",
    [
        (-3, "is negative"),
        (2.5, "is not a whole number"),
        (np.nan, "is not a finite number"),
        (1e9, "is >= the number of classes"),
    ],
)
def test_npz_bad_label_names_file_and_row(tmp_path, label, why):
    labels = np.array([0, 1, label, 1], np.float64)
    np.savez(tmp_path / "bad.npz", images=np.zeros((4, 5, 5), np.uint8), label=labels)
    with pytest.raises(ValueError, match=rf"bad\.npz 'label': example 2: label .* {why}"):
        sources.open_source(f"npz:{tmp_path / 'bad.npz'}")


def test_decode_rgb_matches_opencv_on_omniglot_jpegs(omniglot_dir):
    """Simplejpeg (accurate IDCT, fancy upsampling) gives OpenCV's pixels, grey and colour, 4:2:0 and 4:4:4."""
    with np.load(omniglot_dir / "omniglot_small_28.npz") as z:
        strokes = z["images"][:40]
    rng = np.random.default_rng(0)
    for k, grey in enumerate(strokes):
        image = cv2.resize(grey, (56, 56), interpolation=cv2.INTER_LINEAR)
        colour = np.stack([image, 255 - image, rng.integers(0, 256, image.shape, dtype=np.uint8)], axis=-1)
        sampling = [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444] if k % 2 else []
        for array in (image, colour):
            data = cv2.imencode(".jpg", array, [cv2.IMWRITE_JPEG_QUALITY, 60 + k] + sampling)[1].tobytes()
            reference = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
            np.testing.assert_array_equal(sources.decode_rgb(data, "x"), reference)
            np.testing.assert_array_equal(sources.decode_rgb(data, "x", flip=True), reference[:, ::-1])
            png = cv2.imencode(".png", array)[1].tobytes()
            flipped = sources.decode_rgb(png, "x", flip=True)
            np.testing.assert_array_equal(flipped, sources.decode_rgb(png, "x")[:, ::-1])


def test_synthetic_render_cache_gives_the_rendered_pixels():
    import pickle

    spec = "synthetic:num_classes=5,min_images=2,max_images=3,image_size=16,seed=3"
    src = sources.open_source(spec)
    faces = SyntheticFaces(num_classes=5, min_images=2, max_images=3, image_size=16, seed=3)
    first = src.read([3, 1, 3])  # repeated index, partly cached afterwards
    again = src.read(np.arange(len(src))[::-1])
    np.testing.assert_array_equal(first, faces.read([3, 1, 3]))
    np.testing.assert_array_equal(again, faces.read(np.arange(len(faces))[::-1]))
    again[:] = 0  # a read is a copy: the cache is not changed through it
    np.testing.assert_array_equal(src.read([0]), faces.read([0]))
    assert pickle.loads(pickle.dumps(src))._cache is None  # worker processes do not receive the images
    with pytest.raises(IndexError, match="out of range"):
        src.read([len(src)])
