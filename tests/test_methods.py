"""The baseline BCT methods (L2, BCT, UniBCT, NCCL, AdvBCT) against NumPy computations of docs/methods.md's formulas.

Loss values are compared with NumPy re-implementations written here; gradients with central finite differences of
those NumPy functions (float64). Collective code runs in a 4-device ``shard_map`` exactly as inside the step.
Each method then trains a few steps through ``step.build`` on 4 fake devices. Metrics are global values
(identical on every device), so a test reads device 0's copy.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from mixbct_jax import bct as bct_lib
from mixbct_jax import config as config_lib
from mixbct_jax import step as step_lib
from mixbct_jax.bct import advbct, api, bct, l2, nccl, unibct
from mixbct_jax.data import old_embeddings as oe
from mixbct_jax.data import old_stats, splits
from mixbct_jax.heads import sharded_fc

W, C, N, D = 4, 10, 16, 16
ROWS = sharded_fc.padded_rows(C, W)  # 128: centres and prototypes are zero-padded to this
MESH = Mesh(np.array(jax.devices()[:W]), ("data",))
R, S = P("data"), P()


# ---------------------------------------------------------------------------------------------------------------
# NumPy references (SPEC formulas)
# ---------------------------------------------------------------------------------------------------------------
def nrm(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def logsumexp(x, axis):
    m = np.max(x, axis=axis, keepdims=True)
    return (m + np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))).squeeze(axis)


def np_arcface(cos, labels, s=64.0, m=0.5):
    """docs/methods.md (the margin head): target cos(theta + m), or c - sin(pi - m) m past cos(pi - m).

    Everything x s.
    """
    out = cos.copy()
    rows = np.arange(len(labels))
    c = cos[rows, labels]
    out[rows, labels] = np.where(
        c > math.cos(math.pi - m), c * math.cos(m) - np.sqrt(1 - c * c) * math.sin(m), c - math.sin(math.pi - m) * m
    )
    return out * s


def finite_difference(f, x, eps=1e-5):
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[i] += eps
        down[i] -= eps
        g[i] = (f(up) - f(down)) / (2 * eps)
    return g


def config(**bct):
    c = config_lib.default_config()
    c.model.arch, c.model.embedding_size, c.model.input_size, c.model.width = "r_tiny", D, 32, 0.125
    c.data.global_batch = N
    c.bct.update(bct)
    return c


def make_ctx(
    cfg,
    emb,
    labels,
    *,
    batch=None,
    params=None,
    state=None,
    centres=None,
    consts=None,
    step=0,
    steps_per_epoch=10,
    total_steps=100,
):
    return api.StepContext(
        embeddings=emb,
        batch=batch or {},
        labels=labels,
        params=params or {},
        state=state or {},
        centres=centres,
        key=jax.random.key(0),
        config=cfg,
        axis_name="data",
        global_batch=emb.shape[0] * W,
        step=jnp.asarray(step, jnp.int32),
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        consts=consts or {},
    )


def sharded(fn, in_specs, out_specs):
    return jax.jit(jax.shard_map(fn, mesh=MESH, in_specs=in_specs, out_specs=out_specs, check_vma=False))


def data(seed=0, n=N):
    rng = np.random.RandomState(seed)
    emb = rng.normal(size=(n, D)) * 3
    old = nrm(rng.normal(size=(n, D)))
    labels = rng.randint(0, C, n).astype(np.int32)
    return rng, emb, old, labels


def padded(table):
    return np.concatenate([table, np.zeros((ROWS - table.shape[0],) + table.shape[1:])]).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# L2 / weakened L2
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("threshold", [0.0, 0.2])
def test_l2_loss_and_gradient_match_numpy(threshold):
    _, emb, old, labels = data(1)
    cfg = config(l2_threshold=threshold, l2_weight=10.0)

    def ref(e):
        return 10.0 * np.mean(np.maximum(np.linalg.norm(old - nrm(e), axis=1) - threshold, 0.0))

    def body(e, o, y):
        share, g = jax.value_and_grad(lambda e: l2.extra_loss(make_ctx(cfg, e, y, batch={"old_features": o}))[0])(e)
        return share[None], g

    shares, grads = sharded(body, (R, R, R), (R, R))(
        jnp.asarray(emb, jnp.float32), jnp.asarray(old, jnp.float32), labels
    )
    np.testing.assert_allclose(np.sum(shares), ref(emb), rtol=1e-5)
    np.testing.assert_allclose(grads, finite_difference(ref, emb), rtol=1e-3, atol=1e-6)
    # Identical new and old directions: a zero (PyTorch's) rather than NaN gradient of the distance.
    np.testing.assert_array_equal(jax.grad(l2.safe_norm)(jnp.zeros(D)), np.zeros(D))


# ---------------------------------------------------------------------------------------------------------------
# BCT and UniBCT
# ---------------------------------------------------------------------------------------------------------------
def np_influence(emb, labels, prototypes):
    """docs/methods.md (BCT): mean CE of raw cosines n(e) . P^T over the C real classes."""
    logits = nrm(emb) @ prototypes.T
    return np.mean(logsumexp(logits, axis=1) - logits[np.arange(len(labels)), labels])


def run_influence(method, cfg, emb, labels, prototypes, step):
    def body(e, y, p):
        def loss(e):
            share, _, metrics = method.extra_loss(make_ctx(cfg, e, y, consts={"prototypes": p}, step=step))
            return share, metrics

        (share, metrics), g = jax.value_and_grad(loss, has_aux=True)(e)
        return share[None], g, metrics["bct/influence"][None]

    return sharded(body, (R, R, R), (R, R, R))(jnp.asarray(emb, jnp.float32), labels, padded(prototypes))


def test_bct_influence_loss_and_gradient_match_full_softmax():
    rng, emb, _, labels = data(2)
    prototypes = nrm(rng.normal(size=(C, D)))
    shares, grads, reported = run_influence(bct, config(influence_weight=1.0), emb, labels, prototypes, 0)
    ref = np_influence(emb, labels, prototypes)
    np.testing.assert_allclose(np.sum(shares), ref, rtol=1e-5)
    np.testing.assert_allclose(reported[0], ref, rtol=1e-5)
    # The padded (zero) prototype rows are not classes: a 128-way softmax would give a different gradient.
    np.testing.assert_allclose(
        grads, finite_difference(lambda e: np_influence(e, labels, prototypes), emb), rtol=1e-3, atol=1e-6
    )


def test_unibct_weight_is_zero_before_start_epoch():
    rng, emb, _, labels = data(3)
    prototypes = nrm(rng.normal(size=(C, D)))
    cfg = config(unibct_start_epoch=10)
    ref = np_influence(emb, labels, prototypes)
    before = run_influence(unibct, cfg, emb, labels, prototypes, step=99)  # epoch 9 (10 steps per epoch)
    after = run_influence(unibct, cfg, emb, labels, prototypes, step=100)  # epoch 10
    assert np.sum(before[0]) == 0 and np.all(np.asarray(before[1]) == 0)
    np.testing.assert_allclose(before[2][0], ref, rtol=1e-5)  # still computed and reported
    np.testing.assert_allclose(np.sum(after[0]), ref, rtol=1e-5)
    assert np.abs(np.asarray(after[1])).max() > 0


def np_refine_loop(v_new, v_old, labels, lam, temperature, axis):
    """docs/methods.md (UniBCT) step 4, one class at a time with an explicit inverse."""
    out = np.zeros((labels.max() + 1, v_old.shape[1]))
    for c in np.unique(labels):
        vn, vo = v_new[labels == c], v_old[labels == c]
        a = vn @ vn.T / temperature
        np.fill_diagonal(a, -1e9)
        a = np.exp(a - a.max(axis=axis, keepdims=True))
        a /= a.sum(axis=axis, keepdims=True)
        m = (1 - lam) * np.linalg.inv(np.eye(len(vn)) - lam * a)
        out[c] = (m @ vo).mean(axis=0)
    return out


def uneven_classes(seed):
    rng = np.random.RandomState(seed)
    counts = np.array([1, 2, 3, 5, 8, 1, 13, 4, 2, 6, 9])  # singletons and several padded block sizes
    labels = rng.permutation(np.repeat(np.arange(len(counts)), counts))
    return rng, labels


def test_unibct_column_refinement_is_the_class_mean():
    rng, labels = uneven_classes(4)
    v_new, v_old = rng.normal(size=(2, labels.size, D)) * 4  # raw, unnormalised, as the reference
    refined = unibct.refine_prototypes(v_new, v_old, labels, lam=0.9, temperature=0.05, softmax_axis=0)
    means = np.stack([v_old[labels == c].mean(axis=0) for c in range(labels.max() + 1)])
    np.testing.assert_allclose(refined, means, rtol=1e-5, atol=1e-5)


def test_unibct_row_refinement_matches_per_class_loop():
    rng, labels = uneven_classes(5)
    v_new, v_old = nrm(rng.normal(size=(labels.size, D))), rng.normal(size=(labels.size, D)) * 4
    refined = unibct.refine_prototypes(v_new, v_old, labels, lam=0.9, temperature=0.05, softmax_axis=1)
    ref = np_refine_loop(v_new, v_old, labels, 0.9, 0.05, axis=1)
    np.testing.assert_allclose(refined, ref, rtol=1e-5, atol=1e-5)
    means = np.stack([v_old[labels == c].mean(axis=0) for c in range(labels.max() + 1)])
    assert np.abs(refined - means).max() > 1e-2  # rows, unlike columns, do depend on the new features


@pytest.mark.parametrize("affinity", ["column", "row"])
def test_unibct_host_update_refines_saves_and_reloads(tmp_path, monkeypatch, affinity):
    monkeypatch.setattr(unibct, "_EMBED_CHUNK", 7)  # several chunks, classes spanning chunk boundaries
    rng, labels = uneven_classes(6)
    num_classes = labels.max() + 1
    v_old = (rng.normal(size=(labels.size, D)) * 4).astype(np.float32)
    v_new = rng.normal(size=(labels.size, D)).astype(np.float32)
    old = oe.OldEmbeddings(features=v_old)
    subset = splits.Subset(np.arange(labels.size), labels.astype(np.int32), int(num_classes))
    cfg = config(unibct_affinity=affinity, unibct_refine_epochs=(10, 20))
    initial = {"prototypes": np.zeros((ROWS, D), np.float32)}
    calls = []

    def embed_new(idx):
        calls.append(idx)
        return v_new[idx]

    kw = dict(config=cfg, workdir=tmp_path, embed_new=embed_new, old=old, subset=subset)
    assert unibct.host_update(9, consts=initial, **kw) is None
    new = unibct.host_update(10, consts=initial, **kw)["prototypes"]
    axis = 0 if affinity == "column" else 1
    expected = np_refine_loop(nrm(v_new.astype(np.float64)) if axis else v_new, v_old, labels, 0.9, 0.05, axis)
    assert new.shape == (ROWS, D) and np.all(new[num_classes:] == 0)
    np.testing.assert_allclose(new[:num_classes], expected, rtol=1e-4, atol=1e-4)
    assert bool(calls) == (affinity == "row")  # the reference's column softmax needs no new-model pass
    if calls:
        assert sorted(np.concatenate(calls).tolist()) == list(range(labels.size))
    assert (tmp_path / "unibct" / "prototypes_epoch010.npy").exists()
    calls.clear()
    assert unibct.host_update(11, consts={"prototypes": new}, **kw) is None  # already in place
    resumed = unibct.host_update(15, consts=initial, **kw)["prototypes"]  # a resume: reload, no recomputation
    np.testing.assert_array_equal(resumed, new)
    assert not calls


# ---------------------------------------------------------------------------------------------------------------
# NCCL
# ---------------------------------------------------------------------------------------------------------------
INTENDED = dict(
    nccl_logit_grad=True,
    nccl_normalize_logits=True,
    nccl_clamp_logits=False,
    nccl_amplify_grad=False,
    nccl_count_empty_slots=False,
)
REFERENCE = dict(
    nccl_logit_grad=False,
    nccl_normalize_logits=False,
    nccl_clamp_logits=True,
    nccl_amplify_grad=True,
    nccl_count_empty_slots=True,
)


def np_logit_vectors(x, labels, centres, cfg):
    g = np_arcface(np.clip(nrm(x) @ nrm(centres).T, -1, 1), labels)
    g = np.clip(g, -1, 1) if cfg.nccl_clamp_logits else g
    return nrm(g) if cfg.nccl_normalize_logits else g


def np_soft_contrastive(sim, weights, positive, valid):
    log_p = sim - logsumexp(np.where(valid[None], sim, -np.inf), axis=1)[:, None]
    return -np.sum(np.where(positive, weights * log_p, 0.0), axis=1) / positive.sum(axis=1)


def np_nccl(emb, old, labels, centres, queue, cfg):
    """docs/methods.md (NCCL): enqueue the global batch at the pointer, then alpha * mean l1 + beta * mean l2."""
    feats, qlabels, logits = (a.copy() for a in queue[:3])
    ptr = queue[3]
    slots = (ptr + np.arange(len(labels))) % len(qlabels)
    feats[slots], qlabels[slots] = old, labels
    logits[slots] = np_logit_vectors(old, labels, centres, cfg)
    valid = np.ones_like(qlabels, bool) if cfg.nccl_count_empty_slots else qlabels >= 0
    positive = labels[:, None] == qlabels[None, :]
    weights = (old @ feats.T + 1) / 2
    tau = cfg.nccl_temperature
    l1 = np_soft_contrastive(nrm(emb) @ feats.T / tau, weights, positive, valid)
    l2_ = np_soft_contrastive(np_logit_vectors(emb, labels, centres, cfg) @ logits.T / tau, weights, positive, valid)
    return l1.mean(), l2_.mean(), (feats, qlabels, logits)


def nccl_queue(rng, centres, cfg, q, filled):
    """A queue with ``filled`` items written before the pointer and empty slots after it."""
    feats, labels, logits = np.zeros((q, D)), np.full(q, -1), np.zeros((q, C))
    feats[:filled] = nrm(rng.normal(size=(filled, D)))
    labels[:filled] = rng.randint(0, C, filled)
    logits[:filled] = np_logit_vectors(rng.normal(size=(filled, D)), labels[:filled], centres, cfg)
    return feats, labels, logits, filled


def run_nccl(cfg, emb, old, labels, centres, queue):
    feats, qlabels, logits, ptr = queue
    state = {
        "feat_queue": jnp.asarray(feats, jnp.float32),
        "label_queue": jnp.asarray(qlabels, jnp.int32),
        "ptr": jnp.asarray(ptr, jnp.int32),
        "class_rows": {"logit_queue": padded(logits.T)},
    }
    specs = nccl.METHOD.state_specs(state)

    def body(e, o, y, w, st):
        def loss(e):
            share, new_state, metrics = nccl.extra_loss(
                make_ctx(cfg, e, y, batch={"old_features": o}, state=st, centres=w)
            )
            return share, (new_state, metrics)

        (share, (new_state, metrics)), g = jax.value_and_grad(loss, has_aux=True)(e)
        return share[None], g, new_state, jax.tree.map(lambda m: m[None], metrics)

    f = sharded(body, (R, R, R, R, specs), (R, R, specs, R))
    return f(jnp.asarray(emb, jnp.float32), jnp.asarray(old, jnp.float32), labels, padded(centres), state)


@pytest.mark.parametrize("switches", [INTENDED, REFERENCE], ids=["intended", "reference"])
def test_nccl_losses_queue_and_gradients_match_numpy(switches):
    rng, emb, old, labels = data(7, n=8)
    cfg = config(nccl_queue_size=24, nccl_alpha=1.0, nccl_beta=1.0, nccl_temperature=0.5, **switches)
    centres = rng.normal(size=(C, D))
    queue = nccl_queue(rng, centres, cfg.bct, 24, filled=10)  # 8 enqueued at 10..17, slots 18..23 stay empty
    shares, grads, state, metrics = run_nccl(cfg, emb, old, labels, centres, queue)
    l1, l2_, (feats, qlabels, logits) = np_nccl(emb, old, labels, centres, queue, cfg.bct)
    np.testing.assert_allclose(metrics["nccl/l1"][0], l1, rtol=1e-5)
    np.testing.assert_allclose(metrics["nccl/l2"][0], l2_, rtol=1e-5)
    np.testing.assert_allclose(np.sum(shares), l1 + l2_, rtol=1e-5)
    np.testing.assert_allclose(state["feat_queue"], feats, atol=1e-6)
    np.testing.assert_array_equal(state["label_queue"], qlabels)
    np.testing.assert_allclose(state["class_rows"]["logit_queue"][:C].T, logits, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(state["class_rows"]["logit_queue"])[C:] == 0) and int(state["ptr"]) == 18

    def fd(which):
        return finite_difference(lambda e: np_nccl(e, old, labels, centres, queue, cfg.bct)[which], emb)

    if switches is INTENDED:  # gradient of alpha * mean l1 + beta * mean l2
        expected = fd(0) + fd(1)
    else:  # l2 carries no gradient; l1's arrives multiplied by the number of devices
        expected = W * fd(0)
    np.testing.assert_allclose(grads, expected, rtol=2e-3, atol=1e-5)


def test_nccl_queue_wraps_around_overwriting_the_oldest():
    q, n, rows = 12, 8, 3
    state = {
        "feat_queue": jnp.zeros((q, 2)),
        "label_queue": jnp.full((q,), -1, jnp.int32),
        "ptr": jnp.zeros((), jnp.int32),
        "class_rows": {"logit_queue": jnp.zeros((rows, q))},
    }
    ring_feats, ring_labels, ring_logits, ptr = np.zeros((q, 2)), np.full(q, -1), np.zeros((q, rows)), 0
    for batch in range(3):
        item = 100 * batch + np.arange(n)
        feats, logits = np.stack([item, -item], 1).astype(np.float32), np.repeat(item[:, None], rows, 1) * 1.0
        state = nccl.enqueue(state, jnp.asarray(feats), jnp.asarray(item, jnp.int32), jnp.asarray(logits))
        for i in range(n):  # the reference writes one item at a time at h, h = (h + 1) % Q
            ring_feats[ptr], ring_labels[ptr], ring_logits[ptr] = feats[i], item[i], logits[i]
            ptr = (ptr + 1) % q
        assert int(state["ptr"]) == ptr
        np.testing.assert_array_equal(state["feat_queue"], ring_feats)
        np.testing.assert_array_equal(state["label_queue"], ring_labels)
        np.testing.assert_array_equal(state["class_rows"]["logit_queue"], ring_logits.T)
    # After 24 items in 12 slots only the last 12 remain: batch 1's last four and all of batch 2.
    assert sorted(ring_labels.tolist()) == [104, 105, 106, 107] + list(range(200, 208))
    with pytest.raises(ValueError, match="at least the global batch"):
        nccl.enqueue(state, jnp.zeros((13, 2)), jnp.zeros(13, jnp.int32), jnp.zeros((13, rows)))


# ---------------------------------------------------------------------------------------------------------------
# AdvBCT
# ---------------------------------------------------------------------------------------------------------------
def np_discriminator(p, x):
    h = x @ p["dense1"]["kernel"] + p["dense1"]["bias"]
    h = (h - h.mean(0)) / np.sqrt(h.var(0) + 1e-5) * p["bn"]["scale"] + p["bn"]["bias"]
    z = np.maximum(h, 0) @ p["dense2"]["kernel"] + p["dense2"]["bias"]
    return z - logsumexp(z, axis=1)[:, None]


def np_adv(emb, old, p):
    """Mean NLL(disc(n(e)), 0) + mean NLL(disc(n(o)), 1); BatchNorm statistics per device and per batch."""
    total = 0.0
    for e, o in zip(np.split(emb, W), np.split(old, W)):
        total += -np.sum(np_discriminator(p, nrm(e))[:, 0]) - np.sum(np_discriminator(p, nrm(o))[:, 1])
    return total / len(emb)


def np_p2s(emb, labels, w, center, rmax, kept, thr=0.4, weight=4.0):
    rad = np.abs(rmax - thr) / (1 + np.exp(-w[labels]))
    bound = np.where(rmax < thr, rmax + rad, rmax - rad)
    t = np.maximum(np.linalg.norm(nrm(emb) - center, axis=1) - bound, 0.0)
    active = (kept > 1) & (t > 0)
    return weight * t[active].sum() / max(active.sum(), 1)


def advbct_inputs(seed, kept_max):
    rng, emb, old, labels = data(seed)
    params, _ = advbct.init(jax.random.key(seed), config=config(), embedding_size=D, num_classes=C)
    centers = nrm(rng.normal(size=(C, D))) * 0.9
    batch = {
        "old_features": old.astype(np.float32),
        "advbct_center": centers[labels].astype(np.float32),
        "advbct_radius_max": rng.uniform(0.2, 0.6, N).astype(np.float32),
        "advbct_num_kept": rng.randint(0, kept_max + 1, N).astype(np.int32),
    }
    return emb, labels, params, batch


def run_advbct(cfg, emb, labels, params, batch, step):
    def body(e, y, p, b):
        def loss(e, p):
            share, _, metrics = advbct.extra_loss(make_ctx(cfg, e, y, batch=b, params=p, step=step))
            return share, metrics

        (share, metrics), (ge, gp) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(e, p)
        return share[None], ge, jax.lax.psum(gp, "data"), jax.tree.map(lambda m: m[None], metrics)

    f = sharded(body, (R, R, S, R), (R, R, S, R))
    return f(jnp.asarray(emb, jnp.float32), labels, params, batch)


def test_advbct_losses_match_numpy():
    emb, labels, params, batch = advbct_inputs(8, kept_max=4)
    step, total = 37, 100  # epoch 3 of E = 10 (10 steps per epoch)
    shares, _, _, metrics = run_advbct(config(), emb, labels, params, batch, step)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    adv = np_adv(emb, batch["old_features"], p["discriminator"])
    p2s = np_p2s(
        emb, labels, p["eboundary"], batch["advbct_center"], batch["advbct_radius_max"], batch["advbct_num_kept"]
    )
    assert 0 < metrics["advbct/p2s_active"][0] < N  # some rows inside, some outside, some skipped
    np.testing.assert_allclose(metrics["advbct/adv"][0], adv, rtol=1e-5)
    np.testing.assert_allclose(metrics["advbct/p2s"][0], p2s, rtol=1e-5)
    np.testing.assert_allclose(np.sum(shares), p2s + 4.0 * (10 - 3 + 1) / 10 * adv, rtol=1e-5)
    np.testing.assert_allclose(metrics["advbct/alpha"][0], 2 / (1 + np.exp(-10 * step / total)) - 1, rtol=1e-6)


def test_advbct_gradient_reversal_sign():
    """The backbone gets -alpha x the discriminator's gradient; the discriminator its normal gradient."""
    emb, labels, params, batch = advbct_inputs(9, kept_max=1)  # no boundary term: only the adversarial one
    step = 50  # p = 0.5
    alpha, scale = 2 / (1 + np.exp(-5.0)) - 1, 4.0 * (10 - 5 + 1) / 10
    _, g_emb, g_params, _ = run_advbct(config(), emb, labels, params, batch, step)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    old = batch["old_features"].astype(np.float64)
    expected = -alpha * scale * finite_difference(lambda e: np_adv(e, old, p["discriminator"]), emb)
    np.testing.assert_allclose(g_emb, expected, rtol=2e-3, atol=1e-6)
    # Discriminator: a directional derivative along a random direction of its parameters, not reversed.
    rng = np.random.RandomState(0)
    direction = jax.tree.map(lambda a: rng.normal(size=a.shape), p["discriminator"])

    def shifted(t):
        return jax.tree.map(lambda a, v: a + t * v, p["discriminator"], direction)

    eps = 1e-5
    fd = scale * (np_adv(emb, old, shifted(eps)) - np_adv(emb, old, shifted(-eps))) / (2 * eps)
    analytic = sum(
        np.sum(np.asarray(g) * v)
        for g, v in zip(jax.tree.leaves(g_params["discriminator"]), jax.tree.leaves(direction))
    )
    np.testing.assert_allclose(analytic, fd, rtol=1e-3)


