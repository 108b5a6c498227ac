"""prepare.py against loop-based re-implementations of the reference's denoise, class-means and AdvBCT-meta tools.

The tools are described in docs/methods.md.
"""

import math
import os

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from mixbct_jax import prepare
from mixbct_jax.data import old_stats

SIZES = (1, 2, 3, 10, 11, 37)


# ------------------------------------------------------------------------------------------------
# Independent references: plain loops, written from the SPEC.
# ------------------------------------------------------------------------------------------------
def _row_normalise(x):
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _col_normalise(x):
    norms = np.linalg.norm(x, axis=0)
    norms[norms == 0] = 1.0
    return x / norms


def ref_denoise(features, labels, keep, *, per_class_columns=False):
    """docs/methods.md (MixBCT) with a loop over runs of equal consecutive labels; ties kept in file order."""
    x = _row_normalise(np.asarray(features, np.float64))
    if not per_class_columns:
        x = _col_normalise(x)
    masks, start = [], 0
    for end in range(1, len(labels) + 1):
        if end < len(labels) and labels[end] == labels[start]:
            continue
        run = x[start:end]
        if per_class_columns:  # the wrong variant, used only to show the test can tell them apart
            run = _col_normalise(run)
        mean = run.mean(axis=0, keepdims=True)
        distance = cdist(run, mean)[:, 0]
        order = np.argsort(distance, kind="stable")
        mask = np.zeros(end - start, bool)
        mask[order[: math.ceil(keep * (end - start))]] = True
        masks.append(mask)
        start = end
    return np.concatenate(masks)


def ref_class_means(features, labels, num_classes, normalize):
    out = np.zeros((num_classes, features.shape[1]))
    for c in range(num_classes):
        rows = np.asarray(features, np.float64)[labels == c]
        if len(rows):
            out[c] = rows.mean(axis=0)
            if normalize:
                out[c] /= max(np.linalg.norm(out[c]), 1e-12)
    return out


def ref_advbct(features, labels, num_classes):
    x = _row_normalise(np.asarray(features, np.float64))
    centers = np.zeros((num_classes, x.shape[1]))
    radius_max = np.zeros(num_classes)
    num_kept = np.zeros(num_classes, int)
    for c in range(num_classes):
        rows = x[labels == c]
        if not len(rows):
            continue
        centers[c] = rows.mean(axis=0)
        radii = sorted(np.linalg.norm(row - centers[c]) for row in rows)
        n = len(radii)
        kept = radii
        if n >= 4:
            q3, q1 = radii[int(3 * n / 4)], radii[int(n / 4)]
            iqr = q3 - q1
            kept = [r for r in radii if not (r < q1 - 1.5 * iqr or r > q3 + 1.5 * iqr)]
            if not kept:
                kept = radii
        radius_max[c], num_kept[c] = kept[-1], len(kept)
    return centers, radius_max, num_kept


# ------------------------------------------------------------------------------------------------
# Data.
# ------------------------------------------------------------------------------------------------
def _grouped_data(seed=0, sizes=SIZES, dim=8, dtype=np.float32):
    """Features clustered per class, rows of a class consecutive, label values not sorted."""
    rng = np.random.default_rng(seed)
    values = rng.permutation(100)[: len(sizes)]
    labels = np.repeat(values, sizes)
    centres = rng.normal(size=(len(sizes), dim)) * 2
    features = np.repeat(centres, sizes, axis=0) + rng.normal(size=(sum(sizes), dim))
    return features.astype(dtype), labels


# ------------------------------------------------------------------------------------------------
# denoise.
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk_rows", [7, 1000])
# No keep value splits a 2-row class: its two rows tie at the same distance from their midpoint, so
# which one is kept would hinge on rounding (the tie rule has its own test).
@pytest.mark.parametrize("keep", [0.9, 0.6, 1.0, 0.0])
def test_denoise_matches_loop_reference(chunk_rows, keep):
    features, labels = _grouped_data()
    mask = old_stats.denoise(features, labels, keep=keep, chunk_rows=chunk_rows)
    assert mask.dtype == np.bool_ and mask.shape == labels.shape
    np.testing.assert_array_equal(mask, ref_denoise(features, labels, keep))


def test_denoise_float16_memmap(tmp_path):
    features, labels = _grouped_data(seed=1, dim=16, dtype=np.float16)
    np.save(tmp_path / "f.npy", features)
    mapped = np.load(tmp_path / "f.npy", mmap_mode="r")
    mask = old_stats.denoise(mapped, labels, keep=0.9, chunk_rows=5)
    np.testing.assert_array_equal(mask, ref_denoise(features, labels, 0.9))


def test_denoise_keep_counts_per_class():
    features, labels = _grouped_data(seed=2)
    mask = old_stats.denoise(features, labels, keep=0.9)
    kept = [int(mask[labels == value].sum()) for value in dict.fromkeys(labels)]
    # the reference's documented toy example: n=10 keeps 9, n=1 keeps 1; and ceil(0.9 n) for the others (n=11 keeps 10).
    assert kept == [1, 2, 3, 9, 10, 34]


