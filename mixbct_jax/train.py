"""Trains an old model, or a new model with a backward-compatible method, and checkpoints it with Orbax.

  python -m mixbct_jax.train --config configs/quickstart.py --workdir runs/old
  python -m mixbct_jax.train --config configs/quickstart.py:role=new,method=mixbct --workdir runs/new \
      --config.old.features=runs/old/emb/features.npy --config.old.credible=runs/old/emb/credible.npy

Rerunning the same command resumes from the latest checkpoint with the same data order and RNG stream. The file
reads top to bottom in phases, one call each: devices and data, the step (``step.build``: model, method,
optimizer), the method's host data (``method_host``), the state (restored or initialised), then per epoch: refresh
the method's host data; per step: step, log, save, evaluate; at the end the final evaluation.
"""

from __future__ import annotations

import os
import pathlib
import sys
import time
from typing import Any

import jax
import ml_collections

from mixbct_jax import checkpoint, cli, guard, method_host, metrics_writer, progress
from mixbct_jax import config as config_lib
from mixbct_jax import step as step_lib
from mixbct_jax.nonfinite import NonFiniteLossError, SkipCounter  # noqa: F401 (NonFiniteLossError: re-exported)

_HELP = """usage: python -m mixbct_jax.train --config CONFIG[:ARG] --workdir DIR [--config.FIELD=VALUE ...]

Trains (or resumes) one run in DIR: checkpoints, config.json, metrics.jsonl and TensorBoard events.

  --config CONFIG[:ARG]   a configs/<name>.py file or a shipped config's name, with the config's argument
                          after ':' (e.g. quickstart:role=new,method=mixbct). Shipped: {configs}.
                          Its arguments, and every field with its meaning:
                          python -m mixbct_jax.config --show CONFIG
  --config.FIELD=VALUE    override any field, e.g. --config.optim.lr=0.05 --config.data.global_batch=256
  --workdir DIR           the run directory; rerunning the same command resumes from its latest checkpoint
  --coordinator HOST:PORT, --num_processes N, --process_id I
                          a multi-process run (or the JAX_* variables, or MIXBCT_DISTRIBUTED=auto)
  --verbose               show the traceback of an error
  --helpfull              every flag, including absl's and JAX's

Examples:
  python -m mixbct_jax.train --config quickstart --workdir runs/old
  python -m mixbct_jax.train --config quickstart:role=new,method=mixbct --workdir runs/new \\
      --config.old.features=runs/old/emb/features.npy --config.old.credible=runs/old/emb/credible.npy"""


def resolve_steps(config, num_examples: int) -> tuple[int, int]:
    """(steps per epoch, total steps): epochs are resolved once here and never written back."""
    spe = num_examples // config.data.global_batch
    if spe == 0:
        raise ValueError(
            f"config.data.global_batch={config.data.global_batch} exceeds the {num_examples} training "
            f"examples; lower the batch or use more data."
        )
    total = config.total_steps if config.total_steps > 0 else int(round(config.optim.num_epochs * spe))
    return spe, total


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, file=sys.stderr, flush=True)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
    """Runs (or resumes) training in ``workdir``; returns the last logged metrics.

    Before anything is built: every config value is validated, the workdir is locked against a second trainer,
    and a resume is refused when the config no longer describes the run in the workdir (mixbct_jax/guard.py).
    """
    config_lib.validate(config)
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    lock = guard.WorkdirLock(workdir, enabled=jax.process_index() == 0)
    lock.acquire(log=_log)
    try:
        changes = guard.check_resume(workdir, config)
        return _train(config, workdir, changes)
    finally:
        lock.release()


