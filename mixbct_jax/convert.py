r"""Moves backbones between insightface PyTorch state dicts (or ONNX models) and mixbct-jax run directories.

Import (a PyTorch old model becomes a run directory that ``checkpoint.load_params`` and ``embed.load_embedder``
accept like a trained run)::

    python -m mixbct_jax.convert --torch backbone.pth --arch r18 [--embedding_size 512] [--input_size 112] \
        --out runs/old_r18

Export (a run's backbone becomes a state dict that the reference's ``get_model(arch, num_features=D)`` loads
with ``strict=True``)::

    python -m mixbct_jax.convert --export runs/new_r50 [--arch r50] [--step N] --out backbone_r50.pt

ONNX (IResNets, in the layout of insightface's model packs; ``mixbct_jax/onnx_io.py``)::

    python -m mixbct_jax.convert --onnx w600k_r50.onnx --out runs/old_r50
    python -m mixbct_jax.convert --export runs/new_r50 --out new_r50.onnx

``--width`` imports a PyTorch IResNet built with scaled stage widths (the tiny models of tests and demos).

The name map is generated from the Flax module tree (``jax.eval_shape``; no weights are materialised) walked in
PyTorch's module order, so the first mismatching key of a wrong checkpoint is the first one PyTorch would see.
Layouts: conv OIHW <-> HWIO (grouped and depthwise convs too), Linear (out, in) <-> (in, out), and IResNet's
``fc`` rows are permuted because PyTorch flattens C,H,W while the Flax model flattens H,W,C. BatchNorm running
statistics live in ``batch_stats``; PReLU weights are ``slope``. The IResNet head BatchNorm1d has a frozen
gamma (always 1) and no Flax counterpart: import checks it is 1, export writes ones. ``num_batches_tracked``
counters are ignored on import and written as 0 on export.

ViTs (insightface ``backbones/vit.py``: ``vit_t``, ``vit_s``, ``vit_b``, ``vit_l_dp005_mask_005``, ...) map
``pos_embed``/``mask_token`` as they are, ``patch_embed.proj`` as a conv with bias, ``blocks.i.{norm1, attn.qkv,
attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``norm`` and ``feature.{0,1,2,3}`` (Linear, BatchNorm1d, Linear,
BatchNorm1d). Their flatten is token-major in both frameworks, so no rows are permuted::

    python -m mixbct_jax.convert --torch vit_s_backbone.pth --arch vit_s --out runs/old_vit_s
    python -m mixbct_jax.convert --torch tiny.pth --arch vit_tiny --input_size 32 --patch_size 4 --out runs/x

torch is imported only by the functions that read or write ``.pt`` files, so the package works without it.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
import pathlib
import re
from collections.abc import Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from mixbct_jax import checkpoint, models
from mixbct_jax.files import atomic_write

log = logging.getLogger(__name__)

StateDict = dict[str, np.ndarray]
Variables = dict[str, Any]  # {'params': ..., 'batch_stats': ...} of numpy arrays

# Wrappers a training script may put around the state dict (insightface's checkpoint_gpu_*.pt uses the first).
_WRAPPER_KEYS = ("state_dict_backbone", "state_dict", "model")
# Heads, discriminators and class centres that share a file with the backbone in the reference's methods:
# softmax old models (cls_fc), BCT/UniBCT (BCT_FC), NormFace, PartialFC centres (a bare 'weight'),
# AdvBCT (discriminator, eboundary), and the parameter-free dropout.
_NON_BACKBONE = re.compile(r"^((cls_fc|BCT_FC|NormFace|discriminator|eboundary|dropout)(\..*)?|weight)$")
_COUNTER = "num_batches_tracked"


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One PyTorch state-dict entry and its Flax counterpart.

    Attributes:
      torch_key: the state-dict key, e.g. ``layer1.0.conv1.weight``.
      flax_path: ``('params'|'batch_stats', module..., leaf)``; None for entries with no Flax counterpart.
      layout: ``conv`` (OIHW <-> HWIO), ``linear`` ((out, in) <-> (in, out)), ``linear_chw`` (linear whose
        input is a C,H,W flatten), ``same``, ``ones`` (frozen BN gamma) or ``counter`` (num_batches_tracked).
      torch_shape: the shape PyTorch stores.
      chw: (C, H, W) of the flattened feature map, for ``linear_chw`` only.
    """

    torch_key: str
    flax_path: tuple[str, ...] | None
    layout: str
    torch_shape: tuple[int, ...]
    chw: tuple[int, int, int] | None = None


# ---------------------------------------------------------------------------------------------------------------
# Module order: (torch module prefix, flax module path, kind), in the order PyTorch registers the modules.
# Kinds: conv, bn, bn_frozen_scale, prelu, linear, linear_chw.
# ---------------------------------------------------------------------------------------------------------------


