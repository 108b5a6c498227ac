"""The one progress line of long jobs (prepare, extract, evaluation): rate and ETA on stderr, at most once a second."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def format_eta(seconds: float) -> str:
    """``1h05m`` or ``4m07s``: the trainer's ETA."""
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


def train_line(done: int, total: int, steps_per_epoch: int, metrics: dict, rate: float) -> str:
    """The trainer's log line: ``step 50/300 ep 2.00 loss 11.0782 lr 0.07000 214 img/s ETA 1m14s``."""
    speed = f"{metrics['img_per_s']:.0f} img/s ETA {format_eta((total - done) / rate)}" if rate else ""
    return (
        f"step {done}/{total} ep {done / steps_per_epoch:.2f} loss {metrics['loss']:.4f} lr {metrics['lr']:.5f} {speed}"
    )


class Progress:
    """Counts work done and prints `desc: done/total (pct) rate/s ETA h:mm:ss`.

    Use as a context manager; `update(n)` after each chunk of work. Printing is throttled to one line per
    `min_interval` seconds (plus a final line on exit), so it costs nothing inside tight loops.
    """

    def __init__(
        self,
        total: int,
        desc: str,
        *,
        unit: str = "it",
        stream: TextIO | None = None,
        min_interval: float = 1.0,
        enabled: bool = True,
    ) -> None:
        self.total = int(total)
        self.desc = desc
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.min_interval = min_interval
        self.enabled = enabled
        self.done = 0
        self._start = time.monotonic()
        self._last_print = -float("inf")
        self._closed = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        """Records `n` more units of work and prints if a second has passed since the last line."""
        self.done += n
        now = time.monotonic()
        # The work's last update is left to close(), whose line says "done in": one line at 100%, not two.
        if self.done < self.total and now - self._last_print >= self.min_interval:
            self._print(now)

    def close(self) -> None:
        """Prints the final line (once, however often it is called)."""
        if not self._closed:
            self._closed = True
            self._print(time.monotonic(), final=True)

    def _print(self, now: float, final: bool = False) -> None:
        self._last_print = now
        if not self.enabled:
            return
        elapsed = now - self._start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        pct = 100.0 * self.done / self.total if self.total else 100.0
        if final:
            tail = f"done in {_clock(elapsed)}"
        else:
            eta = (self.total - self.done) / rate if rate > 0 else float("nan")
            tail = f"ETA {_clock(eta) if eta == eta else '?'}"
        self.stream.write(f"{self.desc}: {self.done}/{self.total} ({pct:5.1f}%) {rate:,.1f} {self.unit}/s {tail}\n")
        self.stream.flush()
