"""End to end: the quickstart config trains, checkpoints, resumes exactly, and every config file loads."""

import dataclasses
import json
import pathlib
import pickle

import cv2
import jax
import numpy as np
import pytest

from mixbct_jax import checkpoint, embed, evaluate, train
from mixbct_jax import config as config_lib
from mixbct_jax import step as step_lib
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


def record_steps(monkeypatch) -> list[dict]:
    """Records every train step the next runs take, as host copies: state in and out, batch, key, consts, metrics.

    The record of a run's step ``s`` holds ``state_in`` (the state before it), ``batch`` (the global batch it
    consumed) and ``step`` (the compiled step function itself, unwrapped, with its ``par``), so a test can replay it.
    """
    records: list[dict] = []
    original = step_lib.build

    def build(*args, **kwargs):
        par = original(*args, **kwargs)

        def step(state, batch, key, consts):
            record = dict(
                par=par,
                step=par.step,
                state_in=jax.device_get(state),
                batch=jax.device_get(batch),
                key=key,
                consts=consts,
            )
            state, metrics = par.step(state, batch, key, consts)  # donates the state: copy it before, as above
            records.append(dict(record, state_out=jax.device_get(state), metrics=jax.device_get(metrics)))
            return state, metrics

        return dataclasses.replace(par, step=step)

    monkeypatch.setattr(step_lib, "build", build)
    return records


@pytest.fixture(scope="module")
def straight_steps(tmp_path_factory):
    """``quick(6)`` on 4 devices, uninterrupted: its run directory and the record of its 6 steps."""
    workdir = tmp_path_factory.mktemp("straight")
    with pytest.MonkeyPatch.context() as mp:
        records = record_steps(mp)
        train.train_and_evaluate(quick(6), workdir)
    return workdir, records


@pytest.fixture(scope="module")
def straight_run(straight_steps):
    return straight_steps[0]


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


def assert_trees_equal(actual, expected, what: str) -> None:
    assert jax.tree.structure(actual) == jax.tree.structure(expected), what
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=f"{what}{jax.tree_util.keystr(path)}")


def test_a_run_resumes_on_another_number_of_devices(tmp_path, straight_steps, monkeypatch):
    """Checkpoints hold global arrays: 3 steps on 4 devices, then the rest on 2 continue the straight run exactly.

    After the move the run must start from the straight run's in-memory state at step 3 (parameters, row-sharded
    class centres, BatchNorm statistics, optimizer slots, step), bit for bit, and consume the straight run's
    batches 4-6. Its steps then equal a replay of the 2-device step on those: the only difference from the
    straight run is the documented one, BatchNorm statistics over 16 rows per device instead of 8.
    """
    straight_dir, straight = straight_steps
    workdir = tmp_path / "moved"
    kill_after_checkpoint(workdir, monkeypatch)
    moved = record_steps(monkeypatch)
    train.train_and_evaluate(quick(6, num_devices=2), workdir)
    assert [r["par"].num_devices for r in moved] == [2, 2, 2] and [r["par"].num_devices for r in straight] == [4] * 6
    assert_trees_equal(moved[0]["state_in"], straight[2]["state_out"], "restored state at step 3")
    for s, (m, r) in enumerate(zip(moved, straight[3:]), start=4):
        assert_trees_equal(m["batch"], r["batch"], f"batch of step {s}")

    # Replay: the straight run's step-3 state and batches 4-6 through the resumed process's own 2-device step.
    par = moved[0]["par"]
    state, losses = par.to_device(straight[2]["state_out"]), []
    for r in straight[3:]:
        state, out = moved[0]["step"](state, par.put_batch(r["batch"]), moved[0]["key"], moved[0]["consts"])
        losses.append(float(out["loss"]))
    assert_trees_equal(moved[-1]["state_out"], jax.device_get(state), "state at step 6")
    records = metrics(workdir)
    assert [r["step"] for r in records] == [2, 4, 6]
    assert records[0]["loss"] == metrics(straight_dir)[0]["loss"]  # written before the move
    np.testing.assert_allclose([records[1]["loss"], records[2]["loss"]], [losses[0], losses[2]], rtol=1e-6)
    # The per-device BatchNorm difference is real: the 4-device straight run's step 4 took another loss.
    assert losses[0] != float(straight[3]["metrics"]["loss"])


def test_finished_run_is_not_retrained(straight_run, capsys):
    before = (straight_run / "metrics.jsonl").read_text()
    train.train_and_evaluate(quick(6), straight_run)
    assert (straight_run / "metrics.jsonl").read_text() == before
    assert "is finished (step 6/6)" in capsys.readouterr().err


def test_resuming_with_another_data_order_is_refused(straight_run, tmp_path, monkeypatch):
    """The checkpoint's input state (checkpoints/<step>/data) must match what the run resumes with.

    A changed seed is refused by the config guard first; a changed data set behind the same spec by the input
    state.
    """
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
    retrieval = "synthetic:num_classes=6,min_images=4,max_images=6,image_size=32,seed=9"
    with config.unlocked():
        config.evals.every_steps = 2
        config.evals.retrieval = retrieval
        config.evals.bin = str(tmp_path / "pairs.bin")
        config.checkpoint.every_steps = 2  # keeps the step-2 model, to evaluate it on its own below
    train.train_and_evaluate(config, tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/new/new/mAP" in r]
    assert [r["step"] for r in evals] == [2]  # the final step is evaluated by the final report instead
    # The numbers logged during training are those of `python -m mixbct_jax.evaluate` on the step-2 checkpoint.
    expected = evaluate.evaluate(
        embed.load_embedder(tmp_path / "run", step=2),
        protocols=[("retrieval", retrieval), ("bin", str(tmp_path / "pairs.bin"))],
        batch_size=config.evals.batch_size,
    )["protocols"]
    rows = expected[f"retrieval:{retrieval}"]["rows"]["new/new"]
    for metric in ("top1", "top5", "mAP"):
        np.testing.assert_allclose(evals[0][f"eval/new/new/{metric}"], rows[metric], rtol=1e-6)
    bin_rows = next(v for k, v in expected.items() if k.startswith("bin:"))["rows"]["new/new"]
    np.testing.assert_allclose(evals[0]["eval/pairs/new/new/accuracy"], bin_rows["accuracy"], rtol=1e-6)
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
