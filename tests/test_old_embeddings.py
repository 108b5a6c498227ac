"""data/old_embeddings.py: opening, validation messages and batch gathering."""

import numpy as np
import pytest

from mixbct_jax.bct import advbct, bct
from mixbct_jax.data import old_embeddings as oe
from mixbct_jax.data import old_stats

N, D, C = 50, 8, 5


@pytest.fixture()
def files(tmp_path):
    """A consistent set of old-embedding files, as extract + prepare would write them."""
    rng = np.random.default_rng(0)
    labels = np.sort(rng.integers(0, C, size=N))
    labels[:C] = np.arange(C)  # every class present
    labels.sort()
    features = (rng.normal(size=(N, D)) * 3).astype(np.float16)
    paths = {name: str(tmp_path / f"{name}.npy") for name in ("features", "labels", "credible", "prototypes")}
    np.save(paths["features"], features)
    np.save(paths["labels"], labels)
    np.save(paths["credible"], old_stats.denoise(features, labels, keep=0.9))
    np.save(paths["prototypes"], old_stats.class_means(features, labels, C))
    paths["advbct_meta"] = str(tmp_path / "meta.npz")
    np.savez(paths["advbct_meta"], **old_stats.advbct_meta(features, labels, C))
    return paths, labels


def _open(paths, **kw):
    """``open_old_embeddings`` with the method class files BCT (prototypes) and AdvBCT (meta) declare."""
    class_files = []
    if "prototypes" in kw:
        class_files.append((kw.pop("prototypes"), bct.METHOD.class_files[0]))
    if "advbct_meta" in kw:
        class_files.append((kw.pop("advbct_meta"), advbct.METHOD.class_files[0]))
    return oe.open_old_embeddings(**kw, class_files=class_files)


def _validate(old, labels, **overrides):
    kwargs = dict(num_examples=N, source_labels=labels, embedding_size=D, num_classes=C)
    oe.validate(old, **{**kwargs, **overrides})


def test_open_and_validate_consistent_files(files):
    paths, labels = files
    old = _open(paths, **paths)
    assert isinstance(old.features, np.memmap) and isinstance(old.credible, np.memmap)
    assert old.tables["prototypes"].shape == (C, D) and old.tables["advbct_center"].shape == (C, D)
    assert old.tables["advbct_num_kept"].dtype == np.int32 and old.source("credible") == paths["credible"]
    _validate(old, labels, check_all_rows=True)
    _validate(oe.open_old_embeddings(features=paths["features"]), labels, embedding_size=None, num_classes=None)


def test_wrong_row_count(files):
    paths, labels = files
    with pytest.raises(ValueError, match=rf"{paths['features']} has 50 rows but the training set has 51.*extract"):
        _validate(oe.open_old_embeddings(features=paths["features"]), labels, num_examples=51)


def test_wrong_dimension(files):
    paths, labels = files
    with pytest.raises(ValueError, match=rf"{paths['features']} have dimension 8 but .* embedding_size is 16"):
        _validate(oe.open_old_embeddings(features=paths["features"]), labels, embedding_size=16)


def test_nan_row_is_reported(files):
    paths, labels = files
    features = np.load(paths["features"])
    features[37, 3] = np.nan
    np.save(paths["features"], features)
    with pytest.raises(ValueError, match=rf"{paths['features']} row 37 contains NaN or Inf"):
        _validate(oe.open_old_embeddings(features=paths["features"]), labels)


def test_sampled_finite_check_reads_first_and_last_chunks(tmp_path):
    rows = 300_000  # 74 chunks of 4096 rows: more than the 64 a sampled check reads
    path = str(tmp_path / "big.npy")
    features = np.ones((rows, 2), np.float16)
    features[rows - 1, 0] = np.inf
    np.save(path, features)
    common = dict(num_examples=rows, source_labels=None, embedding_size=2, num_classes=None)
    with pytest.raises(ValueError, match=rf"{path} row {rows - 1} contains NaN or Inf"):
        oe.validate(oe.open_old_embeddings(features=path), **common)
    features[rows - 1, 0] = 1.0
    # Chunk 4 (rows 16384-20479) is not among the 64 sampled chunks; only a full check finds it.
    features[17000, 1] = np.nan
    np.save(path, features)
    old = oe.open_old_embeddings(features=path)
    oe.validate(old, **common)
    with pytest.raises(ValueError, match="row 17000 contains NaN"):
        oe.validate(old, **common, check_all_rows=True)


