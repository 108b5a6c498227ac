"""Side-by-side compatibility table of every method on real images (Omniglot, 242 handwritten-character classes).

  python benchmarks/compat_table.py --out runs/compat_omniglot [--steps 600] [--methods mixbct,l2,...]

Protocol (an "extended-class" experiment at toy scale):
* classes 0..193 are for training, classes 194..241 (48 classes, 960 images) are held out from both models;
* the old model trains on the first 30% of the training classes (58 classes; the scenario's old side);
* each new model trains on all 194 training classes, with one compatibility method each, plus the new model
  without any compatibility term (the upper bound, "none");
* every method's arrays come from the real workflow: extract the old model's embeddings of the new training
  set, then `prepare denoise` / `class-means` / `advbct-meta`;
* retrieval on the held-out classes (per class, the first half of the images is the gallery, the rest are
  queries): old/old, new/new and new/old (new queries against the old gallery) - top-1, top-5 and mAP.

The same small IResNet ("r_tiny", width 0.25, D=64, 32x32 inputs) is used for old and new, trained from scratch
on the CPU, so the table shows how the methods order on real images, not face-recognition accuracy. Every stage
is skipped when its output exists, so an interrupted run continues.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

OMNIGLOT = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot" / "omniglot_small_28.npz"
TRAIN_CLASSES, ALL_CLASSES = 194, 242
METHODS = ("none", "mixbct", "l2", "weakened_l2", "bct", "unibct", "nccl", "advbct")


def make_config(source: str, *, role: str, method: str, steps: int, arrays: dict[str, str]):
    from mixbct_jax import config as config_lib

    c = config_lib.default_config()
    c.model.update(arch="r_tiny", width=0.25, embedding_size=64, input_size=32)
    c.data.update(source=source, scenario="exclass", role=role, global_batch=64)
    c.head.scale = 32.0
    c.total_steps = steps
    c.log_every_steps = 50
    c.checkpoint.every_steps = steps
    config_lib.apply_method(c, method)
    if method == "unibct":  # epochs are ~60 steps here: refine and switch the loss on at a third of the run
        epochs = max(1, steps // 60)
        c.bct.unibct_start_epoch = max(1, epochs // 3)
        c.bct.unibct_refine_epochs = (max(1, epochs // 3), max(2, 2 * epochs // 3))
        c.optim.decay_epochs = tuple(max(1, int(epochs * f)) for f in (20 / 35, 26 / 35, 32 / 35))
    if method == "nccl":
        c.bct.nccl_queue_size = 1024
    for key, path in arrays.items():
        c.old[key] = path
    return c.lock()


def run(out: pathlib.Path, *, steps: int, methods: tuple[str, ...], data: pathlib.Path) -> dict:
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    from mixbct_jax import evaluate, extract, prepare, train

    train_source = f"npz:{data},size=32,classes=0:{TRAIN_CLASSES}"
    held_out = f"npz:{data},size=32,classes={TRAIN_CLASSES}:{ALL_CLASSES}"
    old_dir, emb = out / "old", out / "old" / "emb"
    t_start = time.time()

    def done(run_dir):
        return (run_dir / "checkpoints" / str(steps) / "model").exists()

    if not done(old_dir):
        train.train_and_evaluate(make_config(train_source, role="old", method="none", steps=steps, arrays={}), old_dir)
    if not (emb / "features.npy").exists():
        extract.extract(old_dir, None, emb, role="new", batch_size=256)
    feats, labels = str(emb / "features.npy"), str(emb / "labels.npy")
    for sub, out_file in (
        ("denoise", "credible.npy"),
        ("class-means", "prototypes.npy"),
        ("advbct-meta", "advbct_meta.npz"),
    ):
        if not (emb / out_file).exists():
            prepare.main([sub, "--features", feats, "--labels", labels, "--out", str(emb / out_file)])
    arrays = {
        "features": feats,
        "labels": labels,
        "credible": str(emb / "credible.npy"),
        "prototypes": str(emb / "prototypes.npy"),
        "advbct_meta": str(emb / "advbct_meta.npz"),
    }

    table, wall = {}, {}
    for method in methods:
        run_dir = out / f"new_{method}"
        t0 = time.time()
        if not done(run_dir):
            config = make_config(
                train_source, role="new", method=method, steps=steps, arrays=arrays if method != "none" else {}
            )
            train.train_and_evaluate(config, run_dir)
        wall[method] = time.time() - t0
        report_dir = out / "reports" / method
        if not (report_dir / "report.json").exists():
            evaluate.evaluate(run_dir, old_dir, [("retrieval", held_out)], out_dir=report_dir, batch_size=256)
        results = json.loads((report_dir / "report.json").read_text())
        table[method] = results["protocols"][f"retrieval:{held_out}"]["rows"]
    text = format_table(table, steps=steps, wall=time.time() - t_start)
    print(text)
    (out / "compat_table.md").write_text(text + "\n")
    (out / "compat_table.json").write_text(json.dumps({"steps": steps, "table": table, "train_wall_s": wall}, indent=2))
    return table


def format_table(table: dict, *, steps: int, wall: float) -> str:
    old = next(iter(table.values()))["old/old"]
    lines = [
        f"Omniglot held-out classes {TRAIN_CLASSES}-{ALL_CLASSES - 1} ({ALL_CLASSES - TRAIN_CLASSES} classes), "
        f"{steps} steps per model, total wall time {wall / 60:.1f} min",
        "",
        "| new model | new/new top-1 | new/new mAP | new/old top-1 | new/old mAP | new/old > old/old (mAP) |",
        "|---|---|---|---|---|---|",
        f"| (old/old) | {old['top1']:.3f} | {old['mAP']:.3f} | | | |",
    ]
    for method, rows in table.items():
        self_, cross = rows["new/new"], rows["new/old"]
        lines.append(
            f"| {method} | {self_['top1']:.3f} | {self_['mAP']:.3f} | {cross['top1']:.3f} | "
            f"{cross['mAP']:.3f} | {'yes' if cross['mAP'] > old['mAP'] else 'no'} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/compat_omniglot")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--data", default=str(OMNIGLOT), help="omniglot_small_28.npz")
    a = p.parse_args(argv)
    if not pathlib.Path(a.data).exists():
        sys.exit(f"{a.data} not found: it lies in ../shared/data/omniglot beside the checkout")
    run(pathlib.Path(a.out), steps=a.steps, methods=tuple(a.methods.split(",")), data=pathlib.Path(a.data))


if __name__ == "__main__":
    main()
