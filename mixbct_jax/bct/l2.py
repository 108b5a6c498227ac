"""L2 and weakened L2: pull each new embedding toward the old embedding of the same image (docs/methods.md (L2)).

``L_l2 = mean_i max(0, ||n(o_i) - n(e_i)||_2 - th)`` over the global batch, added with weight
``config.bct.l2_weight`` (10 in the reference) to the classification loss. ``th = config.bct.l2_threshold``: 0 is
plain "L2", 0.2 is "weakened L2", which leaves embeddings already within 0.2 of their old counterpart alone. The
distance is the non-squared Euclidean distance between unit vectors, as the reference.

References:
  Shen et al., "Towards Backward-Compatible Representation Learning", CVPR 2020 (the L2 baseline).
  Liang et al., "MixBCT: Towards Self-Adapting Backward-Compatible Training", arXiv:2308.06948, 2023 (weakened L2).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mixbct_jax.bct import api
from mixbct_jax.heads.sharded_fc import l2_normalize
from mixbct_jax.numerics import safe_norm


def hinge_distance(new: jax.Array, old: jax.Array, *, threshold: float) -> jax.Array:
    """Per-example ``max(0, ||n(old) - n(new)|| - threshold)``.

    Args:
      new: [b, D] new embeddings (unnormalised).
      old: [b, D] old embeddings of the same images (any scale; normalised here).
      threshold: 0 for L2, 0.2 for weakened L2.

    Returns:
      [b] hinge distances; the gradient flows into ``new`` only.
    """
    diff = l2_normalize(jax.lax.stop_gradient(old)) - l2_normalize(new)  # [b, D]
    return jnp.maximum(safe_norm(diff) - threshold, 0.0)


def extra_loss(ctx: api.StepContext) -> tuple[jax.Array, dict, dict]:
    """This device's share ``l2_weight * sum_local(hinge) / N`` of the global-batch-mean L2 loss."""
    cfg = ctx.config.bct
    emb = ctx.embeddings  # [b, D]
    hinge = hinge_distance(emb, ctx.batch["old_features"].astype(emb.dtype), threshold=cfg.l2_threshold)  # [b]
    share = cfg.l2_weight * jnp.sum(hinge) / ctx.global_batch
    local = {"l2/distance": jnp.sum(hinge) / ctx.global_batch, "l2/active": jnp.sum(hinge > 0).astype(jnp.float32)}
    return share, ctx.state, jax.lax.psum(jax.lax.stop_gradient(local), ctx.axis_name)


METHOD = api.Method(
    name="l2",
    config=(
        api.Field("l2_weight", 10.0, "weight of the L2 hinge", interval=(0, None, True, None)),
        api.Field("l2_threshold", 0.0, '0: "L2"; 0.2: "weakened L2"', interval=(0, None, True, None)),
    ),
    # The reference's weight 10; "weakened L2" is this method with threshold 0.2.
    presets={
        "l2": {"bct.l2_weight": 10.0, "bct.l2_threshold": 0.0},
        "weakened_l2": {"bct.l2_weight": 10.0, "bct.l2_threshold": 0.2},
    },
    per_example=("old_features",),
    extra_loss=extra_loss,
)