def test_denoise_columns_normalised_over_full_dataset():
    rng = np.random.default_rng(3)
    sizes = (10, 10)
    labels = np.repeat([0, 1], sizes)
    # Class 1 lives mostly in column 0 and class 0 mostly in column 1, so a per-class column scaling
    # would weight the columns very differently from the global one.
    scales = np.array([[0.05, 1.0, 0.3], [1.0, 0.05, 0.3]])
    features = (np.abs(rng.normal(size=(20, 3))) + 0.2) * np.repeat(scales, sizes, axis=0)
    features[:, 2] += rng.normal(size=20) * 0.2
    expected = ref_denoise(features, labels, 0.7)
    wrong = ref_denoise(features, labels, 0.7, per_class_columns=True)
    assert not np.array_equal(expected, wrong), "the data must tell the two normalisations apart"
    np.testing.assert_array_equal(old_stats.denoise(features, labels, keep=0.7), expected)


def test_denoise_zero_column_and_zero_row():
    features, labels = _grouped_data(seed=4)
    features[:, 3] = 0.0
    features[5] = 0.0
    mask = old_stats.denoise(features, labels, keep=0.9, chunk_rows=4)
    np.testing.assert_array_equal(mask, ref_denoise(features, labels, 0.9))


def test_denoise_ties_keep_the_earlier_row():
    rng = np.random.default_rng(5)
    features = rng.normal(size=(10, 4)) * 0.01 + 1.0
    features[2] = features[6] = [3.0, -1.0, 0.5, 2.0]  # two identical outliers: ranks 8 and 9 tie
    labels = np.zeros(10, np.int64)
    mask = old_stats.denoise(features, labels, keep=0.9, chunk_rows=3)
    assert mask.sum() == 9 and mask[2] and not mask[6]


def test_denoise_label_in_two_runs_raises():
    features, _ = _grouped_data(seed=6, sizes=(3, 4, 2))
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 0, 0])
    with pytest.raises(ValueError, match=r"label 0 appears in two separate runs.*rows 0 and 7.*--group_by_label"):
        old_stats.denoise(features, labels)


def test_denoise_group_by_label_matches_grouped_reference():
    features, labels = _grouped_data(seed=7)
    perm = np.random.default_rng(7).permutation(len(labels))
    mask = old_stats.denoise(features[perm], labels[perm], keep=0.9, group_by_label=True, chunk_rows=6)
    # The reference on the grouped order, brought back to the shuffled order. Within a class the
    # shuffled order is the file order, so the grouping sort must be stable.
    grouped = np.argsort(labels[perm], kind="stable")
    expected = np.empty_like(mask)
    expected[grouped] = ref_denoise(features[perm][grouped], labels[perm][grouped], 0.9)
    np.testing.assert_array_equal(mask, expected)


def test_denoise_rejects_bad_input():
    features, labels = _grouped_data(seed=8)
    with pytest.raises(ValueError, match="keep must lie in"):
        old_stats.denoise(features, labels, keep=1.5)
    with pytest.raises(ValueError, match="labels has 63 entries"):
        old_stats.denoise(features, labels[:-1])
    features[17, 2] = np.nan
    with pytest.raises(ValueError, match="row 17 contains NaN"):
        old_stats.denoise(features, labels, chunk_rows=5)


# ------------------------------------------------------------------------------------------------
# class_means and advbct_meta.
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("normalize", [True, False])
def test_class_means_match_loop(normalize):
    rng = np.random.default_rng(9)
    labels = rng.integers(0, 6, size=80)
    features = (rng.normal(size=(80, 5)) + 3).astype(np.float16)
    got = old_stats.class_means(features, labels, normalize=normalize, chunk_rows=9)
    assert got.dtype == np.float32 and got.shape == (6, 5)
    np.testing.assert_allclose(got, ref_class_means(features, labels, 6, normalize), rtol=1e-6, atol=1e-6)


def test_class_means_missing_class_is_zero_and_warns():
    features, _ = _grouped_data(seed=10, sizes=(3, 4))
    labels = np.array([0, 0, 0, 3, 3, 3, 3])
    with pytest.warns(UserWarning, match=r"3 of 5 classes have no example \(first ids: \[1, 2, 4\]\)"):
        got = old_stats.class_means(features, labels, num_classes=5)
    np.testing.assert_allclose(got, ref_class_means(features, labels, 5, True), atol=1e-6)
    assert not got[[1, 2, 4]].any()
    with pytest.raises(ValueError, match="label 3 at row 3 is >= num_classes=2"):
        old_stats.class_means(features, labels, num_classes=2)