def test_grad_reverse_is_identity_forward_and_negated_backward():
    x = jnp.arange(6.0).reshape(2, 3)
    y, vjp = jax.vjp(lambda x: advbct.grad_reverse(x, jnp.float32(0.3)), x)
    np.testing.assert_array_equal(y, x)
    np.testing.assert_allclose(vjp(jnp.ones_like(x))[0], -0.3 * np.ones((2, 3)))


# ---------------------------------------------------------------------------------------------------------------
# Per-batch host arrays
# ---------------------------------------------------------------------------------------------------------------
def test_batch_arrays_gathers_by_index_and_by_label(tmp_path):
    rng = np.random.RandomState(10)
    features = rng.normal(size=(20, D)).astype(np.float32)
    np.save(tmp_path / "features.npy", features)
    meta = {
        "centers": rng.normal(size=(C, D)).astype(np.float32),
        "radius_max": rng.rand(C).astype(np.float32),
        "num_kept": rng.randint(0, 5, C).astype(np.int32),
    }
    np.savez(tmp_path / "meta.npz", **meta)
    method = advbct.METHOD
    old = oe.open_old_embeddings(
        features=str(tmp_path / "features.npy"), class_files=[(str(tmp_path / "meta.npz"), method.class_files[0])]
    )
    old = dataclasses.replace(old, features=features, credible=rng.rand(20) < 0.5)
    needs = method.per_example + method.per_label
    indices, labels = np.array([3, 7, 3, 19]), np.array([1, 9, 1, 0])
    out = oe.batch_arrays(old, needs, indices, labels)
    assert sorted(out) == sorted(needs)
    np.testing.assert_allclose(out["old_features"], nrm(features[indices]), rtol=1e-6)
    np.testing.assert_array_equal(out["advbct_center"], meta["centers"][labels])
    np.testing.assert_array_equal(out["advbct_radius_max"], meta["radius_max"][labels])
    assert out["advbct_num_kept"].dtype == np.int32
    np.testing.assert_array_equal(out["advbct_num_kept"], meta["num_kept"][labels])
    np.testing.assert_array_equal(
        oe.batch_arrays(old, ("credible",), indices, labels)["credible"], old.credible[indices]
    )
    with pytest.raises(ValueError, match="class tables"):
        oe.batch_arrays(oe.OldEmbeddings(features=features), needs, indices, labels)
    with pytest.raises(ValueError, match="unknown"):
        oe.batch_arrays(old, ("nope",), indices, labels)


