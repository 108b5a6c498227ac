"""extract: rows in example-index order, any batch size, resumable after a kill, float16 option."""

import jax
import numpy as np
import pytest

from mixbct_jax import checkpoint, embed, extract, models
from mixbct_jax import config as config_lib
from mixbct_jax.data import sources, splits

SOURCE = "synthetic:num_classes=12,min_images=3,max_images=7,image_size=32,seed=5"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory holding a randomly initialised tiny model (BatchNorm statistics made non-trivial)."""
    workdir = tmp_path_factory.mktemp("model")
    config = config_lib.default_config()
    config.model.update(arch="r_tiny", embedding_size=16, input_size=32, width=0.25)
    config.data.source, config.data.scenario = SOURCE, "opclass"
    model = models.build("r_tiny", embedding_size=16, input_size=32, width=0.25)
    x = jax.random.normal(jax.random.key(0), (8, 32, 32, 3))
    variables = jax.jit(lambda x: model.init(jax.random.key(1), x, train=False))(x)
    _, mutated = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
    variables = {"params": variables["params"], "batch_stats": mutated["batch_stats"]}
    checkpoint.save_model_only(workdir, config, variables)
    return workdir


def expected_features(run_dir):
    source = sources.open_source(SOURCE)
    subset = splits.scenario("opclass", source.labels)["new"]
    embedder = embed.load_embedder(run_dir, batch_size=64)
    return embedder(models.normalize_images(source.read(subset.indices))), subset.labels


def test_rows_follow_example_index_order_with_a_batch_size_that_does_not_divide_n(run_dir, tmp_path):
    paths = extract.main(["--workdir", str(run_dir), "--out", str(tmp_path), "--batch-size", "7"])
    features, labels = np.load(paths["features"], mmap_mode="r"), np.load(paths["labels"])
    want, want_labels = expected_features(run_dir)
    assert features.shape == want.shape and len(want) % 8  # 8 = batch 7 rounded up to the 4 devices
    np.testing.assert_allclose(features, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(labels, want_labels)
    assert labels.min() == 0  # class70 relabelled


def test_killed_extraction_resumes_where_it_stopped(run_dir, tmp_path, monkeypatch):
    calls = []
    original = embed.ModelEmbedder.__call__

    def dies_on_third_batch(self, images):
        calls.append(len(images))
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return original(self, images)

    monkeypatch.setattr(embed.ModelEmbedder, "__call__", dies_on_third_batch)
    monkeypatch.setattr(extract.time, "time", iter(range(0, 10**6, 10)).__next__)  # save progress every batch
    with pytest.raises(KeyboardInterrupt):
        extract.extract(run_dir, None, tmp_path, batch_size=8)
    assert not (tmp_path / "features.npy").exists() and (tmp_path / "features.npy.partial").exists()
    monkeypatch.undo()
    resumed_calls = []
    monkeypatch.setattr(
        embed.ModelEmbedder,
        "__call__",
        lambda self, images: resumed_calls.append(len(images)) or original(self, images),
    )
    extract.extract(run_dir, None, tmp_path, batch_size=8)
    embedded_after_resume = sum(resumed_calls)
    monkeypatch.undo()
    want, _ = expected_features(run_dir)
    assert embedded_after_resume == len(want) - 16  # two batches of 8 were already written
    np.testing.assert_allclose(np.load(tmp_path / "features.npy"), want, rtol=1e-4, atol=1e-5)
    assert not (tmp_path / "features.npy.partial").exists()


def test_float16_output(run_dir, tmp_path):
    paths = extract.extract(run_dir, None, tmp_path, dtype="float16", batch_size=16)
    features = np.load(paths["features"])
    want, _ = expected_features(run_dir)
    assert features.dtype == np.float16
    np.testing.assert_allclose(features.astype(np.float32), want, rtol=2e-3, atol=2e-3)
