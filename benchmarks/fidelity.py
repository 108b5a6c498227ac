"""Fidelity study: does MixBCT do what the paper claims, in runs this machine can make?

Described in docs/fidelity.md.

  python benchmarks/fidelity.py run    --out runs/fidelity [--scale cpu|cpu-long|gpu] [--tracks a,b] [--only PATTERN]
  python benchmarks/fidelity.py report --out runs/fidelity [--publish benchmarks/results]
  python benchmarks/fidelity.py plan   --out runs/fidelity          # the stage list, nothing run

The study follows the paper's axes at toy scale, on real images (Omniglot) and on the synthetic identities:

* old-model quality: an ArcFace old model, and a weak softmax old model trained for a fifth of the steps (the
  paper's r18-softmax-f128 against r18-arcface-f512; a D/4 softmax model was tried first, see ``grid``);
* capacity gap: the new model is deeper than the old one (the paper's r50 over r18); the old model trains on
  the old side of the open-class split (the first 30% of the training classes), the new model on all of them;
* methods: none (the unconstrained upper bound), mixbct, l2, weakened_l2, bct, unibct, nccl, advbct, all with
  the same steps, learning rate and schedule (each method keeps its reference preset, as in compat_table.py);
* MixBCT's knobs: the mix ratio alpha and the denoising (credible mask on/off);
* seeds: the main rows (none, mixbct, l2) run with several seeds of the new model (init and data order); the
  old model of a track is one fixed run.

Every stage is a folder that is skipped when complete (a killed run resumes from its last checkpoint): the old
model per track, its embeddings of the new training set, the denoise masks, class means and AdvBCT meta, each
new-model run and each evaluation. A "track" is (data, old model, new model); a new track that reuses an old
model (say a ViT new model over the IResNet old model: ``new=dict(arch="vit_t", ...)``) is one more entry of
``tracks()`` and runs only its own new-model stages.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import os
import pathlib
import shutil
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's mixbct_jax, also in the worker processes
OMNIGLOT = ROOT.parent / "shared" / "data" / "omniglot" / "omniglot_small_28.npz"
METHODS = ("none", "mixbct", "l2", "weakened_l2", "bct", "unibct", "nccl", "advbct")
KEEP = 0.9  # denoise: fraction of each class kept (reference default); at 20 images per class it drops 2


@dataclasses.dataclass(frozen=True)
class OldModel:
    """One old model: trained once, shared by every track that names it."""

    name: str
    data: str  # key of datasets()
    model: dict  # config.model overrides
    head: str  # arcface | softmax
    steps: int


@dataclasses.dataclass(frozen=True)
class Track:
    """One (data, old model, new model) setting; its runs are every method x seed plus MixBCT's knob runs."""

    name: str
    old: str  # OldModel.name
    new_model: dict  # config.model overrides; embedding_size must equal the old model's
    steps: int
    seeds: tuple[int, ...]  # seeds of the main rows
    main: tuple[str, ...]  # methods run with every seed
    side: tuple[str, ...]  # methods run with the first seed only
    alphas: tuple[float, ...]  # MixBCT mix ratios besides the preset 0.3 (first seed)
    denoise_off: bool  # one MixBCT run with an all-true credible mask (first seed)
    # A track whose new model and data equal another's: its "none" runs (which never see the old model) are that
    # track's runs, only evaluated against this track's old model.
    none_from: str = ""
    # Order among tracks when time is short (lower first): added to every run's priority, except that the first
    # seed's main rows (priority 0) of the tracks with priority < 1 come first.
    priority: float = 0.0


@dataclasses.dataclass(frozen=True)
class Run:
    track: str
    method: str
    seed: int
    alpha: float = 0.3
    denoise: bool = True

    @property
    def name(self) -> str:
        knobs = ("" if self.alpha == 0.3 else f"_a{self.alpha:g}") + ("" if self.denoise else "_nodenoise")
        return f"{self.method}{knobs}_s{self.seed}"


def datasets(data: pathlib.Path) -> dict[str, dict[str, str]]:
    """Training and held-out retrieval source of each data set (open classes: neither model sees the held-out)."""
    synth = "synthetic:num_classes={n},min_images=8,max_images=16,image_size=32,seed={seed}"
    return {
        "omniglot": {
            "train": f"npz:{data},size=32,classes=0:194",  # 194 classes x 20 images
            "held_out": f"npz:{data},size=32,classes=194:242",
        },  # 48 classes, 960 images
        # Harder than the demo's 64 identities: 256 identities with 8-16 images each.
        "synthetic": {"train": synth.format(n=256, seed=0), "held_out": synth.format(n=64, seed=1)},
    }


