"""Where a run's numbers go: ``metrics.jsonl`` (one JSON record per logged step) and TensorBoard event files.

Both are written by process 0 only. Every record gets ``time`` (wall-clock seconds since the epoch), so curves can
be plotted against time as well as steps. TensorBoard files are written with tensorboardX, which needs no
TensorFlow; ``tensorboard --logdir runs/`` shows every run below ``runs/`` side by side. On resume, TensorBoard is
told to hide the events at or after the restored step (``purge_step``), as ``metrics.jsonl`` is truncated there,
so a curve never shows a step twice.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import time
from typing import Any

from mixbct_jax import guard

TENSORBOARD_DIR = "tensorboard"
_TAG_CHARS = re.compile(r"[^A-Za-z0-9_./:-]+")


def tag_name(key: str) -> str:
    """A TensorBoard tag for a record key: ``'mAP %'`` -> ``'mAP'``, other spaces and symbols -> ``_``."""
    return _TAG_CHARS.sub("_", key.replace(" %", "").strip())


def _scalars(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numeric leaves of a record as TensorBoard tags (nested dicts join with '/')."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in ("step", "time"):
            continue
        tag = f"{prefix}{tag_name(str(key))}"
        if isinstance(value, dict):
            out.update(_scalars(value, f"{tag}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[tag] = float(value)
    return out


class MetricsWriter:
    """Appends records to ``<workdir>/metrics.jsonl`` and mirrors their scalars to ``<workdir>/tensorboard``.

    Args:
      workdir: the run directory.
      start_step: the step the run (re)starts from: ``metrics.jsonl`` is cut back to it and TensorBoard hides the
        events written from it on.
      enabled: False on every process but 0.
      tensorboard: also write TensorBoard event files.
    """

    def __init__(
        self, workdir: str | os.PathLike, *, start_step: int = 0, enabled: bool = True, tensorboard: bool = True
    ) -> None:
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self.enabled = enabled
        self._tb = None
        if enabled:  # records after the restored step are logged again: keep each step once
            guard.truncate_metrics(self.path, start_step)
        if enabled and tensorboard:
            from tensorboardX import SummaryWriter  # lazily: only a training run needs it

            self._tb = SummaryWriter(
                str(pathlib.Path(workdir) / TENSORBOARD_DIR),
                purge_step=start_step if start_step > 0 else None,
                flush_secs=30,
            )

    def write(self, step: int, record: dict[str, Any], *, prefix: str = "") -> dict[str, Any]:
        """Writes one record (``step`` and ``time`` added) to both sinks; returns the record as written."""
        record = {**record, "step": int(step), "time": round(time.time(), 3)}
        if not self.enabled:
            return record
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        if self._tb is not None:
            for tag, value in _scalars(record, prefix).items():
                self._tb.add_scalar(tag, value, global_step=int(step), walltime=record["time"])
        return record

    def tensorboard_only(self, step: int, record: dict[str, Any]) -> None:
        """Writes a record's scalars to TensorBoard alone.

        Used for the final evaluation: its full results are the run's ``eval/report.json``, and ``metrics.jsonl``
        stays one record per logged step.
        """
        if self._tb is not None:
            for tag, value in _scalars(record).items():
                self._tb.add_scalar(tag, value, global_step=int(step))

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