def _iresnet_modules(model: nn.Module) -> Iterator[tuple[str, tuple[str, ...], str]]:
    yield "conv1", ("stem_conv",), "conv"
    yield "bn1", ("stem_bn",), "bn"
    yield "prelu", ("stem_prelu",), "prelu"
    for s, n_blocks in enumerate(model.stage_sizes, start=1):
        for b in range(n_blocks):
            t, f = f"layer{s}.{b}", f"layer{s}_{b}"
            yield f"{t}.bn1", (f, "bn1"), "bn"
            yield f"{t}.conv1", (f, "conv1"), "conv"
            yield f"{t}.bn2", (f, "bn2"), "bn"
            yield f"{t}.prelu", (f, "prelu"), "prelu"
            yield f"{t}.conv2", (f, "conv2"), "conv"
            yield f"{t}.bn3", (f, "bn3"), "bn"
            if b == 0:  # every stage opens with a strided block whose shortcut is conv1x1 + BN
                yield f"{t}.downsample.0", (f, "downsample_conv"), "conv"
                yield f"{t}.downsample.1", (f, "downsample_bn"), "bn"
    yield "bn2", ("features_bn",), "bn"
    yield "fc", ("fc",), "linear_chw"
    yield "features", ("features",), "bn_frozen_scale"


def _mbf_block(t: str, f: tuple[str, ...], prelu: bool = True) -> Iterator[tuple[str, tuple[str, ...], str]]:
    """ConvBlock (conv, BN, PReLU) or LinearBlock (conv, BN): an nn.Sequential called ``layers`` in PyTorch."""
    yield f"{t}.layers.0", f + ("conv",), "conv"
    yield f"{t}.layers.1", f + ("bn",), "bn"
    if prelu:
        yield f"{t}.layers.2", f + ("prelu",), "prelu"


def _mbf_depthwise(t: str, f: tuple[str, ...]) -> Iterator[tuple[str, tuple[str, ...], str]]:
    yield from _mbf_block(f"{t}.layers.0", f + ("expand",))
    yield from _mbf_block(f"{t}.layers.1", f + ("depthwise",))
    yield from _mbf_block(f"{t}.layers.2", f + ("project",), prelu=False)


def _mbf_modules(model: nn.Module) -> Iterator[tuple[str, tuple[str, ...], str]]:
    blocks = model.blocks
    yield from _mbf_block("layers.0", ("conv1",))
    if blocks[0] == 1:
        yield from _mbf_block("layers.1", ("conv2_dw",))
    else:
        for i in range(blocks[0]):
            yield from _mbf_depthwise(f"layers.1.layers.{i}", (f"conv2_{i}",))
    # layers.2..7 alternate a strided DepthWise and a Residual (a Sequential of residual DepthWise blocks).
    for idx, (down, stage, n) in enumerate(
        (("conv23", "conv3", blocks[1]), ("conv34", "conv4", blocks[2]), ("conv45", "conv5", blocks[3]))
    ):
        yield from _mbf_depthwise(f"layers.{2 + 2 * idx}", (down,))
        for i in range(n):
            yield from _mbf_depthwise(f"layers.{3 + 2 * idx}.layers.{i}", (f"{stage}_{i}",))
    yield from _mbf_block("conv_sep", ("conv_sep",))
    # GDC head: Sequential(LinearBlock, Flatten, Linear(no bias), BatchNorm1d).
    yield from _mbf_block("features.layers.0", ("gdc",), prelu=False)
    yield "features.layers.2", ("fc",), "linear"
    yield "features.layers.3", ("features",), "bn"


def _vit_modules(model: nn.Module) -> Iterator[tuple[str, tuple[str, ...], str]]:
    """Insightface ``backbones/vit.py``: the model's own parameters first (PyTorch lists them before submodules)."""
    yield "pos_embed", ("pos_embed",), "param"
    yield "mask_token", ("mask_token",), "param"
    yield "patch_embed.proj", ("patch_embed",), "conv"
    for i in range(model.depth):
        t, f = f"blocks.{i}", f"blocks_{i}"
        yield f"{t}.norm1", (f, "norm1"), "ln"
        yield f"{t}.attn.qkv", (f, "attn", "qkv"), "linear"
        yield f"{t}.attn.proj", (f, "attn", "proj"), "linear"
        yield f"{t}.norm2", (f, "norm2"), "ln"
        yield f"{t}.mlp.fc1", (f, "mlp", "fc1"), "linear"
        yield f"{t}.mlp.fc2", (f, "mlp", "fc2"), "linear"
    yield "norm", ("norm",), "ln"
    # feature = Sequential(Linear(L*E -> E, no bias), BatchNorm1d, Linear(E -> D, no bias), BatchNorm1d). The
    # flatten is token-major in both frameworks, so feature.0 needs no row permutation.
    yield "feature.0", ("feature_fc1",), "linear"
    yield "feature.1", ("feature_bn1",), "bn"
    yield "feature.2", ("feature_fc2",), "linear"
    yield "feature.3", ("features",), "bn"


