"""The built wheel: what it holds, and that it runs the quickstart from an empty folder in a clean venv.

The clean venv gets the wheel and nothing else; the dependencies (jax, flax, ...) come from this test
environment's site-packages through a ``.pth`` line, so no registry is needed and the project's own checkout is
not on the path (only the wheel's copy of ``mixbct_jax`` is importable there).
"""

import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    # Built from a copy of what the wheel is made of: setuptools leaves build/ behind in the source tree, and a
    # stale build/ could hide a module missing from pyproject.toml.
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    for name in ("mixbct_jax", "configs"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
        check=True,
        cwd=src,
    )
    (whl,) = out.glob("mixbct_jax-*.whl")
    return whl


def test_wheel_holds_every_module_the_configs_and_the_license(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "mixbct_jax").rglob("*.py")}
    assert modules <= names, f"missing from the wheel: {sorted(modules - names)} (list the package in pyproject.toml)"
    configs = {f"mixbct_jax/configs/{p.name}" for p in (ROOT / "configs").glob("*.py")}
    assert configs <= names and "mixbct_jax/configs/quickstart.py" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    assert "License-Expression: Apache-2.0" in text
    assert not any(n.startswith(("tests/", "benchmarks/", "colab/")) for n in names)


def test_wheel_trains_the_quickstart_from_an_empty_folder(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        env=env,
    )
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    pathlib.Path(site, "test_dependencies.pth").write_text("\n".join(sorted(deps)) + "\n")
    work = tmp_path / "empty"
    work.mkdir()
    where = subprocess.run(
        [str(python), "-c", "import mixbct_jax; print(mixbct_jax.__file__)"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    assert where.returncode == 0 and where.stdout.startswith(str(env_dir)), where.stdout + where.stderr
    run = subprocess.run(
        [
            str(python),
            "-m",
            "mixbct_jax.train",
            "--config",
            "quickstart:runlocal",
            "--workdir",
            "run",
            "--config.total_steps=2",
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert (work / "run" / "config.json").is_file() and (work / "run" / "metrics.jsonl").is_file()
    assert any(p.name == "2" for p in (work / "run" / "checkpoints").iterdir())


def test_unknown_config_name_is_one_line(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "mixbct_jax.train", "--config", "quickstrat", "--workdir", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "quickstrat" in lines[0] and "'quickstart'" in lines[0], run.stderr
