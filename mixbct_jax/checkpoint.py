"""The only module that talks to Orbax.

A run directory holds ``config.json`` and ``checkpoints/<step>/`` written by an Orbax ``CheckpointManager`` with
two items per step:

* ``state``: the whole train state (parameters, BatchNorm statistics, optimizer state, extra method state), for
  resuming. Arrays are global, so a run can resume on another number of devices.
* ``model``: ``{'params': backbone parameters, 'batch_stats': backbone BatchNorm statistics}`` only, which is all
  that extraction, evaluation, notebooks and the PyTorch converter need. Keeping it separate means loading a model
  never reads the (large, sharded) class centres or the optimizer state.
* ``data`` (JSON): the input iterator's state (``pipeline.data_state``: step, seed, batch, subset, ...), checked
  on resume so a resumed run continues with exactly the batches it would have seen.

Old embeddings and other per-example arrays are never stored here (the train step's design (README, Several GPUs)).
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging

from mixbct_jax.aliases import PyTree
from mixbct_jax.files import write_text_atomic

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"


def write_config(workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> None:
    """Writes ``config.json`` atomically (only process 0 writes)."""
    if jax.process_index() != 0:
        return
    path = pathlib.Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path / CONFIG_FILE, config.to_json(indent=2, sort_keys=True))


def read_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """Reads ``<workdir>/config.json``; a clear error when the folder is not a run directory."""
    path = pathlib.Path(workdir) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: {workdir} is not a mixbct-jax run directory. Pass the --workdir of a training "
            f"run (python -m mixbct_jax.train) or the --out of python -m mixbct_jax.convert."
        )
    try:
        return ml_collections.ConfigDict(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); restore it from the run's original config file.") from e


def manager(workdir: str | os.PathLike, *, keep: int = 3, asynchronous: bool = True) -> ocp.CheckpointManager:
    """The run's ``CheckpointManager`` (saves are triggered explicitly by the trainer)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=asynchronous, create=True)
    directory = pathlib.Path(workdir).absolute() / CHECKPOINT_DIR
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "model", "data"))


def model_variables(state_params: PyTree, batch_stats: PyTree) -> dict[str, PyTree]:
    return {"params": state_params, "batch_stats": batch_stats}


def save(
    mngr: ocp.CheckpointManager, step: int, *, state: PyTree, model: PyTree, data: dict[str, Any] | None = None
) -> None:
    """Saves the items at ``step`` (asynchronously when the manager is); ``data`` is the input iterator's state."""
    items = {"state": ocp.args.StandardSave(state), "model": ocp.args.StandardSave(model)}
    if data is not None:
        items["data"] = ocp.args.JsonSave(data)
    mngr.save(step, args=ocp.args.Composite(**items), force=True)


def save_run(mngr: ocp.CheckpointManager, step: int, host_state: PyTree, data: dict[str, Any]) -> None:
    """Saves a training state (host layout) with its extractable model and the input state ``data``."""
    model = model_variables(host_state["params"]["backbone"], host_state["batch_stats"])
    save(mngr, step, state=host_state, model=model, data=data)


def restore_data(mngr: ocp.CheckpointManager, step: int) -> dict[str, Any] | None:
    """The input iterator's state saved at ``step``; None for a checkpoint written before it was stored."""
    if not (pathlib.Path(mngr.directory) / str(step) / "data").exists():
        return None
    return dict(mngr.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"])


BAD_DIR = "checkpoints_unreadable"


def _reason(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:200]}"


