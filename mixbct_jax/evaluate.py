r"""Self/cross evaluation of a new model (and optionally the old one it must be compatible with).

    python -m mixbct_jax.evaluate --new runs/new --old runs/old --protocol ijbc --data /data/ijb --out runs/new/eval
    python -m mixbct_jax.evaluate --new runs/new --protocol bin --data /data/lfw.bin --out /tmp/eval
    python -m mixbct_jax.evaluate --new runs/new --old runs/old \
        --protocol bin --data /data/faces_val/ --protocol retrieval --data <source spec> --out runs/new/eval

Rows: with --old, old/old, new/new and new/old (new queries against the old gallery: the backward-compatibility
test); without, new/new only. `--protocol`/`--data` may be repeated in pairs. Data per protocol:
  bin        a `.bin` pair set, or a folder whose `*.bin` files are all evaluated
  ijbc/ijbb  the folder that holds IJBC/ (or IJBB/) in the insightface IJB release layout
  retrieval  a data source spec for `mixbct_jax.data.sources.open_source` (split per class into gallery/queries)
Writes report.json, report.md and plots into --out (rewritten after each protocol).
"""

from __future__ import annotations

import argparse
import glob
import os
import pathlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from mixbct_jax.evaluation import ijb, report, retrieval, verification
from mixbct_jax.evaluation.embedding import Embedder, image_size_of

PROTOCOLS = ("bin", "ijbc", "ijbb", "retrieval")


def _as_embedder(model: str | os.PathLike | Embedder, batch_size: int) -> Embedder:
    if isinstance(model, (str, os.PathLike)):
        from mixbct_jax.embed import load_embedder  # heavy (jax, flax, orbax): import only when needed

        return load_embedder(os.fspath(model), batch_size=batch_size)
    if callable(model):
        return model
    raise TypeError(f"a model must be a run directory or an embedder callable, got {type(model).__name__}")


def _describe(model) -> str | None:
    if model is None:
        return None
    return os.fspath(model) if isinstance(model, (str, os.PathLike)) else type(model).__name__


def _bin_files(data: str) -> list[str]:
    if os.path.isdir(data):
        files = sorted(glob.glob(os.path.join(data, "*.bin")))
        if not files:
            raise FileNotFoundError(f"{data}: a folder given for --protocol bin must contain *.bin files")
        return files
    if not os.path.isfile(data):
        raise FileNotFoundError(f"{data}: no such .bin file or folder")
    return [data]


def evaluate(
    new_workdir: str | os.PathLike | Embedder,
    old_workdir: str | os.PathLike | Embedder | None = None,
    protocols: Sequence[tuple[str, str]] | Mapping[str, str] = (),
    out_dir: str | os.PathLike | None = None,
    *,
    batch_size: int = 256,
    ijb_scale: str = "reference",
    ijb_far_index: str = "reference",
    ijb_tasks: Sequence[str] = ("1:1", "1:N"),
    gallery_fraction: float = 0.5,
    num_workers: int = 8,
) -> dict:
    """Evaluates the new model (and the old one, if given) on each protocol and writes the report.

    Args:
      new_workdir: the new model's run directory, or an embedder callable (tests, notebooks).
      old_workdir: the old model's run directory or embedder; adds the old/old and new/old rows.
      protocols: (protocol, data) pairs, protocol in bin|ijbc|ijbb|retrieval (see the module docstring).
      out_dir: where report.json/report.md/plots go (None: no files).
      batch_size: images per embedder call.
      ijb_scale: IJB input scale, 'reference' (/128) or 'clean' (/127.5).
      ijb_far_index: IJB 1:N threshold index, 'reference' (int(n*far)-1) or 'ceil'.
      ijb_tasks: IJB tasks to run, '1:1' and/or '1:N'.
      gallery_fraction: per-class gallery share for retrieval.
      num_workers: image decoding threads.

    Returns:
      {'new', 'old', 'rows', 'options', 'protocols': {name: {'protocol', 'data', 'rows': {row: metrics}}}}.
    """
    pairs = list(protocols.items()) if isinstance(protocols, Mapping) else [tuple(p) for p in protocols]
    if not pairs:
        raise ValueError("give at least one (protocol, data) pair")
    for proto, _ in pairs:
        if proto not in PROTOCOLS:
            raise ValueError(f"unknown protocol {proto!r}; choose from {PROTOCOLS}")

    embedders = {"new": _as_embedder(new_workdir, batch_size)}
    rows = [("new", "new")]
    if old_workdir is not None:
        embedders["old"] = _as_embedder(old_workdir, batch_size)
        sizes = {k: getattr(e, "embedding_size", None) for k, e in embedders.items()}
        if None not in sizes.values() and sizes["new"] != sizes["old"]:
            raise ValueError(
                f"the new model ({_describe(new_workdir)}, D={sizes['new']}) and the old model "
                f"({_describe(old_workdir)}, D={sizes['old']}) have different embedding sizes, so new "
                f"queries cannot be compared with the old gallery; pass the old model the new one was "
                f"trained to be compatible with, or drop --old"
            )
        rows = [("old", "old"), ("new", "new"), ("new", "old")]

    results = {
        "new": _describe(new_workdir),
        "old": _describe(old_workdir),
        "rows": ["/".join(r) for r in rows],
        "options": {
            "batch_size": batch_size,
            "ijb_scale": ijb_scale,
            "ijb_far_index": ijb_far_index,
            "ijb_tasks": list(ijb_tasks),
            "gallery_fraction": gallery_fraction,
        },
        "protocols": {},
    }
    options = dict(
        batch_size=batch_size,
        ijb_scale=ijb_scale,
        ijb_far_index=ijb_far_index,
        ijb_tasks=ijb_tasks,
        gallery_fraction=gallery_fraction,
        num_workers=num_workers,
    )
    for proto, data in pairs:
        print(f"== {proto}: {os.fspath(data)}", file=sys.stderr)
        results["protocols"].update(run_protocol(proto, os.fspath(data), embedders, rows, **options))
        if out_dir is not None:  # after each protocol, so a later failure keeps what is done
            report.write_report(results, out_dir)
    return results


