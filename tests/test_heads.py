"""Margin functions and the sharded head against reference values.

Margin functions against docs/methods.md (the margin head)'s reference values; the inter-class filter and
PartialFC sampling of the sharded head against NumPy full-softmax references, on 1 and 4 devices.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from mixbct_jax import config as config_lib
from mixbct_jax.heads import margin, sharded_fc


def test_arcface_matches_spec_reference_values():
    cos = jnp.array([1.0, 0.5, 0.0, -0.5, -0.87, -0.9, -1.0])[:, None]
    out = margin.arcface(cos, jnp.zeros(7, jnp.int32), scale=64.0, margin=0.5)
    expected = [56.1653, 1.51018, -30.6832, -54.6551, -63.9922, -72.9416, -79.3416]
    np.testing.assert_allclose(np.asarray(out[:, 0]), expected, rtol=2e-5)


def test_arcface_leaves_non_target_and_foreign_rows_unmargined():
    cos = jnp.array([[0.3, 0.2], [0.4, -0.1]])
    out = margin.arcface(cos, jnp.array([1, -1]), scale=64.0, margin=0.5)
    np.testing.assert_allclose(out[0, 0], 0.3 * 64, rtol=1e-6)  # non-target column
    np.testing.assert_allclose(out[1], np.array([0.4, -0.1]) * 64, rtol=1e-6)  # target on another shard
    np.testing.assert_allclose(out[0, 1], 64 * math.cos(math.acos(0.2) + 0.5), rtol=1e-5)


def test_cosface_and_combined_margin():
    cos = jnp.array([[0.5, 0.25]])
    np.testing.assert_allclose(margin.cosface(cos, jnp.array([0]), scale=64, margin=0.4), [[0.1 * 64, 16.0]], rtol=1e-6)
    np.testing.assert_allclose(
        margin.combined_margin(cos, jnp.array([0]), m1=1.0, m2=0.0, m3=0.4),
        margin.cosface(cos, jnp.array([0])),
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        margin.combined_margin(cos, jnp.array([1]), m1=1.0, m2=0.5, m3=0.0),
        margin.arcface(cos, jnp.array([1])),
        rtol=1e-6,
    )
    filtered = margin.combined_margin(
        jnp.array([[0.5, 0.9, 0.1], [0.7, 0.9, 0.1]]),
        jnp.array([0, -1]),
        m1=1.0,
        m2=0.5,
        m3=0.0,
        interclass_filtering_threshold=0.6,
    )
    assert float(filtered[0, 1]) == 0.0 and float(filtered[0, 2]) == pytest.approx(0.1 * 64)
    # A row whose target lives on another shard is filtered too (the reference filters every row).
    np.testing.assert_allclose(filtered[1], [0.0, 0.0, 0.1 * 64], rtol=1e-6)


def test_partial_fc_sampling_keeps_all_positives_and_remaps_targets():
    num_rows, num_valid, num_keep, num_sample = 40, 37, 9, 12
    labels = jnp.array([3, 3, 17, -1, 36, 0, -1, 25])  # -1: target on another shard; 5 distinct positives

    def sample(key, num_keep):
        out = sharded_fc.sample_centres(
            key,
            labels,
            num_rows=num_rows,
            num_valid=jnp.asarray(num_valid),
            num_keep=jnp.asarray(num_keep),
            num_sample=num_sample,
        )
        return [np.asarray(x) for x in out]

    rows, target_col, kept = sample(jax.random.key(0), num_keep)
    assert len(set(rows.tolist())) == num_sample and np.all(np.diff(rows) > 0)
    assert kept.sum() == num_keep and np.all(rows[kept] < num_valid)  # padding rows are never kept
    for label, col in zip(np.asarray(labels), target_col):
        if label < 0:
            assert col == -1
        else:
            assert rows[col] == label and kept[col]
    # Different keys draw different negatives, never dropping a positive.
    rows2, _, kept2 = sample(jax.random.key(1), num_keep)
    assert set(np.asarray(labels)[np.asarray(labels) >= 0]) <= set(rows2[kept2].tolist())
    assert set(rows[kept].tolist()) != set(rows2[kept2].tolist())
    # More positives than int(rate * C_d): all positives and nothing else, as the reference.
    rows3, _, kept3 = sample(jax.random.key(2), 3)
    assert sorted(rows3[kept3].tolist()) == [0, 3, 17, 25, 36]


def test_sampled_count_follows_the_real_class_count():
    # 300 classes on 4 devices are padded to 384 rows, 96 per device; the last device holds 12 real classes.
    assert sharded_fc.sample_counts(300, 96, 4, 0.5) == [48, 48, 48, 6]
    assert sharded_fc.sample_counts(10, 32, 4, 0.5) == [5, 0, 0, 0]
    assert sharded_fc.sample_counts(1000, 1024, 1, 0.1) == [100]  # not int(0.1 * 1024) = 102 padded rows
    assert sharded_fc.sample_counts(93431, 11680, 8, 0.1) == [1168] * 7 + [1167]


# ---------------------------------------------------------------------------------------------------------------
# The sharded head against NumPy full-softmax references
# ---------------------------------------------------------------------------------------------------------------
N, D = 16, 16


def head_config(**kw):
    head = config_lib.default_config().head
    head.update(kw)
    return head


def sharded_head(num_devices, emb, labels, centres, num_classes, head, key=None):
    """Per-example loss and the gradients of the mean loss for embeddings and centres, over ``num_devices``."""
    mesh = Mesh(np.array(jax.devices()[:num_devices]), ("data",))
    key = jax.random.key(0) if key is None else key

    def body(e, y, w, k):
        def mean_loss(e, w):
            loss, _ = sharded_fc.margin_softmax_loss(
                e, y, w, axis_name="data", num_classes=num_classes, head=head, key=k
            )
            return jnp.mean(loss), loss

        (_, loss), (ge, gw) = jax.value_and_grad(mean_loss, argnums=(0, 1), has_aux=True)(e, w)
        return loss, ge, gw

    f = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(P("data"), P("data"), P("data"), P()),
        out_specs=(P(), P("data"), P("data")),
        check_vma=False,
    )
    return [np.asarray(x) for x in f(emb, labels, centres, key)]


def numpy_margin_ce(emb, labels, centres, classes, *, threshold=0.0, scale=64.0, m=0.5):
    """Per-example ArcFace CE over the centre rows ``classes`` in float64, with the reference's filter."""
    e = np.asarray(emb, np.float64)
    w = np.asarray(centres, np.float64)[classes]
    cos = np.clip(
        (e / np.linalg.norm(e, axis=1, keepdims=True)) @ (w / np.linalg.norm(w, axis=1, keepdims=True)).T, -1, 1
    )
    target = np.searchsorted(classes, labels)
    is_target = np.arange(len(classes))[None, :] == target[:, None]
    if threshold > 0:
        cos = np.where(~is_target & (cos > threshold), 0.0, cos)
    c = cos[np.arange(len(labels)), target]
    arc = np.where(c > np.cos(np.pi - m), np.cos(np.arccos(c) + m), c - np.sin(np.pi - m) * m)
    logits = scale * np.where(is_target, arc[:, None], cos)
    top = logits.max(axis=1)
    return top + np.log(np.exp(logits - top[:, None]).sum(axis=1)) - logits[np.arange(len(labels)), target]


