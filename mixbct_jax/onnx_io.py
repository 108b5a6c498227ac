"""IResNet backbones in and out of ONNX, in the layout of insightface's recognition model packs.

insightface ships its deployed recognition models (``w600k_r50.onnx``, ``glint360k_r100.onnx``, ...) as ONNX
graphs exported from the PyTorch IResNet: input ``[N, 3, 112, 112]`` already scaled to ``(x - 127.5) / 127.5``,
output the raw ``[N, D]`` embedding. PyTorch's exporter folds each BatchNorm that follows a convolution into the
convolution (the convolution then has a bias and the BatchNorm node is gone), reshapes PReLU slopes to
``[C, 1, 1]`` and writes the Linear layer as ``Gemm`` (or ``MatMul`` + ``Add``).

Import reads the graph's parameterised nodes in execution order and matches them, one by one, against the
modules of the Flax IResNet (the same walk the PyTorch converter uses), producing an insightface PyTorch state
dict that :func:`mixbct_jax.convert.torch_to_flax` then converts. A folded convolution becomes the convolution
plus an identity BatchNorm that carries its bias (scale 1, mean 0, variance ``1 - eps``), which is exact.

Export writes the same layout from a run's backbone: a graph that insightface's ``ArcFaceONNX`` wrapper (and any
ONNX runtime) loads as a drop-in replacement for a model pack, BatchNorms kept as nodes (a runtime fuses them).

``onnx`` is imported only by the functions that read or write ``.onnx`` files, so the package works without it.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from mixbct_jax import checkpoint, convert, models
from mixbct_jax.files import atomic_write

_EPS = 1e-5  # the IResNet's BatchNorm epsilon (PyTorch's default), models/layers.py
INPUT_NAME = "input.1"  # insightface's model packs name their input so; any name is accepted on import
OUTPUT_NAME = "embedding"


def _onnx():
    try:
        import onnx
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("ONNX import/export needs the onnx package: pip install 'mixbct-jax[onnx]'") from e
    return onnx


# ---------------------------------------------------------------------------------------------------------------
# Reading a graph
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Op:
    """One parameterised node: its kind, its constant inputs and (for errors) its name and position."""

    kind: str  # conv | bn | prelu | linear | bias
    name: str
    position: int
    arrays: dict[str, np.ndarray]
    attrs: dict[str, Any]
    data_in: str = ""  # the tensor it reads (first input)
    data_out: str = ""  # the tensor it writes


def _constants(graph) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    consts[node.output[0]] = numpy_helper.to_array(attr.t)
    return consts


def _attrs(node) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _param_ops(model, where: str) -> list[_Op]:
    """The graph's parameterised nodes in execution order (Conv, BatchNormalization, PRelu, Gemm/MatMul, Add)."""
    graph = model.graph
    consts = _constants(graph)
    ops: list[_Op] = []
    seen_conv = False
    for pos, node in enumerate(graph.node):
        name = node.name or f"{node.op_type}#{pos}"
        const_in = [consts.get(i) if i else None for i in node.input]
        t = node.op_type
        if t in ("Sub", "Mul", "Div") and not seen_conv and any(c is not None for c in const_in):
            raise ValueError(
                f"{where}: node {name} ({t}) scales the input inside the graph (an mxnet-era model pack that "
                "takes raw 0-255 pixels); only packs that take (x - 127.5) / 127.5 inputs, as the PyTorch-trained "
                "insightface models do, can be imported"
            )
        if t == "Conv":
            seen_conv = True
            arrays = {"weight": const_in[1]}
            if len(const_in) > 2 and const_in[2] is not None:
                arrays["bias"] = const_in[2]
            ops.append(_Op("conv", name, pos, arrays, _attrs(node), node.input[0], node.output[0]))
        elif t == "BatchNormalization":
            scale, bias, mean, var = const_in[1:5]
            ops.append(
                _Op(
                    "bn",
                    name,
                    pos,
                    dict(weight=scale, bias=bias, mean=mean, var=var),
                    _attrs(node),
                    node.input[0],
                    node.output[0],
                )
            )
        elif t == "PRelu":
            ops.append(_Op("prelu", name, pos, {"weight": const_in[1]}, {}))
        elif t == "Gemm":
            a = _attrs(node)
            w = const_in[1]
            if w is None:
                continue
            w = w if a.get("transB", 0) else w.T  # -> [out, in]
            w = w * a.get("alpha", 1.0)
            arrays = {"weight": w}
            if len(const_in) > 2 and const_in[2] is not None:
                arrays["bias"] = np.broadcast_to(const_in[2] * a.get("beta", 1.0), (w.shape[0],))
            ops.append(_Op("linear", name, pos, arrays, a, node.input[0], node.output[0]))
        elif t == "MatMul" and const_in[1] is not None:
            ops.append(_Op("linear", name, pos, {"weight": const_in[1].T}, {}, node.input[0], node.output[0]))
        elif t == "Add" and ops and ops[-1].kind == "linear" and "bias" not in ops[-1].arrays:
            bias = next((c for c in const_in if c is not None), None)
            if bias is not None:
                ops[-1].arrays["bias"] = np.reshape(bias, (-1,))
                ops[-1].data_out = node.output[0]
    for op in ops:
        missing = [k for k, v in op.arrays.items() if v is None]
        if missing:
            raise ValueError(
                f"{where}: node {op.name} takes its {'/'.join(missing)} from another node's output, "
                "not from an initializer; export the model with constant folding on"
            )
    return ops