def grid(scale: str) -> tuple[dict[str, OldModel], dict[str, Track]]:
    """The old models and tracks of a scale.

    ``cpu`` (the default, ~1 h on 2 idle cores): every method and MixBCT's knobs at 10 epochs. ``cpu-long`` (~2 h):
    the convergence grid, the main rows at 30 epochs (three seeds) and 60 epochs; same
    old models and stage folders, so both can share one ``--out``. ``gpu``: every track, wider and longer.
    """
    if scale in ("cpu", "cpu-long"):
        # Old: one block per stage; new: two (r18's depth) at the same width, ~2x the FLOPs (r50/r18: ~2.4x).
        old_w, new_w, arch_new, d_full, steps_old, steps_new, batch_seeds = 0.125, 0.125, "r18", 64, 400, 600, 3
        alphas, side = (0.1, 0.5), ("bct", "unibct", "advbct", "nccl", "weakened_l2")
    elif scale == "gpu":  # wider, deeper new model, longer runs, more seeds; every method with every seed
        old_w, new_w, arch_new, d_full, steps_old, steps_new, batch_seeds = 0.25, 0.5, "r18", 128, 3000, 6000, 5
        alphas, side = (0.1, 0.5), ()
    elif scale == "smoke":  # a few steps of everything: checks that every stage runs, numbers meaningless
        old_w, new_w, arch_new, d_full, steps_old, steps_new, batch_seeds = 0.125, 0.125, "r18", 64, 10, 12, 1
        alphas, side = (0.1,), ("weakened_l2", "bct", "unibct", "nccl", "advbct")
    else:
        raise ValueError(f"--scale {scale!r}: choose cpu, cpu-long, gpu or smoke")
    main = ("none", "mixbct", "l2") if side else METHODS
    olds = {
        "omniglot_arcface": OldModel(
            "omniglot_arcface",
            "omniglot",
            dict(arch="r_tiny", width=old_w, embedding_size=d_full),
            "arcface",
            steps_old,
        ),
        # The weak old model: softmax head, trained for a fifth of the steps. (A low D was tried first: at D=16 the
        # ArcFace new model did not train within the CPU budget - new/new mAP 0.185 against the old model's 0.296 -
        # so the weak old model keeps D and is weak through its head and its training length.)
        "omniglot_softmax": OldModel(
            "omniglot_softmax_short",
            "omniglot",
            dict(arch="r_tiny", width=old_w, embedding_size=d_full),
            "softmax",
            steps_old // 5,
        ),
        "synthetic_arcface": OldModel(
            "synthetic_arcface",
            "synthetic",
            dict(arch="r_tiny", width=old_w, embedding_size=d_full),
            "arcface",
            steps_old,
        ),
    }
    seeds = tuple(range(batch_seeds))
    tracks = {
        "omniglot_arcface": Track(
            "omniglot_arcface",
            "omniglot_arcface",
            dict(arch=arch_new, width=new_w, embedding_size=d_full),
            steps_new,
            seeds,
            main,
            side,
            alphas,
            True,
        ),
        "omniglot_softmax": Track(
            "omniglot_softmax",
            "omniglot_softmax",
            dict(arch=arch_new, width=new_w, embedding_size=d_full),
            steps_new,
            seeds,
            main,
            side,
            alphas,
            True,
            none_from="omniglot_arcface",
            priority=0.5,
        ),
        # Convergence: the main rows at three times the steps, every seed, over both old models.
        "omniglot_arcface_long": Track(
            "omniglot_arcface_long",
            "omniglot_arcface",
            dict(arch=arch_new, width=new_w, embedding_size=d_full),
            3 * steps_new,
            seeds,
            main[:3],
            (),
            (),
            False,
            priority=0.6,
        ),
        "omniglot_softmax_long": Track(
            "omniglot_softmax_long",
            "omniglot_softmax",
            dict(arch=arch_new, width=new_w, embedding_size=d_full),
            3 * steps_new,
            seeds,
            main[:3],
            (),
            (),
            False,
            none_from="omniglot_arcface_long",
            priority=0.7,
        ),
        # Until the unconstrained loss is flat: the main rows at six times the steps (first seed).
        "omniglot_arcface_xlong": Track(
            "omniglot_arcface_xlong",
            "omniglot_arcface",
            dict(arch=arch_new, width=new_w, embedding_size=d_full),
            6 * steps_new,
            seeds[:1],
            main[:3],
            (),
            (),
            False,
            priority=1.75,
        ),
        # The synthetic identities: the main rows only (the second data set checks the direction, not the grid).
        "synthetic_arcface": Track(
            "synthetic_arcface",
            "synthetic_arcface",
            dict(arch=arch_new, width=new_w, embedding_size=d_full),
            steps_new,
            seeds[:1] if side else seeds,
            main,
            (),
            (),
            False,
            priority=1.8,
        ),
        # Cross-architecture: a ViT new model (2 blocks of width 64, 4x4 patches: 64 tokens at 32 px) over the
        # ArcFace IResNet old model, the case of a CNN gallery and a transformer query model (first seed).
        "omniglot_vit": Track(
            "omniglot_vit",
            "omniglot_arcface",
            dict(arch="vit_tiny", embedding_size=d_full),
            steps_new,
            seeds[:1],
            main[:3],
            (),
            (),
            False,
            priority=0.8,
        ),
    }
    long_tracks = ("omniglot_arcface_long", "omniglot_softmax_long", "omniglot_arcface_xlong")
    if scale == "cpu":
        tracks = {k: v for k, v in tracks.items() if k not in long_tracks}
    elif scale == "cpu-long":
        tracks = {k: v for k, v in tracks.items() if k in long_tracks}
    return olds, tracks