def test_advbct_meta_matches_loop():
    rng = np.random.default_rng(11)
    sizes = np.array([1, 2, 3, 4, 5, 9, 40, 60])
    labels = rng.permutation(np.repeat(np.arange(8), sizes))
    features = rng.normal(size=(sizes.sum(), 6)) * 0.3 + rng.normal(size=(8, 6))[labels]
    # Far outliers in the two big classes, so the IQR filter drops rows.
    for c in (6, 7):
        rows = np.flatnonzero(labels == c)[:3]
        features[rows] = -5 * features[rows]
    # Class 5: a shell of constant radius around its direction plus two rows on the direction
    # itself, so the lower IQR bound drops those two.
    shell = np.flatnonzero(labels == 5)
    offsets = rng.normal(size=(9, 5))
    offsets /= np.linalg.norm(offsets, axis=1, keepdims=True)
    features[shell] = np.concatenate([np.ones((9, 1)), 0.3 * offsets], axis=1)
    features[shell[:2], 1:] = 0.0
    features = features.astype(np.float32)
    with pytest.warns(UserWarning, match="1 of 9 classes have no example"):
        meta = old_stats.advbct_meta(features, labels, num_classes=9, chunk_rows=13)
    centers, radius_max, num_kept = ref_advbct(features, labels, 9)
    assert meta["centers"].dtype == np.float32 and meta["num_kept"].dtype == np.int32
    np.testing.assert_allclose(meta["centers"], centers, atol=1e-6)
    np.testing.assert_allclose(meta["radius_max"], radius_max, rtol=1e-6)
    np.testing.assert_array_equal(meta["num_kept"], num_kept)
    assert num_kept[5] == 7, "the data must exercise the lower IQR bound"
    assert (num_kept[6:8] < sizes[6:8]).all(), "the data must exercise the upper IQR bound"


# ------------------------------------------------------------------------------------------------
# Command line.
# ------------------------------------------------------------------------------------------------
def test_cli_round_trip(tmp_path, capsys):
    features, labels = _grouped_data(seed=12, dtype=np.float16)
    np.save(tmp_path / "features.npy", features)
    np.save(tmp_path / "labels.npy", labels)
    inputs = ["--features", str(tmp_path / "features.npy"), "--labels", str(tmp_path / "labels.npy")]
    sorted_labels = np.searchsorted(np.unique(labels), labels)  # class ids 0..C-1 for class means

    prepare.main(["denoise", *inputs, "--keep", "0.9", "--out", str(tmp_path / "out" / "credible.npy")])
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "credible.npy"), ref_denoise(features, labels, 0.9))

    np.save(tmp_path / "labels.npy", sorted_labels)
    with pytest.warns(UserWarning, match="1 of 7 classes have no example"):
        prepare.main(["class-means", *inputs, "--num_classes", "7", "--quiet", "--out", str(tmp_path / "p.npy")])
    np.testing.assert_allclose(
        np.load(tmp_path / "p.npy"), ref_class_means(features, sorted_labels, 7, True), atol=1e-6
    )
    prepare.main(["advbct-meta", *inputs, "--out", str(tmp_path / "meta.npz")])
    with np.load(tmp_path / "meta.npz") as meta:
        np.testing.assert_array_equal(meta["num_kept"], ref_advbct(features, sorted_labels, 6)[2])
    assert sorted(os.listdir(tmp_path)) == ["features.npy", "labels.npy", "meta.npz", "out", "p.npy"]
    assert "wrote" in capsys.readouterr().err


def test_cli_errors_name_the_file(tmp_path):
    features, labels = _grouped_data(seed=13)
    np.save(tmp_path / "features.npy", features)
    np.save(tmp_path / "short_labels.npy", labels[:-2])
    base = ["denoise", "--features", str(tmp_path / "features.npy")]
    with pytest.raises(SystemExit, match=r"--labels .*missing\.npy does not exist"):
        prepare.main([*base, "--labels", str(tmp_path / "missing.npy"), "--out", str(tmp_path / "c.npy")])
    with pytest.raises(SystemExit, match=r"features\.npy has 64 rows but .*short_labels\.npy has 62"):
        prepare.main([*base, "--labels", str(tmp_path / "short_labels.npy"), "--out", str(tmp_path / "c.npy")])
    with pytest.raises(SystemExit, match=r"--out .*c\.txt must end with \.npy"):
        prepare.main([*base, "--labels", str(tmp_path / "short_labels.npy"), "--out", str(tmp_path / "c.txt")])
    assert not (tmp_path / "c.npy").exists()


def test_streaming_passes_give_the_same_bits_on_any_thread_count():
    rng = np.random.default_rng(5)
    labels = np.repeat(np.arange(9), rng.integers(1, 12, 9))
    features = rng.standard_normal((labels.size, 6)).astype(np.float16)
    for tool in (old_stats.denoise, old_stats.class_means, old_stats.advbct_meta):
        one, three = (tool(features, labels, chunk_rows=4, threads=t) for t in (1, 3))
        for a, b in zip(*(x.values() if isinstance(x, dict) else [x] for x in (one, three))):
            np.testing.assert_array_equal(a, b)