def _graph_input_size(model) -> int | None:
    dims = model.graph.input[0].type.tensor_type.shape.dim if model.graph.input else []
    values = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    if len(values) == 4 and values[2] and values[2] == values[3]:
        return int(values[2])
    return None


def _identity_bn(prefix: str, bias: np.ndarray) -> dict[str, np.ndarray]:
    """A BatchNorm that adds ``bias`` and nothing else: 1 / sqrt((1 - eps) + eps) = 1."""
    c = bias.shape[0]
    return {
        f"{prefix}.weight": np.ones(c, np.float32),
        f"{prefix}.bias": bias.astype(np.float32),
        f"{prefix}.running_mean": np.zeros(c, np.float32),
        f"{prefix}.running_var": np.full(c, 1.0 - _EPS, np.float32),
    }


def _bn_entries(prefix: str, op: _Op, frozen_scale: bool) -> dict[str, np.ndarray]:
    """A BatchNorm node's tensors, with a non-default epsilon or fixed scale moved into the running variance.

    A node epsilon other than 1e-5 (and, for the head BatchNorm1d whose gamma the Flax model fixes at 1, a scale
    other than 1) is moved into the running variance, which is exact.
    """
    a = {k: np.asarray(v, np.float32).reshape(-1) for k, v in op.arrays.items()}
    eps = float(op.attrs.get("epsilon", _EPS))
    denom = a["var"] + eps  # what the node divides by (squared)
    scale = a["weight"]
    if frozen_scale:
        if np.any(scale <= 0):
            raise ValueError(
                f"node {op.name}: the head BatchNorm's scale has non-positive entries; it cannot be "
                "expressed with the frozen gamma of the insightface IResNet"
            )
        denom = denom / scale**2
        scale = np.ones_like(scale)
    return {
        f"{prefix}.weight": scale,
        f"{prefix}.bias": a["bias"],
        f"{prefix}.running_mean": a["mean"],
        f"{prefix}.running_var": (denom - _EPS).astype(np.float32),
    }