def runs_of(track: Track) -> list[tuple[int, Run]]:
    """The runs of ``track`` as (priority, run), most important first.

    Main methods at the first seed (0), at the second (1), later seeds (1.5 and on), side methods (2), knobs (3);
    so when time is short every track gets its second seed before any gets its third.
    """
    first = track.seeds[0]
    out = [
        (0 if i == 0 else 0.5 + 0.5 * i, Run(track.name, m, s)) for i, s in enumerate(track.seeds) for m in track.main
    ]
    out += [(2, Run(track.name, m, first)) for m in track.side]
    out += [(3, Run(track.name, "mixbct", first, alpha=a)) for a in track.alphas]
    if track.denoise_off:
        out.append((3, Run(track.name, "mixbct", first, denoise=False)))
    return out


# ------------------------------------------------------------------------------------------------ configs
BATCH = 64


def base_config(source: str, *, role: str, model: dict, head: str, steps: int, seed: int):
    from mixbct_jax import config as config_lib

    c = config_lib.default_config()
    c.seed = seed
    c.num_devices = 1  # one device: the study's numbers do not depend on the device count
    c.model.update(input_size=32, **model)
    c.data.update(source=source, scenario="exclass", role=role, global_batch=BATCH)
    c.head.type = head
    c.head.scale = 32.0  # s=64 with a few hundred classes saturates at toy scale (compat_table.py uses 32 too)
    c.total_steps = steps
    c.log_every_steps = 25
    c.checkpoint.every_steps = max(100, steps // 4)
    c.checkpoint.keep = 1
    return c


def new_config(track: Track, run: Run, source: str, num_examples: int, arrays: dict[str, str]):
    from mixbct_jax import config as config_lib

    c = base_config(source, role="new", model=track.new_model, head="arcface", steps=track.steps, seed=run.seed)
    config_lib.apply_method(c, run.method)
    c.bct.mix_ratio = run.alpha
    spe = num_examples // BATCH
    if run.method == "unibct":  # the reference's epochs 10/20 of 35 and StepLR 20/26/32 of 35, scaled to this run
        epochs = max(3, track.steps // spe)
        c.bct.unibct_start_epoch = max(1, round(epochs * 10 / 35))
        c.bct.unibct_refine_epochs = (max(1, round(epochs * 10 / 35)), max(2, round(epochs * 20 / 35)))
        c.optim.decay_epochs = tuple(max(1, round(epochs * f / 35)) for f in (20, 26, 32))
    if run.method == "nccl":
        c.bct.nccl_queue_size = 1024
    if run.method != "none":
        for key in ("features", "labels", "prototypes", "advbct_meta"):
            c.old[key] = arrays[key]
        c.old.credible = arrays["credible" if run.denoise else "credible_all"]
    return c.lock()


# ------------------------------------------------------------------------------------------------ stages
class Clock:
    """Progress with an ETA over the study's remaining training steps (the dominant cost)."""

    def __init__(self, total_steps: int):
        self.total, self.done, self.t0, self.trained = total_steps, 0, time.time(), 0

    def stage(self, name: str, steps: int, fn, *, skip: bool) -> None:
        if skip:
            self.done += steps
            print(f"[fidelity] {name}: skipped (done or taken)", file=sys.stderr, flush=True)
            return
        left = self.total - self.done
        rate = self.trained / max(time.time() - self.t0, 1e-9)
        workers = int(os.environ.get("FIDELITY_JOBS", "1"))  # the workers share what is left
        eta = f", study ETA {left / rate / workers / 60:.0f} min" if self.trained else ""
        print(
            f"[fidelity] {name} ({steps} steps; {self.done}/{self.total} study steps done{eta}) ...",
            file=sys.stderr,
            flush=True,
        )
        t = time.time()
        fn()
        self.done += steps
        self.trained += steps
        print(f"[fidelity] {name}: {time.time() - t:.0f}s", file=sys.stderr, flush=True)


def _trained(run_dir: pathlib.Path, steps: int) -> bool:
    return (run_dir / "checkpoints" / str(steps) / "model").exists()


def _save_json(path: pathlib.Path, obj) -> None:
    from mixbct_jax.evaluation import report as report_lib

    report_lib.write_text_atomic(path, json.dumps(report_lib.to_jsonable(obj), indent=1) + "\n")


def _prepare_old(olds_dir: pathlib.Path, old: OldModel, ds: dict[str, str], clock: Clock) -> dict[str, str]:
    """Trains the old model, extracts its embeddings of the new training set and writes every method's arrays."""
    from mixbct_jax import extract, prepare, train
    from mixbct_jax.data import old_stats

    old_dir, emb = olds_dir / old.name, olds_dir / old.name / "emb"
    clock.stage(
        f"old model {old.name}",
        old.steps,
        lambda: train.train_and_evaluate(
            base_config(ds["train"], role="old", model=old.model, head=old.head, steps=old.steps, seed=0).lock(),
            old_dir,
        ),
        skip=_trained(old_dir, old.steps),
    )
    if not (emb / "labels.npy").exists():
        extract.extract(old_dir, None, emb, role="new", batch_size=256)
    feats, labels = emb / "features.npy", emb / "labels.npy"
    if not (emb / "credible.npy").exists():
        mask = old_stats.denoise(np.load(feats, mmap_mode="r"), np.load(labels), keep=KEEP)
        np.save(emb / "credible_all.npy", np.ones_like(mask))
        _save_json(emb / "denoise.json", {"keep": KEEP, "rows": int(mask.size), "removed": int((~mask).sum())})
        np.save(emb / "credible.npy", mask)  # last: its presence marks the step done
    if not (emb / "prototypes.npy").exists():
        prepare.main(
            [
                "class-means",
                "--features",
                str(feats),
                "--labels",
                str(labels),
                "--quiet",
                "--out",
                str(emb / "prototypes.npy"),
            ]
        )
    if not (emb / "advbct_meta.npz").exists():
        prepare.main(
            [
                "advbct-meta",
                "--features",
                str(feats),
                "--labels",
                str(labels),
                "--quiet",
                "--out",
                str(emb / "advbct_meta.npz"),
            ]
        )
    return {
        "features": str(feats),
        "labels": str(labels),
        "credible": str(emb / "credible.npy"),
        "credible_all": str(emb / "credible_all.npy"),
        "prototypes": str(emb / "prototypes.npy"),
        "advbct_meta": str(emb / "advbct_meta.npz"),
        "old_dir": str(old_dir),
    }


def _evaluate(run_dir: pathlib.Path, old_dir: str, held_out: str, to: pathlib.Path | None = None) -> None:
    from mixbct_jax import evaluate

    res = evaluate.evaluate(run_dir, old_dir, [("retrieval", held_out)], out_dir=None, batch_size=256)
    rows = res["protocols"][f"retrieval:{held_out}"]["rows"]
    _save_json((to or run_dir) / "eval.json", {row: {k: rows[row][k] for k in ("top1", "top5", "mAP")} for row in rows})


def selected(tracks, names: str | None, only: str | None) -> list[tuple[Track, Run]]:
    """The runs to make, in priority order: what matters most finishes first when time is short.

    Tracks in ``grid`` order come first by track priority (the last track, the synthetic one, runs after the
    Omniglot grid), then by run priority (main rows at the first seed, other seeds, side methods, knobs).
    """
    chosen = list(tracks) if not names else names.split(",")
    for n in chosen:
        if n not in tracks:
            sys.exit(f"--tracks: unknown track {n!r}; known: {', '.join(tracks)}")
    items = []
    for t_index, n in enumerate(chosen):
        track = tracks[n]
        for r_index, (prio, run) in enumerate(runs_of(track)):
            prio = prio + track.priority if prio or track.priority >= 0.55 else 0
            if run.method == "none" and track.none_from:
                prio = 99  # an evaluation only, of a model another track trains: last, when that model exists
            if not only or fnmatch.fnmatch(f"{n}/{run.name}", only):  # tracks interleaved within a priority
                items.append(((prio, r_index, t_index), track, run))
    items.sort(key=lambda x: x[0])
    return [(t, r) for _, t, r in items]


class Claim:
    """A stage taken by one worker: ``<folder>.claim`` holds its pid; a dead worker's claim is taken over."""

    def __init__(self, folder: pathlib.Path):
        self.path = folder.parent / (folder.name + ".claim")

    def take(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and pathlib.Path(f"/proc/{pid}").exists():
                    return False  # a live worker has it
                self.path.unlink(missing_ok=True)  # stale: its worker died
                continue
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            return True
        return False

    def release(self) -> None:
        self.path.unlink(missing_ok=True)


def run_study(
    out: pathlib.Path,
    *,
    scale: str,
    track_names: str | None,
    only: str | None,
    data: pathlib.Path,
    stop_at: float | None = None,
) -> None:
    """One worker: walks the stages in priority order and makes every one no other live worker holds."""
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    from mixbct_jax import train
    from mixbct_jax.data import sources, splits

    olds, tracks = grid(scale)
    plan = selected(tracks, track_names, only)
    needed_olds = {t.old for t, _ in plan}
    total = sum(olds[o].steps for o in needed_olds) + sum(t.steps for t, _ in plan)
    clock = Clock(total)
    dsets = datasets(data)
    out.mkdir(parents=True, exist_ok=True)
    # The folder accumulates: a track of another scale run into the same --out stays in the report.
    previous = json.loads((out / "study.json").read_text()) if (out / "study.json").exists() else {}
    scales = sorted(set(previous.get("scale", scale).split("+")) | {scale})
    _save_json(
        out / "study.json",
        {
            "scale": "+".join(scales),
            "batch": BATCH,
            "keep": KEEP,
            "datasets": dsets,
            "olds": {**previous.get("olds", {}), **{k: dataclasses.asdict(v) for k, v in olds.items()}},
            "tracks": {**previous.get("tracks", {}), **{k: dataclasses.asdict(v) for k, v in tracks.items()}},
        },
    )
    t_start = time.time()
    prepared: dict[str, dict[str, str]] = {}
    num_new: dict[str, int] = {}

    def old_arrays(old: OldModel) -> dict[str, str]:
        if old.name not in prepared:
            claim = Claim(out / "olds" / old.name)
            while not claim.take():  # another worker trains this old model: wait for it
                time.sleep(10)
            try:
                prepared[old.name] = _prepare_old(out / "olds", old, dsets[old.data], clock)
            finally:
                claim.release()
        return prepared[old.name]

    last_run_s = 0.0
    for track, run in plan:
        run_dir = out / track.name / run.name
        if stop_at and time.time() + last_run_s > stop_at and not (run.method == "none" and track.none_from):
            print(f"[fidelity] --stop-at reached: {track.name}/{run.name} not started", file=sys.stderr, flush=True)
            continue  # later evaluation-only stages still run
        t_run = time.time()
        if (run_dir / "eval.json").exists():
            clock.stage(f"{track.name}/{run.name}", track.steps, None, skip=True)
            continue
        claim = Claim(run_dir)
        if not claim.take():
            clock.stage(f"{track.name}/{run.name} (another worker)", track.steps, None, skip=True)
            continue
        try:
            old = olds[track.old]
            ds = dsets[old.data]
            arrays = old_arrays(old)
            if old.data not in num_new:
                labels = sources.open_source(ds["train"]).labels
                num_new[old.data] = len(splits.scenario("exclass", labels, 0.3)["new"])
            if run.method == "none" and track.none_from:
                src = out / track.none_from / run.name
                src_claim = Claim(src)
                while not (src / "eval.json").exists():
                    if src_claim.take():  # nobody trains it now: leave this evaluation for a later invocation
                        src_claim.release()
                        break
                    time.sleep(10)  # another worker trains it
                if not (src / "eval.json").exists():
                    print(f"[fidelity] {track.name}/{run.name}: {src} not trained yet, skipped", file=sys.stderr)
                    continue
                run_dir.mkdir(parents=True, exist_ok=True)
                shutil.copy(src / "metrics.jsonl", run_dir / "metrics.jsonl")
                _evaluate(src, arrays["old_dir"], ds["held_out"], to=run_dir)
                continue
            clock.stage(
                f"{track.name}/{run.name}",
                track.steps,
                lambda t=track, r=run, d=ds, o=old, a=arrays, w=run_dir: train.train_and_evaluate(
                    new_config(t, r, d["train"], num_new[o.data], a), w
                ),
                skip=_trained(run_dir, track.steps),
            )
            if not (run_dir / "eval.json").exists():
                _evaluate(run_dir, arrays["old_dir"], ds["held_out"])
            last_run_s = time.time() - t_run
        except Exception as e:  # noqa: BLE001 - one failed run must not stop the study; the report lists it
            import traceback

            traceback.print_exc()
            (out / track.name).mkdir(parents=True, exist_ok=True)
            (out / track.name / f"{run.name}.failed").write_text(f"{type(e).__name__}: {e}\n")
        finally:
            claim.release()
    wall = time.time() - t_start
    print(f"[fidelity] worker done in {wall / 60:.1f} min", file=sys.stderr)
    with (out / "wall.jsonl").open("a") as f:
        f.write(
            json.dumps(
                {
                    "scale": scale,
                    "tracks": track_names,
                    "only": only,
                    "wall_s": wall,
                    "end": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                }
            )
            + "\n"
        )


def launch_workers(argv: list[str], jobs: int, out: pathlib.Path) -> None:
    """Starts ``jobs`` single-threaded worker processes of this script and waits for them.

    On a few shared CPU cores, one single-threaded XLA process per core outruns one multi-threaded process
    (measured: 170 vs 115 img/s on the 2-core box under load), and the workers share the stages by claims.
    """
    import os
    import subprocess

    env = dict(
        os.environ,
        FIDELITY_JOBS=str(jobs),
        XLA_FLAGS=(
            os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        ),
    )
    # On one GPU the workers share its memory instead of each preallocating 75% of it.
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.9 / jobs:.2f}")
    out.mkdir(parents=True, exist_ok=True)
    procs, logs = [], []
    for i in range(jobs):
        log = open(out / f"worker{i}.log", "a")  # noqa: SIM115 - the worker's stdout, closed after it exits
        logs.append(log)
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, *argv, "--jobs", "0"], env=env, stdout=log, stderr=subprocess.STDOUT
            )
        )
        time.sleep(20)  # the first worker claims the first old model before the second one looks
    t0 = time.time()
    codes = [p.wait() for p in procs]
    for log in logs:
        log.close()
    print(
        f"[fidelity] {jobs} workers finished in {(time.time() - t0) / 60:.1f} min, exit codes {codes}; "
        f"logs in {out}/worker*.log"
    )
    if any(codes):
        sys.exit(1)


