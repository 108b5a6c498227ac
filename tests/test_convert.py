"""PyTorch <-> Flax backbone conversion: numerical parity against PyTorch models written here.

The models are written from the reference MixBCT code's backbones/iresnet.py/§2.3.

The PyTorch models below are minimal re-statements of the insightface backbones (same module names, so the same
state-dict keys). All weights, BatchNorm affine parameters, running statistics and PReLU slopes are random, so a
wrong transpose, a wrong flatten order or a swapped statistic changes the embedding.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from torch import nn as tnn

from mixbct_jax import checkpoint, convert, embed, models

MAX_ABS = 1e-4
MIN_COS = 0.99999
STAGES = {"r18": (2, 2, 2, 2), "r50": (3, 4, 14, 3)}


# ---------------------------------------------------------------------------------------------------------------
# PyTorch reference models (the reference MixBCT code's backbones/iresnet.py and mobilefacenet.py),
# insightface module names
# ---------------------------------------------------------------------------------------------------------------


class TorchBasicBlock(tnn.Module):
    def __init__(self, cin: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = tnn.BatchNorm2d(cin, eps=1e-5)
        self.conv1 = tnn.Conv2d(cin, planes, 3, 1, 1, bias=False)
        self.bn2 = tnn.BatchNorm2d(planes, eps=1e-5)
        self.prelu = tnn.PReLU(planes)
        self.conv2 = tnn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # the stride sits on the second conv
        self.bn3 = tnn.BatchNorm2d(planes, eps=1e-5)
        self.downsample = None
        if stride != 1 or cin != planes:
            self.downsample = tnn.Sequential(
                tnn.Conv2d(cin, planes, 1, stride, bias=False), tnn.BatchNorm2d(planes, eps=1e-5)
            )

    def forward(self, x):
        y = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return y + (x if self.downsample is None else self.downsample(x))  # no activation after the add


class TorchIResNet(tnn.Module):
    def __init__(self, stages, embedding_size: int, widths=(64, 128, 256, 512), input_size: int = 112):
        super().__init__()
        self.conv1 = tnn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = tnn.BatchNorm2d(widths[0], eps=1e-5)
        self.prelu = tnn.PReLU(widths[0])
        cin = widths[0]
        for s, (n, planes) in enumerate(zip(stages, widths)):
            blocks = [TorchBasicBlock(cin if b == 0 else planes, planes, 2 if b == 0 else 1) for b in range(n)]
            setattr(self, f"layer{s + 1}", tnn.Sequential(*blocks))
            cin = planes
        self.bn2 = tnn.BatchNorm2d(cin, eps=1e-5)
        self.dropout = tnn.Dropout(p=0.0)
        side = input_size // 16
        self.fc = tnn.Linear(cin * side * side, embedding_size)
        self.features = tnn.BatchNorm1d(embedding_size, eps=1e-5)
        tnn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False  # frozen gamma

    def forward(self, x):  # x: [B, 3, input_size, input_size]
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.bn2(x), 1)  # C,H,W order
        return self.features(self.fc(self.dropout(x)))


class TorchSeq(tnn.Module):
    """insightface wraps every block's modules in an attribute ``layers``; ``residual`` adds the input."""

    def __init__(self, *modules, residual: bool = False):
        super().__init__()
        self.layers = tnn.Sequential(*modules)
        self.residual = residual

    def forward(self, x):
        y = self.layers(x)
        return x + y if self.residual else y


def _block(cin, cout, k=1, s=1, p=0, g=1, prelu=True):
    mods = [tnn.Conv2d(cin, cout, k, s, p, groups=g, bias=False), tnn.BatchNorm2d(cout)]
    return TorchSeq(*(mods + [tnn.PReLU(cout)] if prelu else mods))


def _depthwise(cin, cout, g, s, residual=False):
    return TorchSeq(_block(cin, g), _block(g, g, 3, s, 1, g), _block(g, cout, prelu=False), residual=residual)


