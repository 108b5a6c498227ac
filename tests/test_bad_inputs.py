"""Bad inputs, each with its guaranteed outcome: one line naming the file or field and the fix (docs/reliability.md).

Cheap checks run in-process; the command lines run as subprocesses only where the exit code and the one-line
``error: ...`` output are what is tested.
"""

import json
import os
import pathlib
import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixbct_jax import checkpoint, cli, embed, evaluate, guard, models, train
from mixbct_jax import config as config_lib
from mixbct_jax.data import old_embeddings
from mixbct_jax.evaluation import report, verification

ROOT = pathlib.Path(__file__).resolve().parents[1]


def quickstart(**overrides):
    return config_lib.load(ROOT / "configs" / "quickstart.py", "runlocal", overrides)


# ------------------------------------------------------------------------------------------------ config values


@pytest.mark.parametrize(
    "field,value",
    [
        ("bct.mix_ratio", 1.5),
        ("bct.mix_ratio", -0.2),
        ("checkpoint.every_steps", 0),
        ("log_every_steps", 0),
        ("checkpoint.keep", 0),
        ("optim.lr", 0.0),
        ("optim.lr", float("nan")),
        ("optim.momentum", 1.0),
        ("data.global_batch", 0),
        ("data.split_ratio", 1.0),
        ("data.scenario", "opclas"),
        ("data.role", "both"),
        ("model.arch", "r9"),
        ("model.dtype", "float16"),
        ("model.embedding_size", 0),
        ("model.width", 0.0),
        ("head.type", "arc"),
        ("head.sample_rate", 0.0),
        ("head.scale", -1.0),
        ("bct.method", "mixbc"),
        ("total_steps", 0),
        ("num_devices", 0),
        ("evals.every_steps", -1),
        ("evals.batch_size", 0),
        ("max_consecutive_nonfinite", 0),
        ("old.finite_check", "none"),
        ("parallel", "pjit"),
        ("optim.schedule", "cosine"),
        ("model.num_classes", 0),
    ],
)
def test_a_bad_config_value_is_one_line_naming_the_field(field, value):
    with pytest.raises(config_lib.ConfigError) as err:
        config_lib.validate(quickstart(**{field: value}))
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"config.{field}=") and f"--config.{field}=" in message


def test_divisibility_and_cross_field_checks():
    with pytest.raises(config_lib.ConfigError, match=r"config.data.global_batch=30: must be divisible by "):
        config_lib.validate(quickstart(**{"data.global_batch": 30, "num_devices": 4}))
    with pytest.raises(config_lib.ConfigError, match=r"config.bct.nccl_queue_size=16: must be >= "):
        config_lib.validate(quickstart(**{"bct.method": "nccl", "bct.nccl_queue_size": 16}))
    with pytest.raises(config_lib.ConfigError, match="optim.decay_epochs"):
        config_lib.validate(quickstart(**{"optim.schedule": "step", "optim.decay_epochs": (20, 10)}))


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("[!_]*.py")), ids=lambda p: p.stem)
def test_every_shipped_config_validates(path):
    config_lib.validate(config_lib.load(path))


def test_a_bad_value_fails_before_anything_is_built(tmp_path):
    with pytest.raises(config_lib.ConfigError, match="config.bct.mix_ratio=1.5"):
        train.train_and_evaluate(quickstart(**{"bct.mix_ratio": 1.5}), tmp_path / "run")
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


# ------------------------------------------------------------------------------------------------ old features


def test_a_nan_row_outside_the_sample_is_found_by_the_default_full_check(tmp_path):
    chunk, limit = old_embeddings._FINITE_CHUNK_ROWS, old_embeddings._FINITE_MAX_CHUNKS
    rows = chunk * (limit + 10)
    sampled = set(np.unique(np.linspace(0, limit + 9, limit).round().astype(int)).tolist())
    skipped = next(k for k in range(limit + 10) if k not in sampled)
    features = np.ones((rows, 2), np.float16)
    features[skipped * chunk + 5] = np.nan
    np.save(tmp_path / "features.npy", features)
    old = old_embeddings.open_old_embeddings(features=str(tmp_path / "features.npy"))
    kw = {"num_examples": rows, "source_labels": None, "embedding_size": 2, "num_classes": None}
    old_embeddings.validate(old, **kw, check_all_rows=False)  # the sampled opt-out misses it
    with pytest.raises(ValueError, match=rf"features.npy row {skipped * chunk + 5} contains NaN"):
        old_embeddings.validate(old, **kw, check_all_rows=True)
    assert quickstart().old.finite_check == "full"  # what the trainer passes by default


# ------------------------------------------------------------------------------------------------ metrics.jsonl