def _modules(arch: str, model: nn.Module) -> Iterator[tuple[str, tuple[str, ...], str]]:
    if arch in models.vit.VARIANTS:
        return _vit_modules(model)
    return _iresnet_modules(model) if arch.startswith("r") else _mbf_modules(model)


# ---------------------------------------------------------------------------------------------------------------
# The leaf map
# ---------------------------------------------------------------------------------------------------------------


def _build(arch: str, embedding_size: int, input_size: int, width: float, patch_size: int = 0) -> nn.Module:
    return models.build(arch, embedding_size=embedding_size, input_size=input_size, width=width, patch_size=patch_size)


def abstract_variables(
    arch: str, embedding_size: int, input_size: int = 112, width: float = 1.0, patch_size: int = 0
) -> Variables:
    """The Flax variable tree of ``arch`` as ``jax.ShapeDtypeStruct`` leaves (nothing is computed)."""
    model = _build(arch, embedding_size, input_size, width, patch_size)
    x = jax.ShapeDtypeStruct((1, input_size, input_size, 3), jnp.float32)
    return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)


@functools.lru_cache(maxsize=16)
def leaf_map(
    arch: str, embedding_size: int, input_size: int = 112, width: float = 1.0, patch_size: int = 0
) -> tuple[Leaf, ...]:
    """Every PyTorch state-dict entry of ``arch`` in PyTorch's order, with its Flax path and layout.

    ``patch_size`` is the ViTs' patch side (0: the variant's own); the other backbones require 0.

    Raises:
      RuntimeError: when the map and the Flax model disagree (a model was changed without this module).
    """
    model = _build(arch, embedding_size, input_size, width, patch_size)
    flat = {
        k: v.shape
        for k, v in traverse_util.flatten_dict(
            abstract_variables(arch, embedding_size, input_size, width, patch_size)
        ).items()
    }
    modules = _modules(arch, model)
    leaves: list[Leaf] = []
    for t, f, kind in modules:
        p, s = ("params",) + f, ("batch_stats",) + f
        if kind == "conv":
            kh, kw, i, o = flat[p + ("kernel",)]
            leaves.append(Leaf(f"{t}.weight", p + ("kernel",), "conv", (o, i, kh, kw)))
            if p + ("bias",) in flat:  # the ViT patch embedding; IResNet/MobileFaceNet convs have no bias
                leaves.append(Leaf(f"{t}.bias", p + ("bias",), "same", flat[p + ("bias",)]))
        elif kind == "param":  # a bare nn.Parameter of the model (ViT pos_embed, mask_token), same layout
            leaves.append(Leaf(t, p, "same", flat[p]))
        elif kind == "ln":
            leaves.append(Leaf(f"{t}.weight", p + ("scale",), "same", flat[p + ("scale",)]))
            leaves.append(Leaf(f"{t}.bias", p + ("bias",), "same", flat[p + ("bias",)]))
        elif kind == "prelu":
            leaves.append(Leaf(f"{t}.weight", p + ("slope",), "same", flat[p + ("slope",)]))
        elif kind in ("linear", "linear_chw"):
            n_in, n_out = flat[p + ("kernel",)]
            chw = None
            if kind == "linear_chw":
                # The Flax fc sees the features_bn map flattened as H,W,C; its side is input_size / 16.
                c = flat[("params", "features_bn", "scale")][0]
                side = input_size // 16
                chw = (c, side, side)
                if c * side * side != n_in:
                    raise RuntimeError(f"{arch}: fc has {n_in} inputs, expected {c}x{side}x{side}")
            leaves.append(Leaf(f"{t}.weight", p + ("kernel",), kind, (n_out, n_in), chw))
            if p + ("bias",) in flat:
                leaves.append(Leaf(f"{t}.bias", p + ("bias",), "same", flat[p + ("bias",)]))
        elif kind in ("bn", "bn_frozen_scale"):
            (c,) = flat[p + ("bias",)]
            if kind == "bn":
                leaves.append(Leaf(f"{t}.weight", p + ("scale",), "same", (c,)))
            else:
                leaves.append(Leaf(f"{t}.weight", None, "ones", (c,)))
            leaves.append(Leaf(f"{t}.bias", p + ("bias",), "same", (c,)))
            leaves.append(Leaf(f"{t}.running_mean", s + ("mean",), "same", (c,)))
            leaves.append(Leaf(f"{t}.running_var", s + ("var",), "same", (c,)))
            leaves.append(Leaf(f"{t}.{_COUNTER}", None, "counter", ()))
        else:  # pragma: no cover - the walkers only yield the kinds above
            raise RuntimeError(f"unknown module kind {kind!r}")
    mapped = {leaf.flax_path for leaf in leaves if leaf.flax_path is not None}
    if mapped != set(flat):
        raise RuntimeError(
            f"convert.leaf_map({arch!r}) is out of date with the Flax model: unmapped "
            f"{sorted(map('/'.join, set(flat) - mapped))[:5]}, unknown "
            f"{sorted(map('/'.join, mapped - set(flat)))[:5]}"
        )
    return tuple(leaves)


