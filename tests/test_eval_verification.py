"""`.bin` pair verification: loading, fold logic, accuracy/VAL against hand values and a loop re-implementation."""

import pickle
import struct

import cv2
import numpy as np
import pytest
from sklearn.model_selection import KFold

from mixbct_jax.evaluation import verification


class ProjectionEmbedder:
    """A fixed random linear projection of the pixels: similar images get similar embeddings."""

    def __init__(self, image_size: int, dim: int = 16, seed: int = 0):
        self.image_size = image_size
        rng = np.random.default_rng(seed)
        self.w = rng.standard_normal((image_size * image_size * 3, dim)).astype(np.float32)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return x.reshape(x.shape[0], -1) @ self.w


def _png(img_rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", img_rgb[:, :, ::-1])
    assert ok
    return buf.tobytes()


def _pairs(rng, n_pairs: int, size: int):
    """Same pairs: an image and a slightly noisy copy; different pairs: two unrelated images."""
    images, issame = [], []
    for k in range(n_pairs):
        a = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        same = k % 2 == 0
        if same:
            b = np.clip(a.astype(int) + rng.integers(-8, 9, a.shape), 0, 255).astype(np.uint8)
        else:
            b = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        images += [a, b]
        issame.append(same)
    return np.stack(images), np.array(issame)


# ------------------------------------------------------------------------------------------------ folds


@pytest.mark.parametrize("n,k", [(6000, 10), (57, 10), (13, 4)])
def test_kfold_matches_sklearn(n, k):
    ours = verification.kfold_indices(n, k)
    ref = [test for _, test in KFold(n_splits=k, shuffle=False).split(np.arange(n))]
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------------------ metrics


def test_evaluate_pairs_hand_computed():
    # Four pairs, two folds, distances chosen off the threshold grids.
    dist = np.array([0.5005, 2.0005, 0.7005, 1.5005])
    issame = np.array([True, False, False, True])
    emb1 = np.zeros((4, 2))
    emb2 = np.stack([np.sqrt(dist), np.zeros(4)], axis=1)
    res = verification.evaluate_pairs(emb1, emb2, issame, nfolds=2)
    # Fold 1 trains on {0.7005 F, 1.5005 T}: every threshold scores 1/2, so the first (0) wins and the test
    # fold {0.5005 T, 2.0005 F} scores 1/2. Fold 2 trains on {0.5005 T, 2.0005 F}: the first perfect
    # threshold is 0.51, and the test fold {0.7005 F, 1.5005 T} scores 1/2.
    assert res["accuracy"] == pytest.approx(0.5)
    assert res["accuracy_std"] == pytest.approx(0.0)
    assert res["best_thresholds"] == pytest.approx([0.0, 0.51])
    # VAL: training FAR jumps 0 -> 1 just after 0.700 (fold 1) and 2.000 (fold 2), so the interpolated
    # thresholds are 0.700001 and 2.000001. Fold 1 test: the genuine pair (0.5005) is accepted, the impostor
    # (2.0005) is not; fold 2 test: both are accepted.
    assert res["val"] == pytest.approx(1.0)
    assert res["far"] == pytest.approx(0.5)


def _reference_evaluate(dist, issame, nfolds, far_target=1e-3):
    """Straightforward loop version of the insightface/reference procedure."""
    thr_acc = np.arange(0, 4, 0.01)
    thr_val = np.arange(0, 4, 0.001)
    acc, val, far, best = [], [], [], []
    for train, test in KFold(n_splits=nfolds, shuffle=False).split(dist):
        acc_train = [np.mean((dist[train] < t) == issame[train]) for t in thr_acc]
        t_best = thr_acc[int(np.argmax(acc_train))]
        best.append(t_best)
        acc.append(np.mean((dist[test] < t_best) == issame[test]))
        far_train = np.array([np.sum((dist[train] < t) & ~issame[train]) / np.sum(~issame[train]) for t in thr_val])
        if far_train.max() >= far_target:
            # Old scipy interp1d('slinear') on knots with duplicates: the segment starting at the last knot
            # with far <= target.
            j = np.flatnonzero(far_train <= far_target)[-1]
            if j == len(far_train) - 1 or far_train[j] == far_target:
                t = thr_val[j]
            else:
                frac = (far_target - far_train[j]) / (far_train[j + 1] - far_train[j])
                t = thr_val[j] + frac * (thr_val[j + 1] - thr_val[j])
        else:
            t = 0.0
        pred = dist[test] < t
        val.append(np.sum(pred & issame[test]) / np.sum(issame[test]))
        far.append(np.sum(pred & ~issame[test]) / np.sum(~issame[test]))
    return np.mean(acc), np.std(acc), best, np.mean(val), np.std(val), np.mean(far)


def test_evaluate_pairs_matches_loop_reference():
    rng = np.random.default_rng(1)
    p, d = 600, 8
    issame = rng.random(p) < 0.5
    e1 = rng.standard_normal((p, d))
    e2 = np.where(issame[:, None], e1 + 0.9 * rng.standard_normal((p, d)), rng.standard_normal((p, d)))
    e1 /= np.linalg.norm(e1, axis=1, keepdims=True)
    e2 /= np.linalg.norm(e2, axis=1, keepdims=True)
    res = verification.evaluate_pairs(e1, e2, issame, nfolds=10)
    acc, std, best, val, val_std, far = _reference_evaluate(np.sum((e1 - e2) ** 2, 1), issame, 10)
    assert 0.6 < acc < 1.0  # a non-trivial case
    assert res["accuracy"] == pytest.approx(acc)
    assert res["accuracy_std"] == pytest.approx(std)
    assert res["best_thresholds"] == pytest.approx(best)
    assert res["val"] == pytest.approx(val)
    assert res["val_std"] == pytest.approx(val_std)
    assert res["far"] == pytest.approx(far)


def test_threshold_interpolation_on_plateau_takes_last_knot():
    far = np.array([0, 0, 0, 1e-3, 1e-3, 2e-3, 0.5])
    thr = np.arange(7) * 0.1
    # Exactly on a duplicated knot: the last of the run (old scipy 'slinear' semantics).
    assert verification._threshold_at_far(far, thr, 1e-3) == pytest.approx(0.4)
    assert verification._threshold_at_far(far, thr, 1.5e-3) == pytest.approx(0.45)
    assert verification._threshold_at_far(far, thr, 0.9) == 0.0  # target above every FAR


def test_evaluate_pairs_rejects_bad_shapes():
    with pytest.raises(ValueError, match="must be"):
        verification.evaluate_pairs(np.zeros((4, 2)), np.zeros((3, 2)), np.zeros(4, bool))


# ------------------------------------------------------------------------------------------------ .bin files


def test_load_bin_decodes_and_resizes(tmp_path):
    rng = np.random.default_rng(2)
    imgs = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    wide = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)  # short side 40 -> 32, then centre crop
    ok, jpg = cv2.imencode(".jpg", wide[:, :, ::-1])
    bins = [_png(imgs[0]), _png(imgs[1]), _png(imgs[2]), jpg.tobytes()]
    path = tmp_path / "set.bin"
    path.write_bytes(pickle.dumps((bins, [True, False])))
    images, issame = verification.load_bin(path, image_size=32)
    assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(issame, [True, False])
    for i in range(3):
        np.testing.assert_array_equal(images[i], imgs[i])  # PNG is lossless; channel order is RGB
    decoded = cv2.cvtColor(cv2.imdecode(np.frombuffer(jpg, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    expect = cv2.resize(decoded, (38, 32), interpolation=cv2.INTER_CUBIC)[:, 3:35]  # 48*32/40 = 38.4 -> 38
    np.testing.assert_array_equal(images[3], expect)


def _py2_pickle(bins, issame) -> bytes:
    """A protocol-2 pickle as Python 2 wrote it: images as py2 `str` (BINSTRING opcodes)."""
    out = [b"\x80\x02", b"]", b"("]
    for b in bins:
        out += [b"T", struct.pack("<i", len(b)), b]
    out += [b"e", b"]", b"("]
    out += [b"\x88" if s else b"\x89" for s in issame]
    out += [b"e", b"\x86", b"."]
    return b"".join(out)


def test_load_bin_python2_pickle(tmp_path):
    rng = np.random.default_rng(3)
    imgs = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(4)]
    path = tmp_path / "py2.bin"
    path.write_bytes(_py2_pickle([_png(i) for i in imgs], [True, False]))
    with pytest.raises(UnicodeDecodeError):  # what a plain load does, hence the fallback
        pickle.loads(path.read_bytes())
    images, issame = verification.load_bin(path, image_size=16)
    np.testing.assert_array_equal(images, np.stack(imgs))
    np.testing.assert_array_equal(issame, [True, False])


def test_load_bin_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.bin"
    path.write_bytes(pickle.dumps(([b"x"] * 3, [True, False])))
    with pytest.raises(ValueError, match="bad.bin.*2 images per pair"):
        verification.load_bin(path)
    path.write_bytes(pickle.dumps(([b"not an image"] * 2, [True])))
    with pytest.raises(ValueError, match="bad.bin image 0.*decode"):
        verification.load_bin(path)


def test_evaluate_bin_end_to_end(tmp_path):
    rng = np.random.default_rng(4)
    images, issame = _pairs(rng, 60, 24)
    path = tmp_path / "pairs.bin"
    path.write_bytes(pickle.dumps(([_png(i) for i in images], issame.tolist())))
    loaded, loaded_same = verification.load_bin(path, image_size=24)
    np.testing.assert_array_equal(loaded, images)

    old, new = ProjectionEmbedder(24, seed=0), ProjectionEmbedder(24, seed=1)
    rows = [("old", "old"), ("new", "new"), ("new", "old")]
    res = verification.evaluate_bin(loaded, loaded_same, {"old": old, "new": new}, rows, batch_size=7)
    assert set(res) == {"old/old", "new/new", "new/old"}

    def feats(model):  # independent flip-sum
        x = (images.astype(np.float32) / 255 - 0.5) / 0.5
        a, b = model(x), model(x[:, :, ::-1])
        norms = (np.linalg.norm(a, axis=1) + np.linalg.norm(b, axis=1)) / 2
        f = a + b
        return f / np.linalg.norm(f, axis=1, keepdims=True), norms

    (fo, no), (fn, nn) = feats(old), feats(new)
    for row, (g, ng), (q, nq) in [("old/old", (fo, no), (fo, no)), ("new/old", (fo, no), (fn, nn))]:
        expect = verification.evaluate_pairs(g[0::2], q[1::2], issame)
        assert res[row]["accuracy"] == pytest.approx(expect["accuracy"])
        assert res[row]["val"] == pytest.approx(expect["val"])
        assert res[row]["xnorm"] == pytest.approx(np.concatenate([ng[0::2], nq[1::2]]).mean(), rel=1e-5)
    assert res["new/new"]["accuracy"] > 0.95  # a projection of pixels separates noisy copies from strangers
    # Cross with the same model on both sides is the self test.
    same = verification.evaluate_bin(loaded, loaded_same, {"old": old, "new": old}, rows)
    assert same["new/old"] == same["old/old"]


def test_evaluate_bin_size_mismatch_explains():
    images = np.zeros((4, 24, 24, 3), np.uint8)
    with pytest.raises(ValueError, match="image_size=32"):
        verification.evaluate_bin(images, np.array([True, False]), {"new": ProjectionEmbedder(32)}, [("new", "new")])