def print_plan(out: pathlib.Path, *, scale: str, track_names: str | None, only: str | None) -> None:
    olds, tracks = grid(scale)
    for track, r in selected(tracks, track_names, only):
        old = olds[track.old]
        state = "done" if (out / track.name / r.name / "eval.json").exists() else "todo"
        print(
            f"{state} {track.name}/{r.name}: old {old.name} {old.model} {old.head} {old.steps} steps -> new "
            f"{track.new_model} {track.steps} steps"
        )


# ------------------------------------------------------------------------------------------------ report
ROWS = ("new/new", "new/old")


def _records(path: pathlib.Path) -> list[dict]:
    """The logged training records by step; a resumed or restarted run appended its own, and the last one wins."""
    if not path.exists():
        return []
    by_step = {}
    for line in path.read_text().splitlines():
        if line.strip() and '"loss"' in line:
            record = json.loads(line)
            by_step[record["step"]] = record
    return [by_step[k] for k in sorted(by_step)]


def collect(out: pathlib.Path) -> dict:
    """Everything finished under ``out``: per track, the old/old row, each run's rows and its loss curve."""
    study = json.loads((out / "study.json").read_text())
    result = {"scale": study["scale"], "batch": study["batch"], "keep": study["keep"], "tracks": {}}
    for name, track in study["tracks"].items():
        old = study["olds"][track["old"]]
        emb = out / "olds" / old["name"] / "emb"
        runs, old_old = {}, None
        for run_dir in sorted(p for p in (out / name).glob("*_s*") if p.is_dir()):
            if not (run_dir / "eval.json").exists():
                continue
            rows = json.loads((run_dir / "eval.json").read_text())
            old_old = rows["old/old"]
            curve = _records(run_dir / "metrics.jsonl")
            runs[run_dir.name] = {
                "rows": {r: rows[r] for r in ROWS},
                "curve": [(r["step"], r["cls_loss"], r["loss"]) for r in curve],
            }
        if not runs:
            continue
        failed = sorted(p.stem for p in (out / name).glob("*.failed"))
        denoise = json.loads((emb / "denoise.json").read_text()) if (emb / "denoise.json").exists() else None
        result["tracks"][name] = {
            "old": old,
            "new_model": track["new_model"],
            "steps": track["steps"],
            "old/old": old_old,
            "runs": runs,
            "failed": failed,
            "denoise": denoise,
            "old_curve": [
                (r["step"], r["cls_loss"], r["loss"]) for r in _records(out / "olds" / old["name"] / "metrics.jsonl")
            ],
        }
    return result