def _to_flax(leaf: Leaf, x: np.ndarray) -> np.ndarray:
    if leaf.layout == "conv":
        return x.transpose(2, 3, 1, 0)  # OIHW -> HWIO (for grouped convs I is in/groups in both)
    if leaf.layout == "linear":
        return x.T
    if leaf.layout == "linear_chw":
        c, h, w = leaf.chw
        d = x.shape[0]
        return x.reshape(d, c, h, w).transpose(2, 3, 1, 0).reshape(h * w * c, d)  # rows in H,W,C order
    return x


def _to_torch(leaf: Leaf, x: np.ndarray) -> np.ndarray:
    if leaf.layout == "conv":
        return x.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    if leaf.layout == "linear":
        return x.T
    if leaf.layout == "linear_chw":
        c, h, w = leaf.chw
        d = x.shape[1]
        return x.reshape(h, w, c, d).transpose(3, 2, 0, 1).reshape(d, c * h * w)  # columns in C,H,W order
    return x


# ---------------------------------------------------------------------------------------------------------------
# PyTorch -> Flax
# ---------------------------------------------------------------------------------------------------------------


def split_backbone_keys(state_dict: Mapping[str, np.ndarray]) -> tuple[StateDict, list[str]]:
    """Strips a DDP ``module.`` prefix and separates the backbone from keys that belong to something else.

    Returns:
      ``(backbone, skipped)``: the backbone entries without ``num_batches_tracked`` counters, and the keys left
      out (heads such as ``cls_fc.*``/``BCT_FC.*``/PartialFC ``weight``, AdvBCT's ``discriminator.*`` and
      ``eboundary.*``, ``dropout.*`` and the counters).
    """
    backbone: StateDict = {}
    skipped: list[str] = []
    for key, value in state_dict.items():
        key = key[len("module.") :] if key.startswith("module.") else key
        if _NON_BACKBONE.match(key) or key.endswith("." + _COUNTER):
            skipped.append(key)
        else:
            backbone[key] = value
    return backbone, skipped


def describe_skipped(skipped: list[str], limit: int = 12) -> str:
    """A one-line summary of ``split_backbone_keys``'s skipped keys (counters are only counted)."""
    named = [k for k in skipped if not k.endswith("." + _COUNTER)]
    counters = len(skipped) - len(named)
    parts = []
    if named:
        parts.append(", ".join(named[:limit]) + (f" and {len(named) - limit} more" if len(named) > limit else ""))
    if counters:
        parts.append(f"{counters} BatchNorm {_COUNTER} counters")
    return "; ".join(parts) if parts else "nothing"


def _embedding_key(arch: str) -> str:
    if arch in models.vit.VARIANTS:
        return "feature.3.bias"
    return "features.bias" if arch.startswith("r") else "features.layers.3.bias"


def _final_linear_key(arch: str) -> str:
    if arch in models.vit.VARIANTS:
        return "feature.2.weight"
    return "fc.weight" if arch.startswith("r") else "features.layers.2.weight"


def infer_embedding_size(state_dict: Mapping[str, np.ndarray], arch: str) -> int:
    """D from the head BatchNorm1d's bias (as the reference's IJB-C script does), else from the final Linear."""
    for key, axis in ((_embedding_key(arch), 0), (_final_linear_key(arch), 0)):
        if key in state_dict and np.ndim(state_dict[key]) >= 1:
            return int(np.shape(state_dict[key])[axis])
    guess = guess_arch(state_dict)
    hint = f"its keys look like {guess}: pass --arch {guess}" if guess and guess != arch else "check --arch"
    raise ValueError(
        f"cannot infer the embedding size of the {arch} checkpoint: it has no {_embedding_key(arch)!r} "
        f"key; {hint}, or pass --embedding_size."
    )


