"""The whole workflow on the embedded synthetic data set, stage by stage (``make demo``).

  python -m mixbct_jax.demo --out demo_runs

1. train the old model on the old side of an open-class split (30% of the identities);
2. extract its embeddings of the new model's training set and denoise them (credible mask);
3. train two new models on the new side: one with no compatibility term (the upper bound, "new-only") and
   one with MixBCT;
4. evaluate retrieval on identities neither model saw (a synthetic set with another seed): old/old,
   new/new and new/old (new queries against the old gallery), and write reports with plots.

Every stage writes files into ``--out/steps<N>_seed<S>/``: a finished stage is skipped when the demo runs again
with the same settings, and other settings (``--steps``, ``--seed``) get a folder of their own.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from collections.abc import Sequence

from mixbct_jax.evaluation import report as report_lib

HELD_OUT = "synthetic:num_classes=48,min_images=16,max_images=24,image_size=32,seed=1"


def _stage(name: str, marker: pathlib.Path, fn) -> None:
    """Runs ``fn`` unless ``marker`` exists; prints the stage's banner and wall time."""
    if marker.exists():
        print(f"[demo] {name}: done already ({marker})", file=sys.stderr, flush=True)
        return
    print(f"[demo] {name} ...", file=sys.stderr, flush=True)
    t0 = time.time()
    fn()
    print(f"[demo] {name}: {time.time() - t0:.0f}s", file=sys.stderr, flush=True)


def _load_config(arg: str, **overrides):
    from mixbct_jax import config as config_lib

    return config_lib.load("quickstart", arg, overrides)


def run_dir(out: str | pathlib.Path, *, steps: int = 300, seed: int = 0) -> pathlib.Path:
    """Where the demo with these settings writes: stages are reused only by a run with the same settings."""
    return pathlib.Path(out) / f"steps{steps}_seed{seed}"


def run(out: str | pathlib.Path, *, steps: int = 300, seed: int = 0) -> dict:
    """Runs (or resumes) every stage under ``run_dir(out, steps, seed)``; returns the combined retrieval table."""
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    from mixbct_jax import evaluate, extract, prepare, train

    out = run_dir(out, steps=steps, seed=seed)
    print(f"[demo] {steps} steps per model, seed {seed}: {out}", file=sys.stderr, flush=True)
    old, emb = out / "old", out / "old" / "emb"
    new_only, mixbct = out / "new_only", out / "new_mixbct"
    done = lambda workdir: workdir / "checkpoints" / str(steps) / "model"  # noqa: E731

    _stage(
        "1/5 train the old model",
        done(old),
        lambda: train.train_and_evaluate(_load_config(f"role=old,steps={steps}", seed=seed), old),
    )
    _stage(
        "2/5 extract old embeddings of the new training set",
        emb / "features.npy",
        lambda: extract.extract(old, None, emb, role="new", batch_size=128),
    )
    _stage(
        "3/5 denoise (credible mask, keep 90% per class)",
        emb / "credible.npy",
        lambda: prepare.main(
            [
                "denoise",
                "--features",
                str(emb / "features.npy"),
                "--labels",
                str(emb / "labels.npy"),
                "--keep",
                "0.9",
                "--out",
                str(emb / "credible.npy"),
            ]
        ),
    )
    _stage(
        "4/5 train the new model without compatibility (upper bound)",
        done(new_only),
        lambda: train.train_and_evaluate(_load_config(f"role=new,steps={steps}", seed=seed), new_only),
    )
    _stage(
        "4/5 train the new model with MixBCT",
        done(mixbct),
        lambda: train.train_and_evaluate(
            _load_config(
                f"role=new,method=mixbct,steps={steps}",
                seed=seed,
                **{
                    "old.features": str(emb / "features.npy"),
                    "old.credible": str(emb / "credible.npy"),
                    "old.labels": str(emb / "labels.npy"),
                },
            ),
            mixbct,
        ),
    )

    table = {}
    for name, workdir in (("new_only", new_only), ("mixbct", mixbct)):
        report_dir = out / "reports" / name
        if not (report_dir / "report.json").exists():
            print(f"[demo] 5/5 evaluate {name} against the old model on held-out identities ...", file=sys.stderr)
            evaluate.evaluate(workdir, old, [("retrieval", HELD_OUT)], out_dir=report_dir, batch_size=128)
        rows = json.loads((report_dir / "report.json").read_text())["protocols"][f"retrieval:{HELD_OUT}"]["rows"]
        table[name] = rows
    report_lib.plot_training_curves(
        {"old": old / "metrics.jsonl", "new_only": new_only / "metrics.jsonl", "mixbct": mixbct / "metrics.jsonl"},
        out / "reports" / "training_curves.png",
    )
    _print_table(table, out)
    return table


def _print_table(table: dict, out: pathlib.Path) -> None:
    lines = [
        "",
        "Retrieval on 48 held-out synthetic identities (query model / gallery model):",
        "",
        "| new model | row | top-1 | top-5 | mAP |",
        "|---|---|---|---|---|",
    ]
    old_row = next(iter(table.values()))["old/old"]
    lines.append(f"| - | old/old | {old_row['top1']:.3f} | {old_row['top5']:.3f} | {old_row['mAP']:.3f} |")
    for name, rows in table.items():
        for row in ("new/new", "new/old"):
            m = rows[row]
            lines.append(f"| {name} | {row} | {m['top1']:.3f} | {m['top5']:.3f} | {m['mAP']:.3f} |")
    lines += [
        "",
        "Compatible (BCT criterion): new/old mAP > old/old mAP: "
        + ", ".join(
            f"{name} {'yes' if rows['new/old']['mAP'] > old_row['mAP'] else 'no'}" for name, rows in table.items()
        ),
        "",
        f"Reports and plots: {out / 'reports'}/<model>/report.md, *.png; "
        f"training curves: {out / 'reports' / 'training_curves.png'}",
    ]
    text = "\n".join(lines)
    print(text)
    report_lib.write_text_atomic(out / "reports" / "summary.md", text + "\n")


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m mixbct_jax.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo_runs", help="where every stage writes (reused on a second run)")
    p.add_argument("--steps", type=int, default=300, help="train steps per model")
    p.add_argument("--seed", type=int, default=0, help="the runs' seed (initialisation, data order, mixing)")
    from mixbct_jax import cli

    a = p.parse_args(None if argv is None else cli.snake_case_flags(argv))
    if a.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {a.steps}")
    return run(a.out, steps=a.steps, seed=a.seed)


if __name__ == "__main__":
    from mixbct_jax import cli

    cli.run(main)