def restore_state(
    mngr: ocp.CheckpointManager, abstract_state: PyTree, step: int | None = None, log=print
) -> tuple[int, PyTree] | None:
    """Restores the newest readable train state into the shardings of ``abstract_state``; None if none saved.

    A damaged newest checkpoint (a full disk, a torn copy, a node lost mid-write) does not stop the run: the steps
    are tried from the newest down, each unreadable one is reported with its error and moved aside to
    ``<workdir>/checkpoints_unreadable/<step>`` (never deleted), and the run resumes from the newest readable one.
    When no step is readable nothing is moved (that is a config mismatch more often than damage).

    Args:
      mngr: the run's manager.
      abstract_state: shapes, dtypes and shardings to restore into.
      step: restore exactly this step (no fallback).
      log: where the fallback messages go.
    """
    steps = sorted(mngr.all_steps(), reverse=True) if step is None else [step]
    if not steps:
        return None
    failures: list[tuple[int, str]] = []
    for candidate in steps:
        try:
            restored = mngr.restore(candidate, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
        except Exception as err:  # Orbax/TensorStore raise many types for damaged files: all mean "unreadable"
            if step is not None:
                raise
            failures.append((candidate, _reason(err)))
            continue
        if failures:
            _set_aside(mngr, [s for s, _ in failures], log)
            for bad, why in failures:
                log(
                    f"checkpoint step {bad} is unreadable ({why}); moved to {BAD_DIR}/{bad}, resuming from step "
                    f"{candidate}"
                )
        return candidate, restored["state"]
    newest, why = failures[0]
    raise ValueError(
        f"no checkpoint in {mngr.directory} can be restored into this run's state (steps "
        f"{', '.join(str(s) for s, _ in failures)}; step {newest}: {why}); if the config changed, use a "
        f"new --workdir, otherwise move {mngr.directory} aside to start over."
    )


def _set_aside(mngr: ocp.CheckpointManager, steps: list[int], log) -> None:
    """Moves unreadable step directories out of the manager's view (kept for inspection) and reloads it."""
    if jax.process_index() == 0:
        directory = pathlib.Path(mngr.directory)
        aside = directory.parent / BAD_DIR
        aside.mkdir(exist_ok=True)
        for bad in steps:
            target = aside / str(bad)
            if target.exists():  # an earlier fallback kept one of the same step
                target = aside / f"{bad}.{int(time.time())}"
            os.replace(directory / str(bad), target)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("mixbct_checkpoint_set_aside")
    mngr.reload()


def save_model_only(
    workdir: str | os.PathLike, config: ml_collections.ConfigDict, variables: PyTree, step: int = 0
) -> None:
    """Writes a run directory holding just a model (``config.json`` + the ``model`` item), e.g. a converted one."""
    write_config(workdir, config)
    mngr = manager(workdir, keep=1, asynchronous=False)
    mngr.save(step, args=ocp.args.Composite(model=ocp.args.StandardSave(variables)), force=True)
    mngr.wait_until_finished()
    mngr.close()


@contextlib.contextmanager
def _quiet_absl():
    previous = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        absl_logging.set_verbosity(previous)


def load_params(workdir: str | os.PathLike, step: int | None = None) -> tuple[ml_collections.ConfigDict, PyTree]:
    """Loads ``(config, {'params', 'batch_stats'})`` of the backbone from a run directory, as host NumPy arrays.

    Args:
      workdir: a training run's ``--workdir`` or a converter's ``--out``.
      step: a saved step; the latest by default.
    """
    config = read_config(workdir)
    directory = pathlib.Path(workdir).absolute() / CHECKPOINT_DIR
    # Process-local: in a multi-process run any subset of the processes may load (evaluation runs on process 0
    # only), so the manager must not wait at barriers for the others.
    local = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(), active_processes={jax.process_index()})
    handlers = {
        "state": ocp.StandardCheckpointHandler(),
        "model": ocp.StandardCheckpointHandler(),
        "data": ocp.JsonCheckpointHandler(),
    }
    options = ocp.CheckpointManagerOptions(
        read_only=True, create=False, save_interval_steps=0, multiprocessing_options=local
    )
    with _quiet_absl():  # Orbax warns that a read-only manager is read-only
        mngr = ocp.CheckpointManager(directory, item_handlers=handlers, options=options)
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(
            f"{directory} holds no checkpoint yet: train the run first (python -m mixbct_jax.train "
            f"--workdir {workdir} ...) or convert a model into it."
        )
    # Restore onto one local device whatever the saving topology was: without a target Orbax rebuilds the saved
    # shardings, which fails when the devices differ (another device count, or a multi-process run's devices).
    device = jax.local_devices()[0]
    try:
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=jax.sharding.SingleDeviceSharding(device)),
            mngr.item_metadata(step)["model"],
        )
        restored = mngr.restore(step, args=ocp.args.Composite(model=ocp.args.StandardRestore(target)))
    except Exception as err:  # noqa: BLE001 (Orbax/TensorStore raise many types for a damaged item)
        others = [s for s in mngr.all_steps() if s != step]
        raise ValueError(
            f"{directory}/{step} cannot be read ({_reason(err)}); load another saved step "
            f"({others or 'none'}, --step where the command has it) or retrain"
        ) from None
    finally:
        mngr.close()
    variables = jax.tree.map(np.asarray, restored["model"])
    return config, variables