def _split(run_name: str) -> tuple[str, str, int]:
    """'mixbct_a0.1_s2' -> ('mixbct', '_a0.1', 2)."""
    stem, _, seed = run_name.rpartition("_s")
    for method in sorted(METHODS, key=len, reverse=True):
        if stem.startswith(method):
            return method, stem[len(method) :], int(seed)
    return stem, "", int(seed)


def _stats(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def _final_loss(curve: list, frac: float = 0.1) -> float:
    """Mean classification loss over the last ``frac`` of the logged steps."""
    k = max(1, round(len(curve) * frac))
    return float(np.mean([c[1] for c in curve[-k:]]))


def _flatness(curve: list) -> float | None:
    """Relative drop of the classification loss over the last quarter of training (0: flat)."""
    if len(curve) < 8:
        return None
    q = len(curve) // 4
    a = np.mean([c[1] for c in curve[-q - 2 : -q + 1]])
    b = np.mean([c[1] for c in curve[-3:]])
    return float((a - b) / a)


def method_table(track: dict) -> tuple[str, dict]:
    """Markdown table: old/old, then per method (default knobs) mean ± std over seeds, and the summary numbers."""
    oo = track["old/old"]
    by_method: dict[str, list[dict]] = {}
    for run_name, run in track["runs"].items():
        method, knobs, _ = _split(run_name)
        if not knobs:
            by_method.setdefault(method, []).append(run)
    lines = [
        "| new model | seeds | new/new top-1 | new/new mAP | new/old top-1 | new/old mAP | "
        "compatible? (new/old mAP > old/old) | new/new mAP cost vs none | final cls loss |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| (old/old) | | {oo['top1']:.3f} | {oo['mAP']:.3f} | | | | | |",
    ]
    none_map = [r["rows"]["new/new"]["mAP"] for r in by_method.get("none", [])]
    summary = {}
    for method in METHODS:
        runs = by_method.get(method)
        if not runs:
            continue
        nn_top1 = [r["rows"]["new/new"]["top1"] for r in runs]
        nn_map = [r["rows"]["new/new"]["mAP"] for r in runs]
        no_top1 = [r["rows"]["new/old"]["top1"] for r in runs]
        no_map = [r["rows"]["new/old"]["mAP"] for r in runs]
        wins = sum(v > oo["mAP"] for v in no_map)
        loss = [_final_loss(r["curve"]) for r in runs if r["curve"]]
        verdict = (
            "-"
            if method == "none"
            else (f"yes ({wins}/{len(runs)})" if wins == len(runs) else f"no ({wins}/{len(runs)})")
        )
        cost = f"{np.mean(none_map) - np.mean(nn_map):+.3f}" if none_map and method != "none" else ""
        lines.append(
            f"| {method} | {len(runs)} | {_stats(nn_top1)} | {_stats(nn_map)} | {_stats(no_top1)} | "
            f"{_stats(no_map)} | {verdict} | {cost} | {np.mean(loss):.2f} |"
        )
        summary[method] = {
            "seeds": len(runs),
            "new/new mAP": float(np.mean(nn_map)),
            "new/old mAP": float(np.mean(no_map)),
            "new/new top1": float(np.mean(nn_top1)),
            "new/old top1": float(np.mean(no_top1)),
            "compatible_seeds": wins,
            "new/new mAP std": float(np.std(nn_map, ddof=1)) if len(runs) > 1 else None,
            "new/old mAP std": float(np.std(no_map, ddof=1)) if len(runs) > 1 else None,
            "final_cls_loss": float(np.mean(loss)) if loss else None,
        }
    return "\n".join(lines), summary


def knob_table(track: dict) -> tuple[str, list]:
    """MixBCT at the first seed: alpha and denoise on/off."""
    rows = []
    for run_name, run in track["runs"].items():
        method, knobs, seed = _split(run_name)
        if method != "mixbct" or seed != 0:
            continue
        alpha = float(knobs.split("_a")[1].split("_")[0]) if "_a" in knobs else 0.3
        rows.append(
            {
                "alpha": alpha,
                "denoise": "nodenoise" not in knobs,
                "run": run_name,
                "new/new mAP": run["rows"]["new/new"]["mAP"],
                "new/old mAP": run["rows"]["new/old"]["mAP"],
                "new/new top1": run["rows"]["new/new"]["top1"],
                "new/old top1": run["rows"]["new/old"]["top1"],
                "final cls loss": _final_loss(run["curve"]) if run["curve"] else float("nan"),
            }
        )
    rows.sort(key=lambda r: (not r["denoise"], r["alpha"]))
    lines = [
        "| alpha | denoise | new/new top-1 | new/new mAP | new/old top-1 | new/old mAP | final cls loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['alpha']:g} | {'on' if r['denoise'] else 'off'} | {r['new/new top1']:.3f} | "
            f"{r['new/new mAP']:.3f} | {r['new/old top1']:.3f} | {r['new/old mAP']:.3f} | "
            f"{r['final cls loss']:.2f} |"
        )
    return "\n".join(lines), rows


def _fig(width=6.0, height=4.5, cols=1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * cols, height))
    return fig, fig.subplots(1, cols, squeeze=False)[0]


