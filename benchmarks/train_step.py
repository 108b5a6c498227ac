"""Throughput (img/s) of the jitted train step, against the same step written in PyTorch, in one run.

JAX side: the real step of ``mixbct_jax.step`` (``step.build`` over all local devices, shard_map
by default), an IResNet from ``mixbct_jax.models``, the ArcFace head with class centres sharded over the devices,
the optax chain of ``mixbct_jax.optim`` (SGD momentum 0.9, coupled weight decay 5e-4, backbone-only global-norm
clip 5), and optionally the MixBCT mix-up (``--method mixbct``).

PyTorch side (imported only for that part; ``--no-torch`` skips it): a compact IResNet written here from the reference
MixBCT code's backbones/iresnet.py, ArcFace (s=64, m=0.5) with a full softmax over all classes on one device,
``torch.optim.SGD(momentum=0.9, weight_decay=5e-4)`` and ``clip_grad_norm_(backbone, 5)``; eager mode as in the
reference. On a GPU it uses ``channels_last``, cuDNN autotuning and, with ``--dtype bfloat16``, autocast to bf16.

Both sides read synthetic uint8 images already on the device (the step, not the input pipeline, is measured), time
``--windows`` windows of ``--steps / --windows`` steps each after ``--warmup`` steps, synchronise around every
window, and report the median window. On a CPU the JAX and PyTorch windows alternate (other load hits both alike);
on a GPU PyTorch runs first and hands its memory back before JAX starts. The loss of the first step (at
initialisation) is printed for both as a sanity check: ArcFace at init gives about log(C) + 64 sin(0.5) +
(64^2 / D) / 2, i.e. about 44 for C=10000, D=512.

Model FLOPs are counted analytically: forward multiply-accumulates of every conv and of the fc layer, times 2
(FLOPs per MAC) times 3 (forward + backward); r50 at 112x112 gives 37.9 GFLOP per training image. On a GPU the
model FLOP utilisation is reported against ``--peak-tflops`` (dense bf16; 989 for an H100 SXM) per device; on a
CPU, where no peak is known, the achieved model GFLOP/s instead.

ViTs (``--arch vit_t|vit_s|vit_b|vit_l``, the reference MixBCT code's backbones/vit.py) run on the JAX side only, next
to a JAX IResNet baseline (``--baseline``, r50 by default) with the same head, batch and dtype, timed in alternating
windows in the same run. Their count (``vit_forward_macs``): patch embedding ``L E 3 p^2``; per block, on the T tokens
the encoder sees in training (T = int(L (1 - mask_ratio)): 129 of 144 for vit_s), ``12 T E^2`` for qkv, proj and the 4E
MLP plus ``2 T^2 E`` for q k^T and attn v; head ``L E^2 + E D``. vit_s at 112x112 with D=512 gives 30.8 GFLOP per
training image. Remat's recomputed forward is not counted (model FLOPs, not hardware FLOPs); LayerNorm, softmax,
BatchNorm and the classifier head are left out, as for the IResNets.

One JSON line per run goes to stdout (and is appended to ``--jsonl``, default ``$OUT/bench.jsonl`` when ``OUT`` is
set), followed by a human-readable line.

    python benchmarks/train_step.py --arch r18 --batch 32                      # CPU, float32, JAX vs PyTorch
    python benchmarks/train_step.py --arch r50 --batch 512 --dtype bfloat16    # one GPU run, JAX vs PyTorch
    python benchmarks/train_step.py --arch vit_s --batch 16                    # CPU: ViT-S next to r50 (JAX)
    python benchmarks/train_step.py --all-gpu                                  # the H100 preset (<= 7 minutes)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time

REPO = pathlib.Path(__file__).resolve().parents[1]

# The runs of ``--all-gpu``: (name, extra arguments, share of --preset-budget-s reserved for the run's subprocess).
GPU_PRESET = (
    ("r50_bf16_b512_jax_torch", ["--arch", "r50", "--dtype", "bfloat16", "--batch", "512"], 200),
    ("r50_fp32_b512_jax", ["--arch", "r50", "--dtype", "float32", "--batch", "512", "--no-torch"], 120),
    ("r18_bf16_b512_jax", ["--arch", "r18", "--dtype", "bfloat16", "--batch", "512", "--no-torch"], 100),
)
PRESET_STEPS, PRESET_WARMUP, PRESET_WINDOWS = 20, 5, 4

ARCH_STAGES = {
    "r_tiny": (1, 1, 1, 1),
    "r18": (2, 2, 2, 2),
    "r34": (3, 4, 6, 3),
    "r50": (3, 4, 14, 3),
    "r100": (3, 13, 30, 3),
    "r200": (6, 26, 60, 6),
}
WIDTHS = (64, 128, 256, 512)


def stage_widths(width: float = 1.0) -> tuple[int, ...]:
    """The stage widths scaled as mixbct_jax's IResNet ``width`` does (r_tiny at 0.25 is the quickstart model)."""
    return tuple(max(1, int(round(c * width))) for c in WIDTHS)


