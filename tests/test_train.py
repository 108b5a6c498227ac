"""End to end: the quickstart config trains, checkpoints, resumes exactly, and every config file loads."""

import json
import pathlib
import pickle

import cv2

import jax
import numpy as np
import pytest

from mixbct_jax import checkpoint, config as config_lib, train
from mixbct_jax.data import recordio
from mixbct_jax.data.synthetic import SyntheticFaces

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config(name: str, arg: str | None = None):
    return config_lib.load(ROOT / "configs" / f"{name}.py", arg)


def quick(steps: int, **kw):
    config = load_config("quickstart", "runlocal")
    with config.unlocked():
        config.total_steps = steps
        config.checkpoint.every_steps = 3
        config.checkpoint.asynchronous = False
        for k, v in kw.items():
            config[k] = v
    return config


def backbone(workdir):
    _, variables = checkpoint.load_params(workdir)
    return variables


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    train.train_and_evaluate(quick(6), workdir)
    return workdir


def test_quickstart_trains_and_writes_run_directory(straight_run):
    records = [json.loads(line) for line in (straight_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6]
    assert all(np.isfinite(r["loss"]) and r["finite"] == 1.0 for r in records)
    assert records[0]["lr"] > records[-1]["lr"] > 0
    assert {"loss", "lr", "img_per_s", "grad_norm"} <= set(records[0])
    config = checkpoint.read_config(straight_run)
    assert config.model.arch == "r_tiny" and config.total_steps == 6
    assert sorted(int(p.name) for p in (straight_run / "checkpoints").iterdir() if p.name.isdigit()) == [3, 6]
    from test_metrics_writer import scalars

    tb = scalars(straight_run / "tensorboard")  # the same numbers for TensorBoard
    assert tb["loss"] == pytest.approx({r["step"]: r["loss"] for r in records}, rel=1e-6)


def metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def kill_after_checkpoint(workdir, monkeypatch, step: int = 3) -> None:
    """Runs ``quick(6)`` in ``workdir`` and kills it right after the step-``step`` checkpoint is written."""
    original_save = checkpoint.save

    def save_then_die(mngr, at_step, **kw):
        original_save(mngr, at_step, **kw)
        if at_step == step:
            raise KeyboardInterrupt(f"killed after the step-{step} checkpoint")

    monkeypatch.setattr(checkpoint, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(quick(6), workdir)
    monkeypatch.setattr(checkpoint, "save", original_save)


def test_rerunning_the_same_command_resumes_and_matches_a_straight_run(tmp_path, straight_run, monkeypatch):
    workdir = tmp_path / "resumed"
    kill_after_checkpoint(workdir, monkeypatch)
    train.train_and_evaluate(quick(6), workdir)  # the same command again
    records = metrics(workdir)
    assert [r["step"] for r in records] == [2, 4, 6]  # 4 and 6 logged by the resumed process
    np.testing.assert_allclose([r["loss"] for r in records], [r["loss"] for r in metrics(straight_run)], rtol=1e-5)
    a, b = backbone(workdir), backbone(straight_run)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_a_run_resumes_on_another_number_of_devices(tmp_path, straight_run, monkeypatch):
    """Checkpoints hold global arrays: 3 steps on 4 devices, then the rest on 2, loss close to the straight run."""
    workdir = tmp_path / "moved"
    kill_after_checkpoint(workdir, monkeypatch)
    train.train_and_evaluate(quick(6, num_devices=2), workdir)
    records, straight = metrics(workdir), metrics(straight_run)
    assert [r["step"] for r in records] == [2, 4, 6]
    # Same data and parameters; only the BatchNorm batch differs (8 instead of 4 rows per device) after the move.
    np.testing.assert_allclose(records[0]["loss"], straight[0]["loss"], rtol=1e-6)
    assert np.isfinite(records[-1]["loss"])
    assert abs(records[-1]["loss"] - straight[-1]["loss"]) < 0.5 * straight[-1]["loss"]


def test_finished_run_is_not_retrained(straight_run, capsys):
    before = (straight_run / "metrics.jsonl").read_text()
    train.train_and_evaluate(quick(6), straight_run)
    assert (straight_run / "metrics.jsonl").read_text() == before
    assert "is finished (step 6/6)" in capsys.readouterr().err


def test_resuming_with_another_data_order_is_refused(straight_run, tmp_path, monkeypatch):
    """The checkpoint's input state (checkpoints/<step>/data) must match what the run resumes with: a changed seed
    is refused by the config guard first; a changed data set behind the same spec by the input state."""
    assert json.loads((straight_run / "checkpoints" / "6" / "data" / "metadata").read_text())["step"] == 6
    with pytest.raises(ValueError, match=r"another config \(seed: 0 -> 1\).*resume_allow=seed"):
        train.train_and_evaluate(quick(6, seed=1), straight_run)
    # The same config over another number of examples (a .rec rewritten in place, say): the stored state says so.
    workdir = tmp_path / "moved_data"
    kill_after_checkpoint(workdir, monkeypatch)
    data = json.loads((workdir / "checkpoints" / "3" / "data" / "metadata").read_text())
    (workdir / "checkpoints" / "3" / "data" / "metadata").write_text(json.dumps(dict(data, num_examples=1)))
    with pytest.raises(ValueError, match=r"input-pipeline state does not match this run \(num_examples: checkpoint 1"):
        train.train_and_evaluate(quick(6), workdir)


def test_pmap_mode_trains(tmp_path):
    train.train_and_evaluate(quick(2, parallel="pmap"), tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 2 and np.isfinite(records[-1]["loss"])
    assert checkpoint.load_params(tmp_path)[1]["params"]["fc"]["kernel"].shape[1] == 64


def test_non_finite_loss_stops_with_the_last_good_checkpoint(tmp_path):
    config = quick(6)
    with config.unlocked():
        config.optim.lr = 1e30  # diverges
        config.optim.clip_norm = 0.0
    with pytest.raises(train.NonFiniteLossError, match="last finite step was"):
        train.train_and_evaluate(config, tmp_path)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("[!_]*.py")), ids=lambda p: p.stem)
def test_every_config_loads_locked(path):
    config = load_config(path.stem)
    assert config.is_locked
    with pytest.raises(AttributeError):
        config.optim.not_a_field = 1


def write_bin(path, faces: SyntheticFaces, num_pairs: int = 20) -> None:
    """A .bin pair set (pickle of encoded images and issame flags) of synthetic faces."""
    rng = np.random.RandomState(0)
    bins, issame = [], []
    for k in range(num_pairs):
        a = rng.randint(len(faces))
        same = k % 2 == 0
        candidates = np.flatnonzero((faces.labels == faces.labels[a]) == same)
        b = rng.choice(candidates[candidates != a])
        for i in (a, b):
            bins.append(cv2.imencode(".png", faces.read([i])[0][:, :, ::-1])[1].tobytes())
        issame.append(same)
    with open(path, "wb") as f:
        pickle.dump((bins, issame), f)


def test_periodic_evaluation_is_logged(tmp_path):
    write_bin(tmp_path / "pairs.bin", SyntheticFaces(num_classes=5, image_size=32, seed=4))
    config = quick(4)
    with config.unlocked():
        config.evals.every_steps = 2
        config.evals.retrieval = "synthetic:num_classes=6,min_images=4,max_images=6,image_size=32,seed=9"
        config.evals.bin = str(tmp_path / "pairs.bin")
    train.train_and_evaluate(config, tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/new/new/mAP" in r]
    assert [r["step"] for r in evals] == [2]  # the final step is evaluated by the final report instead
    assert 0 <= evals[0]["eval/new/new/top1"] <= 1
    assert 0.0 <= evals[0]["eval/pairs/new/new/accuracy"] <= 1.0
    report = json.loads((tmp_path / "run" / "eval" / "report.json").read_text())
    assert "new/new" in next(iter(report["protocols"].values()))["rows"]


def test_trains_from_an_insightface_rec_file_on_four_devices(tmp_path):
    faces = SyntheticFaces(num_classes=12, min_images=4, max_images=6, image_size=32, seed=2)
    recordio.write_rec(tmp_path / "train", faces.read(np.arange(len(faces))), faces.labels, encoding=".png")
    config = quick(2, parallel="shard_map")
    with config.unlocked():
        config.data.source = f"rec:{tmp_path / 'train'}"
        config.data.scenario = "full"
    metrics = train.train_and_evaluate(config, tmp_path / "run")
    assert jax.device_count() == 4 and metrics["step"] == 2 and np.isfinite(metrics["loss"])
    assert checkpoint.read_config(tmp_path / "run").data.source.startswith("rec:")


def test_a_method_without_its_old_embeddings_fails_naming_the_field(tmp_path):
    config = config_lib.load(ROOT / "configs" / "quickstart.py", "role=new,method=mixbct,runlocal")
    with pytest.raises(ValueError, match="config.old.features"):
        train.train_and_evaluate(config, tmp_path)
