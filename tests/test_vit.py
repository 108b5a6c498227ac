"""ViT backbones (the reference MixBCT code's backbones/vit.py).

Parameter counts, PyTorch parity both ways, train-only randomness, and a tiny ViT through train -> extract ->
evaluate.

``TorchViT`` below re-states insightface's ``backbones/vit.py`` from the reference MixBCT code's backbones/vit.py
with its module names, so its state-dict keys (and their order) are the ones a real insightface ViT checkpoint has.
"""

from __future__ import annotations

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn as tnn

from mixbct_jax import checkpoint, convert, embed, evaluate, extract, models, train
from mixbct_jax import config as config_lib
from mixbct_jax.models import vit

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAX_ABS = 1e-4


# ---------------------------------------------------------------------------------------------------------------
# PyTorch reference (the reference MixBCT code's backbones/vit.py), insightface module names
# ---------------------------------------------------------------------------------------------------------------


class TorchAttention(tnn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = tnn.Linear(dim, 3 * dim, bias=False)
        self.proj = tnn.Linear(dim, dim)

    def forward(self, x):
        b, n, e = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, e // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0].float(), qkv[1].float(), qkv[2].float()  # [B, H, L, hd]
        attn = ((q @ k.transpose(-2, -1)) * (e // self.heads) ** -0.5).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, e))


class TorchMlp(tnn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = tnn.Linear(dim, hidden), tnn.ReLU6(), tnn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class TorchBlock(tnn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = tnn.LayerNorm(dim)
        self.attn = TorchAttention(dim, heads)
        self.norm2 = tnn.LayerNorm(dim)
        self.mlp = TorchMlp(dim, 4 * dim)

    def forward(self, x):  # drop path is left out: these tests compare deterministic forwards
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(tnn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = tnn.Conv2d(3, dim, patch, patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, L, E], row-major grid order


class TorchViT(tnn.Module):
    def __init__(self, dim: int, depth: int, heads: int, embedding_size: int, input_size: int = 112, patch: int = 9):
        super().__init__()
        self.num_patches = (input_size // patch) ** 2
        self.dim = dim
        self.patch_embed = PatchEmbed(patch, dim)
        self.pos_embed = tnn.Parameter(torch.zeros(1, self.num_patches, dim))
        self.blocks = tnn.ModuleList([TorchBlock(dim, heads) for _ in range(depth)])
        self.norm = tnn.LayerNorm(dim)
        self.feature = tnn.Sequential(
            tnn.Linear(dim * self.num_patches, dim, bias=False),
            tnn.BatchNorm1d(dim, eps=2e-5),
            tnn.Linear(dim, embedding_size, bias=False),
            tnn.BatchNorm1d(embedding_size, eps=2e-5),
        )
        self.mask_token = tnn.Parameter(torch.zeros(1, 1, dim))

    def forward(self, x, keep=None):
        """``keep`` [B, L_keep] (training only): the token indices each sample keeps (the masking under test)."""
        b = x.shape[0]
        x = self.patch_embed(x) + self.pos_embed
        if keep is not None:
            restore = torch.argsort(torch.cat([keep, _complement(keep, self.num_patches)], 1), 1)
            x = torch.gather(x, 1, keep[..., None].expand(-1, -1, self.dim))
        for block in self.blocks:
            x = block(x)
        x = self.norm(x.float())
        if keep is not None:
            fill = self.mask_token.expand(b, self.num_patches - x.shape[1], -1)
            x = torch.gather(torch.cat([x, fill], 1), 1, restore[..., None].expand(-1, -1, self.dim))
        return self.feature(x.reshape(b, self.num_patches * self.dim))


def _complement(keep: torch.Tensor, n: int) -> torch.Tensor:
    dropped = torch.ones(keep.shape[0], n, dtype=torch.bool)
    dropped.scatter_(1, keep, False)
    return torch.stack([torch.nonzero(row).flatten() for row in dropped])


TORCH_DIMS = {"vit_t": (256, 12, 8), "vit_s": (512, 12, 8), "vit_b": (512, 24, 8), "vit_l_dp005_mask_005": (768, 24, 8)}


def randomize(model: TorchViT, seed: int, input_size: int, calib: int = 8) -> TorchViT:
    """Random weights everywhere (LayerNorm and BN affine too); BN running statistics from a calibration batch.

    So every layer sees O(1) inputs and the 1e-4 bound means something.
    """
    g = torch.Generator().manual_seed(seed)

    def calibrate(bn, inputs):
        x = inputs[0]
        var = x.var(unbiased=False) * (torch.rand(x.shape[1], generator=g) * 0.45 + 0.8)  # pooled: few rows
        bn.running_mean.copy_(x.mean(0) + torch.randn(x.shape[1], generator=g) * 0.1 * var.sqrt())
        bn.running_var.copy_(var)

    hooks = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight")) or name == "norm.weight":
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif p.dim() >= 2 and "pos_embed" not in name and "mask_token" not in name:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        for m in model.modules():
            if isinstance(m, tnn.BatchNorm1d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                hooks.append(m.register_forward_pre_hook(calibrate))
        model.eval()(torch.rand((calib, 3, input_size, input_size), generator=g) * 2 - 1)
    for h in hooks:
        h.remove()
    return model


def batch(seed: int, n: int, size: int) -> tuple[np.ndarray, torch.Tensor]:
    x = np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)
    return x, torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


def torch_eval(model, xt) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(xt).numpy()


def flax_eval(net, variables, x) -> np.ndarray:
    return np.asarray(jax.jit(lambda v, x: net.apply(v, x, train=False))(variables, x))


def tiny_torch(seed: int) -> TorchViT:
    return randomize(TorchViT(64, 2, 4, 32, input_size=32, patch=4), seed, 32)


# ---------------------------------------------------------------------------------------------------------------
# Layout and parameter counts
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", sorted(TORCH_DIMS))
def test_parameter_counts_keys_and_shapes_match_pytorch(arch):
    with torch.device("meta"):  # no memory: shapes only
        ref = TorchViT(*TORCH_DIMS[arch], embedding_size=512)
    want = sum(p.numel() for p in ref.parameters())
    net = models.build(arch, embedding_size=512)
    abstract = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros((1, 112, 112, 3)), train=False))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract["params"])) == want
    leaves = convert.leaf_map(arch, 512)
    assert [(leaf.torch_key, leaf.torch_shape) for leaf in leaves] == [
        (k, tuple(v.shape)) for k, v in ref.state_dict().items()
    ]


def test_registered_variants_follow_spec():
    assert vit.drop_path_rates(0.1, 12) == pytest.approx(torch.linspace(0, 0.1, 12).tolist(), abs=1e-7)
    assert vit.num_kept_tokens(144, 0.1) == 129 and vit.num_kept_tokens(144, 0.05) == 136
    spec = {
        "vit_t": (256, 12, 0.1, 0.1, False),
        "vit_t_dp005_mask0": (256, 12, 0.05, 0.0, False),
        "vit_s": (512, 12, 0.1, 0.1, False),
        "vit_s_dp005_mask_0": (512, 12, 0.05, 0.0, False),
        "vit_b": (512, 24, 0.1, 0.1, True),
        "vit_b_dp005_mask_005": (512, 24, 0.05, 0.05, True),
        "vit_l_dp005_mask_005": (768, 24, 0.05, 0.05, True),
        "vit_l": (768, 24, 0.05, 0.05, True),
    }
    for arch, (e, depth, dp, mask, remat) in spec.items():
        net = models.build(arch, embedding_size=512)
        got = (net.embed_dim, net.depth, net.drop_path, net.mask_ratio, net.remat)
        assert got == (e, depth, dp, mask, remat) and (net.num_heads, net.patch_size, net.num_tokens) == (8, 9, 144)
    assert models.build("vit_b", embedding_size=8, remat="off").remat is False
    with pytest.raises(ValueError, match="apply to the ViTs only"):
        models.build("r18", embedding_size=8, patch_size=4)


# ---------------------------------------------------------------------------------------------------------------
# PyTorch parity (eval mode, float32, random weights)
# ---------------------------------------------------------------------------------------------------------------


def test_vit_t_import_matches_pytorch(tmp_path):
    model = randomize(TorchViT(*TORCH_DIMS["vit_t"], embedding_size=128), seed=1, input_size=112)
    path = tmp_path / "vit_t.pth"
    torch.save({"state_dict_backbone": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    out = tmp_path / "old_vit_t"
    convert.main(["--torch", str(path), "--arch", "vit_t", "--out", str(out)])  # D inferred from feature.3.bias
    config = checkpoint.read_config(out)
    assert (config.model.arch, config.model.embedding_size, config.model.patch_size) == ("vit_t", 128, 0)
    x, xt = batch(seed=2, n=3, size=112)
    emb, ref = embed.load_embedder(out, batch_size=4)(x), torch_eval(model, xt)
    assert np.abs(ref).max() > 0.5  # a meaningful scale for the absolute bound
    np.testing.assert_allclose(emb, ref, rtol=0, atol=MAX_ABS)


def test_tiny_vit_export_import_round_trip(tmp_path):
    model = tiny_torch(seed=3)
    net = models.build("vit_tiny", embedding_size=32, input_size=32)
    variables = convert.torch_to_flax({k: v.numpy() for k, v in model.state_dict().items()}, "vit_tiny", input_size=32)
    x, xt = batch(seed=4, n=4, size=32)
    np.testing.assert_allclose(flax_eval(net, variables, x), torch_eval(model, xt), rtol=0, atol=MAX_ABS)
    # Export through the command line from a run directory; PyTorch loads it strictly, in its own key order.
    run = tmp_path / "run"
    checkpoint.save_model_only(run, convert.converted_config("vit_tiny", 32, 32, "test", patch_size=4), variables)
    out = tmp_path / "vit_tiny.pt"
    convert.main(["--export", str(run), "--out", str(out)])
    state = torch.load(out, map_location="cpu", weights_only=True)
    assert list(state) == list(model.state_dict())
    back = TorchViT(64, 2, 4, 32, input_size=32, patch=4)
    back.load_state_dict(state, strict=True)
    np.testing.assert_allclose(torch_eval(back, xt), torch_eval(model, xt), rtol=0, atol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, convert.torch_to_flax(state, "vit_tiny", input_size=32), variables)


def test_wrong_patch_size_is_named(tmp_path):
    state = {k: v.numpy() for k, v in TorchViT(64, 2, 4, 32, input_size=32, patch=8).state_dict().items()}
    with pytest.raises(ValueError, match=r"First mismatch: pos_embed.*pass --patch_size 8 --input_size 32"):
        convert.torch_to_flax(state, "vit_tiny", input_size=32)
    with pytest.raises(ValueError, match="pass --arch vit_s"):
        convert.torch_to_flax(
            {
                k: np.zeros(v.shape, np.float32)
                for k, v in convert.flax_to_torch(
                    jax.tree.map(lambda s: np.zeros(s.shape, np.float32), convert.abstract_variables("vit_s", 16)),
                    "vit_s",
                ).items()
            },
            "vit_t",
        )


def test_training_masking_matches_pytorch_with_the_same_kept_tokens():
    """Train mode, drop path 0: keep / encode / LN / fill with mask_token / un-shuffle, then BN on batch stats."""
    model = tiny_torch(seed=5)
    variables = convert.torch_to_flax({k: v.numpy() for k, v in model.state_dict().items()}, "vit_tiny", input_size=32)
    net = vit.VisionTransformer(
        embed_dim=64, depth=2, num_heads=4, mask_ratio=0.25, embedding_size=32, input_size=32, patch_size=4
    )
    x, xt = batch(seed=6, n=4, size=32)
    seen = {}

    def record_head_input(next_fun, args, kwargs, context):
        if context.module.name == "feature_fc1":
            seen["x"] = args[0]
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record_head_input):
        emb, _ = net.apply(variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(7)})
    tokens = np.asarray(seen["x"]).reshape(4, 64, 64)  # [B, L, E] after the un-shuffle
    filled = np.all(tokens == np.asarray(variables["params"]["mask_token"]), axis=-1)  # [B, L]
    assert (filled.sum(1) == 64 - vit.num_kept_tokens(64, 0.25)).all()
    assert len({tuple(row) for row in filled}) > 1  # each sample draws its own mask
    keep = torch.from_numpy(np.stack([np.flatnonzero(~row) for row in filled]))
    with torch.no_grad():
        ref = model.train()(xt, keep=keep).numpy()  # BatchNorm on batch statistics, as Flax's train=True
    np.testing.assert_allclose(np.asarray(emb), ref, rtol=0, atol=MAX_ABS)


# ---------------------------------------------------------------------------------------------------------------
# Randomness: training only, driven by the 'dropout' key
# ---------------------------------------------------------------------------------------------------------------


def test_masking_and_drop_path_only_in_training():
    net = models.build("vit_tiny", embedding_size=16, input_size=16)  # 16 tokens: quick to compile
    x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
    variables = net.init(jax.random.key(0), x, train=False)
    eval_fn = jax.jit(lambda v, x: net.apply(v, x, train=False))
    keyed_eval = jax.jit(lambda v, x, k: net.apply(v, x, train=False, rngs={"dropout": k}))
    a = np.asarray(eval_fn(variables, x))
    # Deterministic without any key, and a key changes nothing.
    np.testing.assert_array_equal(a, np.asarray(eval_fn(variables, x)))
    for k in (9, 10):
        np.testing.assert_array_equal(a, np.asarray(keyed_eval(variables, x, jax.random.key(k))))

    train_fn = jax.jit(lambda v, x, k: net.apply(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": k})[0])

    def train(key):
        return np.asarray(train_fn(variables, x, key))

    np.testing.assert_array_equal(train(jax.random.key(2)), train(jax.random.key(2)))  # reproducible
    assert np.abs(train(jax.random.key(2)) - train(jax.random.key(3))).max() > 1e-3
    # With masking and drop path off, training differs from evaluation only by BatchNorm's batch statistics.
    plain = net.clone(mask_ratio=0.0, drop_path=0.0)
    plain_fn = jax.jit(lambda v, x, k: plain.apply(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": k})[0])
    np.testing.assert_array_equal(
        np.asarray(plain_fn(variables, x, jax.random.key(2))), np.asarray(plain_fn(variables, x, jax.random.key(3)))
    )


def test_stochastic_depth_drops_whole_samples_and_rescales():
    x = jnp.ones((20000, 3, 2))
    y = np.asarray(vit.stochastic_depth(x, 0.25, jax.random.key(0)))
    per_sample = y.reshape(20000, -1)
    assert set(np.unique(per_sample).tolist()) == {0.0, float(np.float32(1 / 0.75))}
    assert (per_sample.min(1) == per_sample.max(1)).all()  # a whole sample is kept or dropped
    assert abs((per_sample[:, 0] == 0).mean() - 0.25) < 0.015


def test_remat_and_bfloat16():
    x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
    net = models.build("vit_tiny", embedding_size=16, input_size=16)
    variables = net.init(jax.random.key(0), x, train=False)
    rematted = models.build("vit_tiny", embedding_size=16, input_size=16, remat="on")
    assert rematted.remat and jax.tree.structure(
        rematted.init(jax.random.key(0), x, train=False)
    ) == jax.tree.structure(variables)

    def loss(net, params):
        out, _ = net.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            x,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": jax.random.key(4)},
        )
        return jnp.sum(out**2)

    g0, g1 = (jax.jit(jax.grad(lambda p, n=n: loss(n, p)))(variables["params"]) for n in (net, rematted))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g0, g1)
    bf16 = models.build("vit_tiny", embedding_size=16, input_size=16, dtype="bfloat16")
    out = jax.jit(lambda v, x: bf16.apply(v, x, train=False))(variables, x)
    assert out.dtype == jnp.float32
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))
    ref = np.asarray(jax.jit(lambda v, x: net.apply(v, x, train=False))(variables, x))
    assert np.abs(np.asarray(out) - ref).max() < 0.05 * np.abs(ref).max()


# ---------------------------------------------------------------------------------------------------------------
# End to end: a tiny ViT through train_and_evaluate, extract and evaluate
# ---------------------------------------------------------------------------------------------------------------


def test_tiny_vit_trains_extracts_and_evaluates(tmp_path):
    config = config_lib.load(ROOT / "configs" / "quickstart_vit.py", "runlocal")
    with config.unlocked():
        config.total_steps = 4
        config.checkpoint.asynchronous = False
        config.data.source = "synthetic:num_classes=24,min_images=4,max_images=8,image_size=32,seed=0"  # small
    assert (config.model.arch, config.model.input_size, config.model.patch_size) == ("vit_tiny", 32, 4)
    run = tmp_path / "run"
    train.train_and_evaluate(config, run)
    _, variables = checkpoint.load_params(run)
    init = models.build_from_config(config.model).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    assert jax.tree.structure(variables["params"]) == jax.tree.structure(init["params"])
    paths = extract.extract(run, None, tmp_path / "emb", batch_size=16)
    features = np.load(paths["features"])
    assert features.shape[1] == 64 and np.isfinite(features).all()
    # Extraction is eval mode: the same rows through the run's model with train=False, no RNG anywhere.
    embedder = embed.load_embedder(run, batch_size=16)
    images = np.random.default_rng(0).uniform(-1, 1, (5, 32, 32, 3)).astype(np.float32)
    net = models.build_from_config(config.model)
    np.testing.assert_allclose(embedder(images), flax_eval(net, variables, images), rtol=0, atol=1e-5)
    report = evaluate.evaluate(run, protocols={"retrieval": config.data.source}, out_dir=tmp_path / "eval")
    assert (tmp_path / "eval" / "report.json").is_file()
    print(report)


def test_train_step_masks_from_the_step_key_reproducibly():
    """The step hands the ViT a key folded from its per-device step key: same key, same update; new key, new one."""
    from jax.sharding import Mesh

    from mixbct_jax import step as step_lib

    c = config_lib.default_config()
    c.model.arch, c.model.embedding_size, c.model.input_size = "vit_tiny", 16, 16
    c.data.global_batch = 8
    devices = jax.devices()[:2]
    par = step_lib.build(c, num_classes=6, steps_per_epoch=5, total_steps=10, mesh=Mesh(np.array(devices), ("data",)))
    state = par.init_fn(jax.random.key(0))
    rng = np.random.RandomState(0)
    host = {
        "image": rng.randint(0, 256, (8, 16, 16, 3)).astype(np.uint8),
        "label": rng.randint(0, 6, 8).astype(np.int32),
        "index": np.arange(8, dtype=np.int32),
    }

    def run(key):
        st, metrics = par.step(
            par.to_device(jax.tree.map(np.copy, jax.device_get(state))),
            par.put_batch(host),
            jax.random.key(key),
            par.consts_to_device({}),
        )
        return np.asarray(st["params"]["backbone"]["patch_embed"]["kernel"]), float(metrics["loss"])

    (a, loss_a), (b, loss_b), (c2, loss_c) = run(1), run(1), run(2)
    np.testing.assert_array_equal(a, b)
    assert loss_a == loss_b and loss_a != loss_c and np.abs(a - c2).max() > 0


def test_recipe_with_a_vit_new_model_loads_and_builds():
    config = config_lib.load(ROOT / "configs" / "ms1mv3_r18_to_r50.py", "new_arch=vit_s,dim=256")
    assert config.is_locked and (config.model.arch, config.model.embedding_size) == ("vit_s", 256)
    net = models.build_from_config(config.model)
    abstract = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros((1, 112, 112, 3)), train=False))
    assert abstract["params"]["features"]["bias"].shape == (256,)
    with pytest.raises(ValueError, match="not a known backbone"):
        models.build_from_config(config_lib.load(ROOT / "configs" / "ms1mv3_r18_to_r50.py", "new_arch=vit_x").model)
