"""Faults a cluster or an operator causes, each with its guaranteed outcome (docs/reliability.md).

Kill -9 anywhere, a damaged newest checkpoint, two trainers on one workdir, a rerun with another config, and
non-finite steps: the run either continues correctly or stops with one line naming the file or field and the
fix, and nothing already written is lost.
"""

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mixbct_jax import checkpoint, guard, train
from mixbct_jax import config as config_lib
from mixbct_jax import step as step_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def quick(steps: int, **kw):
    config = config_lib.load(ROOT / "configs" / "quickstart.py", "runlocal")
    with config.unlocked():
        config.total_steps = steps
        config.checkpoint.every_steps = 3
        config.checkpoint.asynchronous = False
        for k, v in kw.items():
            *parents, leaf = k.split(".")
            node = config
            for p in parents:
                node = node[p]
            node[leaf] = v
    return config


def steps_logged(workdir):
    return [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def saved_steps(workdir):
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 6-step run (checkpoints 3 and 6) that the fault cases compare with."""
    workdir = tmp_path_factory.mktemp("straight")
    train.train_and_evaluate(quick(6), workdir)
    return workdir


def params(workdir):
    return jax.tree.leaves(checkpoint.load_params(workdir)[1])


# ------------------------------------------------------------------------------------------------ kill -9


def test_kill_9_mid_run_then_rerun_is_bit_identical_and_logs_each_step_once(tmp_path, straight):
    """A trainer killed with SIGKILL right after its first (asynchronous) save starts, leaving its lock behind."""
    workdir = tmp_path / "killed"
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=str(ROOT),
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    cmd = [
        sys.executable,
        "-m",
        "mixbct_jax.train",
        "--config",
        f"{ROOT}/configs/quickstart.py:runlocal",
        "--workdir",
        str(workdir),
        "--config.total_steps=6",
        "--config.checkpoint.every_steps=3",
        "--config.log_every_steps=2",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    # Kill as soon as step 4 is logged: the async step-3 save may still be in flight, metrics hold step 4.
    while time.time() < deadline and proc.poll() is None:
        path = workdir / "metrics.jsonl"
        if path.exists() and any(json.loads(s)["step"] >= 4 for s in path.read_text().splitlines() if s.strip()):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the trainer finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (workdir / guard.LOCK_FILE).exists()  # a dead trainer's lock: stale, taken over below

    train.train_and_evaluate(quick(6, **{"checkpoint.asynchronous": True}), workdir)
    assert steps_logged(workdir) == [2, 4, 6]
    for a, b in zip(params(workdir), params(straight)):
        np.testing.assert_array_equal(a, b)
    assert not (workdir / guard.LOCK_FILE).exists()


# ------------------------------------------------------------------------------------------------ resume guard


def copy_run(straight, tmp_path):
    workdir = tmp_path / "copy"
    shutil.copytree(straight, workdir)
    return workdir


@pytest.mark.parametrize(
    "field,value",
    [
        ("data.global_batch", 16),
        ("seed", 1),
        ("data.role", "new"),
        ("data.scenario", "opdata"),
        ("bct.method", "l2"),
        ("model.embedding_size", 32),
        ("model.width", 0.5),
        ("model.arch", "r18"),
        ("head.type", "cosface"),
        ("optim.lr", 0.05),
        ("total_steps", 9),
        ("optim.schedule", "step"),
        ("bct.mix_ratio", 0.5),
        ("old.features", "/x/features.npy"),
    ],
)
def test_a_changed_config_refuses_to_resume_naming_the_field(straight, field, value):
    before = (straight / "config.json").read_text(), steps_logged(straight)
    with pytest.raises(guard.ResumeError) as err:
        train.train_and_evaluate(quick(6, **{field: value}), straight)
    message = str(err.value)
    assert "\n" not in message and field in message and "--workdir" in message
    if field in (
        "model.embedding_size",
        "model.width",
        "model.arch",
        "head.type",
        "data.role",
        "data.scenario",
        "bct.method",
    ):
        assert "resume_allow" not in message  # structural: only a new workdir helps
    else:
        assert f"--config.resume_allow={field}" in message
    assert ((straight / "config.json").read_text(), steps_logged(straight)) == before  # nothing touched


def test_finished_run_with_the_same_config_says_finished(straight, capsys):
    before = (straight / "metrics.jsonl").read_text()
    train.train_and_evaluate(quick(6), straight)
    assert "is finished (step 6/6)" in capsys.readouterr().err
    assert (straight / "metrics.jsonl").read_text() == before


def test_harmless_changes_resume_and_are_recorded(straight, tmp_path):
    workdir = copy_run(straight, tmp_path)
    train.train_and_evaluate(quick(6, log_every_steps=3, **{"evals.batch_size": 64}), workdir)
    assert checkpoint.read_config(workdir).log_every_steps == 3
    record = json.loads((workdir / guard.RESUMES_FILE).read_text().splitlines()[-1])
    assert record["step"] == 6 and record["changed"]["log_every_steps"] == {"was": 2, "now": 3}


def test_a_deliberate_change_resumes_with_resume_allow(straight, tmp_path):
    workdir = copy_run(straight, tmp_path)
    train.train_and_evaluate(quick(7, resume_allow="total_steps"), workdir)
    assert saved_steps(workdir)[-1] == 7 and checkpoint.read_config(workdir).total_steps == 7
    assert steps_logged(workdir) == [2, 4, 6, 7]


def test_checkpoints_without_config_json_refuse(straight, tmp_path):
    workdir = copy_run(straight, tmp_path)
    (workdir / "config.json").unlink()
    with pytest.raises(guard.ResumeError, match="no config.json"):
        train.train_and_evaluate(quick(6), workdir)


# ------------------------------------------------------------------------------------------------ lock


def test_a_second_trainer_refuses_while_the_first_runs(straight, tmp_path):
    workdir = copy_run(straight, tmp_path)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (workdir / guard.LOCK_FILE).write_text(json.dumps({"pid": other.pid, "host": socket.gethostname()}))
        with pytest.raises(guard.LockError, match=f"in use by another trainer \\(pid {other.pid}"):
            train.train_and_evaluate(quick(6), workdir)
        assert (workdir / guard.LOCK_FILE).exists() and saved_steps(workdir) == [3, 6]
    finally:
        other.kill()
        other.wait()


def test_a_lock_from_another_host_names_the_file_to_delete(tmp_path):
    (tmp_path / guard.LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "node-7"}))
    with pytest.raises(guard.LockError, match=f"on host node-7.*delete {tmp_path / guard.LOCK_FILE}"):
        guard.WorkdirLock(tmp_path).acquire()


def test_a_stale_lock_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / guard.LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    messages = []
    lock = guard.WorkdirLock(tmp_path)
    lock.acquire(log=messages.append)
    assert json.loads((tmp_path / guard.LOCK_FILE).read_text())["pid"] == os.getpid()
    assert "stale lock" in messages[0]
    lock.release()
    assert not (tmp_path / guard.LOCK_FILE).exists()


# ------------------------------------------------------------------------------------------------ damaged checkpoints


def _damage(step_dir: pathlib.Path, kind: str) -> None:
    state = step_dir / "state"
    data = [p for p in state.rglob("*") if p.is_file() and p.parent.name == "d"]
    if kind == "truncated_data":
        for p in data:
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    elif kind == "garbage_data":
        for p in data:
            p.write_bytes(b"\x00garbage" * (p.stat().st_size // 8 + 1))
    elif kind == "empty_data":
        for p in data:
            p.write_bytes(b"")
    elif kind == "no_data":
        for p in data:
            p.unlink()
    elif kind == "no_item_metadata":
        (state / "_METADATA").unlink()
    elif kind == "garbage_item_metadata":
        (state / "_METADATA").write_text("{not json")
    elif kind == "truncated_manifest":
        for p in state.rglob("manifest.ocdbt"):
            p.write_bytes(p.read_bytes()[:10])
    elif kind == "no_manifest":
        for p in state.rglob("manifest.ocdbt"):
            p.unlink()
    elif kind == "no_state_item":
        shutil.rmtree(state)
    else:
        raise AssertionError(kind)


DAMAGE = (
    "truncated_data",
    "garbage_data",
    "empty_data",
    "no_data",
    "garbage_item_metadata",
    "truncated_manifest",
    "no_manifest",
    "no_state_item",
)


def _tiny_manager(workdir):
    mngr = checkpoint.manager(workdir, keep=3, asynchronous=False)
    device = jax.devices()[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    for step in (1, 2):
        state = {
            "w": jax.device_put(np.full((64, 8), step, np.float32), device),
            "b": jax.device_put(np.arange(3.0) + step, device),
        }
        checkpoint.save(mngr, step, state=state, model={"params": state["w"]})
    mngr.wait_until_finished()
    abstract = {
        "w": jax.ShapeDtypeStruct((64, 8), np.float32, sharding=sharding),
        "b": jax.ShapeDtypeStruct((3,), np.float64 if jax.config.jax_enable_x64 else np.float32, sharding=sharding),
    }
    return mngr, abstract


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_newest_checkpoint_falls_back_and_is_kept_aside(tmp_path, kind):
    mngr, abstract = _tiny_manager(tmp_path)
    _damage(tmp_path / "checkpoints" / "2", kind)
    messages = []
    step, state = checkpoint.restore_state(mngr, abstract, log=messages.append)
    assert step == 1 and np.all(np.asarray(state["w"]) == 1)
    assert len(messages) == 1 and "checkpoint step 2 is unreadable" in messages[0] and "from step 1" in messages[0]
    assert (tmp_path / checkpoint.BAD_DIR / "2").is_dir()  # kept, not deleted
    assert mngr.all_steps() == [1]
    mngr.close()


def test_a_missing_item_metadata_file_is_not_damage(tmp_path):
    """Orbax restores into the given target without the item's _METADATA: the newest step is used, values intact."""
    mngr, abstract = _tiny_manager(tmp_path)
    _damage(tmp_path / "checkpoints" / "2", "no_item_metadata")
    step, state = checkpoint.restore_state(mngr, abstract)
    assert step == 2 and np.all(np.asarray(state["w"]) == 2)
    mngr.close()


def test_loading_a_damaged_model_for_inference_is_one_error_naming_the_step(tmp_path):
    mngr, _ = _tiny_manager(tmp_path)
    mngr.close()
    checkpoint.write_config(tmp_path, config_lib.load(ROOT / "configs" / "quickstart.py", "runlocal"))
    for p in (tmp_path / "checkpoints" / "2" / "model").rglob("*"):
        if p.is_file() and p.parent.name == "d":
            p.write_bytes(b"")
    with pytest.raises(ValueError, match=r"checkpoints/2 cannot be read \(.*\); load another saved step \(\[1\]"):
        checkpoint.load_params(tmp_path)


def test_no_readable_checkpoint_is_one_error_and_moves_nothing(tmp_path):
    mngr, abstract = _tiny_manager(tmp_path)
    wrong = {"w": jax.ShapeDtypeStruct((32, 8), np.float32, sharding=abstract["w"].sharding), "b": abstract["b"]}
    with pytest.raises(ValueError, match="no checkpoint .* can be restored.*new --workdir"):
        checkpoint.restore_state(mngr, wrong)
    assert sorted(mngr.all_steps()) == [1, 2] and not (tmp_path / checkpoint.BAD_DIR).exists()
    mngr.close()


def test_training_resumes_from_the_previous_checkpoint_when_the_newest_is_damaged(straight, tmp_path, capsys):
    workdir = copy_run(straight, tmp_path)
    _damage(workdir / "checkpoints" / "6", "truncated_data")
    train.train_and_evaluate(quick(6), workdir)
    err = capsys.readouterr().err
    assert "checkpoint step 6 is unreadable" in err and "resuming from step 3" in err
    assert saved_steps(workdir) == [3, 6] and (workdir / checkpoint.BAD_DIR / "6").is_dir()
    assert steps_logged(workdir) == [2, 4, 6]
    for a, b in zip(params(workdir), params(straight)):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------------------ non-finite


def test_divergence_stops_before_saving_a_poisoned_checkpoint(tmp_path):
    config = quick(6, max_consecutive_nonfinite=2, log_every_steps=1, **{"optim.lr": 1e30, "optim.clip_norm": 0.0})
    with pytest.raises(train.NonFiniteLossError) as err:
        train.train_and_evaluate(config, tmp_path)
    message = str(err.value)
    assert "\n" not in message and "2 consecutive steps" in message and "last finite step was" in message
    assert "config.optim.lr" in message
    # Whatever was saved before the divergence is finite; nothing was saved while steps were skipped.
    for step in saved_steps(tmp_path):
        _, variables = checkpoint.load_params(tmp_path, step)
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(variables))


