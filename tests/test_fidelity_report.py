"""benchmarks/fidelity.py's report: the tables' mean ± std, verdicts and costs against NumPy on a fake study folder."""

import importlib.util
import json
import pathlib
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fidelity():
    spec = importlib.util.spec_from_file_location("fidelity", ROOT / "benchmarks" / "fidelity.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fidelity"] = module  # its dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("fidelity", None)


def _write_run(folder: pathlib.Path, rows: dict, losses: list[float]) -> None:
    folder.mkdir(parents=True)
    (folder / "eval.json").write_text(json.dumps(rows))
    # A resumed run logs some steps twice: the report keeps the last record of each step.
    lines = [{"step": 25 * (i + 1), "loss": v, "cls_loss": v} for i, v in enumerate(losses)]
    lines.insert(2, {"step": 50, "loss": 99.0, "cls_loss": 99.0})
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")


def test_method_table_matches_numpy(fidelity, tmp_path):
    olds, tracks = fidelity.grid("cpu")
    track = tracks["omniglot_arcface"]
    (tmp_path / "study.json").write_text(
        json.dumps(
            {
                "scale": "cpu",
                "batch": 64,
                "keep": 0.9,
                "olds": {k: fidelity.dataclasses.asdict(v) for k, v in olds.items()},
                "tracks": {track.name: fidelity.dataclasses.asdict(track)},
            }
        )
    )
    old_old = {"top1": 0.5, "top5": 0.7, "mAP": 0.30}
    values = {  # method -> per seed (new/new mAP, new/old mAP)
        "none": [(0.40, 0.05), (0.44, 0.03)],
        "mixbct": [(0.42, 0.28), (0.38, 0.33), (0.41, 0.31)],
        "l2": [(0.35, 0.31), (0.37, 0.32)],
    }
    losses = [20.0, 18.0, 15.0, 12.0, 10.0, 9.0, 8.5, 8.0, 7.9, 7.8]
    for method, seeds in values.items():
        for seed, (nn, no) in enumerate(seeds):
            _write_run(
                tmp_path / track.name / f"{method}_s{seed}",
                {
                    "old/old": old_old,
                    "new/new": {"top1": nn + 0.1, "top5": 0.9, "mAP": nn},
                    "new/old": {"top1": no + 0.1, "top5": 0.9, "mAP": no},
                },
                losses,
            )

    text = fidelity.report(tmp_path)
    summary = json.loads((tmp_path / "report" / "fidelity.json").read_text())["tracks"][track.name]["methods"]
    none_nn = np.mean([v[0] for v in values["none"]])
    for method, seeds in values.items():
        nn, no = np.array(seeds).T
        assert summary[method]["seeds"] == len(seeds)
        np.testing.assert_allclose(summary[method]["new/new mAP"], nn.mean())
        np.testing.assert_allclose(summary[method]["new/old mAP std"], no.std(ddof=1))
        assert summary[method]["compatible_seeds"] == int((no > old_old["mAP"]).sum())
        # The duplicated step-50 record (loss 99) was replaced by the later one: the final loss is the last 10%.
        np.testing.assert_allclose(summary[method]["final_cls_loss"], 7.8)
    row = next(line for line in text.splitlines() if line.startswith("| mixbct |"))
    nn, no = np.array(values["mixbct"]).T
    assert f"{nn.mean():.3f} ± {nn.std(ddof=1):.3f}" in row
    assert "no (2/3)" in row  # 0.33 and 0.31 beat old/old 0.30, 0.28 does not
    assert f"{none_nn - nn.mean():+.3f}" in row
    assert "| l2 | 2 |" in text and "yes (2/2)" in text
    for png in ("fidelity_tradeoff.png", "fidelity_curves.png"):
        assert (tmp_path / "report" / png).stat().st_size > 1000


def test_second_seeds_before_third(fidelity):
    _, tracks = fidelity.grid("cpu-long")
    order = [(t.name, r.name) for t, r in fidelity.selected(tracks, None, None)]
    last_second = max(i for i, (_, run) in enumerate(order) if run.endswith("_s1") and not run.startswith("none"))
    first_third = min(i for i, (_, run) in enumerate(order) if run.endswith("_s2"))
    assert last_second < first_third
    assert {name for name, _ in order} == {
        "omniglot_arcface_long",
        "omniglot_softmax_long",
        "omniglot_arcface_xlong",
    }
