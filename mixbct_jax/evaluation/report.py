"""Writes evaluation results as report.json, report.md and PNG plots (all writes atomic).

Input: the dict returned by `mixbct_jax.evaluate.evaluate`:
```
{"new": ..., "old": ..., "protocols": {name: {"protocol": "bin"|"ijbc"|"ijbb"|"retrieval", "data": ...,
                                              "rows": {"old/old": metrics, "new/new": ..., "new/old": ...}}}}
```
Row 'q/g' = queries embedded by model q against a gallery embedded by model g. The BCT compatibility
criterion is that the cross row new/old beats old/old on the protocol's key metric.
"""

from __future__ import annotations

import json
import math
import os
import re

import numpy as np
from matplotlib.figure import Figure  # not pyplot: no global backend or figure state to disturb notebooks

from mixbct_jax.files import atomic_write, write_text_atomic  # noqa: F401 (re-exported)

ROW_ORDER = ("old/old", "new/new", "new/old")
CROSS, OLD_SELF = "new/old", "old/old"


# ------------------------------------------------------------------------------------------------ files


def to_jsonable(obj):
    """Numpy scalars/arrays to Python, tuples to lists, NaN/inf to None (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# ------------------------------------------------------------------------------------------------ tables


def headline(protocol: str, metrics: dict) -> tuple[dict[str, float], str]:
    """The table columns of one row and the name of the key (compatibility) column.

    Percentages are in %, as the face literature reports them.
    """
    if protocol == "bin":
        cols = {
            "accuracy %": 100 * metrics["accuracy"],
            "std %": 100 * metrics["accuracy_std"],
            f"VAL@FAR={metrics.get('far_target', 1e-3):.0e} %": 100 * metrics["val"],
            "xnorm": metrics["xnorm"],
        }
        return cols, "accuracy %"
    if protocol == "retrieval":
        cols = {k + " %": 100 * v for k, v in metrics.items() if k.startswith("top")}
        cols["mAP %"] = 100 * metrics["mAP"]
        cols["queries"] = metrics["num_queries"]
        return cols, "mAP %"
    if protocol in ("ijbc", "ijbb"):
        cols, key = {}, None
        if "1:1" in metrics:
            cols.update({f"TAR@FAR={k} %": 100 * v for k, v in metrics["1:1"]["tar_at_far"].items()})
            cols["AUC %"] = 100 * metrics["1:1"]["auc"]
            key = "TAR@FAR=1e-04 %"
        if "1:N" in metrics:
            mean = metrics["1:N"]["mean"]
            cols.update({f"TPIR@FPIR={k} %": 100 * v for k, v in mean["tpir"].items()})
            cols.update({f"{k} %": 100 * v for k, v in mean.items() if k.startswith("top")})
            key = key or "TPIR@FPIR=1e-02 %"
        return cols, key
    raise ValueError(f"unknown protocol {protocol!r}; expected bin, ijbc, ijbb or retrieval")


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    return f"{v:.2f}"


def _table(protocol: str, rows: dict[str, dict], only: str | None = None) -> str:
    """Markdown table; `only` restricts IJB metrics to '1:1' or '1:N'."""
    names = [r for r in ROW_ORDER if r in rows] + [r for r in rows if r not in ROW_ORDER]
    heads = {}
    for r in names:
        m = rows[r] if only is None else {only: rows[r][only]}
        heads[r] = headline(protocol, m)
    cols = list(next(iter(heads.values()))[0])
    key = next(iter(heads.values()))[1]
    compare = CROSS in rows and OLD_SELF in rows
    lines = ["| row | " + " | ".join(cols) + (f" | new/old beats old/old ({key}) |" if compare else " |")]
    lines.append("|---" * (len(cols) + 1 + compare) + "|")
    for r in names:
        vals = heads[r][0]
        line = f"| {r} | " + " | ".join(_fmt(vals[c]) for c in cols) + " |"
        if compare:
            verdict = ""
            if r == CROSS:
                verdict = "yes" if vals[key] > heads[OLD_SELF][0][key] else "no"
            line += f" {verdict} |"
        lines.append(line)
    return "\n".join(lines)


def compatible(protocol: str, rows: dict[str, dict]) -> bool | None:
    """Whether new/old beats old/old on the protocol's key metric (None without both rows)."""
    if CROSS not in rows or OLD_SELF not in rows:
        return None
    cross, key = headline(protocol, rows[CROSS])
    return bool(cross[key] > headline(protocol, rows[OLD_SELF])[0][key])


