"""Report files (json/md/png) and the `evaluate` CLI end to end with fake embedders and data sources."""

import json
import pickle
import sys
import types

import cv2
import matplotlib.image
import numpy as np
import pytest

from mixbct_jax import evaluate as evaluate_mod
from mixbct_jax.evaluation import ijb, report, retrieval, verification


class Projection:
    def __init__(self, image_size, seed, dim=8):
        self.image_size = image_size
        self.w = np.random.default_rng(seed).standard_normal((image_size * image_size * 3, dim)).astype(np.float32)

    def __call__(self, x):
        return x.reshape(len(x), -1) @ self.w


def _png_ok(path):
    img = matplotlib.image.imread(path)
    return img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def _ijb_rows(rng):
    """Real metric dicts on synthetic scores; new/old is made better than old/old."""
    labels = (rng.random(30000) < 0.2).astype(int)
    rows = {}
    for name, sep in (("old/old", 2.0), ("new/new", 4.0), ("new/old", 3.0)):
        scores = rng.normal(0, 1, labels.size) + sep * labels
        gal = rng.standard_normal((40, 8))
        gal /= np.linalg.norm(gal, axis=1, keepdims=True)
        gid = np.arange(40)
        pid = rng.integers(0, 60, 300)  # ids >= 40 are non-mated
        probes = np.where((pid < 40)[:, None], gal[np.minimum(pid, 39)], 0) + rng.normal(0, 0.6 / sep, (300, 8))
        one_n = {g: ijb.identification_metrics(probes, pid, gal, gid) for g in ("G1", "G2")}
        one_n["mean"] = {"tpir": one_n["G1"]["tpir"], "top1": one_n["G1"]["top1"], "top5": 1.0, "top10": 1.0}
        one_n["mixed"] = {"top1": 0.5, "top5": 0.7, "top10": 0.9}
        rows[name] = {"1:1": ijb.verification_metrics(scores, labels), "1:N": one_n}
    return rows


def test_write_report_ijb(tmp_path):
    rows = _ijb_rows(np.random.default_rng(0))
    results = {"new": "runs/new", "old": "runs/old", "protocols": {"ijbc": {"protocol": "ijbc", "rows": rows}}}
    written = report.write_report(results, tmp_path / "out")
    assert set(written) == {"json", "md", "ijbc_roc", "ijbc_tpir_fpir"}
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    for r in rows:
        assert data["protocols"]["ijbc"]["rows"][r]["1:1"]["tar_at_far"] == rows[r]["1:1"]["tar_at_far"]
        assert data["protocols"]["ijbc"]["rows"][r]["1:N"]["G1"]["tpir"] == rows[r]["1:N"]["G1"]["tpir"]
    md = (tmp_path / "out" / "report.md").read_text()
    tar = 100 * rows["new/old"]["1:1"]["tar_at_far"]["1e-04"]
    cross_line = next(line for line in md.splitlines() if line.startswith("| new/old |") and f"{tar:.2f}" in line)
    assert cross_line.rstrip().endswith("yes |")
    assert "TAR@FAR=1e-04 %" in md and "TPIR@FPIR=1e-02 %" in md
    assert "**yes**" in md
    assert _png_ok(written["ijbc_roc"]) and _png_ok(written["ijbc_tpir_fpir"])
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".tmp")]  # no temp files left


def test_report_nan_is_null_and_not_compatible(tmp_path):
    base = {"accuracy": 0.9, "accuracy_std": 0.01, "val": float("nan"), "far_target": 1e-3, "xnorm": 20.0}
    rows = {"old/old": base, "new/old": {**base, "accuracy": 0.8}}
    results = {"protocols": {"bin:lfw": {"protocol": "bin", "data": "lfw.bin", "rows": rows}}}
    report.write_report(results, tmp_path)
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["protocols"]["bin:lfw"]["rows"]["old/old"]["val"] is None
    md = (tmp_path / "report.md").read_text()
    assert "n/a" in md and "| 80.00 |" in md and "**no**" in md
    assert report.compatible("bin", rows) is False
    assert (tmp_path / "bin_lfw_compat.png").exists()


