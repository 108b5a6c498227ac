"""Multi-host training on localhost: two processes x 2 CPU devices == one process x 4 devices (docs/data.md).

Two ``python -m mixbct_jax.train`` processes join through ``--coordinator/--num_processes/--process_id``; JAX's CPU
collectives (gloo, the default of ``jax_cpu_collectives_implementation``) carry the step's psums and all-gathers
between them, and each process feeds its own half of every global batch. The run is compared with the same config
trained in this pytest process on 4 devices (tests/conftest.py).

What "the same" means here: the two runs compute the same sums in a different order (gloo's all-reduce across
processes vs XLA's in-process all-reduce), so after the first step the parameters agree to about one ulp. The
quickstart model is ill-conditioned enough that ulp differences grow by orders of magnitude per step (in a
single-process run, moving 5% of the backbone entries by one ulp after step 1 changes the gradient norm by ~1e-4
within three steps), so the trajectory is checked tightly for two steps and loosely for the third. Duplicated or
missing rows, a wrong sharding or a broken collective would show at step 1 far above these tolerances.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np

from mixbct_jax import checkpoint, train
from mixbct_jax import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 3
OVERRIDES = {"total_steps": STEPS, "log_every_steps": 1, "checkpoint.every_steps": 1}
TIMEOUT_S = 300
# The final evaluation runs on process 0 alone (and loads the checkpoint there): a tiny held-out synthetic set.
RETRIEVAL = "synthetic:num_classes=8,min_images=2,max_images=4,image_size=32,seed=1"


def quickstart_config():
    return config_lib.load(ROOT / "configs" / "quickstart.py", "runlocal", OVERRIDES)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def worker_env(devices_per_process: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
        JAX_PLATFORMS="cpu",
        TF_CPP_MIN_LOG_LEVEL="3",
        CUDA_VISIBLE_DEVICES="",
        JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
    )
    return env


def launch(workdir: pathlib.Path, num_processes: int = 2) -> list[tuple[subprocess.Popen, pathlib.Path]]:
    """Starts the processes of one run (their output goes to <workdir>.<i>.log)."""
    port = free_port()
    overrides = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
    procs = []
    for i in range(num_processes):
        log = workdir.parent / f"{workdir.name}.{i}.log"
        cmd = [
            sys.executable,
            "-m",
            "mixbct_jax.train",
            "--config",
            "configs/quickstart.py:runlocal",
            "--workdir",
            str(workdir),
            "--coordinator",
            f"localhost:{port}",
            "--num_processes",
            str(num_processes),
            "--process_id",
            str(i),
            *overrides,
            f"--config.evals.retrieval={RETRIEVAL}",
        ]
        with open(log, "w") as f:
            procs.append((subprocess.Popen(cmd, cwd=ROOT, env=worker_env(2), stdout=f, stderr=subprocess.STDOUT), log))
    return procs


def wait_all(procs, deadline: float) -> None:
    try:
        for p, _ in procs:
            p.wait(timeout=max(deadline - time.time(), 1))
    finally:
        for p, _ in procs:  # one that hangs (e.g. its peer died) must not outlive the test
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, (p, log) in enumerate(procs):
        assert p.returncode == 0, f"process {i} exited with {p.returncode}:\n{log.read_text()[-4000:]}"


def losses(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    two = tmp_path / "two"
    start = time.time()
    procs = launch(two)
    try:
        # The reference runs meanwhile, here: one process, 4 devices, the same config and global batch.
        one = tmp_path / "one"
        train.train_and_evaluate(quickstart_config(), one)
    finally:
        wait_all(procs, start + TIMEOUT_S)

    logs = [log.read_text() for _, log in procs]
    assert "4 devices" in logs[0] and "step 3/3" in logs[0]
    assert "step 1/3" not in logs[1]  # only process 0 reports

    # Process 0 alone wrote config.json and metrics.jsonl (one record per step, not one per process).
    a, b = losses(two), losses(one)
    assert [r["step"] for r in a] == [1, 2, 3]
    config_two = checkpoint.read_config(two)
    config_two.evals.retrieval = ""  # the only difference between the two configs
    assert config_two.to_dict() == checkpoint.read_config(one).to_dict()
    np.testing.assert_allclose([r["loss"] for r in a[:2]], [r["loss"] for r in b[:2]], rtol=1e-5)
    np.testing.assert_allclose(a[0]["grad_norm"], b[0]["grad_norm"], rtol=1e-5)
    np.testing.assert_allclose(a[2]["loss"], b[2]["loss"], rtol=1e-3)
    np.testing.assert_allclose([r["lr"] for r in a], [r["lr"] for r in b], rtol=1e-7)

    # One checkpoint per step, written cooperatively by both processes into the shared directory.
    steps = sorted(int(p.name) for p in (two / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [1, 2, 3]
    written_by = sorted(p.name for p in (two / "checkpoints" / "3" / "state").glob("ocdbt.process_*"))
    assert written_by == ["ocdbt.process_0", "ocdbt.process_1"]  # each process wrote its own shards
    assert f"retrieval:{RETRIEVAL}" in json.loads((two / "eval" / "report.json").read_text())["protocols"]

    # The backbone: after one step equal up to the all-reduce's summation order; after three, close.
    for step, rtol, atol in [(1, 1e-5, 1e-6), (STEPS, 1e-2, 1e-4)]:
        _, va = checkpoint.load_params(two, step)
        _, vb = checkpoint.load_params(one, step)
        assert jax.tree.structure(va) == jax.tree.structure(vb)
        for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(va), jax.tree.leaves(vb)):
            np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=f"step {step} {jax.tree_util.keystr(path)}")