def run_protocol(
    proto: str,
    data: str,
    embedders: Mapping[str, Embedder],
    rows: Sequence[tuple[str, str]],
    *,
    batch_size: int = 256,
    ijb_scale: str = "reference",
    ijb_far_index: str = "reference",
    ijb_tasks: Sequence[str] = ("1:1", "1:N"),
    gallery_fraction: float = 0.5,
    num_workers: int = 8,
    bins: dict[str, tuple] | None = None,
) -> dict[str, dict]:
    """One protocol of ``evaluate`` on ready embedders.

    Returns ``{name: {'protocol', 'data', 'rows': {row: metrics}}}`` (one name per ``.bin`` file of a bin
    folder). ``bins`` caches decoded pair sets across calls (training).
    """
    out = {}
    if proto == "bin":
        sizes = sorted({image_size_of(e) for e in embedders.values()})
        if len(sizes) != 1:
            raise ValueError(f"the models expect different image sizes {sizes}; bin needs one size")
        for path in _bin_files(data):
            if bins is not None and path in bins:
                images, issame = bins[path]
            else:
                images, issame = verification.load_bin(path, image_size=sizes[0], num_workers=num_workers)
                if bins is not None:
                    bins[path] = (images, issame)
            name = f"bin:{os.path.splitext(os.path.basename(path))[0]}"
            res = verification.evaluate_bin(images, issame, embedders, rows, batch_size=batch_size)
            out[name] = {"protocol": "bin", "data": path, "rows": res}
    elif proto in ("ijbc", "ijbb"):
        res = ijb.evaluate_ijb(
            data,
            embedders,
            rows,
            subset=proto.upper(),
            tasks=ijb_tasks,
            batch_size=batch_size,
            scale=ijb_scale,
            far_index=ijb_far_index,
            num_workers=num_workers,
        )
        out[proto] = {"protocol": proto, "data": data, "rows": res}
    else:
        from mixbct_jax.data.sources import open_source  # another module's heavy deps: load lazily

        res = retrieval.evaluate_retrieval(
            open_source(data), embedders, rows, gallery_fraction=gallery_fraction, batch_size=batch_size
        )
        out[f"retrieval:{data}"] = {"protocol": "retrieval", "data": data, "rows": res}
    return out