@pytest.mark.parametrize(
    "mask, message",
    [
        (np.ones(N, np.uint8), "must be a 1-D bool array, got shape \\(50,\\) dtype uint8"),
        (np.ones(N - 1, bool), "has 49 entries but the old features have 50 rows"),
        (np.zeros(N, bool), "is all False"),
    ],
)
def test_bad_credible_mask(files, mask, message):
    paths, labels = files
    np.save(paths["credible"], mask)
    old = oe.open_old_embeddings(features=paths["features"], credible=paths["credible"])
    with pytest.raises(ValueError, match=rf"credible mask {paths['credible']} {message}.*prepare denoise"):
        _validate(old, labels)


def test_label_mismatch_reports_first_index(files):
    paths, labels = files
    source = labels.copy()
    source[[13, 40]] += 1
    old = oe.open_old_embeddings(features=paths["features"], labels=paths["labels"])
    with pytest.raises(ValueError, match=rf"{paths['labels']} differ .* at 2 indices, first at index 13"):
        _validate(old, source)
    with pytest.raises(ValueError, match=r"have shape \(50,\) but the training set's labels have shape \(49,\)"):
        _validate(old, labels[:-1])


def test_prototypes_shape(files):
    paths, labels = files
    old = _open(paths, features=paths["features"], prototypes=paths["prototypes"])
    with pytest.raises(ValueError, match=rf"prototypes in {paths['prototypes']} has shape \(5, 8\) but \[6, 8\]"):
        _validate(old, labels, num_classes=6)
    np.save(paths["prototypes"], np.zeros((C, D + 1), np.float32))
    old = _open(paths, features=paths["features"], prototypes=paths["prototypes"])
    with pytest.raises(ValueError, match=r"has shape \(5, 9\) but \[C, 8\] is needed"):
        _validate(old, labels, num_classes=None)


def test_advbct_meta_shape_and_keys(files):
    paths, labels = files
    old = _open(paths, features=paths["features"], advbct_meta=paths["advbct_meta"])
    with pytest.raises(ValueError, match=rf"advbct_center in {paths['advbct_meta']} has shape \(5, 8\) but \[7, 8\]"):
        _validate(old, labels, num_classes=7)
    np.savez(paths["advbct_meta"], centers=np.zeros((C, D), np.float32))
    with pytest.raises(ValueError, match=r"lacks arrays \['radius_max', 'num_kept'\].*advbct-meta"):
        _open(paths, features=paths["features"], advbct_meta=paths["advbct_meta"])


def test_missing_file_says_how_to_make_it(files, tmp_path):
    paths, _ = files
    missing = str(tmp_path / "nope.npy")
    with pytest.raises(FileNotFoundError, match=rf"credible mask file {missing} does not exist.*prepare denoise"):
        oe.open_old_embeddings(features=paths["features"], credible=missing)
    with pytest.raises(FileNotFoundError, match=rf"old features file {missing} does not exist.*extract"):
        oe.open_old_embeddings(features=missing)


def test_gather_normalised_rows_in_batch_order(files):
    paths, _ = files
    old = oe.open_old_embeddings(features=paths["features"], credible=paths["credible"])
    indices = np.array([7, 3, 49, 3, 0, 7, 7, 22])  # unsorted, with duplicates
    batch = oe.gather(old, indices)
    assert batch["old_features"].dtype == np.float32 and batch["old_features"].shape == (8, D)
    features, credible = np.load(paths["features"]).astype(np.float32), np.load(paths["credible"])
    for row, index in enumerate(indices):
        expected = features[index] / max(np.linalg.norm(features[index]), 1e-12)
        np.testing.assert_allclose(batch["old_features"][row], expected, rtol=1e-6, atol=1e-7)
        assert batch["credible"][row] == credible[index]
    assert set(oe.gather(oe.open_old_embeddings(features=paths["features"]), indices)) == {"old_features"}
    with pytest.raises(IndexError, match=r"must lie in \[0, 50\).*max 50"):
        oe.gather(old, np.array([0, 50]))


def test_gather_zero_row_stays_zero():
    old = oe.OldEmbeddings(features=np.zeros((3, 4), np.float32))
    np.testing.assert_array_equal(oe.gather(old, np.array([1]))["old_features"], np.zeros((1, 4)))