def plot_tradeoff(result: dict, path: pathlib.Path) -> None:
    """X = new/new mAP, y = new/old mAP, one point per method and seed; old/old mAP as a horizontal line."""
    names = list(result["tracks"])
    fig, axes = _fig(cols=len(names))
    markers = dict(zip(METHODS, "o*sDv^P<"))
    for ax, name in zip(axes, names):
        track = result["tracks"][name]
        for i, method in enumerate(METHODS):
            pts = [
                (r["rows"]["new/new"]["mAP"], r["rows"]["new/old"]["mAP"])
                for n, r in track["runs"].items()
                if _split(n)[0] == method and not _split(n)[1]
            ]
            if pts:
                x, y = zip(*pts)
                ax.scatter(
                    x,
                    y,
                    marker=markers[method],
                    s=90 if method == "mixbct" else 45,
                    color=f"C{i}",
                    label=method,
                    alpha=0.85,
                    edgecolors="k" if method == "mixbct" else "none",
                )
        ax.axhline(track["old/old"]["mAP"], color="k", ls="--", lw=1, label="old/old")
        ax.axvline(track["old/old"]["mAP"], color="gray", ls=":", lw=1)  # a new/new left of it: worse than the old
        ax.set(xlabel="new/new mAP", ylabel="new/old mAP", title=name, ylim=(0, None))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    _save_png(fig, path)


