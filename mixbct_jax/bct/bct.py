"""BCT: the influence loss against a frozen, synthesised old classifier (docs/methods.md (BCT)).

The old classifier is the row-L2-normalised class means of the old embeddings of the new training set
(``python -m mixbct_jax.prepare class-means``; ``consts['prototypes']``). The new embedding is normalised and
scored against every prototype with **no scale and no margin**, and a softmax cross-entropy over all C classes
pulls it toward its own class's old prototype:

``L_BCT = mean_i CE(n(e_i) . P^T, y_i)`` over the global batch, added with weight ``config.bct.influence_weight``.

As in the reference, the synthesised prototypes serve every class, also those the old model was trained on (the
old model's own classifier is never used), and the unscaled cosines keep the loss near ``log C`` with a weak
gradient (docs/deviations.md §8.18). The prototypes are row-sharded over the devices like the class centres, so the softmax
over C uses the head's distributed cross-entropy.

References:
  Shen et al., "Towards Backward-Compatible Representation Learning", CVPR 2020.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mixbct_jax.heads.sharded_fc import distributed_cross_entropy, gather_rows, l2_normalize

CONSTS = ("prototypes",)


def global_mean_share(value: jax.Array, axis_name: str) -> jax.Array:
    """A loss replicated on every device -> this device's share: value ``value / W``, gradient of ``value``.

    The distributed cross-entropy's custom VJPs give each device the complete gradient of the replicated loss for
    its own rows, so the gradient must not be divided; the value is, so that the step's sum over devices
    reports the loss once.
    """
    w = jax.lax.psum(1, axis_name)
    return value + jax.lax.stop_gradient(value / w - value)


def influence_loss(embeddings: jax.Array, labels: jax.Array, prototypes: jax.Array, *,
                   axis_name: str) -> jax.Array:
    """Per-example influence cross-entropy of the whole global batch against row-sharded prototypes.

    Runs inside the per-device program.

    Args:
      embeddings: [b, D] this device's new embeddings (unnormalised).
      labels: [b] class ids.
      prototypes: [C_local, D] this device's block of the (zero-padded) prototype table; device ``d`` holds rows
        ``[d * C_local, (d + 1) * C_local)``. All-zero rows (padding, or a class without old examples) are left
        out of the softmax.
      axis_name: the device axis.

    Returns:
      [N] ``-log softmax(n(e) . P^T)[y]`` for every row of the global batch, identical on every device.
    """
    all_emb = gather_rows(l2_normalize(embeddings), axis_name)  # [N, D]
    all_labels = jax.lax.all_gather(labels, axis_name, tiled=True)  # [N]
    rows = prototypes.shape[0]
    local = all_labels - jax.lax.axis_index(axis_name) * rows
    target_col = jnp.where((local >= 0) & (local < rows), local, -1)  # [N]
    logits = jnp.dot(all_emb, prototypes.astype(all_emb.dtype).T)  # [N, C_local], raw cosines (no scale)
    present = jnp.any(prototypes != 0, axis=1)  # [C_local]
    logits = jnp.where(present[None, :], logits, -jnp.inf)
    return distributed_cross_entropy(logits, target_col, axis_name)


def weighted_loss(ctx: dict, weight: jax.Array | float) -> tuple[jax.Array, dict]:
    """``weight * L_BCT`` as this device's share, and the unweighted loss as a metric (shared with UniBCT)."""
    per_example = influence_loss(ctx["embeddings"], ctx["labels"], ctx["consts"]["prototypes"],
                                 axis_name=ctx["axis_name"])  # [N]
    loss = jnp.mean(per_example)
    share = global_mean_share(weight * loss, ctx["axis_name"])
    # Metrics are summed over devices by the step, so each device reports 1/W of the replicated value.
    return share, {"bct/influence": global_mean_share(jax.lax.stop_gradient(loss), ctx["axis_name"])}


def extra_loss(ctx: dict) -> tuple[jax.Array, dict, dict]:
    """``influence_weight * L_BCT`` as this device's share of the global-batch mean."""
    share, metrics = weighted_loss(ctx, ctx["config"].bct.influence_weight)
    return share, ctx["state"], metrics