# ------------------------------------------------------------------------------------------------ plots


def _save(fig, path: str) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))


def short_name(name: str, limit: int = 40) -> str:
    """A plot title's name for a protocol entry; the full spec stays in report.md.

    ``retrieval:synthetic:num_classes=48,...`` -> ``retrieval synthetic``, ``bin:/data/lfw.bin`` -> ``bin lfw.bin``.
    """
    kind, _, data = name.partition(":")
    head = data.split(",")[0]
    if "=" in head:  # synthetic:k=v: the kind alone
        head = head.split(":")[0]
    short = f"{kind} {os.path.basename(head.rstrip('/')) or head}".strip()
    return short if len(short) <= limit else short[: limit - 1] + "…"


def _plot_roc(name: str, rows: dict[str, dict], path: str) -> None:
    fig = Figure(figsize=(6, 4.5))
    ax = fig.subplots()
    for r, m in rows.items():
        roc = m["1:1"]["roc"]
        ax.plot(roc["fpr"], roc["tpr"], label=f"{r} (TAR@1e-4 = {100 * m['1:1']['tar_at_far']['1e-04']:.2f}%)")
    ax.set(xscale="log", xlim=(1e-6, 1), xlabel="FAR", ylabel="TAR", title=f"{short_name(name)} 1:1 ROC")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    _save(fig, path)


def _plot_tpir(name: str, rows: dict[str, dict], path: str) -> None:
    fig = Figure(figsize=(6, 4.5))
    ax = fig.subplots()
    for i, (r, m) in enumerate(rows.items()):
        color = f"C{i}"
        for style, (g, res) in zip(("-", "--"), ((g, v) for g, v in m["1:N"].items() if "tpir_curve" in v)):
            ax.plot(res["fpir_curve"], res["tpir_curve"], style, color=color, label=f"{r} {g}")
    ax.set(xscale="log", xlabel="FPIR", ylabel="TPIR", title=f"{short_name(name)} 1:N TPIR vs FPIR")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    _save(fig, path)


def _plot_bars(name: str, protocol: str, rows: dict[str, dict], path: str) -> None:
    names = [r for r in ROW_ORDER if r in rows] + [r for r in rows if r not in ROW_ORDER]
    cols = [c for c in headline(protocol, rows[names[0]])[0] if c.endswith("%") and not c.startswith("std")]
    x = np.arange(len(cols))
    width = 0.8 / len(names)
    fig = Figure(figsize=(1.6 * len(cols) + 3, 4))
    ax = fig.subplots()
    values = []
    for i, r in enumerate(names):
        vals = [headline(protocol, rows[r])[0][c] for c in cols]
        bars = ax.bar(x + i * width, vals, width, label=r)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
        values += [v for v in vals if v is not None and np.isfinite(v)]
    # From 0, so bar heights compare honestly; the labels on the bars carry the decimals.
    top = max(values, default=0.0)
    ax.set_ylim(0.0, min(100.0, 1.12 * top) if top > 0 else 100.0)  # all-zero rows: the full 0-100 range
    ax.set_xticks(x + width * (len(names) - 1) / 2, cols)
    ax.set(ylabel="%", title=f"{short_name(name)}: new/old vs old/old")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    _save(fig, path)


# ------------------------------------------------------------------------------------------------ report


