"""Embeddings of every example of a data set from a checkpoint, in example-index order.

  python -m mixbct_jax.extract --workdir runs/old --data rec:/data/ms1m-retinaface-t1/train \
      --scenario opclass --role new --out runs/old/emb_class70

writes ``features.npy`` [N, D] (float32, or float16 with ``--dtype float16``) and ``labels.npy`` [N] int32, both
memory-mappable, where row ``i`` is example ``index == i`` of the chosen subset: exactly what the trainer
gathers per batch for MixBCT and the other methods (docs/data.md (extraction)). BatchNorm runs in inference mode.

By default images are not flipped; ``--flip random`` reproduces the reference, which extracts with the
training transform and so flips each image with probability 0.5 (docs/deviations.md §8.7).

Resumable: rows are written into ``features.npy.partial`` (a memory-mapped .npy) and a small progress file
records how many are done; a killed extraction continues where it stopped when the same command is rerun. The
final files appear atomically (rename) only when every row is written.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time
from collections.abc import Sequence

import numpy as np

from mixbct_jax.files import write_text_atomic
from mixbct_jax.progress import Progress

PROGRESS = "extract_progress.json"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def extract(
    workdir: str | os.PathLike,
    data: str | None,
    out: str | os.PathLike,
    *,
    scenario: str | None = None,
    role: str = "new",
    batch_size: int = 256,
    dtype: str = "float32",
    flip: str = "none",
    seed: int = 0,
    step: int | None = None,
) -> dict[str, str]:
    """Embeds the ``role`` side of ``scenario`` of ``data`` with the model in ``workdir``.

    Args:
      workdir: the model's run directory (training run or converted model).
      data: source spec (``rec:...``, ``folder:...``, ``tfds:...``, ``npz:...``, ``synthetic...``); None = the
        run's own ``config.data.source``.
      out: output folder for features.npy / labels.npy.
      scenario: scenario of the subset (None = the run's ``config.data.scenario``, or 'full' for converted runs).
      role: 'new' (the new model's training set, what BCT methods need) or 'old'.
      batch_size: images per device call.
      dtype: 'float32' or 'float16' for features.npy.
      flip: 'none' or 'random' (the reference's per-image coin, seeded by ``seed``).
      seed: the flip seed.
      step: checkpoint step (latest by default).

    Returns:
      {'features': path, 'labels': path}.
    """
    from mixbct_jax import checkpoint, embed, models
    from mixbct_jax.data import pipeline, sources, splits

    if dtype not in ("float32", "float16"):
        raise ValueError(f"--dtype must be float32 or float16, got {dtype!r}")
    if flip not in ("none", "random"):
        raise ValueError(f"--flip must be none or random, got {flip!r}")
    config, variables = checkpoint.load_params(workdir, step)
    embed.check_variables(config, variables, os.fspath(workdir))
    data = data or config.get("data", {}).get("source")
    if not data:
        raise ValueError(f"{workdir}/config.json names no data source; pass --data")
    scenario = scenario or config.get("data", {}).get("scenario", "full")
    ratio = config.get("data", {}).get("split_ratio", 0.3)
    source = sources.open_source(data)
    subset = splits.scenario(scenario, source.labels, ratio)[role]
    size = config.model.input_size
    if tuple(source.image_shape[:2]) != (size, size):
        raise ValueError(f"{data} has {source.image_shape[:2]} images but the model in {workdir} expects {size}x{size}")
    embedder = embed.make_embedder(config, variables, batch_size=batch_size)

    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n, d = len(subset), config.model.embedding_size
    final_features, final_labels = out / "features.npy", out / "labels.npy"
    partial = out / "features.npy.partial"
    progress_path = out / PROGRESS
    signature = {
        "workdir": str(pathlib.Path(workdir).absolute()),
        "data": data,
        "scenario": scenario,
        "role": role,
        "n": n,
        "d": d,
        "dtype": dtype,
        "flip": flip,
        "seed": seed,
        "step": step,
    }
    if final_features.exists() and final_labels.exists() and not partial.exists():
        _log(f"{final_features} already complete; delete it to extract again")
        return {"features": str(final_features), "labels": str(final_labels)}

    done = 0
    if partial.exists() and progress_path.exists():
        saved = json.loads(progress_path.read_text())
        if saved.get("signature") == signature:
            done = int(saved["rows_done"])
            _log(f"resuming extraction at row {done}/{n}")
    if done == 0:
        np.lib.format.open_memmap(partial, mode="w+", dtype=dtype, shape=(n, d)).flush()
    features = np.lib.format.open_memmap(partial, mode="r+")

    remaining = splits.Subset(
        indices=subset.indices[done:], labels=subset.labels[done:], num_classes=subset.num_classes
    )
    flip_subset_rows = flip == "random"
    last_saved, rows = 0.0, done
    if len(remaining):
        batches = pipeline.eval_batches(source, remaining, batch_size=embedder.batch_size, flip=False)
        bar = Progress(len(remaining), f"extract rows {done}..{n}", unit="img")
        for batch in batches:
            images = batch["image"]
            if flip_subset_rows:  # the coin is keyed by the row in the whole subset, so resuming changes nothing
                coin = pipeline.flip_mask(seed, 0, batch["index"].astype(np.int64) + done)
                images = np.where(coin[:, None, None, None], images[:, :, ::-1], images)
            emb = embedder(models.normalize_images(images))
            k = len(emb)
            features[rows : rows + k] = emb.astype(dtype)
            rows += k
            bar.update(k)
            now = time.time()
            if now - last_saved > 5 or rows == n:  # record what is on disk, so a killed run resumes here
                features.flush()
                write_text_atomic(progress_path, json.dumps({"signature": signature, "rows_done": rows}))
                last_saved = now
        bar.close()
    if rows != n:
        raise RuntimeError(f"extraction wrote {rows} of {n} rows; rerun the same command to resume")
    features.flush()
    del features
    np.save(out / ".labels.npy.tmp.npy", subset.labels.astype(np.int32))
    os.replace(out / ".labels.npy.tmp.npy", final_labels)
    os.replace(partial, final_features)
    progress_path.unlink(missing_ok=True)
    _log(f"wrote {final_features} [{n}, {d}] {dtype} and {final_labels}")
    return {"features": str(final_features), "labels": str(final_labels)}


def main(argv: Sequence[str] | None = None) -> dict[str, str]:
    p = argparse.ArgumentParser(prog="python -m mixbct_jax.extract", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="the model's run directory")
    p.add_argument("--data", default=None, help="source spec; default: the run's config.data.source")
    p.add_argument("--scenario", default=None, help="opclass|opdata|exclass|exdata|full; default: the run's")
    p.add_argument("--role", default="new", choices=("new", "old"), help="which side of the scenario to embed")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--dtype", default="float32", choices=("float32", "float16"))
    p.add_argument("--flip", default="none", choices=("none", "random"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step", type=int, default=None)
    from mixbct_jax import cli

    a = p.parse_args(None if argv is None else cli.snake_case_flags(argv))
    return extract(
        a.workdir,
        a.data,
        a.out,
        scenario=a.scenario,
        role=a.role,
        batch_size=a.batch_size,
        dtype=a.dtype,
        flip=a.flip,
        seed=a.seed,
        step=a.step,
    )


if __name__ == "__main__":
    from mixbct_jax import cli

    cli.run(main)