def _train(config: ml_collections.ConfigDict, workdir: pathlib.Path, changes: dict) -> dict[str, Any]:
    # Imported here: the input pipeline and the evaluations (Grain, decoders) are not needed by the step.
    from mixbct_jax import evaluate
    from mixbct_jax.data import pipeline, sources

    # ------------------------------------------------------------------------------------- devices, data, step
    mesh = step_lib.make_mesh(config)
    source, subset, num_classes = sources.open_training_data(config)
    steps_per_epoch, total_steps = resolve_steps(config, len(subset))
    ts = step_lib.build(
        config, num_classes=num_classes, steps_per_epoch=steps_per_epoch, total_steps=total_steps, mesh=mesh
    )
    host = method_host.MethodHost(config, ts, subset, workdir)

    # --------------------------------------------------------------------------------------------------- state
    init_key, step_key = jax.random.split(jax.random.key(config.seed))
    mngr = checkpoint.manager(workdir, keep=config.checkpoint.keep, asynchronous=config.checkpoint.asynchronous)

    def data_state(step: int) -> dict[str, Any]:
        return pipeline.run_data_state(config, len(subset), step)

    start_step, state = _restore_or_init(config, workdir, ts, mngr, changes, data_state, init_key)
    if start_step == 0:
        _log(
            f"new run in {workdir}: {len(subset)} examples, {num_classes} classes, {steps_per_epoch} steps/epoch, "
            f"{total_steps} steps, {ts.num_devices} devices ({mesh.devices.flat[0].platform}), method "
            f"{config.bct.method}"
        )
    elif start_step >= total_steps:
        _log(f"{workdir} is finished (step {start_step}/{total_steps}); nothing to train")
    else:
        _log(f"resuming {workdir} at step {start_step}/{total_steps}")

    # ---------------------------------------------------------------------------------------------------- loop
    batches = pipeline.run_train_batches(config, source, subset, start_step)
    writer = metrics_writer.MetricsWriter(
        workdir, start_step=start_step, enabled=jax.process_index() == 0, tensorboard=config.tensorboard
    )
    skips = SkipCounter(start_step, config.max_consecutive_nonfinite, workdir, mngr)
    periodic = evaluate.PeriodicEval(config)
    last: dict[str, Any] = {}
    epoch, consts = -1, None
    t0, n0 = time.time(), start_step

    try:
        for step in range(start_step, total_steps):
            if step // steps_per_epoch != epoch:
                epoch = step // steps_per_epoch
                consts = host.refresh(epoch, state)
            state, metrics = ts.step(state, ts.put_batch(host.batch(next(batches))), step_key, consts)
            skips.update(metrics["finite"])  # on device: no host sync per step
            done = step + 1
            if step == start_step:  # throughput and ETA exclude the compilation of the first step
                jax.block_until_ready(metrics)
                t0, n0 = time.time(), done
            if done % config.log_every_steps == 0 or done == total_steps:
                last = {k: float(v) for k, v in jax.device_get(metrics).items()}
                last.update(skips.check(done))
                rate = (done - n0) / max(time.time() - t0, 1e-9)  # steps/s since the first (compiling) step
                last.update(epoch=done / steps_per_epoch, img_per_s=rate * config.data.global_batch)
                last = writer.write(done, last)
                _log(progress.train_line(done, total_steps, steps_per_epoch, last, rate))
            if done % config.checkpoint.every_steps == 0 or done == total_steps:
                if skips.safe_to_save(done, final=done == total_steps, log=_log):
                    checkpoint.save_run(mngr, done, ts.host_state(state), data_state(done))
            if config.evals.every_steps > 0 and done % config.evals.every_steps == 0 and done < total_steps:
                record = writer.write(done, periodic.evaluate(ts.model_variables(state), done))
                _log(periodic.summary(done, record))
    finally:
        batches.close()  # stops the input worker processes
        mngr.wait_until_finished()
        mngr.close()

    final = evaluate.final_evals(config, workdir)
    if final and start_step < total_steps:  # the headline numbers of the final evaluation, in TensorBoard too
        writer.tensorboard_only(total_steps, evaluate.headlines(final))
    writer.close()
    last.update(final)
    return last


def _restore_or_init(config, workdir, ts, mngr, changes, data_state, init_key) -> tuple[int, Any]:
    """(start step, the state in the step's layout): the latest checkpoint, or a new state at step 0."""
    from mixbct_jax.data import pipeline

    restored = checkpoint.restore_state(mngr, ts.abstract_state(), log=_log)
    if restored is None:
        checkpoint.write_config(workdir, config)
        return 0, ts.to_device(ts.init(init_key))
    start_step, state = restored
    # A resume continues the interrupted run's batches exactly, unless the user allowed a field that changes
    # them (config.resume_allow): then the new order starts from this step on purpose.
    pipeline.check_resume(checkpoint.restore_data(mngr, start_step), data_state(start_step), allowed=changes)
    if changes and jax.process_index() == 0:
        checkpoint.write_config(workdir, config)
        guard.record_resume(workdir, start_step, changes)
        _log(f"resuming with changed {', '.join(changes)} (recorded in {guard.RESUMES_FILE})")
    return start_step, ts.to_device(state)


def main(argv: list[str] | None = None) -> None:
    """Command line (``argv`` without the program name; ``sys.argv[1:]`` by default)."""
    from absl import app, flags
    from ml_collections import config_flags

    argv = config_lib.resolve_argv(list(sys.argv[1:] if argv is None else argv))  # names -> shipped configs
    config_flags.DEFINE_config_file(
        "config",
        None,
        "A configs/<name>.py[:arg] file, or a shipped config's name "
        "(quickstart[:arg]); `python -m mixbct_jax.config --show NAME` lists its "
        "arguments and fields.",
        lock_config=True,
    )
    flags.DEFINE_string("workdir", None, "Run directory (checkpoints, config.json, metrics.jsonl).")
    flags.DEFINE_string("coordinator", None, "host:port of process 0 for a multi-process run.")
    flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
    flags.DEFINE_integer("process_id", None, "This process's rank in a multi-process run.")
    flags.mark_flags_as_required(["config", "workdir"])

    def run(_):
        from absl import logging

        logging.set_verbosity(logging.WARNING)  # Orbax logs every save step at INFO
        step_lib.maybe_initialize_distributed(
            flags.FLAGS.coordinator, flags.FLAGS.num_processes, flags.FLAGS.process_id
        )
        train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)

    if "--helpfull" in argv:  # absl's full listing (every library's flags); it exits 1 by absl's convention
        app.run(run, argv=["mixbct_jax.train", *argv])
        return
    if any(a in ("--help", "--helpshort", "-h", "-help") for a in argv):
        print(_HELP.format(configs=", ".join(config_lib.shipped_configs())))
        return
    cli.parse_absl_flags("mixbct_jax.train", argv)  # one-line errors, unlike app.run
    run(None)


if __name__ == "__main__":
    cli.run(main)
