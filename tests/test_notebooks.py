"""The Colab notebooks run end to end in their small mode: offline, parameters injected, outputs checked.

Each notebook is executed by nbclient in a fresh `python3` kernel (this interpreter, so the package and its
dependencies are the test environment's) with values injected into the "parameters" cell, the way papermill does
it, on one CPU device. `pytest -s` prints the time each notebook took.
"""

import importlib.util
import json
import os
import pathlib
import pickle
import time

import numpy as np
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = pathlib.Path(__file__).resolve().parents[1]
COLAB = ROOT / "colab"
NOTEBOOKS = ("quickstart.ipynb", "evaluate_checkpoints.ipynb")
HELD_OUT = "synthetic:num_classes=48,min_images=16,max_images=24,image_size=32,seed=1"
TIMEOUT_S = 600  # per cell; the whole small run takes about 1-2 minutes on a 2-core machine


def run_notebook(name: str, params: dict) -> tuple[nbformat.NotebookNode, float]:
    """Executes colab/<name> with ``params`` injected into its parameters cell; returns it and its wall time."""
    nb = nbformat.read(COLAB / name, as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{name} must have exactly one cell tagged 'parameters'"
    # As papermill: the defaults stay, the injected values follow them (parameters not given keep their default).
    injected = "\n".join(f"{key} = {value!r}" for key, value in params.items())
    cells[0].source = f"{cells[0].source}\n\n# injected by tests/test_notebooks.py\n{injected}"
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=TIMEOUT_S, allow_errors=False, resources={"metadata": {"path": str(COLAB)}}
    )
    t0 = time.time()
    client.execute(env=kernel_env())
    seconds = time.time() - t0
    print(f"\n{name} ran in {seconds:.0f} s with {params}")
    return nb, seconds


def kernel_env() -> dict[str, str]:
    """This process's environment with one CPU device and inline matplotlib plots.

    The 4 fake devices of conftest.py make every compilation of the notebooks' runs slower (the multi-device paths
    are tested elsewhere).
    """
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags)
    return env


def outputs(nb, kind: str) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if kind in o.get("data", {})]


def rows(report_json: pathlib.Path) -> dict:
    protocols = json.loads(report_json.read_text())["protocols"]
    return {name: p["rows"] for name, p in protocols.items()}


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebooks_are_clean(name):
    nb = nbformat.read(COLAB / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), f"{name}: clear the outputs"
    params = next(c for c in code if "parameters" in c.metadata.get("tags", []))
    assert "SMALL = False" in params.source and "OUT = " in params.source
    assert 'REPO_URL = ""' in params.source and 'WHEEL = ""' in params.source  # no placeholder URL to clone


def install_functions(name: str) -> dict:
    """The helper functions of a notebook's install cell, defined without running the cell."""
    import ast

    nb = nbformat.read(COLAB / name, as_version=4)
    cell = next(c for c in nb.cells if c.cell_type == "code" and "def accelerator" in c.source)
    tree = ast.parse(cell.source)
    tree.body = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom, ast.FunctionDef))]
    namespace: dict = {}
    exec(compile(tree, name, "exec"), namespace)
    return namespace


@pytest.mark.parametrize("name", NOTEBOOKS)
@pytest.mark.parametrize(
    "variable, device, want",
    [
        ("TPU_ACCELERATOR_TYPE", None, "tpu"),
        ("COLAB_TPU_ADDR", None, "tpu"),
        (None, "/dev/accel0", "tpu"),
        (None, "/dev/vfio/0", "tpu"),
        (None, None, "cpu"),
    ],
)
def test_install_cell_finds_every_colab_accelerator(name, variable, device, want, monkeypatch):
    fns = install_functions(name)
    for key in ("COLAB_TPU_ADDR", "TPU_ACCELERATOR_TYPE", "TPU_NAME", "TPU_WORKER_ID"):
        monkeypatch.delenv(key, raising=False)
    if variable:
        monkeypatch.setenv(variable, "v5litepod-1")
    real_glob = fns["glob"].glob
    monkeypatch.setattr(
        fns["glob"],
        "glob",
        lambda pattern: (
            [device]
            if device and pattern.startswith(device.rstrip("0"))
            else []
            if pattern.startswith("/dev/")
            else real_glob(pattern)
        ),
    )
    monkeypatch.setattr(fns["shutil"], "which", lambda cmd: None)  # no nvidia-smi on this machine either way
    assert fns["accelerator"]() == want


@pytest.fixture(scope="module")
def quickstart_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    # STEPS keeps its default of 300: SMALL alone must make the runs small.
    nb, _ = run_notebook("quickstart.ipynb", dict(SMALL=True, RUN_SYNTHETIC=True, RUN_TFDS=False, OUT=str(out)))
    return out, nb


