"""The per-device train step against a single-device reference computation written here.

The reference does what one GPU would do with the whole global batch: a forward per 4-row chunk (so BatchNorm
statistics are per device, as in the reference's per-GPU BN), a full C-way softmax cross-entropy over all 16
rows, ``jax.grad`` of that, and the same optax update.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh

from mixbct_jax import config as config_lib
from mixbct_jax import step as step_lib
from mixbct_jax.heads import margin, sharded_fc

C, N, D, SIZE = 10, 16, 16, 32


def tiny_config(**head):
    c = config_lib.default_config()
    c.model.arch, c.model.embedding_size, c.model.input_size, c.model.width = "r_tiny", D, SIZE, 0.125
    c.data.global_batch = N
    c.head.update(head)
    return c


def build(config, method_name="none", devices=None, mode="shard_map"):
    devices = devices if devices is not None else jax.devices()
    config.bct.method, config.parallel = method_name, mode
    ts = step_lib.build(
        config, num_classes=C, steps_per_epoch=10, total_steps=100, mesh=Mesh(np.array(devices), ("data",))
    )
    return ts, ts.init_fn(jax.random.key(0))


def make_batch(seed=0):
    rng = np.random.RandomState(seed)
    return {
        "image": rng.randint(0, 256, (N, SIZE, SIZE, 3)).astype(np.uint8),
        "label": rng.randint(0, C, N).astype(np.int32),
        "index": np.arange(N, dtype=np.int32),
    }


def reference_step(model, tx, state, batch, num_chunks, head_type="arcface"):
    """One plain single-device step with per-chunk BatchNorm and a full softmax over all C classes."""
    images = (batch["image"].astype(np.float32) / 255 - 0.5) / 0.5
    labels = jnp.asarray(batch["label"])
    params = state["params"]

    def loss_fn(params):
        embs, stats = [], []
        for chunk in np.split(images, num_chunks):
            e, mut = model.apply(
                {"params": params["backbone"], "batch_stats": state["batch_stats"]},
                chunk,
                train=True,
                mutable=["batch_stats"],
            )
            embs.append(e)
            stats.append(mut["batch_stats"])
        emb = jnp.concatenate(embs)  # [N, D]
        if head_type == "softmax":
            logits = emb @ params["head"]["kernel"] + params["head"]["bias"]
        else:
            w = params["head"]["centres"][:C]
            e_n = emb / jnp.linalg.norm(emb, axis=1, keepdims=True)
            w_n = w / jnp.linalg.norm(w, axis=1, keepdims=True)
            logits = margin.arcface(jnp.clip(e_n @ w_n.T, -1, 1), labels)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, jax.tree.map(lambda *xs: sum(xs) / len(xs), *stats)

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, _ = tx.update(grads, state["opt_state"], params)
    return loss, optax.apply_updates(params, updates), stats


def run_parallel(config, mode, devices, batch, method_name="none", steps=1):
    par, state = build(config, method_name, devices, mode)
    model, tx = par.model, par.tx
    host_state = jax.tree.map(np.asarray, state)
    st = par.to_device(state)
    for _ in range(steps):
        st, metrics = par.step(st, par.put_batch(batch), jax.random.key(1), par.consts_to_device({}))
    return model, tx, host_state, par.from_device(jax.tree.map(np.asarray, st)), metrics


def assert_tree_close(a, b, rtol=2e-4, atol=2e-5):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol, err_msg=str(path))


@pytest.mark.parametrize("head_type", ["arcface", "softmax"])
def test_four_device_step_equals_single_device_reference(head_type):
    config = tiny_config(type=head_type)
    batch = make_batch()
    model, tx, state0, state1, metrics = run_parallel(config, "shard_map", jax.devices()[:4], batch)
    loss, params, stats = reference_step(model, tx, state0, batch, num_chunks=4, head_type=head_type)
    np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-5)
    ref_params = jax.tree.map(np.asarray, params)
    if head_type != "softmax":  # the padded rows (12 = 3 per shard x 4 > 10 classes) must stay zero
        assert np.all(state1["params"]["head"]["centres"][C:] == 0)
        state1["params"]["head"]["centres"] = state1["params"]["head"]["centres"][:C]
        ref_params["head"]["centres"] = ref_params["head"]["centres"][:C]
    assert_tree_close(state1["params"], ref_params)
    assert_tree_close(state1["batch_stats"], stats)
    assert int(state1["step"]) == 1


def test_one_device_step_equals_reference_with_one_chunk():
    config = tiny_config()
    batch = make_batch(0)
    model, tx, state0, state1, metrics = run_parallel(config, "shard_map", jax.devices()[:1], batch)
    loss, params, _ = reference_step(model, tx, state0, batch, num_chunks=1)
    np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-5)
    assert_tree_close(state1["params"]["backbone"], params["backbone"])


@pytest.mark.parametrize("method_name", ["none", "mixbct"])
def test_shard_map_equals_pmap(method_name):
    config = tiny_config()
    batch = make_batch(2)
    rng = np.random.RandomState(3)
    batch["old_features"] = rng.normal(size=(N, D)).astype(np.float32)
    batch["credible"] = rng.rand(N) < 0.8
    *_, s_shard, m_shard = run_parallel(config, "shard_map", jax.devices()[:4], batch, method_name, steps=2)
    *_, s_pmap, m_pmap = run_parallel(config, "pmap", jax.devices()[:4], batch, method_name, steps=2)
    assert_tree_close(s_shard, s_pmap, rtol=1e-5, atol=1e-6)
    for k in m_shard:
        np.testing.assert_allclose(float(m_shard[k]), float(m_pmap[k]), rtol=1e-5, err_msg=k)


def test_sharded_cross_entropy_equals_full_softmax_loss_and_gradients():
    """The distributed CE with sharded centres vs a full softmax: loss and gradients, relative 1e-5."""
    devices = jax.devices()[:4]
    mesh = Mesh(np.array(devices), ("data",))
    num_classes, rows = 37, sharded_fc.rows_per_shard(37, 4)
    rng = np.random.RandomState(0)
    emb = jnp.asarray(rng.normal(size=(N, D)), jnp.float32)
    labels = jnp.asarray(rng.randint(0, num_classes, N), jnp.int32)
    centres = sharded_fc.init_centres(jax.random.key(0), rows * 4, D, num_classes) * 100
    head = tiny_config().head

    def sharded(emb, centres):
        def body(e, y, w):
            loss, _ = sharded_fc.margin_softmax_loss(e, y, w, axis_name="data", num_classes=num_classes, head=head)
            return jnp.mean(loss)

        def per_device_grads(e, y, w):
            loss, (ge, gw) = jax.value_and_grad(body, argnums=(0, 2))(e, y, w)
            return loss, ge, gw

        from jax.sharding import PartitionSpec as P

        f = jax.shard_map(
            per_device_grads,
            mesh=mesh,
            in_specs=(P("data"), P("data"), P("data")),
            out_specs=(P(), P("data"), P("data")),
            check_vma=False,
        )
        return f(emb, labels, centres)

    def full(emb, centres):
        w = centres[:num_classes]
        e_n = emb / jnp.linalg.norm(emb, axis=1, keepdims=True)
        w_n = w / jnp.linalg.norm(w, axis=1, keepdims=True)
        logits = margin.arcface(jnp.clip(e_n @ w_n.T, -1, 1), labels)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    loss, g_emb, g_w = sharded(emb, centres)
    ref_loss, (ref_ge, ref_gw) = jax.value_and_grad(full, argnums=(0, 1))(emb, centres)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(g_emb, ref_ge, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g_w[:num_classes], ref_gw[:num_classes], rtol=1e-5, atol=1e-7)
    assert np.all(np.asarray(g_w[num_classes:]) == 0)


def test_step_is_traced_once_and_state_is_donated(monkeypatch):
    make_body = step_lib._make_body
    # chex raises on a second trace of the per-device program.
    monkeypatch.setattr(step_lib, "_make_body", lambda *a, **kw: chex.assert_max_traces(make_body(*a, **kw), n=1))
    par, state = build(tiny_config(), devices=jax.devices()[:4])
    st = par.to_device(state)
    for seed in range(3):
        old = st
        st, _ = par.step(st, par.put_batch(make_batch(seed)), jax.random.key(0), {})
        assert jax.tree.leaves(old)[0].is_deleted()  # donated
