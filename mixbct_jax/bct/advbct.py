"""AdvBCT: adversarial alignment of new to old embeddings plus an elastic class-boundary loss.

Described in docs/methods.md (AdvBCT).

Two terms are added to the classification loss:

* **Adversarial.** A discriminator (Linear D->100, BatchNorm in train mode, ReLU, Linear 100->2, log-softmax)
  learns to tell normalised new embeddings (class 0) from normalised old ones (class 1):
  ``L_adv = NLL(disc(GRL(n(e))), 0) + NLL(disc(n(o)), 1)`` (batch means), weighted by
  ``advbct_adv_weight * (E - e + 1) / E`` in epoch e of E. The discriminator trains normally; the gradient
  reversal layer hands the backbone ``-alpha(p)`` times the discriminator's gradient, with
  ``alpha(p) = 2 / (1 + exp(-10 p)) - 1`` and p the training progress in [0, 1], so the backbone learns to make
  new embeddings indistinguishable from old ones. The discriminator's BatchNorm normalises the new and the old
  batch separately (two calls, as the reference).
* **Point-to-set boundary.** From the old embeddings' class meta (``prepare advbct-meta``: centre, largest kept
  radius ``r_max``, number of kept radii), every class with more than one kept radius gets an elastic boundary
  ``R = r_max + rad`` if ``r_max < thr`` else ``r_max - rad``, with ``rad = |r_max - thr| * sigmoid(w_y)`` and ``w``
  a learnable per-class vector (init U(-1, 1)). New embeddings outside their class's boundary are pulled in:
  ``L_p2s = advbct_p2s_weight * sum_j t_j / #{t_j > 0}``, ``t_j = max(||n(e_j) - centre_y|| - R, 0)``.

The reference does not run as committed (docs/deviations.md §8.12); this implements its intended semantics. Where it
would normalise per GPU, the losses here are global-batch quantities: the NLLs are means over the global batch and
``L_p2s`` divides by the global count of positive terms. The discriminator runs only in train mode, so no running
statistics are kept.

References:
  Pan et al., "Boundary-Aware Backward-Compatible Representation via Adversarial Learning in Image Retrieval",
  CVPR 2023.
  Ganin & Lempitsky, "Unsupervised Domain Adaptation by Backpropagation", ICML 2015 (gradient reversal).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from mixbct_jax.bct import api
from mixbct_jax.heads.sharded_fc import l2_normalize
from mixbct_jax.initializers import torch_linear_uniform
from mixbct_jax.numerics import safe_norm

_BN_EPS = 1e-5  # PyTorch BatchNorm1d
_META = "python -m mixbct_jax.prepare advbct-meta"
# The arrays of the meta file (data.old_stats.advbct_meta) -> the per-class tables fed by label, and their dtypes.
_META_TABLES = {
    "centers": ("advbct_center", np.float32),
    "radius_max": ("advbct_radius_max", np.float32),
    "num_kept": ("advbct_num_kept", np.int32),
}


def load_meta(path: str) -> dict[str, np.ndarray]:
    """Loads the class meta ``.npz`` of ``prepare advbct-meta``.

    Returns ``{'advbct_center' [C, D], 'advbct_radius_max' [C], 'advbct_num_kept' [C]}`` (the batch keys they are
    fed under).
    """
    hint = f"write it with `{_META}`"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"AdvBCT meta file {path} does not exist; {hint}")
    with np.load(path) as meta:
        missing = [key for key in _META_TABLES if key not in meta.files]
        if missing:
            raise ValueError(f"AdvBCT meta file {path} lacks arrays {missing}; {hint}")
        return {name: np.asarray(meta[key], dtype) for key, (name, dtype) in _META_TABLES.items()}


def _linear_init(key: jax.Array, fan_in: int, fan_out: int) -> dict[str, jax.Array]:
    kw, kb = jax.random.split(key)
    init = torch_linear_uniform(fan_in)
    return {"kernel": init(kw, (fan_in, fan_out)), "bias": init(kb, (fan_out,))}


def init(
    key: jax.Array, *, config, embedding_size: int, num_classes: int, num_shards: int | None = None
) -> tuple[dict, dict]:
    """Discriminator weights and the eboundary vector ``w`` [C] (U(-1, 1)); no state."""
    del num_shards
    hidden = config.bct.advbct_hidden
    k1, k2, k3 = jax.random.split(key, 3)
    discriminator = {
        "dense1": _linear_init(k1, embedding_size, hidden),
        "bn": {"scale": jnp.ones((hidden,), jnp.float32), "bias": jnp.zeros((hidden,), jnp.float32)},
        "dense2": _linear_init(k2, hidden, 2),
    }
    eboundary = jax.random.uniform(k3, (num_classes,), jnp.float32, -1.0, 1.0)
    return {"discriminator": discriminator, "eboundary": eboundary}, {}


def discriminator(params: dict, x: jax.Array) -> jax.Array:
    """[b, D] -> [b, 2] log-probabilities; BatchNorm uses this call's batch statistics (biased variance)."""
    h = x @ params["dense1"]["kernel"] + params["dense1"]["bias"]  # [b, H]
    mean = jnp.mean(h, axis=0)
    var = jnp.mean(jnp.square(h - mean), axis=0)
    h = (h - mean) * jax.lax.rsqrt(var + _BN_EPS) * params["bn"]["scale"] + params["bn"]["bias"]
    h = jax.nn.relu(h)
    return jax.nn.log_softmax(h @ params["dense2"]["kernel"] + params["dense2"]["bias"], axis=-1)  # [b, 2]


