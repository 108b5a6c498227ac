"""The whole training loop against the jitted step alone, in one run: what input, logging and checkpointing cost.

For each case (a model and a data source) it times, in alternating repetitions:

* **loop**: ``train.train_and_evaluate(config, workdir)`` in a fresh workdir (input pipeline, batch assembly,
  ``device_put``, the step, the skip counter, logging every ``--log-every`` steps to metrics.jsonl and
  TensorBoard, asynchronous Orbax checkpoints every ``--ckpt-every`` steps). Its figure is the trainer's own
  ``img_per_s`` at the last step: the steps after the first (compiling) one over the wall time since it ended.
* **step**: the same config's jitted step on one batch already on the device, ``--steps`` steps back to back
  (the limit the loop is measured against).

Ratio = loop / step (1.0 = the loop costs nothing beyond the step). On a shared CPU the two alternate, so load
from other processes falls on both alike; a persistent compilation cache (a temporary folder) keeps each loop
repetition from recompiling. Because wall-clock rates on a busy machine swing with the other jobs, each side is
also given in images per CPU-second (this process and its input worker processes, from /proc, between the
loop's first and last metrics.jsonl records): the loop's extra work per image, little affected by other load.

  python benchmarks/train_loop.py                      # quickstart model, synthetic + .rec; r18 112x112 likewise
  python benchmarks/train_loop.py --cases quickstart-synthetic --steps 60 --reps 3
  python benchmarks/train_loop.py --r18-batch 64 --steps 200 --reps 3    # a GPU

Cases: quickstart-synthetic, quickstart-rec (the quickstart config: r_tiny width 0.25, 32x32, batch 64, over its
synthetic identities, or those images written to a JPEG ``.rec``), r18-synthetic, r18-rec (r18, 112x112, batch
``--r18-batch``, 10,000 classes). One JSON line per case on stdout (and appended to ``--jsonl``).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from input_pipeline import tree_cpu_seconds  # noqa: E402

from mixbct_jax import config as config_lib  # noqa: E402
from mixbct_jax import train

CASES = ("quickstart-synthetic", "quickstart-rec", "r18-synthetic", "r18-rec")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    p.add_argument("--steps", type=int, default=40, help="timed steps per repetition (the loop runs one more)")
    p.add_argument("--reps", type=int, default=2, help="alternating loop / step repetitions per case")
    p.add_argument("--r18-batch", type=int, default=8)
    p.add_argument("--r18-steps", type=int, default=6, help="--steps for the r18 cases (a CPU step takes seconds)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--ckpt-every", type=int, default=20)
    p.add_argument("--threads", type=int, default=-1, help="config.data.threads (input worker processes; -1 auto)")
    p.add_argument("--rec-images", type=int, default=2048, help="images in the .rec of the r18-rec case")
    p.add_argument("--jsonl", default=None)
    return p.parse_args(argv)


# ---- configs -----------------------------------------------------------------------------------------------------
def _faces_spec(size: int) -> str:
    return f"synthetic:num_classes=96,min_images=16,max_images=32,image_size={size},seed=0"


def _write_rec(spec: str, prefix: str, limit: int | None = None) -> str:
    """The images of a synthetic source written as JPEGs to ``prefix.rec`` (what a real face data set looks like)."""
    from mixbct_jax.data import recordio, sources

    source = sources.open_source(spec)
    n = len(source) if limit is None else min(limit, len(source))
    images = np.concatenate([source.read(np.arange(s, min(n, s + 512))) for s in range(0, n, 512)])
    recordio.write_rec(prefix, images, np.asarray(source.labels[:n]))
    return f"rec:{prefix}"


def make_config(case: str, args, steps: int, tmp: str):
    model, data = case.split("-")
    if model == "quickstart":
        c = config_lib.load("quickstart")
        spec = c.data.source
    else:
        c = config_lib.load("quickstart")  # same data plumbing, r18 at the face size
        spec = _faces_spec(112)
    with c.unlocked():
        if model == "r18":
            c.model.arch, c.model.width, c.model.embedding_size, c.model.input_size = "r18", 1.0, 512, 112
            c.model.num_classes = 10_000
            c.data.global_batch = args.r18_batch
            c.head.scale = 64.0
        if data == "rec":
            prefix = os.path.join(tmp, f"{model}_faces")
            if not os.path.exists(prefix + ".rec"):
                _write_rec(spec, prefix, None if model == "quickstart" else args.rec_images)
            spec = f"rec:{prefix}"
        c.data.source = spec
        c.data.scenario = "full"
        c.data.threads = args.threads
        c.total_steps = steps + 1  # the first step compiles and is not timed by the trainer
        c.log_every_steps = args.log_every
        c.checkpoint.every_steps = args.ckpt_every
        c.checkpoint.asynchronous = True
        c.checkpoint.keep = 2
        c.tensorboard = True
        c.evals.retrieval = ""
        c.evals.bin = ""
    return c


# ---- the step alone ------------------------------------------------------------------------------------------------
def build_step(config):
    """The trainer's step for ``config`` (same model, method, optimizer, mesh) and one device-resident batch.

    Built as ``train._train`` builds it (``step.build``); returns ``run(n)`` that times ``n`` steps.
    """
    from mixbct_jax import step as step_lib
    from mixbct_jax.data import pipeline, sources, splits

    source = sources.open_source(config.data.source)
    subset = splits.scenario(config.data.scenario, source.labels, config.data.split_ratio)[config.data.role]
    num_classes = config.model.num_classes if config.model.num_classes > 0 else subset.num_classes
    steps_per_epoch, total_steps = train.resolve_steps(config, len(subset))
    par = step_lib.build(
        config,
        num_classes=num_classes,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        mesh=step_lib.make_mesh(config),
    )
    init_key, step_key = jax.random.split(jax.random.key(config.seed))
    state = par.to_device(par.init(init_key))
    batches = pipeline.train_batches(
        source, subset, global_batch=config.data.global_batch, seed=config.seed, flip=config.data.flip, threads=0
    )
    host = next(batches)
    batches.close()
    batch = jax.block_until_ready(par.put_batch({k: host[k] for k in ("image", "label", "index")}))
    consts = par.consts_to_device({})
    box = {"state": state}

    def run(n: int) -> tuple[float, float]:
        """(wall seconds, CPU seconds) of n steps."""
        jax.block_until_ready(box["state"])
        t0, c0 = time.perf_counter(), tree_cpu_seconds()
        for _ in range(n):
            box["state"], metrics = par.step(box["state"], batch, step_key, consts)
        jax.block_until_ready((box["state"], metrics))
        return time.perf_counter() - t0, tree_cpu_seconds() - c0

    run(2)  # compiles
    return run


# ---- the loop --------------------------------------------------------------------------------------------------
class _CpuSampler:
    """(wall time, CPU seconds of this process tree) every ``period`` s, in a thread, while the loop runs."""

    def __init__(self, period: float = 1.0):
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True)

    def _run(self, period: float) -> None:
        own = 0.0  # this thread's own CPU (scanning /proc is not free): left out of the loop's figure
        while not self._stop.is_set():
            t0 = time.thread_time()
            cpu = tree_cpu_seconds()
            own += time.thread_time() - t0
            self.samples.append((time.time(), cpu - own))
            self._stop.wait(period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def cpu_at(self, t: float) -> float:
        times, cpus = zip(*self.samples)
        return float(np.interp(t, times, cpus))


def run_loop(config, tmp: str, rep: int) -> tuple[float, float, float | None]:
    """Throughput of the trainer over the steps after the first (compiling) one.

    Returns (img/s, img per CPU-second, img per CPU-second after the first epoch or None). After one epoch an
    in-memory source serves every image from memory.
    """
    workdir = tempfile.mkdtemp(prefix=f"loop{rep}_", dir=tmp)
    with _CpuSampler() as sampler:
        last = train.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [r for r in map(json.loads, f) if "loss" in r]
    first, final = records[0], records[-1]  # CPU per image between two log records (no compile, no setup)
    cpu = sampler.cpu_at(final["time"]) - sampler.cpu_at(first["time"])
    images = (final["step"] - first["step"]) * config.data.global_batch
    later = [r for r in records if r["epoch"] >= 1.0]
    per_cpu_later = None
    if len(later) > 1:
        cpu_later = sampler.cpu_at(final["time"]) - sampler.cpu_at(later[0]["time"])
        per_cpu_later = (final["step"] - later[0]["step"]) * config.data.global_batch / max(cpu_later, 1e-9)
    return float(last["img_per_s"]), images / max(cpu, 1e-9), per_cpu_later


def run_case(case: str, args, tmp: str) -> dict:
    steps = args.r18_steps if case.startswith("r18") else args.steps
    config = make_config(case, args, steps, tmp)
    batch = config.data.global_batch
    t0 = time.perf_counter()
    step = build_step(config)
    compile_s = time.perf_counter() - t0
    loop_rates, step_rates, loop_cpu, loop_cpu_later, step_cpu, loads = [], [], [], [], [], []
    for rep in range(args.reps):
        loads.append(os.getloadavg()[0])
        # alternate which goes first, so a load change during a repetition does not always favour one side
        order = ("loop", "step") if rep % 2 == 0 else ("step", "loop")
        for what in order:
            if what == "loop":
                rate, per_cpu, per_cpu_later = run_loop(config, tmp, rep)
                loop_rates.append(rate)
                loop_cpu.append(per_cpu)
                if per_cpu_later is not None:
                    loop_cpu_later.append(per_cpu_later)
            else:
                wall, cpu = step(steps)
                step_rates.append(steps * batch / wall)
                step_cpu.append(steps * batch / max(cpu, 1e-9))
        print(
            f"  {case} rep {rep}: loop {loop_rates[-1]:.1f} img/s ({loop_cpu[-1]:.1f} img/CPU-s), step "
            f"{step_rates[-1]:.1f} img/s ({step_cpu[-1]:.1f} img/CPU-s) (load {loads[-1]:.1f})",
            file=sys.stderr,
            flush=True,
        )
    loop, alone = statistics.median(loop_rates), statistics.median(step_rates)
    ratios = [a / b for a, b in zip(loop_rates, step_rates)]
    return dict(
        case=case,
        arch=config.model.arch,
        input_size=config.model.input_size,
        batch=batch,
        steps=steps,
        reps=args.reps,
        source=config.data.source.split(":")[0],
        threads=config.data.threads,
        log_every=config.log_every_steps,
        ckpt_every=config.checkpoint.every_steps,
        loop_img_s=round(loop, 2),
        step_img_s=round(alone, 2),
        ratio=round(loop / alone, 3),
        ratio_per_rep=[round(r, 3) for r in ratios],
        loop_img_s_all=[round(r, 2) for r in loop_rates],
        step_img_s_all=[round(r, 2) for r in step_rates],
        load_avg=[round(x, 1) for x in loads],
        loop_img_cpu_s=round(statistics.median(loop_cpu), 2),
        step_img_cpu_s=round(statistics.median(step_cpu), 2),
        ratio_cpu=round(statistics.median(loop_cpu) / statistics.median(step_cpu), 3),
        ratio_cpu_after_epoch1=(
            round(statistics.median(loop_cpu_later) / statistics.median(step_cpu), 3) if loop_cpu_later else None
        ),
        step_build_s=round(compile_s, 1),
        platform=jax.devices()[0].platform,
        jax=jax.__version__,
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="train_loop_") as tmp:
        jax.config.update("jax_compilation_cache_dir", os.path.join(tmp, "jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        for case in args.cases:
            r = run_case(case, args, tmp)
            line = json.dumps(r)
            print(line, flush=True)
            if args.jsonl:
                with open(args.jsonl, "a") as f:
                    f.write(line + "\n")
            print(
                f"{case}: loop {r['loop_img_s']} img/s vs step alone {r['step_img_s']} img/s = {r['ratio']:.3f} "
                f"(per rep {r['ratio_per_rep']}, load {r['load_avg']}); per CPU-second {r['loop_img_cpu_s']} vs "
                f"{r['step_img_cpu_s']} = {r['ratio_cpu']:.3f}",
                file=sys.stderr,
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