class TorchMobileFaceNet(tnn.Module):
    """``mbf`` (blocks (1,4,6,2), scale 2), the reference MixBCT code's backbones/mobilefacenet.py."""

    def __init__(self, embedding_size: int):
        super().__init__()
        res = lambda c, n, g: TorchSeq(*[_depthwise(c, c, g, 1, residual=True) for _ in range(n)])  # noqa: E731
        self.layers = tnn.ModuleList(
            [
                _block(3, 128, 3, 2, 1),
                _block(128, 128, 3, 1, 1, 64),
                _depthwise(128, 128, 128, 2),
                res(128, 4, 128),
                _depthwise(128, 256, 256, 2),
                res(256, 6, 256),
                _depthwise(256, 256, 512, 2),
                res(256, 2, 256),
            ]
        )
        self.conv_sep = _block(256, 512)
        self.features = TorchSeq(
            _block(512, 512, 7, 1, 0, 512, prelu=False),
            tnn.Flatten(),
            tnn.Linear(512, embedding_size, bias=False),
            tnn.BatchNorm1d(embedding_size),
        )

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.features(self.conv_sep(x))


# ---------------------------------------------------------------------------------------------------------------
# Random weights with calibrated statistics. Every weight, BN affine parameter and PReLU slope is random; the BN
# running statistics are the batch statistics of a calibration batch (then perturbed), so every BN output is
# O(1) like in a trained model and the 1e-4 bound is meaningful rather than swamped by exploding activations.
# ---------------------------------------------------------------------------------------------------------------


def randomize_torch(model: tnn.Module, seed: int, calib: int = 2) -> tnn.Module:
    g = torch.Generator().manual_seed(seed)

    def calibrate(bn, inputs):  # pre-hook: this BN's statistics := its input's (perturbed) batch statistics
        x = inputs[0]
        dims = [0] if x.dim() == 2 else [0, 2, 3]
        # The head BN1d sees only `calib` rows: pool its variance over channels, or a near-zero estimate from two
        # samples would blow one embedding coordinate up.
        var = x.var(unbiased=False) if x.dim() == 2 else x.var(dims, unbiased=False)
        var = var * (torch.rand(x.shape[1], generator=g) * 0.45 + 0.8)
        bn.running_mean.copy_(x.mean(dims) + torch.randn(x.shape[1], generator=g) * 0.1 * var.sqrt())
        bn.running_var.copy_(var)
        bn.num_batches_tracked.fill_(1000)

    hooks = []
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, tnn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.weight[0].numel() ** 0.5)
            elif isinstance(m, (tnn.BatchNorm1d, tnn.BatchNorm2d)):
                if m.weight.requires_grad:  # the head's frozen gamma stays 1
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
                hooks.append(m.register_forward_pre_hook(calibrate))
            elif isinstance(m, tnn.PReLU):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.45 + 0.05)
        # One inference pass: each BN is calibrated just before it normalises, so later layers see O(1) inputs.
        model.eval()(torch.randn((calib, 3, 112, 112), generator=g))
    for h in hooks:
        h.remove()
    return model


