"""Where the CPU train step loses to PyTorch: every convolution of an IResNet, XLA:CPU against PyTorch, one by one.

For each distinct convolution of the network (stem, each block's two 3x3 convs, the 1x1 shortcuts) at the
network's resolutions, it times the forward and the backward (the gradients of the input and of the weights, as
the train step computes them) in JAX (``lax.conv_general_dilated``, NHWC/HWIO as flax's ``nn.Conv``, jitted) and
in PyTorch (``F.conv2d``, NCHW, eager), alternating JAX and PyTorch repetitions in one process, and weights each
shape by how often the network uses it. The sum over shapes is the convolution share of one step; the rest of
the step (BatchNorm, PReLU, the head, the optimizer) is not in it.

  python benchmarks/cpu_kernels.py --arch r18 --batch 16            # the r18 CPU row of docs/benchmarks.md
  python benchmarks/cpu_kernels.py --arch r_tiny --width 0.25 --input-size 32 --batch 64

Set XLA_FLAGS (e.g. ``--xla_cpu_use_onednn=true``) to see what an XLA:CPU option changes, kernel by kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from train_step import ARCH_STAGES, stage_widths  # noqa: E402


def conv_shapes(arch: str, input_size: int, width: float) -> list[dict]:
    """The network's convolutions: cin, cout, kernel, stride, input side and how many times each occurs."""
    widths = stage_widths(width)
    shapes: dict[tuple, int] = {}

    def add(cin, cout, k, stride, size):
        key = (cin, cout, k, stride, size)
        shapes[key] = shapes.get(key, 0) + 1

    s, cin = input_size, widths[0]
    add(3, widths[0], 3, 1, s)  # stem
    for n_blocks, planes in zip(ARCH_STAGES[arch], widths):
        for b in range(n_blocks):
            stride = 2 if b == 0 else 1
            add(cin, planes, 3, 1, s)  # conv1 at the block's input resolution
            add(planes, planes, 3, stride, s)  # conv2 carries the stride
            if b == 0:
                add(cin, planes, 1, stride, s)  # shortcut
            s, cin = s // stride, planes
    return [dict(cin=k[0], cout=k[1], k=k[2], stride=k[3], size=k[4], count=n) for k, n in shapes.items()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="r18", choices=sorted(ARCH_STAGES))
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--input-size", type=int, default=112)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--reps", type=int, default=3, help="alternating JAX / PyTorch repetitions per shape (median)")
    p.add_argument("--jsonl", default=None)
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    rows, totals = [], {"jax_fwd": 0.0, "jax_bwd": 0.0, "torch_fwd": 0.0, "torch_bwd": 0.0}
    for sh in conv_shapes(args.arch, args.input_size, args.width):
        n, c, o, k, st, s = args.batch, sh["cin"], sh["cout"], sh["k"], sh["stride"], sh["size"]
        pad = ((k // 2, k // 2),) * 2
        rng = np.random.default_rng(0)
        x = rng.standard_normal((n, s, s, c), dtype=np.float32)
        w = rng.standard_normal((k, k, c, o), dtype=np.float32) * 0.1
        dn = ("NHWC", "HWIO", "NHWC")

        def conv(x, w, st=st, pad=pad, dn=dn):
            return jax.lax.conv_general_dilated(x, w, (st, st), pad, dimension_numbers=dn)

        fwd = jax.jit(conv)
        out_shape = jax.eval_shape(conv, x, w).shape
        g = rng.standard_normal(out_shape, dtype=np.float32)
        bwd = jax.jit(lambda x, w, g: jax.vjp(conv, x, w)[1](g))
        jx, jw, jg = jnp.asarray(x), jnp.asarray(w), jnp.asarray(g)
        tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
        tw = torch.from_numpy(w.transpose(3, 2, 0, 1).copy())
        tg = torch.from_numpy(g.transpose(0, 3, 1, 2).copy())

        # Defaults bind this shape's tensors (each closure runs only within its own iteration).
        def t_fwd(tx=tx, tw=tw, st=st, k=k):
            with torch.no_grad():
                F.conv2d(tx, tw, stride=st, padding=k // 2)

        def t_bwd(tx=tx, tw=tw, tg=tg, st=st, k=k):
            xr, wr = tx.clone().requires_grad_(True), tw.clone().requires_grad_(True)
            F.conv2d(xr, wr, stride=st, padding=k // 2).backward(tg)

        def j_fwd(fwd=fwd, jx=jx, jw=jw):
            jax.block_until_ready(fwd(jx, jw))

        def j_bwd(bwd=bwd, jx=jx, jw=jw, jg=jg):
            jax.block_until_ready(bwd(jx, jw, jg))

        times = {name: [] for name in totals}
        for f in (j_fwd, j_bwd, t_fwd, t_bwd):
            f()  # compile / warm up
        for _ in range(args.reps):
            for name, f in (("jax_fwd", j_fwd), ("torch_fwd", t_fwd), ("jax_bwd", j_bwd), ("torch_bwd", t_bwd)):
                t0 = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - t0)
        row = dict(sh, **{name: round(1e3 * statistics.median(v), 2) for name, v in times.items()})
        row["ratio_fwd"] = round(row["torch_fwd"] / row["jax_fwd"], 2)  # > 1: JAX faster
        row["ratio_bwd"] = round(row["torch_bwd"] / row["jax_bwd"], 2)
        for name in totals:
            totals[name] += sh["count"] * row[name]
        rows.append(row)
        print(
            f"{c:>4}->{o:<4} {k}x{k} s{st} @{s:<3} x{sh['count']}: fwd JAX {row['jax_fwd']:8.2f} ms PyTorch "
            f"{row['torch_fwd']:8.2f} ms ({row['ratio_fwd']:.2f}x) | bwd JAX {row['jax_bwd']:8.2f} ms PyTorch "
            f"{row['torch_bwd']:8.2f} ms ({row['ratio_bwd']:.2f}x)",
            flush=True,
        )
    record = dict(
        bench="cpu_kernels",
        arch=args.arch,
        width=args.width,
        input_size=args.input_size,
        batch=args.batch,
        xla_flags=os.environ.get("XLA_FLAGS", ""),
        jax=jax.__version__,
        torch=torch.__version__,
        torch_threads=torch.get_num_threads(),
        load_avg=os.getloadavg()[0],
        totals_ms={k: round(v, 1) for k, v in totals.items()},
        shapes=rows,
    )
    print(
        f"all convs of one {args.arch} step (weighted by use), batch {args.batch}: forward JAX "
        f"{totals['jax_fwd']:.0f} ms vs PyTorch {totals['torch_fwd']:.0f} ms; backward JAX {totals['jax_bwd']:.0f} "
        f"ms vs PyTorch {totals['torch_bwd']:.0f} ms (load {record['load_avg']:.1f})"
    )
    print(json.dumps(record))
    if args.jsonl:
        with open(args.jsonl, "a") as f:
            f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
