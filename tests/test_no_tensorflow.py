"""The trainer and the extractor run without TensorFlow: a CLI run on a JPEG .rec never imports it.

TensorFlow may still be installed (the ``[tf]`` extra, or a shared environment); the check is that nothing on the
training, extraction or TFDS path imports it. It runs in a fresh interpreter, so nothing imported by other tests
counts.
"""

import pathlib
import subprocess
import sys

import numpy as np

from mixbct_jax.data import recordio
from mixbct_jax.data.synthetic import SyntheticFaces

ROOT = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = """
import runpy, sys
def cli(module, *args):
    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        assert not e.code, f"{module} exited with {e.code}"

if __name__ == "__main__":
    rec, workdir = sys.argv[1:3]
    cli("mixbct_jax.train", "--config", "configs/quickstart.py:runlocal", "--workdir", workdir,
        "--config.data.source=rec:" + rec, "--config.data.threads=1", "--config.total_steps=2",
        "--config.evals.retrieval=")
    cli("mixbct_jax.extract", "--workdir", workdir, "--out", workdir + "/emb", "--batch_size", "32")
    loaded = sorted(m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow."))
    print("TENSORFLOW_MODULES", loaded)
"""


def test_train_and_extract_cli_never_import_tensorflow(tmp_path):
    faces = SyntheticFaces(num_classes=24, min_images=8, max_images=10, image_size=32, seed=0)
    recordio.write_rec(tmp_path / "faces", faces.read(np.arange(len(faces))), faces.labels, encoding=".jpg")
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "faces"), str(tmp_path / "run")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "TENSORFLOW_MODULES []" in result.stdout, result.stdout[-2000:]
    assert (tmp_path / "run" / "emb" / "features.npy").exists()
    assert "step 2/2" in result.stderr
    # Worker processes and their shared-memory batches end quietly: no tracebacks or leak reports at exit.
    assert "resource_tracker" not in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]
