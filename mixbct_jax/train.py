"""Trains an old model, or a new model with a backward-compatible method, and checkpoints it with Orbax.

  python -m mixbct_jax.train --config configs/quickstart.py --workdir runs/old
  python -m mixbct_jax.train --config configs/quickstart.py:role=new,method=mixbct --workdir runs/new \
      --config.old.features=runs/old/emb/features.npy --config.old.credible=runs/old/emb/credible.npy

Rerunning the same command resumes from the latest checkpoint with the same data order and RNG stream. The file
reads top to bottom in phases: setup, data, model and method, state, input, loop.
"""

from __future__ import annotations

import os
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from mixbct_jax import bct, checkpoint, cli, config as config_lib, guard, metrics_writer, models, optim
from mixbct_jax import step as step_lib


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


class NonFiniteLossError(cli.UserError, RuntimeError):
    """Raised after ``config.max_consecutive_nonfinite`` skipped steps; the last good checkpoint is kept."""


def maybe_initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                                 process_id: int | None = None) -> None:
    """Joins a multi-process run when a coordinator is given (flags or JAX_COORDINATOR_ADDRESS etc.).

    On Cloud TPU pods and SLURM, ``MIXBCT_DISTRIBUTED=auto`` calls ``jax.distributed.initialize()`` with no
    arguments and lets JAX detect the cluster.
    """
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if coordinator:
        num_processes = num_processes if num_processes is not None else int(os.environ["JAX_NUM_PROCESSES"])
        process_id = process_id if process_id is not None else int(os.environ["JAX_PROCESS_ID"])
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    elif os.environ.get("MIXBCT_DISTRIBUTED") == "auto":
        jax.distributed.initialize()


