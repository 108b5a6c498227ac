"""Class and data splits and the scenario table (docs/data.md (scenarios))."""

import numpy as np
import pytest

from mixbct_jax.data import splits


def _naive_data_split(labels, ratio):
    """A direct transcription of docs/data.md (scenarios) (Python loop, Python round) as the reference."""
    counts, seen, part30, part70 = {}, {}, [], []
    for lab in labels:
        counts[lab] = counts.get(lab, 0) + 1
    for i, lab in enumerate(labels):
        c = counts[lab]
        k30 = max(1, round(c * ratio))
        rank = seen.get(lab, 0)
        seen[lab] = rank + 1
        if c == 1:
            part30.append(i)
            part70.append(i)
        elif rank < k30:
            part30.append(i)
        else:
            part70.append(i)
    return part30, part70


def test_data_split_spec_counts():
    labels = np.repeat(np.arange(6), [1, 2, 3, 5, 15, 25])
    data30, data70 = splits.data_split(labels)
    np.testing.assert_array_equal(np.bincount(data30.labels), [1, 1, 1, 2, 4, 8])
    np.testing.assert_array_equal(np.bincount(data70.labels), [1, 1, 2, 3, 11, 17])
    assert data30.num_classes == data70.num_classes == 6
    # The first k30 images of each identity go to data30, in record order; the singleton is in both.
    np.testing.assert_array_equal(data30.indices, [0, 1, 3, 6, 7, 11, 12, 13, 14, 26, 27, 28, 29, 30, 31, 32, 33])
    assert 0 in data70.indices
    assert np.all(np.diff(data70.indices) > 0)
    np.testing.assert_array_equal(data30.labels, labels[data30.indices])  # labels unchanged
    assert data30.indices.dtype == np.int64 and data30.labels.dtype == np.int32


@pytest.mark.parametrize("c, k30", [(2, 1), (3, 1), (4, 1), (5, 2), (10, 3), (15, 4), (25, 8), (35, 10)])
def test_data_split_half_to_even(c, k30):
    data30, data70 = splits.data_split(np.zeros(c, np.int64))
    assert len(data30) == k30 and len(data70) == c - k30


def test_data_split_matches_naive_reference_on_ungrouped_labels():
    labels = np.random.default_rng(0).integers(0, 40, size=600)
    for ratio in (0.3, 0.5):
        data30, data70 = splits.data_split(labels, ratio)
        ref30, ref70 = _naive_data_split(labels.tolist(), ratio)
        np.testing.assert_array_equal(data30.indices, ref30)
        np.testing.assert_array_equal(data70.indices, ref70)


def test_class_split_ms1mv3_sizes_and_relabel():
    labels = np.arange(93431)  # one image per class: cheap, same class counts as MS1MV3
    class30, class70 = splits.class_split(labels)
    assert (class30.num_classes, class70.num_classes) == (28029, 65402)
    assert (len(class30), len(class70)) == (28029, 65402)
    np.testing.assert_array_equal(class70.labels, labels[28029:] - 28029)
    np.testing.assert_array_equal(class70.indices, np.arange(28029, 93431))
    np.testing.assert_array_equal(class30.labels, labels[:28029])


def test_class_split_with_repeated_labels():
    labels = np.repeat(np.arange(10), np.arange(1, 11))  # C30 = 3: classes 0, 1, 2 = 6 images
    class30, class70 = splits.class_split(labels)
    assert len(class30) == 6 and class30.num_classes == 3
    assert class70.labels[0] == 0 and class70.labels[-1] == 6 and class70.num_classes == 7
    assert class70.indices[0] == 6


@pytest.mark.parametrize(
    "labels, where", [([0, 0, 2, 2], "position 2"), ([1, 1, 2], "position 0"), ([0, 1, 0], "position 2")]
)
def test_class_split_rejects_unsorted_or_gapped_labels(labels, where):
    with pytest.raises(ValueError, match=f"non-decreasing and contiguous from 0.*{where}"):
        splits.class_split(np.array(labels))


def test_bad_ratio_and_labels():
    with pytest.raises(ValueError, match="ratio"):
        splits.data_split(np.zeros(3, int), ratio=1.5)
    with pytest.raises(ValueError, match=">= 0"):
        splits.full(np.array([0, -1]))
    with pytest.raises(ValueError, match="integer"):
        splits.full(np.array([0.5, 1.0]))


def test_scenario_table():
    labels = np.repeat(np.arange(10), 4)
    s = {name: splits.scenario(name, labels) for name in splits.SCENARIOS}
    c30, c70 = splits.class_split(labels)
    d30, d70 = splits.data_split(labels)
    expect = {
        "opclass": (c30, c70),
        "opdata": (d30, d70),
        "exclass": (c30, splits.full(labels)),
        "exdata": (d30, splits.full(labels)),
        "full": (splits.full(labels), splits.full(labels)),
    }
    for name, (old, new) in expect.items():
        for got, want in ((s[name]["old"], old), (s[name]["new"], new)):
            np.testing.assert_array_equal(got.indices, want.indices)
            np.testing.assert_array_equal(got.labels, want.labels)
            assert got.num_classes == want.num_classes
    assert s["opclass"]["new"].num_classes == 7 and s["exclass"]["new"].num_classes == 10
    assert splits.scenario("OPclass", labels)["old"].num_classes == 3
    with pytest.raises(ValueError, match="unknown scenario 'opx'.*opclass"):
        splits.scenario("opx", labels)