def test_quickstart_runs_the_workflow(quickstart_out):
    out, nb = quickstart_out
    run = out / "synthetic"
    for stage in ("old/metrics.jsonl", "old/emb/features.npy", "old/emb/credible.npy", "new_mixbct/metrics.jsonl"):
        assert (run / stage).exists(), stage
    assert not (run / "new_only").exists()  # SMALL skips the second new model
    table = rows(run / "reports" / "mixbct" / "report.json")[f"retrieval:{HELD_OUT}"]
    assert set(table) == {"old/old", "new/new", "new/old"}
    assert all(0.0 <= m["mAP"] <= 1.0 for m in table.values())
    records = [json.loads(line) for line in (run / "new_mixbct" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 6 and records[-1]["mix/rows"] > 0
    assert len(outputs(nb, "image/png")) >= 2  # training curves + the report's compatibility plot
    assert outputs(nb, "text/markdown")  # the report's tables


def test_evaluate_checkpoints_reuses_quickstart_runs_with_bin_and_ijbc(quickstart_out, tmp_path):
    out, _ = quickstart_out
    bin_path = write_bin(tmp_path / "pairs.bin")
    ijb_root = write_ijbc(tmp_path / "ijb")
    params = dict(SMALL=True, OUT=str(out), BIN_PATH=str(bin_path), IJB_ROOT=str(ijb_root or ""))
    nb, _ = run_notebook("evaluate_checkpoints.ipynb", params)
    reports = out / "synthetic" / "new_mixbct" / "eval_notebook"
    retrieval_rows = rows(reports / "retrieval" / "report.json")[f"retrieval:{HELD_OUT}"]
    assert set(retrieval_rows) == {"old/old", "new/new", "new/old"}
    bin_rows = rows(reports / "bin" / "report.json")["bin:pairs"]
    assert set(bin_rows) == {"old/old", "new/new", "new/old"}
    if ijb_root is not None:
        assert "ijbc" in rows(reports / "ijbc" / "report.json")
    assert len(outputs(nb, "image/png")) >= 3  # retrieval plot, similarity histograms, bin plot
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "training them" not in text  # the quickstart's runs were reused


def test_evaluate_checkpoints_standalone(tmp_path):
    nb, _ = run_notebook("evaluate_checkpoints.ipynb", dict(SMALL=True, OUT=str(tmp_path)))
    reports = tmp_path / "synthetic" / "new_mixbct" / "eval_notebook"
    assert (reports / "retrieval" / "report.json").exists()
    assert not (reports / "bin").exists() and not (reports / "ijbc").exists()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "training them" in text and "BIN_PATH is empty" in text


def test_quickstart_tfds_part_on_a_local_data_set(tmp_path):
    """Part 2 of the quickstart on a tiny TFDS set prepared here (the notebook's download step finds it ready)."""
    data_dir = tmp_path / "tfds"
    build_tfds(data_dir)
    out = tmp_path / "out"
    run_notebook(
        "quickstart.ipynb",
        dict(
            SMALL=True,
            RUN_SYNTHETIC=False,
            RUN_TFDS=True,
            STEPS=6,
            OUT=str(out),
            TFDS_NAME="mixbct_notebook_faces",
            TFDS_DATA_DIR=str(data_dir),
        ),
    )
    run = out / "tfds_mixbct_notebook_faces"
    # 10 classes: old on 0..1, new on 2..7 (open-class), retrieval on the test images of 8..9.
    assert json.loads((run / "old" / "config.json").read_text())["data"]["source"].endswith(",classes=0:2")
    assert np.load(run / "old" / "emb" / "features.npy").shape == (6 * 24, 64)
    table = rows(run / "reports" / "mixbct" / "report.json")
    ((name, table),) = table.items()
    assert name.endswith("classes=8:10") and set(table) == {"old/old", "new/new", "new/old"}
    assert not (out / "synthetic").exists()


# ------------------------------------------------------------------------------------------------ data helpers


def write_bin(path: pathlib.Path, num_pairs: int = 40) -> pathlib.Path:
    """A `.bin` pair set (pickle of PNG bytes and same/different flags) from the held-out synthetic identities."""
    import cv2

    from mixbct_jax.data import sources

    src = sources.open_source(HELD_OUT)
    rng = np.random.default_rng(0)
    bins, issame = [], []
    for k in range(num_pairs):
        a = int(rng.integers(len(src)))
        same = k % 2 == 0
        pool = np.flatnonzero((src.labels == src.labels[a]) if same else (src.labels != src.labels[a]))
        b = int(rng.choice(pool[pool != a]))
        for i in (a, b):
            ok, buf = cv2.imencode(".png", src.read([i])[0][:, :, ::-1])
            assert ok
            bins.append(buf.tobytes())
        issame.append(same)
    with open(path, "wb") as f:
        pickle.dump((bins, issame), f)
    return path


def write_ijbc(root: pathlib.Path) -> pathlib.Path | None:
    """A miniature IJB-C release, written by the IJB tests' helper; None when that helper is unavailable."""
    try:
        path = pathlib.Path(__file__).with_name("test_eval_ijb.py")
        spec = importlib.util.spec_from_file_location("ijb_fixture", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        write = module._write_ijbc
    except (ImportError, AttributeError, FileNotFoundError):
        return None
    root.mkdir(parents=True)
    write(root, np.random.default_rng(5))
    return root


def build_tfds(data_dir: pathlib.Path) -> None:
    """A TFDS data set of synthetic 32x32 identities prepared as array_record.

    10 classes, 24 train and 8 test images each; TFDS shuffles the examples, so labels are not grouped.
    """
    tfds = pytest.importorskip("tensorflow_datasets")

    from mixbct_jax.data import sources

    class MixbctNotebookFaces(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = {
                "image": tfds.features.Image(shape=(32, 32, 3)),
                "label": tfds.features.ClassLabel(num_classes=10),
            }
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples("train"), "test": self._generate_examples("test")}

        def _generate_examples(self, split):
            src = sources.open_source("synthetic:num_classes=10,min_images=32,max_images=32,image_size=32,seed=3")
            idx = np.arange(len(src))
            idx = idx[idx % 4 != 0] if split == "train" else idx[idx % 4 == 0]
            for i in idx:
                yield int(i), {"image": src.read([i])[0], "label": int(src.labels[i])}

    builder = MixbctNotebookFaces(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
