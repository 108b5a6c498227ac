"""MixBCT: mix stored old embeddings into the new batch before one shared margin-softmax head.

Described in docs/methods.md (MixBCT).

On every device, exactly ``k = int(b * mix_ratio)`` rows of the local batch, chosen uniformly among the rows whose old
embedding is credible (denoised, docs/methods.md (MixBCT)), are replaced by the old embedding of the same image. The
replaced rows carry no gradient into the backbone, but they did take part in the forward BatchNorm statistics, as in the
reference. The classifier is then trained on the mixture, so one set of class centres must classify both old and new
features.

Where a device holds fewer than ``k`` credible rows, all of them are replaced (the reference raises ValueError);
``mix/short_devices`` counts such devices.

References:
  Liang et al., "MixBCT: Towards Self-Adapting Backward-Compatible Training", arXiv:2308.06948, 2023.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mixbct_jax.bct import api


def choose_rows(key: jax.Array, credible: jax.Array, k: int) -> jax.Array:
    """Mask [b] of ``min(k, #credible)`` rows drawn uniformly without replacement among credible rows."""
    if k == 0:
        return jnp.zeros_like(credible, dtype=bool)
    # Random keys, credible rows first: the k largest keys are a uniform k-subset of the credible rows.
    score = jnp.where(credible, jax.random.uniform(key, credible.shape), -1.0)
    top = jax.lax.top_k(score, k)[1]
    return jnp.zeros(credible.shape, bool).at[top].set(credible[top])


def mix_rows(embeddings: jax.Array, batch: dict, *, key: jax.Array, config) -> tuple[jax.Array, dict]:
    """Replaces the chosen local rows [b, D] by the (normalised) old embeddings, without gradient.

    Returns the mixed rows and this device's counts: ``mix/rows`` (rows replaced) and ``mix/short_devices`` (1 when
    it held fewer than ``k`` credible rows).
    """
    b = embeddings.shape[0]
    k = int(b * config.bct.mix_ratio)  # int(128 * 0.3) = 38 in the reference
    credible = batch["credible"].astype(bool)
    mask = choose_rows(key, credible, k)
    old = jax.lax.stop_gradient(batch["old_features"]).astype(embeddings.dtype)
    mixed = jnp.where(mask[:, None], old, embeddings)
    counts = {
        "mix/rows": jnp.sum(mask).astype(jnp.float32),
        "mix/short_devices": (jnp.sum(credible) < k).astype(jnp.float32),
    }
    return mixed, counts


def before_head(ctx: api.StepContext) -> tuple[jax.Array, dict]:
    """``mix_rows`` on this device's rows; the counts are summed over the devices."""
    mixed, counts = mix_rows(ctx.embeddings, ctx.batch, key=ctx.key, config=ctx.config)
    return mixed, jax.lax.psum(counts, ctx.axis_name)


METHOD = api.Method(
    name="mixbct",
    config=(
        api.Field(
            "mix_ratio",
            0.3,
            "MixBCT: share of each device's rows replaced by credible old embeddings",
            interval=(0, 1, True, True),
        ),
    ),
    presets={"mixbct": {}},
    per_example=("old_features", "credible"),
    before_head=before_head,
)