def test_metrics_keep_each_step_once_on_resume_and_on_read(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [
        {"step": 2, "loss": 3.0, "lr": 0.1},
        {"step": 4, "loss": 2.0, "lr": 0.1},
        {"step": 4, "eval/new/new/top1": 0.5},
        {"step": 6, "loss": 1.0, "lr": 0.1},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 8, "lo')  # torn last line
    assert guard.truncate_metrics(path, 4) == 2
    assert [json.loads(s)["step"] for s in path.read_text().splitlines()] == [2, 4, 4]
    with open(path, "a") as f:  # a file written by an older version: step 4 logged twice
        f.write(json.dumps({"step": 4, "loss": 1.5, "lr": 0.1}) + "\n")
    train_records, evals = report.read_metrics(path)
    assert [(r["step"], r["loss"]) for r in train_records] == [(2, 3.0), (4, 1.5)]
    assert [r["step"] for r in evals] == [4]
    report.plot_training_curves({"run": path}, tmp_path / "curves.png")  # eval records no longer break it
    assert (tmp_path / "curves.png").stat().st_size > 0


# ------------------------------------------------------------------------------------------------ .bin pair sets


@pytest.mark.parametrize("content", [b"not a pickle at all", pickle.dumps(([b"x"], [True]))[:-5], b""])
def test_a_bin_that_is_not_a_pair_pickle_names_the_file(tmp_path, content):
    path = tmp_path / "lfw.bin"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"lfw.bin is not a .bin pair set"):
        verification.load_bin(path, image_size=32)


def test_folds_with_one_kind_of_pair_are_warned_and_marked_in_the_report(tmp_path):
    rng = np.random.default_rng(0)
    issame = np.r_[np.ones(100, bool), np.zeros(100, bool)]  # all matched, then all mismatched
    e1 = rng.normal(size=(200, 8))
    e1 /= np.linalg.norm(e1, axis=1, keepdims=True)
    with pytest.warns(UserWarning, match="10 of 10 verification folds hold only one kind of pair"):
        res = verification.evaluate_pairs(e1, e1, issame)
    assert res["single_kind_folds"] == 10 and verification.single_kind_folds(issame) == list(range(10))
    interleaved = np.tile([True, False], 100)
    assert verification.single_kind_folds(interleaved) == []
    res["xnorm"] = 1.0  # evaluate_bin adds the mean feature norm
    report.write_report(
        {"protocols": {"bin:lfw": {"protocol": "bin", "data": "lfw.bin", "rows": {"new/new": res}}}}, tmp_path
    )
    assert "10 of the folds hold only one kind of pair" in (tmp_path / "report.md").read_text()


# ------------------------------------------------------------------------------------------------ model files


def model_run(workdir, embedding_size: int, claimed: int | None = None):
    """A run directory holding a tiny backbone of ``embedding_size``; config.json may claim another size."""
    config = quickstart(**{"model.embedding_size": embedding_size})
    model = models.build("r_tiny", embedding_size=embedding_size, input_size=32, width=0.25)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    checkpoint.save_model_only(workdir, config, jax.tree.map(np.asarray, variables))
    if claimed is not None:
        with config.unlocked():
            config.model.embedding_size = claimed
        checkpoint.write_config(workdir, config)
    return workdir


def test_a_checkpoint_that_does_not_match_config_json_names_both(tmp_path):
    run = model_run(tmp_path / "run", 32, claimed=64)
    with pytest.raises(ValueError, match=r"the checkpoint does not match the model its config.json describes"):
        embed.load_embedder(run)


def test_cross_evaluation_of_models_with_different_sizes_names_both(tmp_path):
    new = model_run(tmp_path / "new", 64)
    old = model_run(tmp_path / "old", 32)
    with pytest.raises(ValueError, match=r"D=64.*D=32.*different embedding sizes"):
        evaluate.evaluate(new, old, [("bin", str(tmp_path / "lfw.bin"))])


# ------------------------------------------------------------------------------------------------ cli.run


def test_cli_run_prints_one_line_for_user_errors_and_a_traceback_for_bugs(capsys):
    def user_error(argv):
        raise FileNotFoundError(2, "No such file or directory", "/data/x.npy")

    with pytest.raises(SystemExit) as exit_:
        cli.run(user_error, [])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "error: [Errno 2] No such file or directory: '/data/x.npy'\n"
    with pytest.raises(FileNotFoundError):  # --verbose: the traceback
        cli.run(user_error, ["--verbose"])

    def bug(argv):
        raise TypeError("unsupported operand")

    with pytest.raises(TypeError):
        cli.run(bug, [])


# ------------------------------------------------------------------------------------------------ command lines


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    model_run(d / "run64", 64)
    model_run(d / "run32", 32)
    model_run(d / "mismatch", 32, claimed=64)
    (d / "junk.bin").write_bytes(b"\x00 this is not a pickle")
    (d / "outdir").mkdir()
    # A finished old-model workdir as far as the guard can tell: config.json and a step directory.
    finished = d / "finished"
    checkpoint.write_config(finished, quickstart())
    (finished / "checkpoints" / "6").mkdir(parents=True)
    return d


CLI_CASES = {
    "train_missing_config": (
        ["mixbct_jax.train", "--config", "configs/config.py", "--workdir", "{d}/w"],
        "config 'configs/config.py' is neither a file nor a shipped config",
    ),
    "train_mix_ratio": (
        [
            "mixbct_jax.train",
            "--config",
            "configs/quickstart.py:runlocal",
            "--workdir",
            "{d}/w",
            "--config.bct.mix_ratio=1.5",
        ],
        "config.bct.mix_ratio=1.5: must be in [0, 1]",
    ),
    "train_unknown_field": (
        [
            "mixbct_jax.train",
            "--config",
            "configs/quickstart.py:runlocal",
            "--workdir",
            "{d}/w",
            "--config.optim.lrr=0.1",
        ],
        "--config.optim.lrr: 'lrr' is not a config field",
    ),
    "train_value_of_the_wrong_type": (
        [
            "mixbct_jax.train",
            "--config",
            "configs/quickstart.py:runlocal",
            "--workdir",
            "{d}/w",
            "--config.bct.mix_ratio=abc",
        ],
        "--config.bct.mix_ratio=abc: could not convert",
    ),
    "train_unknown_config_argument": (
        ["mixbct_jax.train", "--config", "configs/quickstart.py:runlocal,rolee=new", "--workdir", "{d}/w"],
        "config argument 'rolee' is unknown",
    ),
    "train_zero_frequency": (
        [
            "mixbct_jax.train",
            "--config",
            "configs/quickstart.py:runlocal",
            "--workdir",
            "{d}/w",
            "--config.checkpoint.every_steps=0",
        ],
        "config.checkpoint.every_steps=0",
    ),
    "train_new_model_into_old_workdir": (
        [
            "mixbct_jax.train",
            "--config",
            "configs/quickstart.py:runlocal,role=new,method=mixbct",
            "--workdir",
            "{d}/finished",
            "--config.old.features=x.npy",
        ],
        "holds another run (bct.method: 'none' -> 'mixbct'",
    ),
    "extract_mismatched_checkpoint": (
        ["mixbct_jax.extract", "--workdir", "{d}/mismatch", "--out", "{d}/emb"],
        "does not match the model its config.json describes",
    ),
    "evaluate_different_sizes": (
        [
            "mixbct_jax.evaluate",
            "--new",
            "{d}/run64",
            "--old",
            "{d}/run32",
            "--protocol",
            "bin",
            "--data",
            "{d}/junk.bin",
            "--out",
            "{d}/eval",
        ],
        "different embedding sizes",
    ),
    "evaluate_bin_not_a_pickle": (
        [
            "mixbct_jax.evaluate",
            "--new",
            "{d}/run64",
            "--protocol",
            "bin",
            "--data",
            "{d}/junk.bin",
            "--out",
            "{d}/eval",
        ],
        "junk.bin is not a .bin pair set",
    ),
    "convert_out_is_a_directory": (
        ["mixbct_jax.convert", "--export", "{d}/run64", "--out", "{d}/outdir"],
        "outdir is a directory",
    ),
    "convert_out_ends_in_a_separator": (
        ["mixbct_jax.convert", "--export", "{d}/run64", "--out", "{d}/newdir/"],
        "newdir/ is a directory",
    ),
    "prepare_missing_features": (
        [
            "mixbct_jax.prepare",
            "denoise",
            "--features",
            "{d}/none.npy",
            "--labels",
            "{d}/none.npy",
            "--out",
            "{d}/c.npy",
        ],
        "none.npy does not exist",
    ),
    "demo_zero_steps": (["mixbct_jax.demo", "--out", "{d}/demo", "--steps", "0"], "--steps must be >= 1, got 0"),
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_a_command_line_user_error_is_one_line_with_exit_code_2(files, case):
    argv, expected = CLI_CASES[case]
    argv = [a.format(d=files) for a in argv]
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    out = subprocess.run(
        [sys.executable, "-m", *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    lines = [s for s in out.stderr.splitlines() if s.strip() and not s.startswith(("I0000", "WARNING: All log"))]
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    errors = [s for s in lines if s.startswith("error: ")]
    assert len(errors) == 1 and expected in errors[0], out.stderr
    assert lines[-1] == errors[0]