def plot_knobs(result: dict, path: pathlib.Path) -> bool:
    names = [n for n in result["tracks"] if len(knob_table(result["tracks"][n])[1]) > 1]
    if not names:
        return False
    fig, axes = _fig(cols=len(names))
    for ax, name in zip(axes, names):
        rows = knob_table(result["tracks"][name])[1]
        on = [r for r in rows if r["denoise"]]
        off = [r for r in rows if not r["denoise"]]
        for j, key in enumerate(("new/new mAP", "new/old mAP")):
            ax.plot([r["alpha"] for r in on], [r[key] for r in on], "o-", color=f"C{j}", label=f"{key}, denoise on")
            if off:
                ax.plot(
                    [r["alpha"] for r in off],
                    [r[key] for r in off],
                    "x",
                    ms=10,
                    mew=2,
                    color=f"C{j}",
                    label=f"{key}, denoise off",
                )
        ax.axhline(result["tracks"][name]["old/old"]["mAP"], color="k", ls="--", lw=1, label="old/old mAP")
        ax.set(xlabel="alpha (mix ratio)", ylabel="mAP", title=f"MixBCT knobs, {name} (seed 0)")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    _save_png(fig, path)
    return True


def plot_curves(result: dict, path: pathlib.Path) -> None:
    """Classification loss against step: every seed of 'none' (thin) and each method at the first seed."""
    names = list(result["tracks"])
    fig, axes = _fig(cols=len(names), height=4.2)
    for ax, name in zip(axes, names):
        track = result["tracks"][name]
        for i, method in enumerate(METHODS):
            for n, r in track["runs"].items():
                m, knobs, seed = _split(n)
                if m == method and not knobs and r["curve"] and (seed == 0 or method == "none"):
                    steps, cls, _ = zip(*r["curve"])
                    ax.plot(
                        steps, cls, color=f"C{i}", lw=1.6 if seed == 0 else 0.7, label=method if seed == 0 else None
                    )
        if track["old_curve"]:
            steps, cls, _ = zip(*track["old_curve"])
            ax.plot(steps, cls, color="gray", ls=":", label=f"old ({track['old']['head']})")
        ax.set(xlabel="step", ylabel="classification loss (head only)", yscale="log", title=name)
        ax.grid(alpha=0.3, which="both")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    _save_png(fig, path)


def _save_png(fig, path: pathlib.Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=90, bbox_inches="tight")