def _skip_steps(monkeypatch, bad_steps):
    """Makes the listed (1-based) steps non-finite: the state is kept and the metrics say so, as the step does."""
    original = step_lib.build

    def build(*args, **kw):
        par = original(*args, **kw)
        real_step, count = par.step, [0]

        def step(state, batch, key, consts):
            count[0] += 1
            new_state, metrics = real_step(state, batch, key, consts)
            if count[0] + START[0] in bad_steps:
                metrics = dict(metrics, finite=metrics["finite"] * 0, loss=metrics["loss"] * np.nan)
            return new_state, metrics

        par.step = step
        return par

    START = [0]
    monkeypatch.setattr(step_lib, "build", build)
    return START


def test_skipped_steps_are_counted_never_checkpointed_and_a_run_ending_on_them_names_the_last_good_one(
    tmp_path, monkeypatch, capsys
):
    _skip_steps(monkeypatch, bad_steps={2, 5, 6})
    config = quick(6, log_every_steps=1, **{"checkpoint.every_steps": 2})
    with pytest.raises(train.NonFiniteLossError, match=r"last finite step was 4.*last good checkpoint \(step 4\)"):
        train.train_and_evaluate(config, tmp_path)
    assert saved_steps(tmp_path) == [4]  # not 2 (skipped) nor 6 (skipped, and the run ends on it)
    assert "step 2: not checkpointed" in capsys.readouterr().err
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records] == [0, 1, 1, 1, 2, 3]
    assert [r["consecutive_nonfinite"] for r in records] == [0, 1, 0, 0, 1, 2]
