"""A frozen prototype classifier: raw cosines against row-sharded class prototypes, softmax over all classes.

BCT's influence loss (docs/methods.md (BCT)) scores the new embedding against a synthesised old classifier: the
class prototypes, with **no scale and no margin**. The prototypes are row-sharded over the devices like the class
centres, so the softmax over C uses the margin head's distributed cross-entropy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mixbct_jax.heads.sharded_fc import distributed_cross_entropy, gather_rows, l2_normalize


def influence_loss(embeddings: jax.Array, labels: jax.Array, prototypes: jax.Array, *, axis_name: str) -> jax.Array:
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

    References:
      Shen et al., "Towards Backward-Compatible Representation Learning", CVPR 2020.
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