def random_head_inputs(num_classes, seed=0):
    rng = np.random.RandomState(seed)
    emb = jnp.asarray(rng.normal(size=(N, D)), jnp.float32)
    labels = jnp.asarray(rng.randint(0, num_classes, N), jnp.int32)
    centres = sharded_fc.init_centres(jax.random.key(seed), sharded_fc.padded_rows(num_classes, 4), D, num_classes)
    return emb, labels, centres


def test_interclass_filter_is_independent_of_the_device_count():
    """Filter > 0: 1 and 4 devices give the same loss and gradients, and both equal a NumPy full softmax.

    37 classes over 4 devices put classes 32..36 on device 1, so device 0 sees rows whose target is elsewhere;
    the reference filters those rows' columns too.
    """
    num_classes = 37
    emb, labels, centres = random_head_inputs(num_classes)
    head = head_config(type="combined", interclass_filtering_threshold=0.15)
    loss1, ge1, gw1 = sharded_head(1, emb, labels, centres, num_classes, head)
    loss4, ge4, gw4 = sharded_head(4, emb, labels, centres, num_classes, head)
    ref = numpy_margin_ce(emb, labels, centres, np.arange(num_classes), threshold=0.15)
    unfiltered = numpy_margin_ce(emb, labels, centres, np.arange(num_classes))
    assert np.abs(ref - unfiltered).max() > 1.0  # the filter changes the loss in this setting
    np.testing.assert_allclose(loss1, ref, rtol=1e-5)
    np.testing.assert_allclose(loss4, ref, rtol=1e-5)
    np.testing.assert_allclose(ge4, ge1, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(gw4, gw1, rtol=1e-5, atol=1e-7)
    assert np.all(gw4[num_classes:] == 0)


def test_sampled_head_equals_softmax_over_the_kept_classes():
    """sample_rate 0.5 on 4 devices: device d keeps max(int(0.5 * C_d), #positives) centres.

    The loss is the NumPy softmax over exactly the kept classes.
    """
    num_classes = 300  # padded to 384: 96, 96, 96 and 12 real classes per device
    emb, labels, centres = random_head_inputs(num_classes, seed=1)
    head = head_config(sample_rate=0.5)
    key = jax.random.key(3)
    loss, _, gw = sharded_head(4, emb, labels, centres, num_classes, head, key=key)
    rows_local = centres.shape[0] // 4
    counts = sharded_fc.sample_counts(num_classes, rows_local, 4, 0.5)
    kept_classes = []
    for d in range(4):  # the same draw as inside the step: same key, same inputs
        local = np.asarray(labels) - d * rows_local
        col = np.where((local >= 0) & (local < rows_local), local, -1)
        num_valid = min(max(num_classes - d * rows_local, 0), rows_local)
        rows, _, kept = sharded_fc.sample_centres(
            key,
            jnp.asarray(col),
            num_rows=rows_local,
            num_valid=jnp.asarray(num_valid),
            num_keep=jnp.asarray(counts[d]),
            num_sample=min(rows_local, max(max(counts), N)),
        )
        positives = len(set(col[col >= 0].tolist()))
        assert int(np.sum(kept)) == max(counts[d], positives)
        kept_classes += (np.asarray(rows)[np.asarray(kept)] + d * rows_local).tolist()
    kept_classes = np.array(sorted(kept_classes))
    assert set(np.asarray(labels).tolist()) <= set(kept_classes.tolist())
    np.testing.assert_allclose(loss, numpy_margin_ce(emb, labels, centres, kept_classes), rtol=1e-5)
    trained = np.flatnonzero(np.any(gw != 0, axis=1))
    assert set(trained.tolist()) <= set(kept_classes.tolist())  # non-sampled centres get no gradient


def test_padded_rows_allow_resuming_on_other_device_counts():
    assert sharded_fc.padded_rows(93431, 8) == sharded_fc.padded_rows(93431, 1) == 93440
    assert sharded_fc.padded_rows(10, 4) == 128
    assert sharded_fc.padded_rows(1000, 6) % 6 == 0