def _match(
    ops: list[_Op], modules: list[tuple[str, tuple[str, ...], str]], expected_shapes: Mapping[str, tuple], where: str
) -> dict[str, np.ndarray]:
    """Walks the model's modules and the graph's parameterised nodes together; returns the torch state dict."""
    sd: dict[str, np.ndarray] = {}
    i = 0  # next graph op
    m = 0  # next module
    while m < len(modules):
        prefix, _, kind = modules[m]
        op = ops[i] if i < len(ops) else None
        want = {
            "conv": "conv",
            "bn": "bn",
            "bn_frozen_scale": "bn",
            "prelu": "prelu",
            "linear": "linear",
            "linear_chw": "linear",
        }[kind]
        if op is None or op.kind != want:
            got = "the end of the graph" if op is None else f"node {op.name} ({op.kind}, node #{op.position})"
            raise ValueError(
                f"{where}: expected the {kind} of {prefix} but found {got}; the graph is not an "
                "insightface IResNet of this depth (pass --arch to choose another, or check the file)"
            )
        i += 1
        m += 1
        if want in ("conv", "linear"):
            weight = np.asarray(op.arrays["weight"], np.float32)
            shape = expected_shapes[f"{prefix}.weight"]
            if weight.shape != shape:
                raise ValueError(
                    f"{where}: node {op.name} has a weight of shape {weight.shape}, {prefix}.weight "
                    f"needs {shape}; the graph is another architecture or embedding size"
                )
            sd[f"{prefix}.weight"] = weight
            bias = op.arrays.get("bias")
            if want == "linear":
                out = weight.shape[0]
                sd[f"{prefix}.bias"] = (
                    np.zeros(out, np.float32) if bias is None else np.asarray(bias, np.float32).reshape(-1)
                )
                bias = None  # the Linear keeps its own bias
            nxt = ops[i] if i < len(ops) else None
            follows_bn = m < len(modules) and modules[m][2] in ("bn", "bn_frozen_scale")
            reads_us = nxt is not None and nxt.kind == "bn" and nxt.data_in == op.data_out
            if follows_bn and not reads_us:
                # BatchNorm folded into this layer by the exporter: an identity BN carries the bias.
                c = weight.shape[0]
                folded = np.zeros(c, np.float32) if bias is None else np.asarray(bias, np.float32).reshape(-1)
                sd.update(_identity_bn(modules[m][0], folded))
                m += 1
            elif bias is not None and np.any(bias != 0):
                raise ValueError(
                    f"{where}: convolution {op.name} has a bias but no BatchNorm to carry it follows "
                    f"{prefix}; this is not an insightface IResNet graph"
                )
        elif want == "bn":
            sd.update(_bn_entries(prefix, op, frozen_scale=kind == "bn_frozen_scale"))
        else:  # prelu
            sd[f"{prefix}.weight"] = np.asarray(op.arrays["weight"], np.float32).reshape(-1)
    if i != len(ops):
        extra = ops[i]
        raise ValueError(
            f"{where}: the graph has more layers than the IResNet (first extra: node {extra.name}, "
            f"{extra.kind}); pass --arch with a deeper model"
        )
    return sd


def _resnet_archs() -> list[str]:
    return [a for a in models.ARCHS if a.startswith("r")]


def _conv_count(arch: str) -> int:
    stages = models.ARCHS[arch].keywords["stage_sizes"]
    return 1 + 2 * sum(stages) + len(stages)


def guess_arch(model) -> str:
    """The IResNet depth whose convolution count matches the graph's (r18: 21, r34: 37, r50: 53, r100: 103)."""
    n = sum(node.op_type == "Conv" for node in model.graph.node)
    matches = [a for a in _resnet_archs() if _conv_count(a) == n]
    if len(matches) != 1:
        known = ", ".join(f"{a}: {_conv_count(a)}" for a in _resnet_archs())
        raise ValueError(f"the graph has {n} convolutions, which matches no single IResNet ({known}); pass --arch")
    return matches[0]


