"""Margin functions against SPEC §3.1's reference values; PartialFC sampling keeps every positive."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
    np.testing.assert_allclose(margin.cosface(cos, jnp.array([0]), scale=64, margin=0.4), [[0.1 * 64, 16.0]],
                               rtol=1e-6)
    np.testing.assert_allclose(margin.combined_margin(cos, jnp.array([0]), m1=1.0, m2=0.0, m3=0.4),
                               margin.cosface(cos, jnp.array([0])), rtol=1e-6)
    np.testing.assert_allclose(margin.combined_margin(cos, jnp.array([1]), m1=1.0, m2=0.5, m3=0.0),
                               margin.arcface(cos, jnp.array([1])), rtol=1e-6)
    filtered = margin.combined_margin(jnp.array([[0.5, 0.9, 0.1]]), jnp.array([0]), m1=1.0, m2=0.5, m3=0.0,
                                      interclass_filtering_threshold=0.6)
    assert float(filtered[0, 1]) == 0.0 and float(filtered[0, 2]) == pytest.approx(0.1 * 64)


def test_partial_fc_sampling_keeps_all_positives_and_remaps_targets():
    num_rows, num_valid, num_sample = 40, 37, 12
    labels = jnp.array([3, 3, 17, -1, 36, 0, -1, 25])  # -1: target on another shard
    rows, target_col = sharded_fc.sample_centres(jax.random.key(0), labels, num_rows=num_rows,
                                                 num_valid=jnp.asarray(num_valid), num_sample=num_sample)
    rows, target_col = np.asarray(rows), np.asarray(target_col)
    assert len(set(rows.tolist())) == num_sample and np.all(np.diff(rows) > 0)
    assert np.all(rows < num_valid)  # padding rows are never sampled
    for label, col in zip(np.asarray(labels), target_col):
        if label < 0:
            assert col == -1
        else:
            assert rows[col] == label
    # Different keys draw different negatives, never dropping a positive.
    rows2, _ = sharded_fc.sample_centres(jax.random.key(1), labels, num_rows=num_rows,
                                         num_valid=jnp.asarray(num_valid), num_sample=num_sample)
    assert set(np.asarray(labels)[np.asarray(labels) >= 0]) <= set(np.asarray(rows2).tolist())
    assert not np.array_equal(rows, np.asarray(rows2))


def test_padded_rows_allow_resuming_on_other_device_counts():
    assert sharded_fc.padded_rows(93431, 8) == sharded_fc.padded_rows(93431, 1) == 93440
    assert sharded_fc.padded_rows(10, 4) == 128
    assert sharded_fc.padded_rows(1000, 6) % 6 == 0
