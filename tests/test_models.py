"""Backbones by shape and parameter count (the reference MixBCT code's backbones/iresnet.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixbct_jax import models


def count(arch, d, size=112, **kw):
    model = models.build(arch, embedding_size=d, input_size=size, **kw)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))


@pytest.mark.parametrize("arch,d,expected_millions", [
    ("r18", 128, 14.39), ("r18", 256, 17.60), ("r18", 512, 24.03),
    ("r34", 512, 34.14), ("r50", 128, 33.96), ("r100", 512, 65.16)])
def test_iresnet_parameter_counts_match_spec(arch, d, expected_millions):
    # + d: the last BatchNorm's frozen scale, which the reference counts and we do not store.
    assert round((count(arch, d) + d) / 1e6, 2) == expected_millions


def test_iresnet50_d512_has_exactly_43_590_848_parameters():
    assert count("r50", 512) + 512 == 43_590_848


def test_iresnet_shapes_and_unnormalised_output():
    model = models.build("r18", embedding_size=32, input_size=32, width=0.125)
    x = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
    variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(x)
    out, _ = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
    assert out.shape == (3, 32) and out.dtype == jnp.float32
    assert not np.allclose(np.linalg.norm(out, axis=1), 1.0)
    assert "scale" not in variables["params"]["features"]  # gamma frozen at 1
    assert variables["params"]["stem_prelu"]["slope"].tolist() == [0.25] * 8
    # 112x112 reaches 7x7 before the flatten: the fc input is 7 * 7 * 512.
    r50 = models.build("r50", embedding_size=512)
    shapes = jax.eval_shape(lambda: r50.init(jax.random.key(0), jnp.zeros((1, 112, 112, 3)), train=False))
    assert shapes["params"]["fc"]["kernel"].shape == (7 * 7 * 512, 512)


def test_conv_init_is_normal_std_0_1():
    model = models.build("r18", embedding_size=16, input_size=32)
    params = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(jnp.zeros((1, 32, 32, 3)))["params"]
    kernel = np.asarray(params["layer3_0"]["conv1"]["kernel"])
    assert abs(kernel.std() - 0.1) < 0.005 and abs(kernel.mean()) < 0.005


def test_bfloat16_compute_keeps_float32_parameters():
    model = models.build("r_tiny", embedding_size=16, input_size=32, width=0.25, dtype="bfloat16")
    x = jnp.ones((2, 32, 32, 3))
    variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(x)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))
    assert jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x).dtype == jnp.float32


def test_mobilefacenet_builds_and_embeds():
    model = models.build("mbf", embedding_size=64, input_size=32)
    x = jnp.ones((2, 32, 32, 3))
    variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(x)
    assert jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x).shape == (2, 64)


def test_unknown_arch_and_bad_input_size_fail_clearly():
    with pytest.raises(ValueError, match="not a known backbone"):
        models.build("r999", embedding_size=8)
    model = models.build("r18", embedding_size=8, input_size=112)
    with pytest.raises(ValueError, match="112x112"):
        model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False)
