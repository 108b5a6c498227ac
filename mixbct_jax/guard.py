"""What a rerun may do to an existing run directory: the resume guard, the workdir lock, metrics on resume.

Rerunning the training command resumes. That is only correct when the command describes the same run, so
``check_resume`` compares the command's config with the workdir's ``config.json`` field by field:

* structural fields (the model, the head, the method, the data and its split) change the shapes or the meaning
  of what is stored: a resume with another value is refused, always;
* the fields in ``HARMLESS`` (logging, evaluation, checkpoint cadence, devices) only change how the run is
  observed: they are allowed and recorded in ``resumes.jsonl``;
* every other field changes what is trained (batch, seed, schedule, learning rate, method weights, old arrays):
  refused unless named in ``--config.resume_allow=field,field`` (or ``*``), a deliberate change such as a longer
  ``total_steps``.

``WorkdirLock`` stops a second trainer from writing into the same workdir; ``truncate_metrics`` keeps each step
at most once in ``metrics.jsonl`` after any number of resumes.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import time
from typing import Any

import ml_collections

from mixbct_jax.cli import UserError

CONFIG_FILE = "config.json"
LOCK_FILE = ".lock"
RESUMES_FILE = "resumes.jsonl"

# Fields whose change only alters how a run is observed or laid out on devices (a prefix ends with a dot).
HARMLESS = (
    "log_every_steps",
    "tensorboard",
    "evals.",
    "checkpoint.every_steps",
    "checkpoint.keep",
    "checkpoint.asynchronous",
    "num_devices",
    "parallel",
    "data.threads",
    "resume_allow",
    "max_consecutive_nonfinite",
    "old.finite_check",
)
# Fields that change the stored shapes or what the stored state means: never resumed across.
STRUCTURAL = ("model.", "head.type", "bct.method", "data.scenario", "data.role", "data.split_ratio")


class ResumeError(ValueError):
    """The command's config does not describe the run already in the workdir."""


class LockError(UserError):
    """Another trainer holds the workdir."""


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def _plain(config: ml_collections.ConfigDict) -> dict[str, Any]:
    # Through JSON, so tuples compare equal to the lists config.json holds.
    return json.loads(config.to_json(sort_keys=True))


def _matches(field: str, patterns) -> bool:
    return any(field == p or (p.endswith(".") and field.startswith(p)) for p in patterns)


def config_diff(stored: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{field: (stored, current)}`` for every leaf that differs (a field absent from an older file is skipped)."""
    a, b = _flatten(stored), _flatten(current)
    return {k: (a[k], b[k]) for k in sorted(b) if k in a and a[k] != b[k]}


def _fmt(diff: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in diff.items())


def has_checkpoint(workdir: str | os.PathLike) -> bool:
    """True when ``<workdir>/checkpoints`` holds at least one finished step directory."""
    directory = pathlib.Path(workdir) / "checkpoints"
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def check_resume(workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> dict[str, tuple[Any, Any]]:
    """Refuses to resume a run with a config that trains something else; returns the allowed changes.

    Args:
      workdir: the run directory; nothing is checked when it holds no checkpoint yet.
      config: the command's config.

    Returns:
      ``{field: (stored, current)}`` of the changes that are allowed (harmless or listed in
      ``config.resume_allow``); empty for a new run or an identical config.

    Raises:
      ResumeError: one line naming the changed fields and the two ways out.
    """
    path = pathlib.Path(workdir) / CONFIG_FILE
    if not has_checkpoint(workdir):
        return {}
    if not path.exists():
        raise ResumeError(
            f"{workdir} holds checkpoints but no {CONFIG_FILE}, so this command cannot be checked "
            f"against the run it would resume: use a new --workdir, or restore {path}."
        )
    try:
        stored = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ResumeError(f"{path} is not valid JSON ({e}); restore it or use a new --workdir.") from None
    diff = config_diff(stored, _plain(config))
    allow = [p.strip() for p in str(config.get("resume_allow", "")).split(",") if p.strip()]
    structural = {k: v for k, v in diff.items() if _matches(k, STRUCTURAL)}
    if structural:
        raise ResumeError(
            f"{workdir} holds another run ({_fmt(structural)}): resuming it with this config would "
            f"train a different model; use a new --workdir for this config."
        )
    refused = {
        k: v for k, v in diff.items() if not _matches(k, HARMLESS) and "*" not in allow and not _matches(k, allow)
    }
    if refused:
        names = ",".join(refused)
        raise ResumeError(
            f"{workdir} was trained with another config ({_fmt(refused)}): use a new --workdir, or "
            f"resume with the change on purpose with --config.resume_allow={names}"
        )
    return diff


def record_resume(workdir: str | os.PathLike, step: int, diff: dict[str, tuple[Any, Any]]) -> None:
    """Appends the allowed changes of a resume to ``resumes.jsonl`` (the new config.json is written by the caller)."""
    if not diff:
        return
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "step": step,
        "changed": {k: {"was": a, "now": b} for k, (a, b) in diff.items()},
    }
    with open(pathlib.Path(workdir) / RESUMES_FILE, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def truncate_metrics(path: str | os.PathLike, step: int) -> int:
    """Drops the records of ``metrics.jsonl`` logged after ``step`` (they are logged again); returns how many.

    A run killed after logging step 40 and resumed from the step-30 checkpoint would otherwise hold steps 31-40
    twice. A torn last line (a kill during the write) is dropped too.
    """
    path = pathlib.Path(path)
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if record.get("step", 0) <= step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
    return dropped


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class WorkdirLock:
    """An exclusive ``<workdir>/.lock`` (pid, host) held by process 0 while a trainer runs.

    A lock left by a trainer that died (kill -9, a lost node) is stale: on the same host its pid no longer exists,
    and it is taken over with a message. A lock from another host cannot be checked from here, so the error names
    the file to delete once that trainer is known to be gone.
    """

    def __init__(self, workdir: str | os.PathLike, enabled: bool = True):
        self.path = pathlib.Path(workdir) / LOCK_FILE
        self.enabled = enabled
        self.held = False

    def _write(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}, f)
        return True

    def acquire(self, log=print) -> None:
        """Takes the lock or raises ``LockError`` (one line)."""
        if not self.enabled:
            return
        for _ in range(2):
            if self._write():
                self.held = True
                return
            try:
                owner = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError):
                owner = {}  # torn by a kill between create and write: stale
            host, pid = owner.get("host"), owner.get("pid")
            if host == socket.gethostname() and isinstance(pid, int) and pid != os.getpid() and _alive(pid):
                raise LockError(
                    f"{self.path.parent} is in use by another trainer (pid {pid} on {host}); wait "
                    f"for it to finish or stop it, or use another --workdir."
                )
            if host not in (None, socket.gethostname()):
                raise LockError(
                    f"{self.path.parent} is locked by a trainer on host {host} (pid {pid}); if it is no "
                    f"longer running, delete {self.path} and rerun."
                )
            log(f"removing the stale lock {self.path} of a trainer that is gone (pid {pid})")
            self.path.unlink(missing_ok=True)
        raise LockError(f"{self.path} could not be taken; delete it if no trainer uses {self.path.parent}.")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