def read_metrics(path: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """(training records, periodic-evaluation records) of a run's ``metrics.jsonl``, each step at most once.

    The trainer truncates the file on resume; reading keeps the last record of each (kind, step) anyway, so a file
    from an older version or a copy with repeated steps reads the same, and a torn last line is skipped.
    """
    train, evals = {}, {}
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(record, dict) or "step" not in record:
                continue
            (train if "loss" in record else evals)[record["step"]] = record
    return [train[k] for k in sorted(train)], [evals[k] for k in sorted(evals)]


def plot_training_curves(runs: dict[str, str | os.PathLike], path: str | os.PathLike) -> None:
    """Loss and learning rate against step, one line per run, from each run's ``metrics.jsonl``."""
    fig = Figure(figsize=(10, 3.6))
    ax_loss, ax_lr = fig.subplots(1, 2)
    for name, metrics_path in runs.items():
        records, _ = read_metrics(metrics_path)
        steps = [r["step"] for r in records]
        ax_loss.plot(steps, [r["loss"] for r in records], label=name)
        ax_lr.plot(steps, [r["lr"] for r in records], label=name)
    ax_loss.set(xlabel="step", ylabel="loss", yscale="log", title="training loss")
    ax_lr.set(xlabel="step", ylabel="learning rate", title="schedule")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_lr.grid(alpha=0.3)
    _save(fig, os.fspath(path))


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "protocol"


def write_report(results: dict, out_dir: str | os.PathLike) -> dict[str, str]:
    """Writes report.json (every number), report.md (one table per protocol) and plots into out_dir.

    Returns:
      {'json': path, 'md': path, '<protocol>_<plot>': path, ...}.
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    written = {}
    md = ["# Evaluation report", ""]
    if results.get("new") is not None:
        md.append(f"- new model: `{results['new']}`")
    if results.get("old") is not None:
        md.append(f"- old model: `{results['old']}`")
    md.append(
        "- row `q/g`: queries (second image, p2, probes) embedded by q, gallery (first image, p1, "
        "galleries) by g; `new/old` is the backward-compatibility (cross) test."
    )
    for name, proto in results.get("protocols", {}).items():
        kind, rows = proto["protocol"], proto["rows"]
        md += ["", f"## {name}", ""]
        if proto.get("data") is not None:
            md += [f"data: `{proto['data']}`", ""]
        slug = _slug(name)
        if kind in ("ijbc", "ijbb"):
            for task, plot, suffix in (("1:1", _plot_roc, "roc"), ("1:N", _plot_tpir, "tpir_fpir")):
                if all(task in m for m in rows.values()):
                    md += [f"### {task}", "", _table(kind, rows, only=task), ""]
                    path = os.path.join(out_dir, f"{slug}_{suffix}.png")
                    plot(name, rows, path)
                    md += [f"![{name} {task}]({os.path.basename(path)})", ""]
                    written[f"{slug}_{suffix}"] = path
        else:
            md += [_table(kind, rows), ""]
            path = os.path.join(out_dir, f"{slug}_compat.png")
            _plot_bars(name, kind, rows, path)
            md += [f"![{name}]({os.path.basename(path)})", ""]
            written[f"{slug}_compat"] = path
        single = max((int(m.get("single_kind_folds", 0)) for m in rows.values() if isinstance(m, dict)), default=0)
        if single:
            md += [
                f"**Warning:** {single} of the folds hold only one kind of pair (the .bin's pairs are ordered by "
                f"kind); these accuracies are not meaningful.",
                "",
            ]
        verdict = compatible(kind, rows)
        if verdict is not None:
            md.append(f"Backward compatible (new/old > old/old): **{'yes' if verdict else 'no'}**")

    json_path = os.path.join(out_dir, "report.json")
    write_text_atomic(json_path, json.dumps(to_jsonable(results), indent=1, allow_nan=False) + "\n")
    md_path = os.path.join(out_dir, "report.md")
    write_text_atomic(md_path, "\n".join(md) + "\n")
    written.update(json=json_path, md=md_path)
    return written