# insightface ViTs (the reference MixBCT code's backbones/vit.py): embed_dim, depth, mask_ratio;
# 8 heads, patch 9, MLP 4E.
VIT_DIMS = {"vit_t": (256, 12, 0.1), "vit_s": (512, 12, 0.1), "vit_b": (512, 24, 0.1), "vit_l": (768, 24, 0.05)}
VIT_PATCH = 9
ARCFACE_S, ARCFACE_M = 64.0, 0.5


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--arch", default="r18", choices=sorted(ARCH_STAGES) + sorted(VIT_DIMS))
    p.add_argument(
        "--baseline",
        default=None,
        help="a second JAX backbone timed in the same run with the same head (default: r50 for a ViT, "
        "none otherwise; 'none' turns it off)",
    )
    p.add_argument("--remat", default="auto", choices=("auto", "on", "off"), help="ViTs: jax.checkpoint per block")
    p.add_argument("--batch", type=int, default=32, help="global batch (split over the JAX devices)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--input-size", type=int, default=112)
    p.add_argument(
        "--width",
        type=float,
        default=1.0,
        help="IResNet stage-width multiplier (r_tiny 0.25 at --input-size 32 is the quickstart model)",
    )
    p.add_argument("--embedding-size", type=int, default=512)
    p.add_argument("--num-classes", type=int, default=10000)
    p.add_argument("--method", default="none", choices=("none", "mixbct"), help="BCT method of the JAX step")
    p.add_argument("--parallel", default="shard_map", choices=("shard_map", "pmap"))
    p.add_argument("--steps", type=int, default=20, help="timed steps, split into --windows windows")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (the first one compiles)")
    p.add_argument("--windows", type=int, default=4, help="timed windows; the median is reported")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch step")
    p.add_argument("--no-jax", action="store_true", help="skip the JAX step")
    p.add_argument(
        "--interleave",
        default="auto",
        choices=("auto", "on", "off"),
        help="alternate JAX and PyTorch timing windows (auto: on a CPU, where other load drifts; "
        "off: one framework after the other, as on a GPU, where both must not hold memory at once)",
    )
    p.add_argument(
        "--fake-devices",
        type=int,
        default=0,
        help="N > 0: fake N CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=N)",
    )
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=989.0,
        help="peak dense bf16 TFLOP/s of one GPU for the MFU (989: H100 SXM)",
    )
    p.add_argument(
        "--xla-flops",
        action="store_true",
        help="also report XLA's cost_analysis() FLOPs of the forward (a cross-check of the count)",
    )
    p.add_argument("--tag", default="", help="a name stored in the JSON line (the preset names its runs)")
    p.add_argument("--jsonl", default=None, help="append the JSON line here (default: $OUT/bench.jsonl if OUT is set)")
    p.add_argument(
        "--preset-budget-s",
        type=float,
        default=420.0,
        help="--all-gpu: wall-clock budget of the whole preset, shared out between its runs",
    )
    p.add_argument(
        "--all-gpu",
        action="store_true",
        help=f"run the GPU preset ({', '.join(n for n, _, _ in GPU_PRESET)}), one subprocess each, "
        f"{PRESET_WARMUP} warm-up + {PRESET_STEPS} timed steps",
    )
    args = p.parse_args(argv)
    if args.steps < args.windows or args.windows < 1:
        p.error("--steps must be >= --windows >= 1")
    if args.warmup < 1:
        p.error("--warmup must be >= 1 (the first step compiles and gives the loss at init)")
    if args.baseline is None:
        args.baseline = "r50" if args.arch in VIT_DIMS else "none"
    if args.baseline != "none" and args.baseline not in ARCH_STAGES:
        p.error(f"--baseline must be an IResNet ({', '.join(sorted(ARCH_STAGES))}) or none")
    if args.arch in VIT_DIMS:
        args.no_torch = True  # the PyTorch side of this benchmark is an IResNet only
    if (args.arch in ARCH_STAGES or args.baseline != "none") and args.input_size % 16:
        p.error("--input-size must be divisible by 16 for an IResNet")
    return args