def onnx_to_flax(model, arch: str | None = None, *, where: str = "the ONNX model") -> tuple[dict, dict[str, Any]]:
    """Converts an insightface IResNet ONNX graph (a ``onnx.ModelProto``) into Flax variables.

    Returns:
      ``(variables, info)``: ``{'params', 'batch_stats'}`` and ``{'arch', 'embedding_size', 'input_size',
      'width'}`` read off the graph.
    """
    arch = arch or guess_arch(model)
    if arch not in _resnet_archs():
        raise ValueError(f"--arch {arch}: ONNX import supports the IResNets {_resnet_archs()}")
    ops = _param_ops(model, where)
    linear = [op for op in ops if op.kind == "linear"]
    conv = [op for op in ops if op.kind == "conv"]
    if not linear or not conv:
        raise ValueError(f"{where}: the graph has no Linear/Gemm or no Conv layer; it is not a recognition backbone")
    embedding_size = int(linear[-1].arrays["weight"].shape[0])
    width = conv[0].arrays["weight"].shape[0] / 64.0
    input_size = _graph_input_size(model)
    if input_size is None:  # a dynamic spatial size: read it off the flatten (C * (S/16)^2 inputs of the fc)
        c_last = max(1, int(round(512 * width)))
        side = int(round((linear[-1].arrays["weight"].shape[1] / c_last) ** 0.5))
        input_size = side * 16
    leaves = convert.leaf_map(arch, embedding_size, input_size, width)
    shapes = {leaf.torch_key: leaf.torch_shape for leaf in leaves}
    flax_model = models.build(arch, embedding_size=embedding_size, input_size=input_size, width=width)
    modules = list(convert._iresnet_modules(flax_model))
    try:
        state = _match(ops, modules, shapes, where)
    except ValueError as e:
        try:
            guess = guess_arch(model)
        except ValueError:
            guess = None
        hint = f" (its {sum(op.kind == 'conv' for op in ops)} convolutions fit --arch {guess})" if guess != arch else ""
        raise ValueError(f"{e}{hint}") from None
    variables = convert.torch_to_flax(state, arch, embedding_size, input_size, width, source=where)
    return variables, dict(arch=arch, embedding_size=embedding_size, input_size=input_size, width=width)


def load_onnx(path: str | os.PathLike):
    """Reads an ``.onnx`` file with a one-line error for a missing or unreadable file."""
    onnx = _onnx()
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--onnx {path}: no such file")
    try:
        return onnx.load(str(path))
    except Exception as e:  # DecodeError and friends
        raise ValueError(f"--onnx {path} is not a readable ONNX model ({type(e).__name__}: {e})") from None


def import_onnx(onnx_path: str | os.PathLike, out: str | os.PathLike, arch: str | None = None) -> dict[str, Any]:
    """Converts an insightface ONNX recognition model into the run directory ``out``; returns what it read."""
    convert.check_new_run_dir(out)
    model = load_onnx(onnx_path)
    variables, info = onnx_to_flax(model, arch, where=f"--onnx {onnx_path}")
    source = str(pathlib.Path(onnx_path).resolve())
    config = convert.converted_config(info["arch"], info["embedding_size"], info["input_size"], source)
    with config.unlocked():
        config.model.width = float(info["width"])
    checkpoint.save_model_only(out, config, variables)
    n = sum(np.size(x) for x in jax.tree.leaves(variables["params"]))
    print(
        f"converted {source} -> {out} ({info['arch']}, D={info['embedding_size']}, input {info['input_size']}, "
        f"width {info['width']:g}, {n / 1e6:.2f}M parameters)"
    )
    return info


# ---------------------------------------------------------------------------------------------------------------
# Writing a graph
# ---------------------------------------------------------------------------------------------------------------