def _write_bin(path, rng, n_pairs=40, size=16):
    images, issame = [], []
    for k in range(n_pairs):
        a = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        b = (
            np.clip(a.astype(int) + rng.integers(-10, 11, a.shape), 0, 255).astype(np.uint8)
            if k % 2 == 0
            else (rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        )
        images += [a, b]
        issame.append(k % 2 == 0)
    bins = [cv2.imencode(".png", im[:, :, ::-1])[1].tobytes() for im in images]
    path.write_bytes(pickle.dumps((bins, issame)))
    return np.stack(images), np.array(issame)


class _Source:
    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def read(self, indices):
        return self.images[indices]


@pytest.fixture
def fake_modules(monkeypatch):
    """Stand-ins for mixbct_jax.embed (the lead's) and mixbct_jax.data.sources (another helper's)."""
    models = {"runs/old": Projection(16, 0), "runs/new": Projection(16, 1)}
    embed = types.ModuleType("mixbct_jax.embed")
    embed.load_embedder = lambda workdir, *, batch_size=256: models[workdir]
    rng = np.random.default_rng(7)
    labels = np.repeat(np.arange(5), 4).astype(np.int32)
    protos = rng.integers(0, 256, (5, 16, 16, 3))
    images = np.clip(protos[labels] + rng.integers(-30, 31, (20, 16, 16, 3)), 0, 255).astype(np.uint8)
    sources = types.ModuleType("mixbct_jax.data.sources")
    sources.open_source = lambda spec: _Source(images, labels)
    monkeypatch.setitem(sys.modules, "mixbct_jax.embed", embed)
    monkeypatch.setitem(sys.modules, "mixbct_jax.data.sources", sources)
    return models, _Source(images, labels)


def test_cli_bin_and_retrieval(tmp_path, fake_modules, capsys):
    models, source = fake_modules
    rng = np.random.default_rng(3)
    images, issame = _write_bin(tmp_path / "lfw.bin", rng)
    out = tmp_path / "eval"
    results = evaluate_mod.main(
        [
            "--new",
            "runs/new",
            "--old",
            "runs/old",
            "--protocol",
            "bin",
            "--data",
            str(tmp_path / "lfw.bin"),
            "--protocol",
            "retrieval",
            "--data",
            "fake:spec",
            "--out",
            str(out),
            "--batch-size",
            "8",
        ]
    )
    rows = [("old", "old"), ("new", "new"), ("new", "old")]
    embedders = {"old": models["runs/old"], "new": models["runs/new"]}
    expect_bin = verification.evaluate_bin(images, issame, embedders, rows)
    expect_ret = retrieval.evaluate_retrieval(source, embedders, rows)
    data = json.loads((out / "report.json").read_text())
    assert data["rows"] == ["old/old", "new/new", "new/old"]
    for r in ("old/old", "new/new", "new/old"):
        got = data["protocols"]["bin:lfw"]["rows"][r]
        assert got["accuracy"] == pytest.approx(expect_bin[r]["accuracy"])
        assert got["xnorm"] == pytest.approx(expect_bin[r]["xnorm"], rel=1e-5)
        assert data["protocols"]["retrieval:fake:spec"]["rows"][r]["mAP"] == pytest.approx(expect_ret[r]["mAP"])
    returned = results["protocols"]["bin:lfw"]["rows"]["new/new"]["accuracy"]
    assert returned == data["protocols"]["bin:lfw"]["rows"]["new/new"]["accuracy"]
    assert _png_ok(out / "bin_lfw_compat.png") and _png_ok(out / "retrieval_fake_spec_compat.png")
    printed = capsys.readouterr().out
    assert "## bin:lfw" in printed and "| new/old |" in printed


def test_evaluate_new_only_with_embedder(tmp_path):
    _write_bin(tmp_path / "a.bin", np.random.default_rng(4))
    res = evaluate_mod.evaluate(Projection(16, 1), None, {"bin": str(tmp_path)}, tmp_path / "out")
    assert list(res["protocols"]["bin:a"]["rows"]) == ["new/new"]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "beats" not in md and "| new/new |" in md


def test_cli_argument_errors(tmp_path):
    with pytest.raises(SystemExit):
        evaluate_mod.main(["--new", "x", "--protocol", "bin", "--protocol", "ijbc", "--data", "a", "--out", "o"])
    with pytest.raises(ValueError, match="unknown protocol"):
        evaluate_mod.evaluate(Projection(16, 1), protocols=[("lfw", "x")])
    with pytest.raises(FileNotFoundError, match="no such .bin"):
        evaluate_mod.evaluate(Projection(16, 1), protocols=[("bin", str(tmp_path / "missing.bin"))])


@pytest.mark.parametrize(
    "name, short",
    [
        ("retrieval:synthetic:num_classes=48,min_images=16,max_images=24,image_size=32,seed=1", "retrieval synthetic"),
        ("bin:/data/faces/lfw.bin", "bin lfw.bin"),
        ("retrieval:tfds:cifar100:test,data_dir=/x/tfds,classes=80:100", "retrieval tfds:cifar100:test"),
        ("ijbc:/data/IJB_release/", "ijbc IJB_release"),
    ],
)
def test_plot_titles_are_short(name, short):
    assert report.short_name(name) == short