# ---------------------------------------------------------------------------------------------------------------
# FLOPs, machine
# ---------------------------------------------------------------------------------------------------------------
def forward_macs(arch: str, input_size: int, embedding_size: int, width: float = 1.0) -> int:
    """Multiply-accumulates of one image's forward: every conv (stem, blocks, 1x1 shortcuts) and the fc layer.

    BatchNorm, PReLU, additions and the classifier head are left out (about 0.1% for r50 with 10k classes).
    """
    s, widths = input_size, stage_widths(width)
    macs = s * s * 3 * widths[0] * 9  # stem, stride 1
    cin = widths[0]
    for n_blocks, planes in zip(ARCH_STAGES[arch], widths):
        for b in range(n_blocks):
            stride = 2 if b == 0 else 1
            out = s // stride
            macs += s * s * cin * planes * 9  # conv1, stride 1 at the input resolution
            macs += out * out * planes * planes * 9  # conv2 carries the stride
            if b == 0:
                macs += out * out * cin * planes  # 1x1 shortcut
            s, cin = out, planes
    macs += s * s * cin * embedding_size  # fc
    return macs


def vit_forward_macs(arch: str, input_size: int, embedding_size: int, train: bool = True) -> int:
    """Multiply-accumulates of one image's ViT forward (see the module docstring); ``train`` counts the kept tokens."""
    e, depth, mask_ratio = VIT_DIMS[arch]
    n = (input_size // VIT_PATCH) ** 2
    t = int(n * (1 - mask_ratio)) if train else n
    macs = n * e * 3 * VIT_PATCH**2  # patch embedding
    macs += depth * (12 * t * e * e + 2 * t * t * e)  # qkv 3E^2 + proj E^2 + MLP 8E^2 per token; q k^T, attn v
    macs += n * e * e + e * embedding_size  # head: Linear(L E -> E), Linear(E -> D)
    return macs


def train_gflop_per_image(arch: str, input_size: int, embedding_size: int, width: float = 1.0) -> float:
    """3 x forward MACs x 2: forward + backward (twice the forward) in FLOPs; r50 at 112 -> 37.9, vit_s -> 30.8."""
    if arch in VIT_DIMS:
        return 3 * 2 * vit_forward_macs(arch, input_size, embedding_size) / 1e9
    return 3 * 2 * forward_macs(arch, input_size, embedding_size, width) / 1e9


def expected_init_loss(num_classes: int, embedding_size: int) -> float:
    """ArcFace CE at init: about log C + s sin m + s^2 / (2 D); 43.9 for C=10000, D=512.

    The target logit is s cos(pi/2 + m) = -s sin m; the others are s cos with cos ~ N(0, 1/D), whose
    log-sum-exp over C classes is about log C + s^2 / (2 D).
    """
    return math.log(num_classes) + ARCFACE_S * math.sin(ARCFACE_M) + ARCFACE_S**2 / (2 * embedding_size)


def cpu_description() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return name


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _median_window(times: list[float], steps_per_window: int, batch: int) -> dict:
    rates = [steps_per_window * batch / t for t in times]
    return {
        "img_s": statistics.median(rates),
        "img_s_windows": [round(r, 2) for r in rates],
        "ms_per_step": 1e3 * statistics.median(times) / steps_per_window,
    }


# ---------------------------------------------------------------------------------------------------------------
# The two steps behind one interface
# ---------------------------------------------------------------------------------------------------------------
class Runner:
    """A built step: ``step()`` runs one training step asynchronously, ``sync()`` waits for the device."""

    def __init__(self, name: str, step, sync, info: dict, last_loss, close=lambda: None):
        self.name, self.step, self.sync, self.info = name, step, sync, info
        self.last_loss, self.close = last_loss, close
        self.times: list[float] = []
        self.cpu_times: list[float] = []

    def first_steps(self, warmup: int) -> None:
        """The first step alone (compilation / autotuning; its loss is the loss at init), then the warm-up."""
        self.sync()
        t0 = time.perf_counter()
        loss = self.step()
        self.sync()
        self.info["first_step_s"] = round(time.perf_counter() - t0, 2)
        self.info["loss_init"] = float(loss)
        for _ in range(warmup - 1):
            self.step()
        self.sync()

    def window(self, steps: int) -> None:
        c0, t0 = _cpu_seconds(), time.perf_counter()
        for _ in range(steps):
            self.step()
        self.sync()
        self.times.append(time.perf_counter() - t0)
        self.cpu_times.append(_cpu_seconds() - c0)

    def result(self, steps_per_window: int, batch: int) -> dict:
        out = dict(self.info)
        out.update(_median_window(self.times, steps_per_window, batch))
        # Images per CPU-second this process spent (all threads): on a shared CPU, less sensitive to other load.
        out["img_per_cpu_s"] = statistics.median(steps_per_window * batch / max(c, 1e-9) for c in self.cpu_times)
        out["loss_last"] = float(self.last_loss())
        return out


def setup_jax(args, arch: str | None = None, name: str = "jax") -> Runner:
    import jax
    import numpy as np
    from jax.sharding import Mesh

    from mixbct_jax import config as config_lib
    from mixbct_jax import step as step_lib

    arch = arch or args.arch
    devices = jax.devices()
    n = len(devices)
    if args.batch % n:
        raise ValueError(f"--batch {args.batch} must be divisible by the {n} devices")
    config = config_lib.default_config()
    config.model.arch = arch
    config.model.remat = args.remat if arch in VIT_DIMS else "auto"
    config.model.embedding_size = args.embedding_size
    config.model.input_size = args.input_size
    config.model.width = args.width
    config.model.dtype = args.dtype
    config.model.num_classes = args.num_classes
    config.data.global_batch = args.batch
    config.bct.method = args.method
    config.parallel = args.parallel
    steps_per_epoch, total_steps = 10_000, 1_000_000  # the LR schedule's shape does not matter here

    mesh = Mesh(np.array(devices), (step_lib.AXIS,))
    par = step_lib.build(
        config, num_classes=args.num_classes, steps_per_epoch=steps_per_epoch, total_steps=total_steps, mesh=mesh
    )
    t0 = time.perf_counter()
    if args.parallel == "shard_map":
        state = par.init(jax.random.key(0))
    else:
        state = par.to_device(jax.device_get(jax.jit(par.init_fn)(jax.random.key(0))))

    rng = np.random.RandomState(0)
    host = {
        "image": rng.randint(0, 256, (args.batch, args.input_size, args.input_size, 3)).astype(np.uint8),
        "label": rng.randint(0, args.num_classes, args.batch).astype(np.int32),
        "index": np.arange(args.batch, dtype=np.int32),
    }
    if args.method == "mixbct":
        old = rng.normal(size=(args.batch, args.embedding_size)).astype(np.float32)
        host["old_features"] = old / np.linalg.norm(old, axis=1, keepdims=True)
        host["credible"] = rng.rand(args.batch) < 0.8
    batch = par.put_batch(host)
    if args.parallel == "pmap":  # pmap's stacked arrays are still on the host: place them once
        place = jax.pmap(lambda x: x, devices=devices)
        batch, state = place(batch), place(state)
    key = jax.random.key(1)
    consts = par.consts_to_device({})
    box = {"state": jax.block_until_ready(state), "metrics": None}
    batch = jax.block_until_ready(batch)
    init_s = time.perf_counter() - t0

    def step():
        box["state"], box["metrics"] = par.step(box["state"], batch, key, consts)
        return box["metrics"]["loss"]

    info = dict(
        arch=arch,
        init_s=round(init_s, 2),
        devices=n,
        device_kind=devices[0].device_kind,
        platform=devices[0].platform,
        version=jax.__version__,
        parallel=args.parallel,
        method=args.method,
    )
    if args.xla_flops:
        import jax.numpy as jnp

        x = jax.ShapeDtypeStruct((1, args.input_size, args.input_size, 3), jnp.float32)
        abstract = par.abstract_state()
        variables = {"params": abstract["params"]["backbone"], "batch_stats": abstract["batch_stats"]}
        cost = jax.jit(lambda v, x: par.model.apply(v, x, train=False)).lower(variables, x).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        info["xla_forward_gflop"] = float(cost["flops"]) / 1e9

    def close():
        box.clear()

    return Runner(
        name,
        step,
        lambda: jax.block_until_ready((box["state"], box["metrics"])),
        info,
        lambda: box["metrics"]["loss"],
        close,
    )


def build_torch_iresnet(torch, arch: str, input_size: int, embedding_size: int, width: float = 1.0):
    """IResNet as the reference MixBCT code's backbones/iresnet.py (NCHW).

    Pre-BN basic blocks with PReLU, stride on the second conv, BN1d head.
    """
    nn = torch.nn

    class IBasicBlock(nn.Module):
        def __init__(self, cin: int, planes: int, stride: int):
            super().__init__()
            self.bn1 = nn.BatchNorm2d(cin, eps=1e-5)
            self.conv1 = nn.Conv2d(cin, planes, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
            self.prelu = nn.PReLU(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
            self.downsample = None
            if stride != 1 or cin != planes:
                self.downsample = nn.Sequential(
                    nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes, eps=1e-5)
                )

        def forward(self, x):
            out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
            return out + (x if self.downsample is None else self.downsample(x))  # no activation after the sum

    class IResNet(nn.Module):
        def __init__(self):
            super().__init__()
            widths = stage_widths(width)
            self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(widths[0], eps=1e-5)
            self.prelu = nn.PReLU(widths[0])
            blocks, cin = [], widths[0]
            for n_blocks, planes in zip(ARCH_STAGES[arch], widths):
                for b in range(n_blocks):
                    blocks.append(IBasicBlock(cin, planes, 2 if b == 0 else 1))
                    cin = planes
            self.blocks = nn.Sequential(*blocks)
            self.bn2 = nn.BatchNorm2d(cin, eps=1e-5)
            self.fc = nn.Linear(cin * (input_size // 16) ** 2, embedding_size)
            self.features = nn.BatchNorm1d(embedding_size, eps=1e-5)
            nn.init.constant_(self.features.weight, 1.0)
            self.features.weight.requires_grad = False  # gamma frozen at 1
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.normal_(m.weight, 0.0, 0.1)

        def forward(self, x):
            x = self.prelu(self.bn1(self.conv1(x)))
            x = self.bn2(self.blocks(x))
            return self.features(self.fc(torch.flatten(x, 1)))

    return IResNet()


def setup_torch(args) -> Runner:
    import torch
    import torch.nn.functional as F

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cudnn.benchmark = True  # as the reference's train.py
    torch.manual_seed(0)
    memory_format = torch.channels_last if cuda else torch.contiguous_format
    model = build_torch_iresnet(torch, args.arch, args.input_size, args.embedding_size, args.width)
    model = model.to(device, memory_format=memory_format).train()
    centres = torch.nn.Parameter(0.01 * torch.randn(args.num_classes, args.embedding_size, device=device))
    backbone = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD([{"params": backbone}, {"params": [centres]}], lr=0.1, momentum=0.9, weight_decay=5e-4)
    bf16 = args.dtype == "bfloat16"
    cos_m, sin_m = math.cos(ARCFACE_M), math.sin(ARCFACE_M)
    threshold, sinmm = math.cos(math.pi - ARCFACE_M), math.sin(math.pi - ARCFACE_M) * ARCFACE_M

    g = torch.Generator().manual_seed(0)
    images = torch.randint(
        0, 256, (args.batch, args.input_size, args.input_size, 3), dtype=torch.uint8, generator=g
    ).to(device)
    labels = torch.randint(0, args.num_classes, (args.batch,), generator=g).to(device)
    box = {"loss": None}

    def step():
        x = images.permute(0, 3, 1, 2).float().div_(255.0).sub_(0.5).div_(0.5)  # NHWC uint8 -> NCHW [-1, 1]
        x = x.contiguous(memory_format=memory_format)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            emb = model(x)
            cosine = F.linear(F.normalize(emb.float()), F.normalize(centres))  # bf16 matmul under autocast
        cosine = cosine.float().clamp(-1.0, 1.0)
        c = cosine.gather(1, labels[:, None])
        sin = (1.0 - c * c).clamp_min(1e-12).sqrt()
        c_margin = torch.where(c > threshold, c * cos_m - sin * sin_m, c - sinmm)  # ArcFace, easy_margin=False
        logits = cosine.scatter(1, labels[:, None], c_margin) * ARCFACE_S
        loss = F.cross_entropy(logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(backbone, max_norm=5.0)
        opt.step()
        box["loss"] = loss.detach()
        return box["loss"]

    def close():  # hand the GPU memory back before JAX allocates
        import gc

        box.clear()
        opt.zero_grad(set_to_none=True)
        opt.state.clear()
        model.cpu()
        centres.data = centres.data.cpu()
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    info = dict(
        device=torch.cuda.get_device_name(0) if cuda else "cpu",
        threads=torch.get_num_threads(),
        version=torch.__version__,
        channels_last=cuda,
        autocast_bf16=bf16,
    )
    return Runner("torch", step, torch.cuda.synchronize if cuda else (lambda: None), info, lambda: box["loss"], close)


def _on_gpu(runner: Runner) -> bool:
    return runner.info.get("platform", "cpu") != "cpu" if runner.name == "jax" else runner.info["device"] != "cpu"


def _jsonl_path(args) -> str | None:
    if args.jsonl:
        return args.jsonl
    return os.path.join(os.environ["OUT"], "bench.jsonl") if os.environ.get("OUT") else None


def _append(path: str | None, record: dict) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def run_one(args) -> dict:
    record = {
        "bench": "train_step",
        "tag": args.tag,
        "arch": args.arch,
        "batch": args.batch,
        "dtype": args.dtype,
        "input_size": args.input_size,
        "embedding_size": args.embedding_size,
        "num_classes": args.num_classes,
        "steps": args.steps,
        "warmup": args.warmup,
        "windows": args.windows,
        "cpu": cpu_description(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor(),
        "gflop_per_img": round(train_gflop_per_image(args.arch, args.input_size, args.embedding_size, args.width), 3),
        "flop_count": (
            "analytic: 3 x 2 x forward MACs of "
            + ("patch conv + blocks on the kept tokens + head" if args.arch in VIT_DIMS else "convs + fc")
        ),
        "peak_tflops": args.peak_tflops,
        "baseline_arch": args.baseline,
        "baseline": None,
        "baseline_gflop_per_img": (
            round(train_gflop_per_image(args.baseline, args.input_size, args.embedding_size), 3)
            if args.baseline != "none"
            else None
        ),
        "loss_init_expected": round(expected_init_loss(args.num_classes, args.embedding_size), 2),
        "jax": None,
        "torch": None,
        "errors": {},
    }
    per_window = args.steps // args.windows

    def attempt(name, fn):
        """``fn()``, or None with the error recorded under ``name`` (the other framework goes on)."""
        try:
            return fn()
        except Exception as e:  # noqa: BLE001
            record["errors"][name] = f"{type(e).__name__}: {e}"[:2000]
            return None

    def ok(name, fn) -> bool:
        return attempt(name, lambda: fn() or True) is not None

    def measure(runners):
        """First steps, then the timed windows, alternating between the runners window by window."""
        live = [r for r in runners if ok(r.name, lambda r=r: r.first_steps(args.warmup))]
        for _ in range(args.windows):
            live = [r for r in live if ok(r.name, lambda r=r: r.window(per_window))]
        for r in live:
            record[r.name] = attempt(r.name, lambda r=r: r.result(per_window, args.batch))
        for r in runners:
            attempt(r.name, r.close)

    # PyTorch is built first, so that on a GPU its cached memory is handed back before JAX's allocator grows.
    pt = None if args.no_torch else attempt("torch", lambda: setup_torch(args))
    interleave = args.interleave == "on" or (args.interleave == "auto" and pt is not None and not _on_gpu(pt))
    if pt is not None and not interleave:
        measure([pt])
        pt = None
    jx = None if args.no_jax else attempt("jax", lambda: setup_jax(args))
    base = None
    if not args.no_jax and args.baseline != "none":
        base = attempt("baseline", lambda: setup_jax(args, arch=args.baseline, name="baseline"))
    measure([r for r in (pt, jx, base) if r is not None])
    record["interleaved"] = bool((interleave and not args.no_torch and not args.no_jax) or base is not None)

    jx, pt, bs = record["jax"], record["torch"], record["baseline"]
    if jx:
        record["machine"] = (
            f"{jx['devices']} x {jx['device_kind']} ({jx['platform']}); host {record['cpu']}, "
            f"{record['cpu_count']} CPUs"
        )
    record["ratio_jax_over_torch"] = jx["img_s"] / pt["img_s"] if jx and pt else None
    flop = record["gflop_per_img"] * 1e9
    for x, gflop in (
        (jx, record["gflop_per_img"]),
        (pt, record["gflop_per_img"]),
        (bs, record["baseline_gflop_per_img"]),
    ):
        if x:  # achieved model GFLOP/s: the CPU figure (no known peak), and the MFU's numerator on a GPU
            x["model_gflop_s"] = x["img_s"] * gflop
    if bs and bs["platform"] != "cpu":
        bs["mfu"] = bs["img_s"] * record["baseline_gflop_per_img"] * 1e9 / (args.peak_tflops * 1e12 * bs["devices"])
    if jx and bs:
        record["ratio_over_baseline"] = jx["img_s"] / bs["img_s"]
    if jx and jx["platform"] != "cpu":
        jx["mfu"] = jx["img_s"] * flop / (args.peak_tflops * 1e12 * jx["devices"])
    if pt and pt["device"] != "cpu":
        pt["mfu"] = pt["img_s"] * flop / (args.peak_tflops * 1e12)
    return record


def human_line(r: dict) -> str:
    parts = [
        (
            f"{r['arch']} ({r['gflop_per_img']:.1f} GFLOP/img) {r['input_size']}px {r['dtype']} "
            f"batch {r['batch']} C={r['num_classes']}"
        )
    ]
    jx, pt, bs = r["jax"], r["torch"], r.get("baseline")

    def extra(x):  # MFU on a GPU, model GFLOP/s and images per CPU-second on a CPU
        if "mfu" in x:
            return f", MFU {100 * x['mfu']:.1f}%"
        return f", {x['model_gflop_s']:.1f} model GFLOP/s, {x['img_per_cpu_s']:.2f} img/CPU-s"

    if jx:
        parts.append(
            f"JAX {r['arch']} {jx['img_s']:.2f} img/s ({jx['ms_per_step']:.1f} ms/step{extra(jx)}; "
            f"{jx['devices']} x {jx['device_kind']}, {jx['parallel']}, method {jx['method']})"
        )
    if bs:
        parts.append(
            f"JAX {bs['arch']} ({r['baseline_gflop_per_img']:.1f} GFLOP/img) {bs['img_s']:.2f} img/s "
            f"({bs['ms_per_step']:.1f} ms/step{extra(bs)})"
        )
    if r.get("ratio_over_baseline"):
        parts.append(f"{r['arch']}/{bs['arch']} img/s {r['ratio_over_baseline']:.2f} (interleaved)")
    if pt:
        parts.append(
            f"PyTorch {pt['img_s']:.2f} img/s ({pt['ms_per_step']:.1f} ms/step{extra(pt)}; {pt['device']}, "
            f"{pt['threads']} threads)"
        )
    if r["ratio_jax_over_torch"] is not None:
        parts.append(f"JAX/PyTorch {r['ratio_jax_over_torch']:.2f}" + (" (interleaved)" if r["interleaved"] else ""))
    losses = [f"{k} {v['loss_init']:.2f}" for k, v in (("JAX", jx), ("JAX baseline", bs), ("PyTorch", pt)) if v]
    if losses:
        parts.append("loss at init " + ", ".join(losses) + f" (expected ~{r['loss_init_expected']:.1f})")
    for k, v in r["errors"].items():
        parts.append(f"{k} FAILED: {v}")
    return " | ".join(parts)


def run_preset(args) -> int:
    """Each preset run in its own subprocess: a crash, an OOM or a hang costs that run only.

    Run i may use its share of ``--preset-budget-s`` plus whatever the runs before it left unused.
    """
    path = _jsonl_path(args)
    failures = 0
    t_start = time.perf_counter()
    total_share = sum(share for _, _, share in GPU_PRESET)
    reserved = [args.preset_budget_s * share / total_share for _, _, share in GPU_PRESET]
    for i, (name, extra, _) in enumerate(GPU_PRESET):
        cap = max(10.0, args.preset_budget_s - (time.perf_counter() - t_start) - sum(reserved[i + 1 :]))
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--steps",
            str(PRESET_STEPS),
            "--warmup",
            str(PRESET_WARMUP),
            "--windows",
            str(PRESET_WINDOWS),
            "--peak-tflops",
            str(args.peak_tflops),
            "--num-classes",
            str(args.num_classes),
            "--input-size",
            str(args.input_size),
            "--embedding-size",
            str(args.embedding_size),
            "--jsonl",
            path or os.devnull,
            "--tag",
            name,
            *extra,
        ]
        print(f"=== {name}: {' '.join(cmd[2:])} (cap {cap:.0f} s)", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1")
        )
        timer = threading.Timer(cap, proc.kill)
        timer.start()
        tail, got_record = [], False
        for line in proc.stdout:
            print(line, end="", flush=True)
            tail = (tail + [line.rstrip()[-500:]])[-12:]
            got_record |= line.startswith('{"bench": "train_step"')
        rc = proc.wait()
        killed = not timer.is_alive() and rc != 0
        timer.cancel()
        wall = time.perf_counter() - t0
        if rc == 0:
            print(f"=== {name} done in {wall:.0f} s", flush=True)
            continue
        failures += 1
        if not got_record:  # the run wrote nothing itself: record why
            record = {
                "bench": "train_step",
                "preset_run": name,
                "args": extra,
                "rc": rc,
                "wall_s": round(wall, 1),
                "error": f"killed after its {cap:.0f} s cap" if killed else "crashed",
                "tail": tail,
            }
            _append(path, record)
            print(json.dumps(record), flush=True)
        print(f"=== {name} FAILED (rc {rc}) after {wall:.0f} s", flush=True)
    print(
        f"=== preset done in {time.perf_counter() - t_start:.0f} s, {failures} failed; JSON lines in "
        f"{path or '(stdout only; set OUT or --jsonl)'}",
        flush=True,
    )
    return 1 if failures else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.all_gpu:
        return run_preset(args)
    if args.fake_devices > 0:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.fake_devices}"
        ).strip()
    if not args.no_torch:
        # Two frameworks on one GPU: JAX must not take 75% of the memory up front.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))  # runs from a plain checkout too (no pip install -e)
    record = run_one(args)
    _append(_jsonl_path(args), record)
    print(json.dumps(record), flush=True)
    print(human_line(record), flush=True)
    return 0 if not record["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