def flax_to_onnx(
    variables: Mapping[str, Any],
    arch: str,
    embedding_size: int,
    input_size: int = 112,
    width: float = 1.0,
    *,
    opset: int = 17,
):
    """The backbone as an ``onnx.ModelProto``: input ``[N, 3, S, S]`` scaled to [-1, 1], output ``[N, D]``."""
    onnx = _onnx()
    from onnx import TensorProto, helper, numpy_helper

    if arch not in _resnet_archs():
        raise ValueError(f"arch {arch!r}: ONNX export supports the IResNets {_resnet_archs()}")
    sd = convert.flax_to_torch(variables, arch, embedding_size, input_size, width)
    stages = models.ARCHS[arch].keywords["stage_sizes"]
    nodes, inits = [], []
    used: set[str] = set()

    def init(name: str, array: np.ndarray) -> str:
        if name not in used:
            used.add(name)
            inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def conv(x: str, prefix: str, stride: int, pad: int) -> str:
        w = sd[f"{prefix}.weight"]
        out = f"{prefix}.out"
        nodes.append(
            helper.make_node(
                "Conv",
                [x, init(f"{prefix}.weight", w)],
                [out],
                name=prefix,
                kernel_shape=list(w.shape[2:]),
                strides=[stride, stride],
                pads=[pad] * 4,
            )
        )
        return out

    def bn(x: str, prefix: str) -> str:
        names = [init(f"{prefix}.{k}", sd[f"{prefix}.{k}"]) for k in ("weight", "bias", "running_mean", "running_var")]
        out = f"{prefix}.out"
        nodes.append(helper.make_node("BatchNormalization", [x, *names], [out], name=prefix, epsilon=_EPS))
        return out

    def prelu(x: str, prefix: str) -> str:
        slope = sd[f"{prefix}.weight"].reshape(-1, 1, 1)  # broadcast over [N, C, H, W]
        out = f"{prefix}.out"
        nodes.append(helper.make_node("PRelu", [x, init(f"{prefix}.weight", slope)], [out], name=prefix))
        return out

    x = prelu(bn(conv(INPUT_NAME, "conv1", 1, 1), "bn1"), "prelu")
    for s, n_blocks in enumerate(stages, start=1):
        for b in range(n_blocks):
            t = f"layer{s}.{b}"
            stride = 2 if b == 0 else 1
            y = bn(x, f"{t}.bn1")
            y = prelu(bn(conv(y, f"{t}.conv1", 1, 1), f"{t}.bn2"), f"{t}.prelu")
            y = bn(conv(y, f"{t}.conv2", stride, 1), f"{t}.bn3")
            shortcut = bn(conv(x, f"{t}.downsample.0", stride, 0), f"{t}.downsample.1") if b == 0 else x
            nodes.append(helper.make_node("Add", [y, shortcut], [f"{t}.out"], name=f"{t}.add"))
            x = f"{t}.out"
    x = bn(x, "bn2")
    nodes.append(helper.make_node("Flatten", [x], ["flatten.out"], name="flatten", axis=1))  # C,H,W order
    nodes.append(
        helper.make_node(
            "Gemm",
            ["flatten.out", init("fc.weight", sd["fc.weight"]), init("fc.bias", sd["fc.bias"])],
            ["fc.out"],
            name="fc",
            transB=1,
        )
    )
    names = [init(f"features.{k}", sd[f"features.{k}"]) for k in ("weight", "bias", "running_mean", "running_var")]
    nodes.append(
        helper.make_node("BatchNormalization", ["fc.out", *names], [OUTPUT_NAME], name="features", epsilon=_EPS)
    )
    graph = helper.make_graph(
        nodes,
        f"mixbct_jax_{arch}",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", 3, input_size, input_size])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", embedding_size])],
        inits,
    )
    model = helper.make_model(graph, producer_name="mixbct-jax", opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    return model


def export_onnx(run_dir: str | os.PathLike, out: str | os.PathLike, step: int | None = None, arch: str | None = None):
    """Writes the backbone of the run in ``run_dir`` as an ONNX file ``out`` (atomically); returns the model."""
    config, variables = checkpoint.load_params(run_dir, step)
    m = config.model
    if arch is not None and arch != m.arch:
        raise ValueError(
            f"--arch {arch} does not match {run_dir}/config.json model.arch={m.arch!r}; drop --arch "
            f"or pick the right run"
        )
    model = flax_to_onnx(variables, m.arch, m.embedding_size, m.input_size, m.get("width", 1.0))
    convert.check_out_file(out)
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: pathlib.Path(tmp).write_bytes(model.SerializeToString()))
    print(
        f"exported {run_dir} ({m.arch}, D={m.embedding_size}) -> {out} (input {INPUT_NAME} "
        f"[N, 3, {m.input_size}, {m.input_size}] scaled to [-1, 1], output {OUTPUT_NAME} [N, {m.embedding_size}])"
    )
    return model