def random_flax_variables(net, seed: int, calib: int = 4):
    rng = np.random.default_rng(seed)
    abstract = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros((1, 112, 112, 3)), train=False))
    flat = {}
    for path, s in traverse_util.flatten_dict(abstract).items():
        shape, name = s.shape, path[-1]
        if name == "kernel":
            x = rng.normal(0, 1 / np.sqrt(np.prod(shape[:-1])), shape)
        elif name == "scale":
            x = rng.uniform(0.5, 1.5, shape)
        elif name == "bias":
            x = rng.normal(0, 0.2, shape)
        elif name == "slope":
            x = rng.uniform(0.05, 0.5, shape)
        else:  # mean, var: zero, so one train step with Flax's momentum 0.9 leaves 0.1 x the batch statistics
            x = np.zeros(shape)
        flat[path] = np.asarray(x, np.float32)
    variables = traverse_util.unflatten_dict(flat)
    x = rng.uniform(-1, 1, (calib, 112, 112, 3)).astype(np.float32)
    _, updates = jax.jit(lambda v, x: net.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
    stats = traverse_util.flatten_dict(jax.tree.map(lambda a: np.asarray(a) * 10.0, updates["batch_stats"]))
    for path, a in stats.items():
        if path[-1] == "mean":
            var = stats[path[:-1] + ("var",)]
            a = a + rng.normal(0, 0.1, a.shape) * np.sqrt(var)
        else:
            a = a * rng.uniform(0.8, 1.25, a.shape)
        stats[path] = a.astype(np.float32)
    variables["batch_stats"] = traverse_util.unflatten_dict(stats)
    return variables


def flax_embed(net, variables, x: np.ndarray) -> np.ndarray:
    return np.asarray(jax.jit(lambda v, x: net.apply(v, x, train=False))(variables, x))


def images(seed: int, n: int = 2) -> tuple[np.ndarray, torch.Tensor]:
    """The same random batch as NHWC (Flax) and NCHW (PyTorch)."""
    x = np.random.default_rng(seed).uniform(-1, 1, (n, 112, 112, 3)).astype(np.float32)
    return x, torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def parity(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(max abs difference, min row cosine in float64)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(np.abs(a - b).max()), float(cos.min())


def assert_parity(jax_emb, torch_emb, label: str) -> None:
    diff, cos = parity(jax_emb, torch_emb)
    print(f"\n[parity] {label}: max|diff|={diff:.3g} 1-cos={1 - cos:.1e} max|emb|={np.abs(torch_emb).max():.3g}")
    assert diff <= MAX_ABS and cos >= MIN_COS, (label, diff, cos)


def torch_embed(model: tnn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(x).numpy()


@pytest.fixture(scope="module")
def r18_file(tmp_path_factory) -> tuple[pathlib.Path, TorchIResNet]:
    model = randomize_torch(TorchIResNet(STAGES["r18"], 128), seed=1)
    path = tmp_path_factory.mktemp("torch") / "r18_backbone.pth"
    torch.save(model.state_dict(), path)
    return path, model


# ---------------------------------------------------------------------------------------------------------------
# PyTorch -> Flax
# ---------------------------------------------------------------------------------------------------------------


def test_r18_import_matches_pytorch(r18_file, tmp_path, capsys):
    path, model = r18_file
    out = tmp_path / "old_r18"
    convert.main(["--torch", str(path), "--arch", "r18", "--out", str(out)])  # D inferred from features.bias
    assert "converted" in capsys.readouterr().out
    config = checkpoint.read_config(out)
    assert (config.model.arch, config.model.embedding_size, config.model.input_size) == ("r18", 128, 112)
    assert config.converted_from == str(path.resolve())
    assert config.data.input_scale == "clean"
    x, xt = images(seed=2)
    emb = embed.load_embedder(out, batch_size=4)(x)
    assert emb.shape == (2, 128)
    assert_parity(emb, torch_embed(model, xt), "r18 torch->flax")


def test_r50_import_matches_pytorch(tmp_path):
    model = randomize_torch(TorchIResNet(STAGES["r50"], 512), seed=3)
    path = tmp_path / "r50.pth"
    # A DDP-wrapped file with a head, as a softmax old model would be saved.
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    state["module.cls_fc.weight"] = torch.zeros(10, 512)
    torch.save({"state_dict": state, "epoch": 3}, path)
    out = tmp_path / "old_r50"
    convert.main(["--torch", str(path), "--arch", "r50", "--embedding_size", "512", "--out", str(out)])
    config, variables = checkpoint.load_params(out)
    n_params = sum(x.size for x in jax.tree.leaves(variables["params"]))
    assert (
        n_params + 512 == 43_590_848
    )  # the reference's documented toy example, counting PyTorch's frozen gamma that Flax does not store
    x, xt = images(seed=4)
    net = models.build("r50", embedding_size=512)
    assert_parity(flax_embed(net, variables, x), torch_embed(model, xt), "r50 torch->flax")


def test_fc_rows_follow_nhwc_flatten():
    """PyTorch fc input column (c, h, w) must become Flax kernel row (h, w, c)."""
    leaf = next(leaf for leaf in convert.leaf_map("r18", 8) if leaf.torch_key == "fc.weight")
    c, h, w = leaf.chw
    assert (c, h, w) == (512, 7, 7)
    weight = np.zeros((8, c * h * w), np.float32)
    weight[5, 300 * h * w + 2 * w + 6] = 1.0  # d=5, c=300, h=2, w=6
    kernel = convert._to_flax(leaf, weight)
    assert kernel.shape == (h * w * c, 8)
    assert kernel[(2 * w + 6) * c + 300, 5] == 1.0 and kernel.sum() == 1.0
    np.testing.assert_array_equal(convert._to_torch(leaf, kernel), weight)


# ---------------------------------------------------------------------------------------------------------------
# Flax -> PyTorch
# ---------------------------------------------------------------------------------------------------------------


def test_export_loads_strict_into_pytorch(tmp_path):
    net = models.build("r18", embedding_size=64)
    variables = random_flax_variables(net, seed=5)
    run = tmp_path / "run"
    checkpoint.save_model_only(run, convert.converted_config("r18", 64, 112, "test"), variables, step=7)
    out = tmp_path / "export" / "r18.pt"
    convert.main(["--export", str(run), "--arch", "r18", "--out", str(out)])
    state = torch.load(out, map_location="cpu", weights_only=True)
    model = TorchIResNet(STAGES["r18"], 64)
    model.load_state_dict(state, strict=True)
    assert torch.equal(model.features.weight, torch.ones(64))
    x, xt = images(seed=6)
    assert_parity(flax_embed(net, variables, x), torch_embed(model, xt), "r18 flax->torch")
    with pytest.raises(ValueError, match="model.arch='r18'"):
        convert.main(["--export", str(run), "--arch", "r50", "--out", str(tmp_path / "x.pt")])


def test_mobilefacenet_round_trip_matches_pytorch():
    net = models.build("mbf", embedding_size=64)
    variables = random_flax_variables(net, seed=7, calib=8)
    state = convert.flax_to_torch(variables, "mbf")
    model = TorchMobileFaceNet(64)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    x, xt = images(seed=8)
    assert_parity(flax_embed(net, variables, x), torch_embed(model, xt), "mbf flax->torch")
    back = convert.torch_to_flax(state, "mbf")
    jax.tree.map(np.testing.assert_array_equal, back, variables)


@pytest.mark.parametrize(
    "arch,millions",
    [
        ("r18", 24.03),
        ("r34", 34.14),
        ("r50", 43.59),
        ("r100", 65.16),
        ("r200", None),
        ("mbf", None),
        ("mbf_large", None),
    ],
)
def test_leaf_map_covers_every_arch(arch, millions):
    leaves = convert.leaf_map(arch, 512)  # raises if a Flax variable is unmapped or mapped twice
    keys = [leaf.torch_key for leaf in leaves]
    assert len(keys) == len(set(keys))
    n = sum(
        int(np.prod(leaf.torch_shape))
        for leaf in leaves
        if not leaf.torch_key.endswith(("running_mean", "running_var", "num_batches_tracked"))
    )
    if (
        millions is not None
    ):  # the reference MixBCT code's backbones/iresnet.py parameter counts (D=512, frozen gamma included)
        assert round(n / 1e6, 2) == millions


@pytest.mark.parametrize("arch", ["r34", "mbf_large"])
def test_flax_torch_flax_identity(arch):
    abstract = convert.abstract_variables(arch, 32)
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), abstract)
    state = convert.flax_to_torch(variables, arch)
    assert list(state) == [leaf.torch_key for leaf in convert.leaf_map(arch, 32)]
    jax.tree.map(np.testing.assert_array_equal, convert.torch_to_flax(state, arch), variables)


# ---------------------------------------------------------------------------------------------------------------
# Errors and skipped keys
# ---------------------------------------------------------------------------------------------------------------


def test_wrong_arch_names_first_mismatching_key(r18_file, tmp_path):
    path, _ = r18_file
    with pytest.raises(ValueError) as e:
        convert.main(["--torch", str(path), "--arch", "r50", "--out", str(tmp_path / "x")])
    msg = str(e.value)
    assert "First mismatch: layer1.2.bn1.weight: r50 (embedding_size=128, input_size=112) expects shape (64,)" in msg
    assert "no such key" in msg and "pass --arch r18" in msg and str(path) in msg
    assert not (tmp_path / "x").exists()


def test_wrong_embedding_size_names_both_shapes(r18_file, tmp_path):
    path, _ = r18_file
    with pytest.raises(
        ValueError,
        match=r"fc\.weight: the checkpoint has shape \(128, 25088\), r18 "
        r"\(embedding_size=256, input_size=112\) expects \(256, 25088\)"
        r".*--embedding_size 128",
    ):
        convert.main(["--torch", str(path), "--arch", "r18", "--embedding_size", "256", "--out", str(tmp_path / "x")])


def test_deeper_checkpoint_lists_unexpected_keys():
    state = convert.flax_to_torch(
        jax.tree.map(lambda s: np.zeros(s.shape, np.float32), convert.abstract_variables("r34", 16)), "r34"
    )
    with pytest.raises(ValueError, match=r"Unexpected keys \(\d+\): layer1\.2\.bn1\.weight.*pass --arch r34"):
        convert.torch_to_flax(state, "r18")


def test_non_backbone_keys_are_reported_and_skipped(r18_file, tmp_path, capsys):
    path, model = r18_file
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    extras = {
        "cls_fc.weight": torch.zeros(5, 128),
        "cls_fc.bias": torch.zeros(5),
        "BCT_FC.weight": torch.zeros(128, 5),
        "NormFace.weight": torch.zeros(5, 128),
        "weight": torch.zeros(5, 128),
        "discriminator.0.weight": torch.zeros(100, 128),
        "eboundary.w": torch.zeros(5),
    }
    state.update({f"module.{k}": v for k, v in extras.items()})
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict_backbone": state, "global_step": 10}, wrapped)
    convert.main(["--torch", str(wrapped), "--arch", "r18", "--out", str(tmp_path / "a")])
    printed = capsys.readouterr().out
    for key in extras:
        assert key in printed
    assert "num_batches_tracked counters" in printed
    _, got = checkpoint.load_params(tmp_path / "a")
    want = convert.torch_to_flax(convert.load_torch_state_dict(path), "r18")
    jax.tree.map(np.testing.assert_array_equal, got, want)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        convert.main(["--torch", str(wrapped), "--arch", "r18", "--out", str(tmp_path / "a")])


def test_trained_head_gamma_is_refused(r18_file):
    state = convert.load_torch_state_dict(r18_file[0])
    state["features.weight"] = state["features.weight"] * 1.5
    with pytest.raises(ValueError, match=r"features\.weight must be all ones"):
        convert.torch_to_flax(state, "r18")


def test_unreadable_files_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        convert.load_torch_state_dict(tmp_path / "missing.pth")
    bad = tmp_path / "bad.pth"
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, bad)
    with pytest.raises(ValueError, match="state_dict_backbone"):
        convert.load_torch_state_dict(bad)


def test_package_imports_without_torch():
    code = "import sys; sys.modules['torch'] = None; import mixbct_jax.convert, mixbct_jax.embed"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=pathlib.Path(__file__).resolve().parents[1]
    )
    assert result.returncode == 0, result.stderr
