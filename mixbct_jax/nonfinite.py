"""Non-finite steps: the train step skips them on the device; this counts them there and stops the run.

The step keeps the old state when its loss or gradients are not finite. The loop must still never checkpoint
while such steps are happening (a rerun would resume from a diverging state), and must stop after
``config.max_consecutive_nonfinite`` of them in a row, naming the last finite step and the last good checkpoint.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp

from mixbct_jax import cli


class NonFiniteLossError(cli.UserError, RuntimeError):
    """Raised after ``config.max_consecutive_nonfinite`` skipped steps; the last good checkpoint is kept."""


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, file=sys.stderr, flush=True)


@jax.jit
def _count_skips(counts: dict[str, jax.Array], finite: jax.Array) -> dict[str, jax.Array]:
    bad = jnp.asarray(finite).reshape(-1)[0] < 1  # pmap metrics carry a device axis
    steps = counts["steps"] + 1
    return {
        "steps": steps,
        "skipped": counts["skipped"] + bad.astype(jnp.int32),
        "consecutive": jnp.where(bad, counts["consecutive"] + 1, 0),
        "last_finite": jnp.where(bad, counts["last_finite"], steps),
    }


class SkipCounter:
    """Counts non-finite (skipped) steps on the device; read on the host only when logging or saving.

    The step keeps the old state when its loss or gradients are not finite. The loop must still never checkpoint
    while such steps are happening (a rerun would resume from a diverging state), and must stop after
    ``config.max_consecutive_nonfinite`` of them in a row, naming the last finite step and the last good checkpoint.
    """

    def __init__(self, start_step: int, limit: int, workdir, mngr):
        self.limit, self.workdir, self.mngr = limit, workdir, mngr
        start = {"steps": start_step, "skipped": 0, "consecutive": 0, "last_finite": start_step}
        self.counts = {k: jnp.asarray(v, jnp.int32) for k, v in start.items()}

    def update(self, finite: jax.Array) -> None:
        self.counts = _count_skips(self.counts, finite)

    def _host(self) -> dict[str, int]:
        return {k: int(v) for k, v in jax.device_get(self.counts).items()}

    def _error(self, c: dict[str, int], done: int, what: str) -> NonFiniteLossError:
        latest = self.mngr.latest_step()
        kept = (
            f"the last good checkpoint (step {latest}) is kept in {self.workdir}/checkpoints"
            if latest is not None
            else "no checkpoint was written, a rerun starts from step 0"
        )
        return NonFiniteLossError(
            f"step {done}: {c['consecutive']} consecutive steps had a non-finite loss or gradients and were skipped "
            f"({c['skipped']} in this process); the last finite step was {c['last_finite']}; {what}; {kept}. Lower "
            f"config.optim.lr or check the input data, then rerun (add --config.resume_allow=optim.lr to keep the "
            f"checkpoint)."
        )

    def check(self, done: int) -> dict[str, int]:
        """At a log step: raises after too many skips in a row; returns the counts for metrics.jsonl."""
        c = self._host()
        if c["consecutive"] >= self.limit:
            raise self._error(c, done, f"stopping after config.max_consecutive_nonfinite={self.limit}")
        if c["consecutive"]:
            _log(f"step {done}: {c['consecutive']} consecutive non-finite steps skipped ({c['skipped']} in all)")
        return {"skipped_steps": c["skipped"], "consecutive_nonfinite": c["consecutive"]}

    def safe_to_save(self, done: int, *, final: bool, log) -> bool:
        """False (with a message) when the newest step was skipped; raises when the run must stop instead."""
        c = self._host()
        if c["consecutive"] >= self.limit or (final and c["consecutive"]):
            raise self._error(c, done, "the state is not saved")
        if c["consecutive"]:
            log(f"step {done}: not checkpointed, the last {c['consecutive']} steps were non-finite (skipped)")
            return False
        return True
