"""Configs by name and `python -m mixbct_jax.config --show`."""

import subprocess
import sys

import pytest

from mixbct_jax import config as config_lib


def test_every_field_has_a_documented_meaning():
    """`--show` reads each field's meaning from default_config's comments: a new field must have one."""
    docs = config_lib.field_docs()
    missing = [
        line.split(" = ")[0]
        for line in config_lib.describe(config_lib.default_config()).splitlines()
        if "  # " not in line
    ]
    assert not missing, f"add a comment to these fields in config.default_config: {missing}"
    assert docs["bct.mix_ratio"].startswith("MixBCT")


def test_configs_resolve_by_name_and_by_path():
    assert config_lib.resolve("quickstart") == config_lib.configs_dir() / "quickstart.py"
    assert config_lib.resolve("quickstart.py") == config_lib.configs_dir() / "quickstart.py"
    assert config_lib.resolve("configs/quickstart.py").name == "quickstart.py"
    assert {"quickstart", "ms1mv3_r18_old", "ms1mv3_r18_to_r50"} <= set(config_lib.shipped_configs())
    assert config_lib.load("quickstart", "runlocal").total_steps == 6
    with pytest.raises(FileNotFoundError, match=r"'nope'.*'quickstart'"):
        config_lib.resolve("nope")


@pytest.mark.parametrize(
    "argv, want",
    [
        (["--config", "quickstart:runlocal"], ":runlocal"),
        (["--config=quickstart"], "quickstart.py"),
        (["--workdir", "x", "--config", "configs/quickstart.py:role=new"], "configs/quickstart.py:role=new"),
    ],
)
def test_command_lines_get_the_shipped_path(argv, want):
    out = config_lib.resolve_argv(["prog", *argv])
    value = next(a for a in out if "quickstart" in a)
    assert value.endswith(want) and ("quickstart.py" in value)


def test_show_prints_the_docstring_and_every_field():
    run = subprocess.run(
        [sys.executable, "-m", "mixbct_jax.config", "--show", "quickstart:role=new,method=mixbct"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "Arguments (comma-separated k=v)" in run.stdout  # the config file's own documentation
    assert "bct.method = 'mixbct'" in run.stdout and "data.role = 'new'" in run.stdout
    assert "# MixBCT: share of each device's rows" in run.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "mixbct_jax.config", "--show", "quickstart:colour=red"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "colour" in bad.stderr
    assert subprocess.run([sys.executable, "-m", "mixbct_jax.config", "--help"], capture_output=True).returncode == 0