# ---------------------------------------------------------------------------------------------------------------
# During training (mixbct_jax/train.py): the same protocols on the model being trained
# ---------------------------------------------------------------------------------------------------------------
class PeriodicEval:
    """Retrieval and ``.bin`` verification of the model being trained every ``evals.every_steps``.

    Self, and against the old model's gallery when ``config.old.workdir`` is set.

    Uses the same code as ``python -m mixbct_jax.evaluate``; the numbers go to metrics.jsonl as
    ``eval/<query>/<gallery>/<metric>`` and ``eval/<bin name>/<query>/<gallery>/accuracy``.
    """

    def __init__(self, config):
        self.config = config
        self.old_embedder = None
        self.bins: dict[str, tuple] = {}

    def evaluate(self, variables, step: int) -> dict[str, Any]:
        from mixbct_jax import embed

        c = self.config
        embedders = {"new": embed.make_embedder(c, variables, batch_size=c.evals.batch_size)}
        rows = [("new", "new")]
        if c.old.workdir:
            if self.old_embedder is None:
                self.old_embedder = embed.load_embedder(c.old.workdir, batch_size=c.evals.batch_size)
            embedders["old"] = self.old_embedder
            rows.append(("new", "old"))
        record: dict[str, Any] = {"step": step}
        for proto, data in _protocols(c):
            for name, result in run_protocol(
                proto, data, embedders, rows, batch_size=c.evals.batch_size, bins=self.bins
            ).items():
                for row, metrics in result["rows"].items():
                    if proto == "retrieval":
                        record.update({f"eval/{row}/{k}": float(metrics[k]) for k in ("top1", "top5", "mAP")})
                    else:
                        record[f"eval/{name.split(':', 1)[1]}/{row}/accuracy"] = float(metrics["accuracy"])
        return record

    @staticmethod
    def summary(step: int, record: dict[str, Any]) -> str:
        """The trainer's log line of an ``evaluate`` record: its top-1, mAP and accuracy values."""
        values = (f"{k.split('/', 1)[1]} {v:.4f}" for k, v in record.items() if k.endswith(("top1", "mAP", "accuracy")))
        return f"step {step} eval: " + " ".join(values)


def _protocols(config) -> list[tuple[str, str]]:
    """``config.evals`` as ``evaluate``'s (protocol, data) pairs."""
    protocols = [("retrieval", config.evals.retrieval)] if config.evals.retrieval else []
    return protocols + [("bin", b) for b in filter(None, config.evals.bin.split(","))]


def final_evals(config, workdir) -> dict[str, Any]:
    """The finished run's ``evaluate`` over ``config.evals`` (retrieval and .bin), written to ``<workdir>/eval``.

    Returns ``{'evals': {protocol name: result}}``, or {} when no protocol is set (and on every process but the
    first).
    """
    import jax

    protocols = _protocols(config)
    if not protocols or jax.process_index() != 0:
        return {}
    results = evaluate(
        workdir,
        config.old.workdir or None,
        protocols,
        out_dir=pathlib.Path(workdir) / "eval",
        batch_size=config.evals.batch_size,
    )
    return {"evals": results["protocols"]}


def headlines(final: dict[str, Any]) -> dict[str, Any]:
    """``final_evals``' headline number per protocol and row, for TensorBoard."""
    return {
        "final": {
            report.short_name(name): {row: report.headline(p["protocol"], m)[0] for row, m in p["rows"].items()}
            for name, p in final["evals"].items()
        }
    }


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m mixbct_jax.evaluate",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--new", required=True, help="run directory of the new model")
    parser.add_argument("--old", help="run directory of the old model (adds old/old and new/old)")
    parser.add_argument(
        "--protocol", action="append", required=True, choices=PROTOCOLS, help="repeatable; each needs its own --data"
    )
    parser.add_argument("--data", action="append", required=True, help="data for the matching --protocol")
    parser.add_argument("--out", required=True, help="output folder for report.json, report.md and plots")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument(
        "--ijb_scale",
        choices=("reference", "clean"),
        default="reference",
        help="IJB input scale: reference (x-127.5)/128 or clean (x-127.5)/127.5",
    )
    parser.add_argument(
        "--ijb_far_index",
        choices=("reference", "ceil"),
        default="reference",
        help="IJB 1:N threshold index: reference int(n*far)-1 or ceil(n*far)-1",
    )
    parser.add_argument("--ijb_tasks", choices=("1:1", "1:N", "both"), default="both")
    parser.add_argument("--gallery_fraction", type=float, default=0.5, help="retrieval: per-class gallery share")
    parser.add_argument("--workers", type=int, default=8, help="image decoding threads")
    from mixbct_jax import cli

    args = parser.parse_args(None if argv is None else cli.snake_case_flags(argv))
    if len(args.protocol) != len(args.data):
        parser.error(f"{len(args.protocol)} --protocol but {len(args.data)} --data; give one --data per protocol")
    results = evaluate(
        args.new,
        args.old,
        list(zip(args.protocol, args.data)),
        args.out,
        batch_size=args.batch_size,
        ijb_scale=args.ijb_scale,
        ijb_far_index=args.ijb_far_index,
        ijb_tasks=("1:1", "1:N") if args.ijb_tasks == "both" else (args.ijb_tasks,),
        gallery_fraction=args.gallery_fraction,
        num_workers=args.workers,
    )
    with open(os.path.join(args.out, "report.md")) as f:
        print(f.read())
    return results


if __name__ == "__main__":
    from mixbct_jax import cli

    cli.run(main)
