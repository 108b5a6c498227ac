"""BCT: the influence loss against a frozen, synthesised old classifier (docs/methods.md (BCT)).

The old classifier is the row-L2-normalised class means of the old embeddings of the new training set
(``python -m mixbct_jax.prepare class-means``, ``config.old.prototypes``; ``ctx.consts['prototypes']``). The new
embedding is normalised and scored against every prototype with **no scale and no margin**, and a softmax cross-entropy
over all C classes pulls it toward its own class's old prototype:

``L_BCT = mean_i CE(n(e_i) . P^T, y_i)`` over the global batch, added with weight ``config.bct.influence_weight``.

As in the reference, the synthesised prototypes serve every class, also those the old model was trained on (the old
model's own classifier is never used), and the unscaled cosines keep the loss near ``log C`` with a weak gradient
(docs/deviations.md §8.18). The prototypes are row-sharded over the devices like the class centres, so the softmax over
C uses the head's distributed cross-entropy (``heads/prototypes.py``).

References:
  Shen et al., "Towards Backward-Compatible Representation Learning", CVPR 2020.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mixbct_jax.bct import api
from mixbct_jax.heads.prototypes import influence_loss
from mixbct_jax.numerics import global_mean_share

_CLASS_MEANS = "python -m mixbct_jax.prepare class-means"
PROTOTYPES = api.ClassFile(
    field="prototypes",
    command=_CLASS_MEANS,
    load=api.npy_table("prototypes", "prototypes", _CLASS_MEANS),
    doc="class means [C, D] (BCT, UniBCT)",
)


def extra_loss(ctx: api.StepContext) -> tuple[jax.Array, dict, dict]:
    """``influence_weight * L_BCT`` as this device's share of the global-batch mean; ``bct/influence`` = L_BCT."""
    loss = jnp.mean(
        influence_loss(ctx.embeddings, ctx.labels, ctx.consts["prototypes"], axis_name=ctx.axis_name)
    )  # replicated on every device
    share = global_mean_share(ctx.config.bct.influence_weight * loss, ctx.axis_name)
    return share, ctx.state, {"bct/influence": jax.lax.stop_gradient(loss)}


METHOD = api.Method(
    name="bct",
    config=(
        api.Field(
            "influence_weight",
            1.0,
            "BCT/UniBCT: weight of the influence loss (CE of n(e) . prototypes)",
            interval=(0, None, True, None),
        ),
    ),
    # The reference's warm-up of -1 epoch (an off-by-one): its learning rate starts at 0.1 * (35/36)^2.
    presets={"bct": {"optim.warmup_epochs": -1.0}},
    class_files=(PROTOTYPES,),
    consts=("prototypes",),
    extra_loss=extra_loss,
)