def resolve_steps(config, num_examples: int) -> tuple[int, int]:
    """(steps per epoch, total steps): epochs are resolved once here and never written back."""
    spe = num_examples // config.data.global_batch
    if spe == 0:
        raise ValueError(f"config.data.global_batch={config.data.global_batch} exceeds the {num_examples} training "
                         f"examples; lower the batch or use more data.")
    total = config.total_steps if config.total_steps > 0 else int(round(config.optim.num_epochs * spe))
    return spe, total


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, file=sys.stderr, flush=True)


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


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
    # Imported here: the input pipeline (Grain, decoders) is not needed by the step and the tests of pure maths.
    from mixbct_jax.data import old_embeddings, pipeline, sources, splits


    # ---------------------------------------------------------------------------------------------------- mesh
    devices = jax.devices()
    if config.num_devices > 0:
        if jax.process_count() > 1 or config.num_devices > len(devices):
            raise ValueError(f"config.num_devices={config.num_devices}: choose at most {len(devices)} devices, and "
                             f"only in a single-process run")
        devices = devices[:config.num_devices]
    mesh = Mesh(np.array(devices), (step_lib.AXIS,))
    if config.data.global_batch % len(devices):
        raise ValueError(f"config.data.global_batch={config.data.global_batch} must be divisible by the "
                         f"{len(devices)} devices")

    # ---------------------------------------------------------------------------------------------------- data
    source = sources.open_source(config.data.source)
    subset = splits.scenario(config.data.scenario, source.labels, config.data.split_ratio)[config.data.role]
    num_classes = config.model.num_classes if config.model.num_classes > 0 else subset.num_classes
    steps_per_epoch, total_steps = resolve_steps(config, len(subset))
    if tuple(source.image_shape[:2]) != (config.model.input_size,) * 2:
        raise ValueError(f"config.data.source={config.data.source!r} has {source.image_shape[:2]} images but "
                         f"config.model.input_size={config.model.input_size}; make them agree.")

    # ------------------------------------------------------------------------------------------ model, method
    model = models.build_from_config(config.model)
    method = bct.get(config.bct.method)
    needs = tuple(getattr(method, "NEEDS", ()))
    const_names = tuple(getattr(method, "CONSTS", ()))
    old = None
    if needs or const_names:
        if not config.old.features:
            raise ValueError(
                f"config.bct.method={config.bct.method!r} needs the old model's embeddings of this run's training "
                f"set: set --config.old.features=<dir>/features.npy, written by `python -m mixbct_jax.extract "
                f"--workdir <old run> --scenario {config.data.scenario} --role {config.data.role} --out <dir>`.")
        old = old_embeddings.open_old_embeddings(
            features=config.old.features, credible=config.old.credible or None, labels=config.old.labels or None,
            prototypes=config.old.prototypes or None, advbct_meta=config.old.advbct_meta or None)
        old_embeddings.validate(old, num_examples=len(subset), source_labels=subset.labels,
                                # every method compares or mixes old and new embeddings: the sizes must agree
                                embedding_size=config.model.embedding_size,
                                num_classes=num_classes,
                                # every row by default (streamed): a NaN row outside a sample poisons training
                                check_all_rows=config.old.finite_check == "full")
        if "credible" in needs and old.credible is None:
            raise ValueError(f"config.bct.method={config.bct.method!r} needs config.old.credible (python -m "
                             f"mixbct_jax.prepare denoise ...)")
    schedule = optim.make_schedule(config.optim, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
    tx = optim.make_optimizer(config.optim, schedule)

    # --------------------------------------------------------------------------------------------------- state
    key = jax.random.key(config.seed)
    init_key, step_key = jax.random.split(key)

    def init():
        return step_lib.init_state(config, model, method, tx, key=init_key, num_classes=num_classes,
                                   num_shards=len(devices))

    abstract = jax.eval_shape(init)
    consts = _load_consts(const_names, old, abstract, config)
    body = step_lib.make_body(config, model, method, tx, schedule, num_classes=num_classes,
                              global_batch=config.data.global_batch, steps_per_epoch=steps_per_epoch,
                              total_steps=total_steps)
    par = step_lib.parallelize(body, abstract, mesh=mesh, mode=config.parallel, consts=consts)
    shardings = par.state_shardings()
    mngr = checkpoint.manager(workdir, keep=config.checkpoint.keep, asynchronous=config.checkpoint.asynchronous)

    def data_state(step: int) -> dict[str, Any]:
        return pipeline.data_state(
            step=step, seed=config.seed, global_batch=config.data.global_batch, num_examples=len(subset),
            flip=config.data.flip, process_count=jax.process_count(), source=config.data.source,
            subset=f"{config.data.scenario}/{config.data.role}/{config.data.split_ratio}")

    restored = checkpoint.restore_state(
        mngr, jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings),
        log=_log)
    if restored is None:
        state = jax.jit(init, out_shardings=shardings)()
        start_step = 0
        checkpoint.write_config(workdir, config)
        _log(f"new run in {workdir}: {len(subset)} examples, {num_classes} classes, {steps_per_epoch} steps/epoch, "
             f"{total_steps} steps, {len(devices)} devices ({devices[0].platform}), method {config.bct.method}")
    else:
        start_step, state = restored
        # A resume continues the interrupted run's batches exactly, unless the user allowed a field that changes
        # them (config.resume_allow): then the new order starts from this step on purpose.
        pipeline.check_resume(checkpoint.restore_data(mngr, start_step), data_state(start_step), allowed=changes)
        if changes and jax.process_index() == 0:
            checkpoint.write_config(workdir, config)
            guard.record_resume(workdir, start_step, changes)
            _log(f"resuming with changed {', '.join(changes)} (recorded in {guard.RESUMES_FILE})")
        if start_step >= total_steps:
            _log(f"{workdir} is finished (step {start_step}/{total_steps}); nothing to train")
        else:
            _log(f"resuming {workdir} at step {start_step}/{total_steps}")
    state = par.to_device(state)

    # --------------------------------------------------------------------------------------------------- input
    batches = pipeline.train_batches(
        source, subset, global_batch=config.data.global_batch, seed=config.seed, start_step=start_step,
        flip=config.data.flip, process_index=jax.process_index(), process_count=jax.process_count(),
        threads=None if config.data.threads < 0 else config.data.threads)

    def device_batch(host: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        arrays = {"image": host["image"], "label": host["label"], "index": host["index"]}
        if old is not None and needs:
            arrays.update(old_embeddings.batch_arrays(old, needs, host["index"], host["label"]))
        return par.put_batch(arrays)

    # ---------------------------------------------------------------------------------------------------- loop
    periodic = _PeriodicEval(config)
    writer = metrics_writer.MetricsWriter(workdir, start_step=start_step, enabled=jax.process_index() == 0,
                                          tensorboard=config.tensorboard)
    skips = _SkipCounter(start_step, config.max_consecutive_nonfinite, workdir, mngr)
    last: dict[str, Any] = {}
    device_consts = par.consts_to_device(consts)
    epoch = -1
    t0, n0 = time.time(), start_step

    def save(step: int) -> None:
        host_state = par.from_device(state) if config.parallel == "pmap" else state
        checkpoint.save(mngr, step, state=host_state,
                        model=checkpoint.model_variables(host_state["params"]["backbone"], host_state["batch_stats"]),
                        data=data_state(step))

    try:
        for step in range(start_step, total_steps):
            if step // steps_per_epoch != epoch:
                epoch = step // steps_per_epoch
                device_consts = _host_update(method, epoch, config, workdir, consts, old, subset, par, state,
                                             device_consts)
            state, metrics = par.step(state, device_batch(next(batches)), step_key, device_consts)
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
                speed = f"{last['img_per_s']:.0f} img/s ETA {_format_eta((total_steps - done) / rate)}" if rate else ""
                _log(f"step {done}/{total_steps} ep {done / steps_per_epoch:.2f} loss {last['loss']:.4f} "
                     f"lr {last['lr']:.5f} {speed}")
            if done % config.checkpoint.every_steps == 0 or done == total_steps:
                if skips.safe_to_save(done, final=done == total_steps, log=_log):
                    save(done)
            if config.evals.every_steps > 0 and done % config.evals.every_steps == 0 and done < total_steps:
                record = writer.write(done, periodic.evaluate(par.model_variables(state), done))
                _log(f"step {done} eval: " + " ".join(f"{k.split('/', 1)[1]} {v:.4f}" for k, v in record.items()
                                                      if k.endswith(("top1", "mAP", "accuracy"))))
    finally:
        batches.close()  # stops the input worker processes
        mngr.wait_until_finished()
        mngr.close()

    final = _final_evals(config, workdir)
    if final and start_step < total_steps:  # the headline numbers of the final evaluation, in TensorBoard too
        from mixbct_jax.evaluation import report

        writer.tensorboard_only(total_steps, {"final": {
            report.short_name(name): {row: report.headline(p["protocol"], m)[0] for row, m in p["rows"].items()}
            for name, p in final["evals"].items()}})
    writer.close()
    last.update(final)
    return last


@jax.jit
def _count_skips(counts: dict[str, jax.Array], finite: jax.Array) -> dict[str, jax.Array]:
    bad = jnp.asarray(finite).reshape(-1)[0] < 1  # pmap metrics carry a device axis
    steps = counts["steps"] + 1
    return {"steps": steps, "skipped": counts["skipped"] + bad.astype(jnp.int32),
            "consecutive": jnp.where(bad, counts["consecutive"] + 1, 0),
            "last_finite": jnp.where(bad, counts["last_finite"], steps)}


class _SkipCounter:
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
        kept = (f"the last good checkpoint (step {latest}) is kept in {self.workdir}/checkpoints" if latest is not None
                else "no checkpoint was written, a rerun starts from step 0")
        return NonFiniteLossError(
            f"step {done}: {c['consecutive']} consecutive steps had a non-finite loss or gradients and were skipped "
            f"({c['skipped']} in this process); the last finite step was {c['last_finite']}; {what}; {kept}. Lower "
            f"config.optim.lr or check the input data, then rerun (add --config.resume_allow=optim.lr to keep the "
            f"checkpoint).")

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


def _load_consts(names: tuple[str, ...], old, abstract, config) -> dict[str, np.ndarray]:
    """Frozen per-class tables (prototypes) padded to the centres' row count."""
    consts = {}
    rows = abstract["params"]["head"]["centres"].shape[0] if step_lib.is_margin_head(config) else None
    for name in names:
        table = np.asarray(getattr(old, name), np.float32)
        if rows is not None:
            table = np.concatenate([table, np.zeros((rows - table.shape[0],) + table.shape[1:], np.float32)])
        consts[name] = table
    return consts


def _host_update(method, epoch, config, workdir, consts, old, subset, par, state, device_consts):
    """Lets a method replace its consts at an epoch boundary (UniBCT's refinement)."""
    update = getattr(method, "host_update", None)
    if update is None:
        return device_consts

    cache = {}

    def embed_new(indices: np.ndarray) -> np.ndarray:
        """Embeds training examples with the current new model (built once per update)."""
        from mixbct_jax import embed
        from mixbct_jax.data import sources
        if not cache:
            cache["embedder"] = embed.make_embedder(config, par.model_variables(state))
            cache["source"] = sources.open_source(config.data.source)
        images = cache["source"].read(subset.indices[indices])
        return cache["embedder"](embed.normalize_images(images))

    new = update(epoch, config=config, workdir=workdir, consts=consts, embed_new=embed_new, old=old, subset=subset)
    if new is None:
        return device_consts
    consts.update(new)
    return par.consts_to_device(consts)


class _PeriodicEval:
    """Retrieval and ``.bin`` verification of the model being trained every ``evals.every_steps``, self and
    against the old model's gallery when ``config.old.workdir`` is set.

    Uses the same code as ``python -m mixbct_jax.evaluate``; the numbers go to metrics.jsonl as
    ``eval/<query>/<gallery>/<metric>`` and ``eval/<bin name>/<query>/<gallery>/accuracy``.
    """

    def __init__(self, config):
        self.config = config
        self.old_embedder = None
        self.bins: dict[str, tuple] = {}

    def evaluate(self, variables, step: int) -> dict[str, Any]:
        from mixbct_jax import embed
        from mixbct_jax.data import sources
        from mixbct_jax.evaluation import retrieval, verification

        c = self.config
        embedders = {"new": embed.make_embedder(c, variables, batch_size=c.evals.batch_size)}
        rows = [("new", "new")]
        if c.old.workdir:
            if self.old_embedder is None:
                self.old_embedder = embed.load_embedder(c.old.workdir, batch_size=c.evals.batch_size)
            embedders["old"] = self.old_embedder
            rows.append(("new", "old"))
        record: dict[str, Any] = {"step": step}
        if c.evals.retrieval:
            results = retrieval.evaluate_retrieval(sources.open_source(c.evals.retrieval), embedders, rows,
                                                   batch_size=c.evals.batch_size)
            for row, metrics in results.items():
                record.update({f"eval/{row}/{k}": float(metrics[k]) for k in ("top1", "top5", "mAP")})
        for path in filter(None, c.evals.bin.split(",")):
            if path not in self.bins:  # decode each pair set once per run
                self.bins[path] = verification.load_bin(path, image_size=c.model.input_size)
            images, issame = self.bins[path]
            name = pathlib.Path(path).stem
            for row, metrics in verification.evaluate_bin(images, issame, embedders, rows).items():
                record[f"eval/{name}/{row}/accuracy"] = float(metrics["accuracy"])
        return record


def _final_evals(config, workdir) -> dict[str, Any]:
    """Retrieval (and .bin) evaluation of the finished model through the evaluation package."""
    protocols = [("retrieval", config.evals.retrieval)] if config.evals.retrieval else []
    protocols += [("bin", b) for b in filter(None, config.evals.bin.split(","))]
    if not protocols or jax.process_index() != 0:
        return {}
    from mixbct_jax import evaluate
    results = evaluate.evaluate(workdir, config.old.workdir or None, protocols, out_dir=pathlib.Path(workdir) / "eval",
                                batch_size=config.evals.batch_size)
    return {"evals": results["protocols"]}


def main(argv: list[str] | None = None) -> None:
    """Command line (``argv`` without the program name; ``sys.argv[1:]`` by default)."""
    from absl import app, flags
    from ml_collections import config_flags

    from mixbct_jax import config as config_lib

    argv = config_lib.resolve_argv(list(sys.argv[1:] if argv is None else argv))  # names -> shipped configs
    config_flags.DEFINE_config_file("config", None, "A configs/<name>.py[:arg] file, or a shipped config's name "
                                    "(quickstart[:arg]); `python -m mixbct_jax.config --show NAME` lists its "
                                    "arguments and fields.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Run directory (checkpoints, config.json, metrics.jsonl).")
    flags.DEFINE_string("coordinator", None, "host:port of process 0 for a multi-process run.")
    flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
    flags.DEFINE_integer("process_id", None, "This process's rank in a multi-process run.")
    flags.mark_flags_as_required(["config", "workdir"])

    def run(_):
        from absl import logging
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save step at INFO
        maybe_initialize_distributed(flags.FLAGS.coordinator, flags.FLAGS.num_processes, flags.FLAGS.process_id)
        train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)

    if "--helpfull" in argv:  # absl's full listing (every library's flags); it exits 1 by absl's convention
        app.run(run, argv=["mixbct_jax.train", *argv])
        return
    if any(a in ("--help", "--helpshort", "-h", "-help") for a in argv):
        print(_HELP.format(configs=", ".join(config_lib.shipped_configs())))
        return
    # Parsed here rather than by app.run, which prints a bad value or an unknown field as a multi-line report.
    try:
        flags.FLAGS(["mixbct_jax.train", *argv])
    except flags.Error as e:
        lines = [s.strip() for s in str(e).splitlines() if s.strip()]
        raise cli.UserError(lines[-1] if len(lines) > 1 else str(e)) from None
    except AttributeError as e:  # ml_collections: an override of a field that does not exist
        import re
        key = (re.findall(r"\w+", str(e)) or ["?"])[0]
        flag = next((x.split("=", 1)[0] for x in argv if x.startswith("--config.") and
                     x.split("=", 1)[0].endswith(f".{key}")), f"--config...{key}")
        hint = re.search(r'Did you mean "[^"]+"', str(e))
        raise cli.UserError(f"{flag}: {key!r} is not a config field" + (f"; {hint.group(0)}?" if hint else "") +
                            " (the fields are listed in mixbct_jax/config.py)") from None
    run(None)


if __name__ == "__main__":
    cli.run(main)
