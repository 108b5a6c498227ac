"""Margin functions on cosine logits (docs/methods.md (the margin head)), as pure functions.

Each takes cosine logits already clamped to [-1, 1] (``[N, C_local]``) and the column of each row's target in
this shard (``-1`` where the target class lives on another shard), and returns the scaled logits.

References:
  Deng et al., "ArcFace: Additive Angular Margin Loss for Deep Face Recognition", CVPR 2019.
  Wang et al., "CosFace: Large Margin Cosine Loss for Deep Face Recognition", CVPR 2018.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def _target_mask(cosine: jax.Array, target_col: jax.Array) -> jax.Array:
    # [N, C] bool; rows with target_col == -1 match no column.
    return jnp.arange(cosine.shape[-1])[None, :] == target_col[:, None]


def arcface(cosine: jax.Array, target_col: jax.Array, *, scale: float = 64.0, margin: float = 0.5) -> jax.Array:
    """ArcFace: target cosine c -> cos(theta + m), with the reference's monotone fallback, then all logits x s.

    Where ``c <= cos(pi - m)`` the angle ``theta + m`` would pass pi and the curve would turn back up, so the
    reference uses ``c - sin(pi - m) * m`` there instead (``easy_margin=False``).
    """
    theta_m_limit = math.cos(math.pi - margin)
    sinmm = math.sin(math.pi - margin) * margin
    c = cosine.astype(jnp.float32)
    # sqrt guarded so the gradient at |c| == 1 stays finite.
    sin = jnp.sqrt(jnp.clip(1.0 - c * c, 1e-12, None))
    with_margin = jnp.where(c > theta_m_limit, c * math.cos(margin) - sin * math.sin(margin), c - sinmm)
    return jnp.where(_target_mask(c, target_col), with_margin, c) * scale


def cosface(cosine: jax.Array, target_col: jax.Array, *, scale: float = 64.0, margin: float = 0.4) -> jax.Array:
    """CosFace: target cosine c -> c - m, then all logits x s."""
    c = cosine.astype(jnp.float32)
    return jnp.where(_target_mask(c, target_col), c - margin, c) * scale


def combined_margin(
    cosine: jax.Array,
    target_col: jax.Array,
    *,
    scale: float = 64.0,
    m1: float = 1.0,
    m2: float = 0.5,
    m3: float = 0.0,
    interclass_filtering_threshold: float = 0.0,
) -> jax.Array:
    """Insightface's CombinedMarginLoss: ArcFace when ``m1 == 1, m3 == 0``, CosFace when ``m3 > 0``.

    With ``interclass_filtering_threshold > 0``, every non-target cosine above it is set to 0 before the margin,
    on every row, as the reference: its mask starts from ``cosine > threshold`` for all rows and only clears the
    target column of rows whose target is in this shard, so a row whose target lives on another shard has all its
    columns here filtered. Which columns a row sees therefore does not depend on how the classes are sharded.
    """
    c = cosine.astype(jnp.float32)
    if interclass_filtering_threshold > 0:
        # A filtered cosine is a constant 0 (no gradient), as the reference's multiplication by a no-grad mask.
        c = jnp.where(~_target_mask(c, target_col) & (c > interclass_filtering_threshold), 0.0, c)
    if m1 == 1.0 and m3 == 0.0:
        return arcface(c, target_col, scale=scale, margin=m2)
    if m3 > 0:
        return cosface(c, target_col, scale=scale, margin=m3)
    raise ValueError(f"combined_margin supports ArcFace (m1=1, m3=0) or CosFace (m3>0); got m1={m1}, m2={m2}, m3={m3}")


def apply(
    kind: str,
    cosine: jax.Array,
    target_col: jax.Array,
    *,
    scale: float,
    margins: tuple[float, float, float],
    interclass_filtering_threshold: float = 0.0,
) -> jax.Array:
    """Dispatches on ``config.head.type``: 'arcface' (m2), 'cosface' (m3) or 'combined' (m1, m2, m3)."""
    m1, m2, m3 = margins
    if kind == "arcface":
        return arcface(cosine, target_col, scale=scale, margin=m2)
    if kind == "cosface":
        return cosface(cosine, target_col, scale=scale, margin=m3)
    if kind == "combined":
        return combined_margin(
            cosine,
            target_col,
            scale=scale,
            m1=m1,
            m2=m2,
            m3=m3,
            interclass_filtering_threshold=interclass_filtering_threshold,
        )
    raise ValueError(f"config.head.type={kind!r} is not a margin head; choose arcface, cosface, combined or softmax")


def apply_head(head, cosine: jax.Array, target_col: jax.Array) -> jax.Array:
    """``apply`` with the margin, scale and filter of ``config.head`` (the sharded head and NCCL's logits)."""
    return apply(
        head.type,
        cosine,
        target_col,
        scale=head.scale,
        margins=tuple(head.margins),
        interclass_filtering_threshold=head.get("interclass_filtering_threshold", 0.0),
    )
