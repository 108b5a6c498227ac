"""Retrieval: split rule, top-k and mAP against a brute-force per-query computation with sklearn."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from mixbct_jax.evaluation import retrieval


def test_split_hand_computed():
    labels = np.array([0, 0, 0, 1, 2, 2, 1, 0, 3])
    q, g = retrieval.split_query_gallery(labels, gallery_fraction=0.5)
    # class 0 = [0,1,2,7]: gallery ceil(2) = [0,1]; class 1 = [3,6]: [3]; class 2 = [4,5]: [4]; class 3 = [8]: [8].
    np.testing.assert_array_equal(g, [0, 1, 3, 4, 8])
    np.testing.assert_array_equal(q, [2, 5, 6, 7])
    q, g = retrieval.split_query_gallery(labels, gallery_fraction=0.2)
    np.testing.assert_array_equal(g, [0, 3, 4, 8])
    with pytest.raises(ValueError, match="gallery_fraction"):
        retrieval.split_query_gallery(labels, gallery_fraction=1.0)


def _brute_force(query, q_labels, gallery, g_labels, ks=(1, 5)):
    q = query / np.linalg.norm(query, axis=1, keepdims=True)
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    aps, hits, excluded = [], {k: [] for k in ks}, 0
    for i in range(len(q)):
        rel = g_labels == q_labels[i]
        if not rel.any():
            excluded += 1
            continue
        s = g @ q[i]
        aps.append(average_precision_score(rel, s))
        order = np.argsort(-s, kind="stable")
        for k in ks:
            hits[k].append(rel[order[:k]].any())
    return {"mAP": np.mean(aps), **{f"top{k}": np.mean(h) for k, h in hits.items()}}, len(aps), excluded


def _clusters(rng, n_classes, per_class, dim, spread):
    centres = rng.standard_normal((n_classes, dim))
    labels = np.repeat(np.arange(n_classes), per_class)
    return centres[labels] + spread * rng.standard_normal((labels.size, dim)), labels


@pytest.mark.parametrize("memory_mb", [512, 0])  # 0: one query per chunk
def test_metrics_match_brute_force(memory_mb):
    rng = np.random.default_rng(0)
    x, labels = _clusters(rng, 30, 8, 16, 1.2)
    q_idx, g_idx = retrieval.split_query_gallery(labels, gallery_fraction=0.4)
    # Extra queries from unseen classes must be excluded.
    extra, extra_labels = _clusters(rng, 3, 4, 16, 1.0)
    query = np.concatenate([x[q_idx], extra])
    q_labels = np.concatenate([labels[q_idx], extra_labels + 100])
    res = retrieval.retrieval_metrics(query, q_labels, x[g_idx], labels[g_idx], memory_mb=memory_mb)
    expect, n_kept, n_excluded = _brute_force(query, q_labels, x[g_idx], labels[g_idx])
    assert 0.3 < expect["mAP"] < 0.95  # non-trivial
    assert res["mAP"] == pytest.approx(expect["mAP"], abs=1e-9)
    assert res["top1"] == pytest.approx(expect["top1"])
    assert res["top5"] == pytest.approx(expect["top5"])
    assert (res["num_queries"], res["num_excluded"], res["num_gallery"]) == (n_kept, n_excluded, g_idx.size)


def test_ties_match_sklearn_average_precision():
    # Embeddings on 5 directions: many exactly tied scores, including negative ones and zeros.
    rng = np.random.default_rng(1)
    dirs = np.array([[1, 0], [0, 1], [-1, 0], [0, -1], [1, 1]], dtype=np.float32)
    g_pick, q_pick = rng.integers(0, 5, 60), rng.integers(0, 5, 25)
    g_labels, q_labels = rng.integers(0, 4, 60), rng.integers(0, 4, 25)
    res = retrieval.retrieval_metrics(dirs[q_pick], q_labels, dirs[g_pick], g_labels)
    expect, _, _ = _brute_force(dirs[q_pick].astype(float), q_labels, dirs[g_pick].astype(float), g_labels)
    assert res["mAP"] == pytest.approx(expect["mAP"], abs=1e-9)


def test_top1_hand_computed():
    gallery = np.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    g_labels = np.array([0, 1, 2])
    query = np.array([[1.0, 0.1], [0.6, 0.8]])  # nearest: 0 (right), then 2 and 1; second: 2 then 1
    res = retrieval.retrieval_metrics(query, np.array([0, 1]), gallery, g_labels, topk=(1, 2))
    assert res["top1"] == 0.5 and res["top2"] == 1.0
    # AP: query 0 finds its only relevant item first (1.0); query 1 finds it second (1/2).
    assert res["mAP"] == pytest.approx(0.75)


class _Source:
    """In-memory stand-in for mixbct_jax.data.sources.open_source(...)."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def read(self, indices):
        return self.images[indices]


class _Projection:
    def __init__(self, image_size, seed):
        self.image_size = image_size
        self.w = np.random.default_rng(seed).standard_normal((image_size * image_size * 3, 8)).astype(np.float32)

    def __call__(self, x):
        return x.reshape(len(x), -1) @ self.w


def test_evaluate_retrieval_self_and_cross():
    rng = np.random.default_rng(2)
    protos = rng.integers(0, 256, (6, 12, 12, 3))
    labels = np.repeat(np.arange(6), 5).astype(np.int32)
    images = np.clip(protos[labels] + rng.integers(-40, 41, (30, 12, 12, 3)), 0, 255).astype(np.uint8)
    source = _Source(images, labels)
    old, new = _Projection(16, 0), _Projection(16, 1)  # 12x12 sources are resized to 16x16
    rows = [("old", "old"), ("new", "new"), ("new", "old")]
    res = retrieval.evaluate_retrieval(source, {"old": old, "new": new}, rows, batch_size=7)

    import cv2

    def feats(model):
        up = np.stack([cv2.resize(im, (16, 16), interpolation=cv2.INTER_LINEAR) for im in images])
        return model((up.astype(np.float32) / 255 - 0.5) / 0.5)

    q_idx, g_idx = retrieval.split_query_gallery(labels)
    fo, fn = feats(old), feats(new)
    expect, _, _ = _brute_force(fn[q_idx], labels[q_idx], fo[g_idx], labels[g_idx])
    assert res["new/old"]["mAP"] == pytest.approx(expect["mAP"], rel=1e-5)
    assert res["new/old"]["top1"] == pytest.approx(expect["top1"])
    assert res["new/new"]["top1"] == 1.0  # noisy copies of one prototype per class
    same = retrieval.evaluate_retrieval(source, {"old": old, "new": old}, rows)
    assert same["new/old"] == same["old/old"]