# ---------------------------------------------------------------------------------------------------------------
# Training through the step
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["l2", "bct", "unibct", "nccl", "advbct"])
def test_method_trains_through_the_step(name):
    assert name in bct_lib.METHODS
    cfg = config(method=name, nccl_queue_size=32, unibct_start_epoch=0)
    par = step_lib.build(cfg, num_classes=C, steps_per_epoch=10, total_steps=100, mesh=MESH)
    method = par.method
    state = par.init_fn(jax.random.key(0))
    rng = np.random.RandomState(11)
    labels = rng.randint(0, C, N).astype(np.int32)
    table = oe.OldEmbeddings(
        features=rng.normal(size=(N, D)).astype(np.float32),
        tables={
            "advbct_center": nrm(rng.normal(size=(C, D))).astype(np.float32) * 0.8,
            "advbct_radius_max": rng.uniform(0.2, 0.6, C).astype(np.float32),
            "advbct_num_kept": np.full(C, 3, np.int32),
        },
    )
    batch = {
        "image": rng.randint(0, 256, (N, 32, 32, 3)).astype(np.uint8),
        "label": labels,
        "index": np.arange(N, dtype=np.int32),
    }
    batch.update(oe.batch_arrays(table, method.per_example + method.per_label, batch["index"], labels))
    consts = {"prototypes": padded(nrm(rng.normal(size=(C, D))))} if method.consts else {}
    if name == "nccl":  # the Q x C logit queue is split by classes over the devices
        assert par.specs["method_state"]["class_rows"]["logit_queue"] == P("data")
    st, dconsts = par.to_device(state), par.consts_to_device(consts)
    history = []
    for _ in range(5):
        st, metrics = par.step(st, par.put_batch(batch), jax.random.key(1), dconsts)
        history.append({k: float(v) for k, v in metrics.items()})
    assert all(math.isfinite(h["loss"]) and h["finite"] == 1 for h in history)
    assert all(h["extra_loss"] > 0 for h in history)
    assert history[-1]["cls_loss"] < history[0]["cls_loss"]