@jax.custom_vjp
def grad_reverse(x: jax.Array, alpha: jax.Array) -> jax.Array:
    """Gradient reversal: identity forward, ``-alpha * g`` backward (no gradient for ``alpha``)."""
    return x


def _grl_fwd(x, alpha):
    return x, alpha


def _grl_bwd(alpha, g):
    return -alpha * g, jnp.zeros_like(alpha)


grad_reverse.defvjp(_grl_fwd, _grl_bwd)


def grl_coefficient(progress: jax.Array) -> jax.Array:
    """``alpha(p) = 2 / (1 + exp(-10 p)) - 1``: 0 at the start, about 1 by a third of training."""
    return 2.0 / (1.0 + jnp.exp(-10.0 * progress)) - 1.0


def boundary_terms(
    embeddings: jax.Array,
    labels: jax.Array,
    eboundary: jax.Array,
    *,
    center: jax.Array,
    radius_max: jax.Array,
    num_kept: jax.Array,
    threshold: float,
) -> tuple[jax.Array, jax.Array]:
    """Per-example point-to-set distances outside the elastic class boundary.

    Args:
      embeddings: [b, D] new embeddings (unnormalised).
      labels: [b] classes.
      eboundary: [C] learnable boundary logits ``w``.
      center: [b, D] the old class centre of each row's class.
      radius_max: [b] the largest kept old radius of each row's class.
      num_kept: [b] how many radii the class kept (the loss skips classes with <= 1).
      threshold: ``thr`` (0.4).

    Returns:
      ``(t [b], active [b] bool)``: ``t = max(||n(e) - centre|| - R, 0)`` and whether it counts (t > 0 and
      num_kept > 1).
    """
    rad = jnp.abs(radius_max - threshold) * jax.nn.sigmoid(eboundary[labels])  # [b]
    bound = jnp.where(radius_max < threshold, radius_max + rad, radius_max - rad)  # [b]
    t = jnp.maximum(safe_norm(l2_normalize(embeddings) - center) - bound, 0.0)
    return t, (num_kept > 1) & (t > 0)


def extra_loss(ctx: api.StepContext) -> tuple[jax.Array, dict, dict]:
    """``L_p2s + scaled L_adv`` as this device's share of the global-batch quantities."""
    cfg = ctx.config.bct
    axis, n = ctx.axis_name, ctx.global_batch
    params, batch, labels = ctx.params, ctx.batch, ctx.labels
    emb = ctx.embeddings  # [b, D]
    alpha = grl_coefficient(ctx.step.astype(jnp.float32) / ctx.total_steps)
    num_epochs = ctx.total_steps / ctx.steps_per_epoch
    epoch = ctx.epoch.astype(jnp.float32)
    adv_scale = cfg.advbct_adv_weight * (num_epochs - epoch + 1.0) / num_epochs

    # Adversarial term: the two batches pass the discriminator separately (separate BatchNorm statistics).
    old = l2_normalize(jax.lax.stop_gradient(batch["old_features"]).astype(jnp.float32))  # [b, D]
    out_new = discriminator(params["discriminator"], grad_reverse(l2_normalize(emb), alpha))  # [b, 2]
    out_old = discriminator(params["discriminator"], old)  # [b, 2]
    nll = (jnp.sum(-out_new[:, 0]) + jnp.sum(-out_old[:, 1])) / n  # share of mean NLL(new, 0) + mean NLL(old, 1)

    # Point-to-set boundary term, normalised by the global count of positive terms.
    t, active = boundary_terms(
        emb,
        labels,
        params["eboundary"],
        center=batch["advbct_center"].astype(jnp.float32),
        radius_max=batch["advbct_radius_max"].astype(jnp.float32),
        num_kept=batch["advbct_num_kept"],
        threshold=cfg.advbct_threshold,
    )
    count = jax.lax.psum(jnp.sum(active), axis)
    p2s = cfg.advbct_p2s_weight * jnp.sum(jnp.where(active, t, 0.0)) / jnp.maximum(count, 1)

    correct = jnp.sum(jnp.argmax(out_new, axis=1) == 0) + jnp.sum(jnp.argmax(out_old, axis=1) == 1)
    shares = {
        "advbct/adv": nll,
        "advbct/p2s": p2s,
        "advbct/p2s_active": jnp.sum(active).astype(jnp.float32),
        "advbct/disc_accuracy": correct.astype(jnp.float32) / (2 * n),
    }
    metrics = jax.lax.psum(jax.lax.stop_gradient(shares), axis)
    metrics["advbct/alpha"] = alpha  # the same on every device
    return p2s + adv_scale * nll, ctx.state, metrics


METHOD = api.Method(
    name="advbct",
    config=(
        api.Field("advbct_threshold", 0.4, "radius threshold of the boundary loss", interval=(0, None, True, None)),
        api.Field("advbct_p2s_weight", 4.0, "point-to-set boundary loss weight"),
        api.Field("advbct_adv_weight", 4.0, "adversarial loss weight, decayed by (E - e + 1) / E"),
        api.Field("advbct_hidden", 100, "discriminator hidden width", interval=(1, None, True, None)),
    ),
    presets={"advbct": {}},
    per_example=("old_features",),
    class_files=(api.ClassFile(field="advbct_meta", command=_META, load=load_meta, doc="advbct meta .npz (AdvBCT)"),),
    per_label=tuple(name for name, _ in _META_TABLES.values()),
    init=init,
    extra_loss=extra_loss,
)