def guess_arch(keys: set[str] | Mapping[str, Any]) -> str | None:
    """The architecture whose block layout matches the checkpoint's keys, or None (a hint for error messages).

    For a ViT the state dict itself (not only its keys) is needed: the variants differ in shapes only.
    """
    state = keys
    keys = set(keys)
    if "conv1.weight" in keys and "layer1.0.conv1.weight" in keys:
        depth = []
        for s in range(1, 5):
            blocks = {int(m.group(1)) for k in keys if (m := re.match(rf"layer{s}\.(\d+)\.", k))}
            depth.append(max(blocks) + 1 if blocks else 0)
        for name, factory in models.ARCHS.items():
            if tuple(getattr(factory, "keywords", {}).get("stage_sizes", ())) == tuple(depth):
                return name
        return None
    if "layers.0.layers.0.weight" in keys:
        return "mbf" if "layers.1.layers.0.weight" in keys else "mbf_large"
    if "patch_embed.proj.weight" in keys and isinstance(state, Mapping) and "pos_embed" in state:
        # The ViT variants share their key names: tell them apart by depth and token width.
        depth = len({int(m.group(1)) for k in keys if (m := re.match(r"blocks\.(\d+)\.", k))})
        width = int(np.shape(state["pos_embed"])[-1])
        for name, (e, d, *_rest) in models.vit.VARIANTS.items():
            if (e, d) == (width, depth):
                return name
    return None


def _first(keys: list[str], n: int = 10) -> str:
    return ", ".join(keys[:n]) + (" ..." if len(keys) > n else "")