# ---------------------------------------------------------------------------------------------------------------
# Every preset, as a user selects it
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", sorted(bct_lib.presets()))
def test_every_preset_loads_and_trains_a_step(preset, tmp_path):
    """``quickstart:method=<preset>`` applies the method's preset and trains one step from real old-array files."""
    from mixbct_jax import method_host

    c = config_lib.load("quickstart", f"role=new,method={preset}").unlock()
    method = bct_lib.presets()[preset]
    assert c.bct.method == method.name
    for dotted, value in method.presets[preset].items():  # e.g. BCT's warm-up quirk, weakened L2's threshold
        section, field = dotted.rsplit(".", 1)
        assert c[section][field] == value
    c.model.width, c.model.embedding_size, c.data.global_batch, c.bct.nccl_queue_size = 0.125, D, N, 32
    rng = np.random.RandomState(12)
    labels = np.repeat(np.arange(C), 2)[:N].astype(np.int32)
    features = rng.normal(size=(N, D)).astype(np.float32)
    np.save(tmp_path / "features.npy", features)
    np.save(tmp_path / "credible.npy", old_stats.denoise(features, labels, keep=0.9))
    np.save(tmp_path / "prototypes.npy", old_stats.class_means(features, labels, C))
    np.savez(tmp_path / "advbct_meta.npz", **old_stats.advbct_meta(features, labels, C))
    for field, name in (
        ("features", "features.npy"),
        ("credible", "credible.npy"),
        ("prototypes", "prototypes.npy"),
        ("advbct_meta", "advbct_meta.npz"),
    ):
        c.old[field] = str(tmp_path / name)
    ts = step_lib.build(c, num_classes=C, steps_per_epoch=10, total_steps=100, mesh=MESH)
    host = method_host.MethodHost(c, ts, splits.Subset(np.arange(N), labels, C), tmp_path)
    batch = {
        "image": rng.randint(0, 256, (N, 32, 32, 3)).astype(np.uint8),
        "label": labels,
        "index": np.arange(N, dtype=np.int32),
    }
    state = ts.to_device(ts.init(jax.random.key(0)))
    state, metrics = ts.step(state, ts.put_batch(host.batch(batch)), jax.random.key(1), host.refresh(0, state))
    assert float(metrics["finite"]) == 1 and math.isfinite(float(metrics["loss"]))
    assert (float(metrics["extra_loss"]) > 0) == (method.extra_loss is not None and method.name != "unibct")