def report(out: pathlib.Path, publish: pathlib.Path | None = None) -> str:
    """Writes ``<out>/report/fidelity.{md,json}`` and the plots over whatever has finished; prints the page."""
    result = collect(out)
    rep = out / "report"
    rep.mkdir(parents=True, exist_ok=True)
    walls = (
        [json.loads(x) for x in (out / "wall.jsonl").read_text().splitlines()] if (out / "wall.jsonl").exists() else []
    )
    parts = [
        f"Study folder `{out}`, scale `{result['scale']}`, batch {result['batch']}, one CPU device per worker.",
        "",
    ]
    summary = {}
    for name, track in result["tracks"].items():
        old, new = track["old"], track["new_model"]
        table, summ = method_table(track)
        none_curves = [r["curve"] for n, r in track["runs"].items() if _split(n)[0] == "none" and r["curve"]]
        flat = [f for f in (_flatness(c) for c in none_curves) if f is not None]
        summary[name] = {
            "methods": summ,
            "old/old": track["old/old"],
            "denoise": track["denoise"],
            "none_flatness": flat,
            "knobs": knob_table(track)[1],
            "failed": track["failed"],
        }
        parts += [
            f"### {name}",
            "",
            f"Old model: {old['model']['arch']} width {old['model']['width']} D={old['model']['embedding_size']}"
            f" {old['head']}, {old['steps']} steps on the old side (30% of the training classes). New model: "
            f"{new['arch']} width {new.get('width', '-')} D={new['embedding_size']} arcface, "
            f"{track['steps']} steps on all training classes, every method.",
            "",
            table,
            "",
        ]
        if flat:
            parts.append(
                f"Unconstrained model ('none'): its classification loss fell by "
                f"{100 * np.mean(flat):.1f}% (relative) over the last quarter of training."
            )
        if track["denoise"]:
            d = track["denoise"]
            parts.append(
                f"Denoising (keep={d['keep']}): {d['removed']} of {d['rows']} old-embedding rows marked "
                f"not credible ({100 * d['removed'] / d['rows']:.1f}%)."
            )
        knobs, krows = knob_table(track)
        if len(krows) > 1:
            parts += ["", "MixBCT knobs (seed 0):", "", knobs]
        if track["failed"]:
            parts.append(f"Failed runs: {', '.join(track['failed'])} (see the worker logs).")
        parts.append("")
    plot_tradeoff(result, rep / "fidelity_tradeoff.png")
    plot_curves(result, rep / "fidelity_curves.png")
    has_knobs = plot_knobs(result, rep / "fidelity_knobs.png")
    parts += [
        "Plots: `fidelity_tradeoff.png` (new/new vs new/old mAP per method and seed; dashed: old/old), "
        "`fidelity_curves.png` (classification loss per step)"
        + (", `fidelity_knobs.png` (MixBCT alpha and denoise)." if has_knobs else ".")
    ]
    if walls:
        parts.append(f"Worker wall time (sum of invocations): {sum(w['wall_s'] for w in walls) / 60:.1f} min.")
    text = "\n".join(parts) + "\n"
    (rep / "fidelity.md").write_text(text)
    _save_json(rep / "fidelity.json", {"scale": result["scale"], "batch": result["batch"], "tracks": summary})
    if publish is not None:
        publish.mkdir(parents=True, exist_ok=True)
        for f in rep.iterdir():
            if f.suffix in (".md", ".json", ".png"):
                shutil.copy(f, publish / f.name)
    print(text)
    return text


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=("run", "report", "plan"))
    p.add_argument("--out", default="runs/fidelity")
    p.add_argument(
        "--scale",
        default="cpu",
        choices=("cpu", "cpu-long", "gpu", "smoke"),
        help="cpu: tiny models, 10 epochs, ~1 h on 2 cores; cpu-long: the convergence grid (30 and 60 "
        "epochs), ~2 h; gpu: wider/deeper, longer, 5 seeds of every method",
    )
    p.add_argument("--tracks", default=None, help="comma-separated track names (default: all of the scale)")
    p.add_argument("--only", default=None, help="fnmatch pattern on TRACK/RUN, e.g. 'omniglot_*/mixbct*'")
    p.add_argument("--data", default=str(OMNIGLOT), help="omniglot_small_28.npz")
    p.add_argument(
        "--jobs",
        type=int,
        default=2,
        help="run: worker processes, one single-threaded XLA process each (0: work in this process)",
    )
    p.add_argument(
        "--stop-at",
        default=None,
        help="run: UTC HH:MM; a worker starts no new run that its last run's wall time would carry past "
        "it (what is left runs on the next invocation)",
    )
    p.add_argument("--publish", default=None, help="report: also copy the small outputs to this folder")
    a = p.parse_args(argv)
    out = pathlib.Path(a.out)
    if a.command == "plan":
        return print_plan(out, scale=a.scale, track_names=a.tracks, only=a.only)
    if a.command == "report":
        if not (out / "study.json").exists():
            sys.exit(f"{out} holds no study.json: run `fidelity.py run --out {out}` first, or pass a study's --out")
        return report(out, publish=pathlib.Path(a.publish) if a.publish else None)
    if not pathlib.Path(a.data).exists():
        sys.exit(f"{a.data} not found: Omniglot lies in ../shared/data/omniglot beside the checkout (--data)")
    if a.jobs > 0:
        return launch_workers([x for x in (argv if argv is not None else sys.argv[1:])], a.jobs, out)
    stop_at = None
    if a.stop_at:  # UTC HH:MM today
        h, m = map(int, a.stop_at.split(":"))
        now = time.gmtime()
        stop_at = time.time() + ((h * 60 + m) - (now.tm_hour * 60 + now.tm_min)) * 60 - now.tm_sec
    run_study(out, scale=a.scale, track_names=a.tracks, only=a.only, data=pathlib.Path(a.data), stop_at=stop_at)


if __name__ == "__main__":
    main()
