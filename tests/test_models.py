"""Backbones by shape and parameter count (the reference MixBCT code's backbones/iresnet.py)."""

import collections

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from mixbct_jax import config as config_lib
from mixbct_jax import models


def count(arch, d, size=112, **kw):
    model = models.build(arch, embedding_size=d, input_size=size, **kw)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))


@pytest.mark.parametrize(
    "arch,d,expected_millions",
    [
        ("r18", 128, 14.39),
        ("r18", 256, 17.60),
        ("r18", 512, 24.03),
        ("r34", 512, 34.14),
        ("r50", 128, 33.96),
        ("r100", 512, 65.16),
    ],
)
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


def matmul_dtypes(fn, *args) -> collections.Counter:
    """(primitive, operand dtypes) of every convolution and dot product in ``fn``'s jaxpr, nested ones included."""
    found = collections.Counter()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in ("conv_general_dilated", "dot_general"):
                found[eqn.primitive.name, tuple(str(v.aval.dtype) for v in eqn.invars)] += 1
            for param in eqn.params.values():
                for sub in param if isinstance(param, (list, tuple)) else [param]:
                    if isinstance(sub, (jax.extend.core.Jaxpr, jax.extend.core.ClosedJaxpr)):
                        walk(getattr(sub, "jaxpr", sub))

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def test_bfloat16_config_runs_every_convolution_in_bfloat16_with_float32_parameters():
    """config.model.dtype=bfloat16: the 13 convolutions and the fc of r_tiny take bf16 operands.

    That holds forward and backward, while parameters and the embedding stay float32; the embedding is within 3%
    (relative L2) of the float32 model's with the same parameters, and not equal to it (measured: 0.85%).
    """
    config = config_lib.default_config()
    config.model.update(arch="r_tiny", embedding_size=16, input_size=32, width=0.25)
    x = jax.random.uniform(jax.random.key(1), (8, 32, 32, 3), minval=-1, maxval=1)
    variables = models.build_from_config(config.model).init(jax.random.key(0), x, train=False)  # float32
    outputs = {}
    for dtype in ("float32", "bfloat16"):
        config.model.dtype = dtype
        model = models.build_from_config(config.model)
        own = jax.eval_shape(lambda x, model=model: model.init(jax.random.key(0), x, train=False), x)
        assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(own))

        def embed(params, x, model=model):  # train=True: batch statistics keep the activations O(1), as in training
            return model.apply(
                {"params": params, "batch_stats": variables["batch_stats"]}, x, train=True, mutable=["batch_stats"]
            )[0]

        def loss(params, x):
            return jnp.sum(embed(params, x) ** 2)

        assert matmul_dtypes(embed, variables["params"], x) == {
            ("conv_general_dilated", (dtype, dtype)): 13,
            ("dot_general", (dtype, dtype)): 1,
        }
        # Backward: the forward again, the input gradients (not of the stem: the image needs none) and the kernels'.
        assert matmul_dtypes(jax.grad(loss), variables["params"], x) == {
            ("conv_general_dilated", (dtype, dtype)): 13 + 12 + 13,
            ("dot_general", (dtype, dtype)): 1 + 2,
        }
        outputs[dtype] = np.asarray(jax.jit(embed)(variables["params"], x))
        assert outputs[dtype].dtype == np.float32
    error = np.linalg.norm(outputs["bfloat16"] - outputs["float32"]) / np.linalg.norm(outputs["float32"])
    assert 1e-4 < error < 0.03, error


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