def _check_keys(
    backbone: Mapping[str, np.ndarray],
    leaves: tuple[Leaf, ...],
    arch: str,
    embedding_size: int,
    input_size: int,
    source: str,
    patch_size: int = 0,
) -> None:
    """Raises a ValueError naming the first mismatching key and both shapes, the missing and unexpected keys."""
    desc = f"{arch} (embedding_size={embedding_size}, input_size={input_size}"
    desc += (
        f", patch_size={patch_size or models.vit.DEFAULT_PATCH.get(arch, 9)})" if arch in models.vit.VARIANTS else ")"
    )
    wanted = [leaf for leaf in leaves if leaf.layout != "counter"]
    first = None
    for leaf in wanted:
        if leaf.torch_key not in backbone:
            first = f"{leaf.torch_key}: {desc} expects shape {leaf.torch_shape}, the checkpoint has no such key"
            break
        shape = tuple(np.shape(backbone[leaf.torch_key]))
        if shape != leaf.torch_shape:
            first = f"{leaf.torch_key}: the checkpoint has shape {shape}, {desc} expects {leaf.torch_shape}"
            break
    known = {leaf.torch_key for leaf in leaves}
    unexpected = [k for k in backbone if k not in known]
    if first is None and not unexpected:
        return
    missing = [leaf.torch_key for leaf in wanted if leaf.torch_key not in backbone]
    lines = [f"{source} does not match the backbone {desc}."]
    if first:
        lines.append(f"First mismatch: {first}.")
    if missing:
        lines.append(f"Missing keys ({len(missing)}): {_first(missing)}")
    if unexpected:
        lines.append(f"Unexpected keys ({len(unexpected)}): {_first(unexpected)}")
    guess = guess_arch(backbone)
    if guess and guess != arch:
        lines.append(f"Its keys look like {guess}: pass --arch {guess}.")
    ckpt_d = infer_embedding_size(backbone, arch) if _embedding_key(arch) in backbone else None
    if ckpt_d is not None and ckpt_d != embedding_size:
        lines.append(f"Its embedding size is {ckpt_d} ({_embedding_key(arch)}): pass --embedding_size {ckpt_d}.")
    if arch in models.vit.VARIANTS and "patch_embed.proj.weight" in backbone and "pos_embed" in backbone:
        p = int(np.shape(backbone["patch_embed.proj.weight"])[-1])
        g = int(round(np.shape(backbone["pos_embed"])[1] ** 0.5))
        if (p, g) != (patch_size or models.vit.DEFAULT_PATCH.get(arch, 9), input_size // p):
            lines.append(f"Its patches are {p}x{p} on a {g}x{g} grid: pass --patch_size {p} --input_size {g * p}.")
    raise ValueError(" ".join(lines))


def torch_to_flax(
    state_dict: Mapping[str, np.ndarray],
    arch: str,
    embedding_size: int | None = None,
    input_size: int = 112,
    width: float = 1.0,
    *,
    source: str = "the state dict",
    patch_size: int = 0,
) -> Variables:
    """Converts an insightface PyTorch backbone state dict into Flax ``{'params', 'batch_stats'}``.

    Args:
      state_dict: key -> array (``load_torch_state_dict`` reads a file); a ``module.`` prefix and non-backbone
        keys (heads, discriminators, counters) are tolerated and skipped with a log message.
      arch: one of ``models.ARCHS``.
      embedding_size: D; inferred from ``features.bias`` (or the final Linear) when None.
      input_size: the image side the model was trained on (112 for the reference).
      width: stage-width multiplier of the Flax IResNet (1.0 for every PyTorch model).
      source: how error messages name the input (e.g. its path).
      patch_size: the ViTs' patch side (0: the variant's own, 9); 0 for the other backbones.

    Returns:
      ``{'params': ..., 'batch_stats': ...}`` of float32 NumPy arrays, the tree ``models.build(arch, ...)`` uses.

    Raises:
      ValueError: a wrong architecture or embedding size (naming the first mismatching key and both shapes and
        listing missing/unexpected keys), or a head BatchNorm1d gamma that is not 1.
    """
    if arch not in models.ARCHS:
        raise ValueError(f"--arch {arch!r} is not a known backbone; choose one of {sorted(models.ARCHS)}")
    backbone, skipped = split_backbone_keys(state_dict)
    if skipped:
        log.info("%s: skipped non-backbone keys: %s", source, describe_skipped(skipped))
    if embedding_size is None:
        embedding_size = infer_embedding_size(backbone, arch)
    leaves = leaf_map(arch, int(embedding_size), int(input_size), float(width), int(patch_size))
    _check_keys(backbone, leaves, arch, int(embedding_size), int(input_size), source, int(patch_size))
    flat: dict[tuple[str, ...], np.ndarray] = {}
    for leaf in leaves:
        if leaf.layout == "counter":
            continue
        x = np.asarray(backbone[leaf.torch_key], dtype=np.float32)
        if leaf.layout == "ones":
            # The Flax head BatchNorm1d has no scale because the reference freezes it at 1
            # (the reference MixBCT code's backbones/iresnet.py).
            if not np.allclose(x, 1.0, rtol=0, atol=1e-6):
                raise ValueError(
                    f"{source}: {leaf.torch_key} must be all ones (the frozen gamma of the head "
                    f"BatchNorm1d, the reference MixBCT code's backbones/iresnet.py) but ranges over "
                    f"[{x.min():.6g}, {x.max():.6g}]; this "
                    f"model trained its gamma and {arch} in mixbct-jax cannot represent it."
                )
            continue
        flat[leaf.flax_path] = np.ascontiguousarray(_to_flax(leaf, x))
    return traverse_util.unflatten_dict(flat)


# ---------------------------------------------------------------------------------------------------------------
# Flax -> PyTorch
# ---------------------------------------------------------------------------------------------------------------


def flax_to_torch(
    variables: Mapping[str, Any],
    arch: str,
    embedding_size: int | None = None,
    input_size: int = 112,
    width: float = 1.0,
    patch_size: int = 0,
) -> StateDict:
    """Converts Flax ``{'params', 'batch_stats'}`` of ``arch`` into an insightface PyTorch state dict.

    The result is in PyTorch's key order and loads with ``strict=True`` into the reference's
    ``get_model(arch, num_features=D)``: it includes the head BatchNorm1d's frozen gamma (ones) and
    ``num_batches_tracked`` counters (0).

    Args:
      variables: the backbone variables (``checkpoint.load_params(workdir)[1]``).
      arch: one of ``models.ARCHS``.
      embedding_size: D; read from ``params/features/bias`` when None.
      input_size: the model's image side.
      width: the IResNet stage-width multiplier the variables were built with.
      patch_size: the ViTs' patch side (0: the variant's own, 9); 0 for the other backbones.

    Returns:
      key -> float32 NumPy array (int64 for the counters).

    Raises:
      ValueError: when the tree does not match ``arch`` (naming the first mismatching path and both shapes).
    """
    if arch not in models.ARCHS:
        raise ValueError(f"arch {arch!r} is not a known backbone; choose one of {sorted(models.ARCHS)}")
    flat = traverse_util.flatten_dict({k: variables[k] for k in ("params", "batch_stats") if k in variables})
    if embedding_size is None:
        bias = flat.get(("params", "features", "bias"))
        if bias is None:
            raise ValueError("the variables have no params/features/bias; are they an IResNet/MobileFaceNet backbone?")
        embedding_size = int(np.shape(bias)[0])
    leaves = leaf_map(arch, int(embedding_size), int(input_size), float(width), int(patch_size))
    desc = f"{arch} (embedding_size={embedding_size}, input_size={input_size}, width={width}"
    desc += f", patch_size={patch_size})" if patch_size else ")"
    for leaf in leaves:
        if leaf.flax_path is None:
            continue
        if leaf.flax_path not in flat:
            raise ValueError(f"the variables do not hold a {desc} backbone: {'/'.join(leaf.flax_path)} is missing")
        want = _to_flax(leaf, np.empty(leaf.torch_shape, np.float32)).shape
        if tuple(np.shape(flat[leaf.flax_path])) != want:
            raise ValueError(
                f"the variables do not hold a {desc} backbone: {'/'.join(leaf.flax_path)} has shape "
                f"{tuple(np.shape(flat[leaf.flax_path]))}, {desc} expects {want}"
            )
    extra = set(flat) - {leaf.flax_path for leaf in leaves}
    if extra:
        raise ValueError(
            f"the variables hold entries a {desc} backbone does not have: {sorted(map('/'.join, extra))[:10]}"
        )
    out: StateDict = {}
    for leaf in leaves:
        if leaf.layout == "counter":
            out[leaf.torch_key] = np.zeros((), np.int64)
        elif leaf.layout == "ones":
            out[leaf.torch_key] = np.ones(leaf.torch_shape, np.float32)
        else:
            x = np.asarray(flat[leaf.flax_path], dtype=np.float32)
            out[leaf.torch_key] = np.ascontiguousarray(_to_torch(leaf, x))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------


def load_torch_state_dict(path: str | os.PathLike) -> StateDict:
    """Reads a PyTorch state dict (plain, or under 'state_dict_backbone'/'state_dict'/'model') as NumPy arrays.

    Floating tensors become float32 (half and bfloat16 checkpoints included). Only tensors and plain containers
    are unpickled (``weights_only=True``).
    """
    import torch  # lazily: the rest of the package does not need torch

    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--torch {path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, ... depending on the damage
        raise ValueError(
            f"--torch {path} is not a loadable PyTorch state dict ({type(e).__name__}: {e}). Save "
            f"it with torch.save(model.state_dict(), path); pickled nn.Module objects are refused."
        ) from e
    if isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            raise ValueError(
                f"--torch {path} holds a dict with non-tensor entries and none of the keys "
                f"{list(_WRAPPER_KEYS)} (its keys: {list(obj)[:10]}); save the backbone's state_dict()."
            )
        obj = inner
    if not isinstance(obj, Mapping):
        raise ValueError(f"--torch {path} holds a {type(obj).__name__}, not a state dict (a dict of tensors).")
    out: StateDict = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"--torch {path}: entry {key!r} is a {type(value).__name__}, not a tensor.")
        value = value.detach().cpu()
        out[str(key)] = (value.float() if value.is_floating_point() else value).numpy()
    return out


def save_torch_state_dict(state_dict: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    """Writes ``state_dict`` as PyTorch tensors with ``torch.save``, atomically (temporary file + rename)."""
    import collections

    import torch

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A writable C-order copy: torch.from_numpy warns about read-only arrays (e.g. ones loaded from a checkpoint).
    tensors = collections.OrderedDict(
        (k, torch.from_numpy(np.array(v, order="C", copy=True))) for k, v in state_dict.items()
    )
    atomic_write(path, lambda tmp: torch.save(tensors, tmp))


def converted_config(
    arch: str, embedding_size: int, input_size: int, source: str, patch_size: int = 0
) -> ml_collections.ConfigDict:
    """The ``config.json`` of a converted run: what ``models.build`` needs plus where the weights came from."""
    config = ml_collections.ConfigDict()
    config.model = ml_collections.ConfigDict(
        dict(
            arch=arch,
            embedding_size=int(embedding_size),
            input_size=int(input_size),
            width=1.0,
            dtype="float32",
            patch_size=int(patch_size),
            remat="auto",
        )
    )
    config.data = ml_collections.ConfigDict(
        dict(
            input_scale="clean",
            input_scale_note=(
                "insightface models are trained on (x/255-0.5)/0.5 = (x-127.5)/127.5 ('clean'); the "
                "reference IJB-C script feeds (x-127.5)/128 ('reference', docs/deviations.md §8.19). Choose the "
                "evaluation scale explicitly when reproducing the reference's numbers."
            ),
        )
    )
    config.converted_from = str(source)
    return config


def check_out_file(out: str | os.PathLike) -> None:
    """Refuses an export ``--out`` that names a directory (an existing one, or a path ending in a separator)."""
    text = os.fspath(out)
    if os.path.isdir(text) or text.endswith(("/", os.sep)):
        raise ValueError(
            f"--out {text} is a directory; --export writes one file, e.g. --out "
            f"{os.path.join(text, 'backbone.pt')} (or backbone.onnx)"
        )


def check_new_run_dir(out: str | os.PathLike) -> None:
    """Refuses an ``--out`` that is a file or already holds checkpoints (an import never overwrites a run)."""
    out = pathlib.Path(out)
    ckpt_dir = out / checkpoint.CHECKPOINT_DIR
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    if ckpt_dir.is_dir() and any(ckpt_dir.iterdir()):
        raise ValueError(f"--out {out} already holds checkpoints ({ckpt_dir}); choose a new directory or delete it")


def import_torch(
    torch_path: str | os.PathLike,
    out: str | os.PathLike,
    arch: str,
    embedding_size: int | None = None,
    input_size: int = 112,
    patch_size: int = 0,
    width: float = 1.0,
) -> ml_collections.ConfigDict:
    """Converts a PyTorch backbone file into the run directory ``out``; returns the written config."""
    check_new_run_dir(out)
    source = str(pathlib.Path(torch_path).resolve())
    state = load_torch_state_dict(torch_path)
    backbone, skipped = split_backbone_keys(state)
    if skipped:
        print(f"skipped (not part of the backbone): {describe_skipped(skipped)}")
    if embedding_size is None:
        embedding_size = infer_embedding_size(backbone, arch)
    variables = torch_to_flax(
        backbone, arch, embedding_size, input_size, width, source=f"--torch {torch_path}", patch_size=patch_size
    )
    config = converted_config(arch, embedding_size, input_size, source, patch_size)
    with config.unlocked():
        config.model.width = float(width)
    checkpoint.save_model_only(out, config, variables)
    n = sum(x.size for x in jax.tree.leaves(variables["params"]))
    print(f"converted {source} -> {out} ({arch}, D={embedding_size}, input {input_size}, {n / 1e6:.2f}M parameters)")
    return config


def export_run(
    run_dir: str | os.PathLike, out: str | os.PathLike, arch: str | None = None, step: int | None = None
) -> StateDict:
    """Writes the backbone of the run in ``run_dir`` as a PyTorch state dict file ``out``; returns it."""
    config, variables = checkpoint.load_params(run_dir, step)
    m = config.model
    if arch is not None and arch != m.arch:
        raise ValueError(
            f"--arch {arch} does not match {run_dir}/config.json model.arch={m.arch!r}; drop --arch "
            f"or pick the right run"
        )
    state = flax_to_torch(
        variables, m.arch, m.embedding_size, m.input_size, m.get("width", 1.0), m.get("patch_size", 0)
    )
    save_torch_state_dict(state, out)
    print(f"exported {run_dir} ({m.arch}, D={m.embedding_size}) -> {out} ({len(state)} entries)")
    return state


def main(argv: list[str] | None = None) -> None:
    """Command line; see the module docstring."""
    parser = argparse.ArgumentParser(
        prog="python -m mixbct_jax.convert",
        description="Convert insightface backbones into mixbct-jax run directories (--torch: a PyTorch state dict; "
        "--onnx: an ONNX recognition model as insightface's model packs ship them) and run directories "
        "back out (--export: a PyTorch state dict, or ONNX when --out ends in .onnx).",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--torch", metavar="FILE", help="PyTorch state dict (.pth/.pt) to import")
    source.add_argument("--onnx", metavar="FILE", help="insightface IResNet ONNX model (.onnx) to import")
    source.add_argument("--export", metavar="RUN_DIR", help="run directory whose backbone to export")
    parser.add_argument(
        "--arch",
        choices=sorted(models.ARCHS),
        help="backbone architecture (required with --torch; checked against the run with --export)",
    )
    parser.add_argument("--embedding_size", type=int, default=None, help="D (default: inferred from features.bias)")
    parser.add_argument("--input_size", type=int, default=None, help="image side the model was trained on (112)")
    parser.add_argument(
        "--patch_size",
        type=int,
        default=None,
        help="ViTs: patch side (default: the variant's own, 9 for the insightface ViTs)",
    )
    parser.add_argument(
        "--width",
        type=float,
        default=None,
        help="IResNets: stage-width multiplier of a scaled-down model (default 1; --onnx reads it)",
    )
    parser.add_argument("--step", type=int, default=None, help="checkpoint step to export (default: latest)")
    parser.add_argument(
        "--out",
        required=True,
        help="--torch/--onnx: the run directory to create; --export: the .pt (or .onnx) file to write",
    )
    from mixbct_jax import cli

    args = parser.parse_args(None if argv is None else cli.snake_case_flags(argv))
    if args.torch is not None:
        if args.arch is None:
            parser.error("--torch needs --arch (e.g. --arch r18)")
        if args.step is not None:
            parser.error("--step applies to --export only")
        import_torch(
            args.torch,
            args.out,
            args.arch,
            args.embedding_size,
            args.input_size or 112,
            args.patch_size or 0,
            args.width or 1.0,
        )
    elif args.onnx is not None:
        from mixbct_jax import onnx_io

        if (
            args.step is not None
            or args.embedding_size is not None
            or args.input_size is not None
            or args.width is not None
            or args.patch_size is not None
        ):
            parser.error(
                "--onnx reads the embedding size, input size and width from the graph; pass only --arch "
                "(optional) and --out"
            )
        onnx_io.import_onnx(args.onnx, args.out, args.arch)
    else:
        if (
            args.embedding_size is not None
            or args.input_size is not None
            or args.patch_size is not None
            or args.width is not None
        ):
            parser.error(
                "--export reads the embedding and input size, patch size and width from the run's "
                "config.json; drop them"
            )
        check_out_file(args.out)
        if str(args.out).endswith(".onnx"):
            from mixbct_jax import onnx_io

            onnx_io.export_onnx(args.export, args.out, args.step, arch=args.arch)
        else:
            export_run(args.export, args.out, args.arch, args.step)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from mixbct_jax import cli

    cli.run(main)
