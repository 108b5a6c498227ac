"""MixBCT's mix-up (docs/methods.md (MixBCT)): exactly int(b·α) credible rows replaced, no gradient through them."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mixbct_jax.bct import mixbct

B, D = 128, 8
CONFIG = ml_collections.ConfigDict({"bct": {"mix_ratio": 0.3}})


def batch_with(credible):
    rng = np.random.RandomState(0)
    return {"old_features": jnp.asarray(rng.normal(size=(B, D)), jnp.float32), "credible": jnp.asarray(credible)}


def test_exactly_38_of_128_rows_replaced_all_credible():
    credible = np.random.RandomState(1).rand(B) < 0.7
    for seed in range(20):
        mask = np.asarray(mixbct.choose_rows(jax.random.key(seed), jnp.asarray(credible), int(B * 0.3)))
        assert mask.sum() == 38
        assert np.all(credible[mask])


def test_choice_is_uniform_over_credible_rows():
    credible = np.zeros(B, bool)
    credible[::2] = True  # 64 candidates, each chosen with probability 38/64
    keys = jax.random.split(jax.random.key(0), 2000)
    masks = np.asarray(jax.vmap(lambda k: mixbct.choose_rows(k, jnp.asarray(credible), 38))(keys))
    freq = masks.mean(0)
    assert np.all(freq[~credible] == 0)
    np.testing.assert_allclose(freq[credible], 38 / 64, atol=0.05)


def test_fewer_credible_rows_than_k_replaces_all_of_them_and_counts_the_device():
    credible = np.zeros(B, bool)
    credible[:20] = True
    emb = jnp.ones((B, D))
    mixed, metrics = mixbct.mix_rows(emb, batch_with(credible), key=jax.random.key(0), config=CONFIG)
    assert float(metrics["mix/rows"]) == 20 and float(metrics["mix/short_devices"]) == 1
    np.testing.assert_array_equal(np.asarray(mixed[:20]), np.asarray(batch_with(credible)["old_features"][:20]))


def test_replaced_rows_hold_old_features_and_carry_no_gradient():
    credible = np.random.RandomState(2).rand(B) < 0.8
    batch = batch_with(credible)
    emb = jax.random.normal(jax.random.key(3), (B, D))
    key = jax.random.key(4)

    def loss(e):
        mixed, _ = mixbct.mix_rows(e, batch, key=key, config=CONFIG)
        return jnp.sum(mixed**2)

    grad = np.asarray(jax.grad(loss)(emb))
    mask = np.asarray(mixbct.choose_rows(key, jnp.asarray(credible), 38))
    mixed, metrics = mixbct.mix_rows(emb, batch, key=key, config=CONFIG)
    assert float(metrics["mix/rows"]) == 38 and float(metrics["mix/short_devices"]) == 0
    np.testing.assert_array_equal(np.asarray(mixed)[mask], np.asarray(batch["old_features"])[mask])
    np.testing.assert_array_equal(np.asarray(mixed)[~mask], np.asarray(emb)[~mask])
    assert np.all(grad[mask] == 0)
    np.testing.assert_allclose(grad[~mask], 2 * np.asarray(emb)[~mask], rtol=1e-6)
