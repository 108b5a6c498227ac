"""NCCL: soft contrastive losses against a queue of old embeddings and old logits (docs/methods.md (NCCL)).

A first-in-first-out queue holds, for the last Q examples seen, the normalised old embedding ``f_q``, the old
embedding's class logits ``z_q`` (the head's margin logits of the old embedding against the current centres,
without gradient) and the label ``y_q``. Each step first enqueues the whole global batch, then scores every new
embedding against the queue with a "neighbourhood consensus" soft contrastive loss: positives are the queued
items of the same class, each weighted by how much its old embedding agrees with the sample's own old embedding,

``l(S)_i = -(sum_q m_iq w_iq log softmax_q(S_i)_q) / sum_q m_iq``,  ``w_iq = (o_i . f_q + 1) / 2``,
``m_iq = [y_q == y_i]``,

once in the embedding space (``S_iq = n(e_i) . f_q / t``, loss l1) and once in the logit space
(``S_iq = g_i . z_q / t`` with ``g_i`` the new embedding's logits, loss l2). The total is
``L_cls + alpha * mean_i l1_i + beta * mean_i l2_i`` over the global batch. The sample's own old embedding is in
the queue, so every row has a positive.

Reference quirks, each a switch in ``config.bct`` whose default is what the paper intends (docs/methods.md):

* ``nccl_logit_grad`` (reference False): the reference builds l2 on a non-differentiable all-gather, so it
  trains nothing; here l2 has a gradient.
* ``nccl_normalize_logits`` (reference False): raw logit dot products over C classes reach 1e4-1e6, which
  saturates the softmax; with a gradient that would swamp training, so the logit vectors are L2-normalised
  (globally over the class shards), the analogue of the embedding level.
* ``nccl_clamp_logits`` (reference True): the reference clamps the x s logits to [-1, 1] (its fp16 branch).
* ``nccl_amplify_grad`` (reference True): the reference's l1 gradient arrives multiplied by the number of devices
  through its all-gather backward.
* ``nccl_count_empty_slots`` (reference True): the zero-initialised slots enter the softmax denominators until the
  queue is full.

The logit queue is ``Q x C`` (3 GB for Q=8192, C=93431), so it is stored class-major, ``[C_padded, Q]``, under the state
key ``'class_rows'``, declared ``class_sharded_state``, so the step shards it by rows like the centres; each device
writes and reads only its classes, and the logit similarities are summed over devices.

References:
  Wu et al., "Neighborhood Consensus Contrastive Learning for Backward-Compatible Representation", AAAI 2022.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mixbct_jax.bct import api
from mixbct_jax.heads import margin
from mixbct_jax.heads.sharded_fc import gather_rows, l2_normalize, padded_rows
from mixbct_jax.numerics import global_mean_share, scale_grad, sum_over_shards


def init(
    key: jax.Array, *, config, embedding_size: int, num_classes: int, num_shards: int | None = None
) -> tuple[dict, dict]:
    """Empty queues: features [Q, D] zeros, labels [Q] -1, logits [C_padded, Q] zeros, write pointer 0.

    The logit queue has the centres' padded row count (``sharded_fc.padded_rows``); ``num_shards`` (the step's
    device count) defaults to ``jax.device_count()``.
    """
    del key
    q = config.bct.nccl_queue_size
    shards = num_shards if num_shards is not None else jax.device_count()
    rows = padded_rows(num_classes, shards)
    state = {
        "feat_queue": jnp.zeros((q, embedding_size), jnp.float32),
        "label_queue": jnp.full((q,), -1, jnp.int32),
        "ptr": jnp.zeros((), jnp.int32),
        "class_rows": {"logit_queue": jnp.zeros((rows, q), jnp.float32)},
    }
    return {}, state


def soft_contrastive(sim: jax.Array, weights: jax.Array, positive: jax.Array, valid: jax.Array) -> jax.Array:
    """Per-row NCCL loss ``-(sum_q m w log softmax(S)) / sum_q m``.

    Args:
      sim: [r, Q] similarities already divided by the temperature.
      weights: [r, Q] consensus weights ``w``.
      positive: [r, Q] bool mask ``m`` (same class).
      valid: [Q] bool, the slots that take part in the softmax denominator.

    Returns:
      [r] losses (0 for a row without positives).
    """
    masked = jnp.where(valid[None, :], sim, -jnp.inf)
    top = jax.lax.stop_gradient(jnp.max(masked, axis=1, keepdims=True))  # the reference detaches the max too
    log_z = top + jnp.log(jnp.sum(jnp.where(valid[None, :], jnp.exp(sim - top), 0.0), axis=1, keepdims=True))
    log_p = sim - log_z  # [r, Q]
    num = jnp.sum(jnp.where(positive, weights * log_p, 0.0), axis=1)
    count = jnp.sum(positive, axis=1)
    return -num / jnp.maximum(count, 1)


def class_logits(
    embeddings: jax.Array, labels: jax.Array, centres: jax.Array, *, head, axis_name: str, normalize: bool, clamp: bool
) -> jax.Array:
    """The head's margin logits of ``embeddings`` against this device's centre shard, as NCCL's logit vectors.

    Args:
      embeddings: [N, D] gathered embeddings (unnormalised).
      labels: [N] their classes (the margin goes on the target column, as the reference's PartialFC output).
      centres: [C_local, D] this device's centre shard; all-zero rows (padding) give zero columns.
      head: ``config.head`` (a margin head).
      axis_name: the device axis.
      normalize: L2-normalise each row over all C classes (a sum over the device axis).
      clamp: clamp the scaled logits to [-1, 1] as the reference's fp16 branch does.

    Returns:
      [N, C_local] this device's columns of the logit vectors.
    """
    rows = centres.shape[0]
    local = labels - jax.lax.axis_index(axis_name) * rows
    target_col = jnp.where((local >= 0) & (local < rows), local, -1)  # [N]
    cosine = jnp.clip(jnp.dot(l2_normalize(embeddings), l2_normalize(centres).T), -1.0, 1.0)  # [N, C_local]
    logits = margin.apply_head(head, cosine, target_col)
    if clamp:
        logits = jnp.clip(logits, -1.0, 1.0)
    logits = jnp.where(jnp.any(centres != 0, axis=1)[None, :], logits, 0.0)  # padded classes contribute nothing
    if normalize:
        sq = sum_over_shards(jnp.sum(jnp.square(logits), axis=1, keepdims=True), axis_name)  # [N, 1]
        logits = logits * jax.lax.rsqrt(jnp.maximum(sq, 1e-24))
    return logits


def enqueue(state: dict, feats: jax.Array, labels: jax.Array, logits: jax.Array) -> dict:
    """Writes N items at the pointer, wrapping modulo Q (the oldest entries are overwritten).

    Args:
      state: the queue state.
      feats: [N, D] normalised old embeddings.
      labels: [N].
      logits: [N, C_local] this device's logit columns.

    Returns:
      The new state, pointer advanced by N modulo Q.
    """
    q = state["feat_queue"].shape[0]
    n = feats.shape[0]
    if n > q:
        raise ValueError(f"config.bct.nccl_queue_size={q} must be at least the global batch {n}")
    slots = (state["ptr"] + jnp.arange(n)) % q  # [N]
    return {
        "feat_queue": state["feat_queue"].at[slots].set(feats),
        "label_queue": state["label_queue"].at[slots].set(labels),
        "ptr": (state["ptr"] + n) % q,
        "class_rows": {"logit_queue": state["class_rows"]["logit_queue"].at[:, slots].set(logits.T)},
    }


def extra_loss(ctx: api.StepContext) -> tuple[jax.Array, dict, dict]:
    """Enqueues the global batch, then ``alpha * l1 + beta * l2`` as this device's share of the global mean."""
    cfg = ctx.config.bct
    axis = ctx.axis_name
    if ctx.centres is None:
        raise ValueError("config.bct.method='nccl' needs a margin head (config.head.type arcface/cosface/combined)")
    head = ctx.config.head
    compute_dtype = jnp.dtype(ctx.config.model.dtype)
    tau = cfg.nccl_temperature
    emb, labels = ctx.embeddings, ctx.labels  # [b, D], [b]
    old = l2_normalize(jax.lax.stop_gradient(ctx.batch["old_features"]).astype(jnp.float32))  # [b, D]
    centres = jax.lax.stop_gradient(ctx.centres)  # [C_local, D]; NCCL's terms do not train the centres
    logit_kw = dict(head=head, axis_name=axis, normalize=cfg.nccl_normalize_logits, clamp=cfg.nccl_clamp_logits)

    # 1. Enqueue every old item of the global batch before the loss, as the reference.
    all_old = jax.lax.all_gather(old, axis, tiled=True)  # [N, D]
    all_labels = jax.lax.all_gather(labels, axis, tiled=True)  # [N]
    state = enqueue(ctx.state, all_old, all_labels, class_logits(all_old, all_labels, centres, **logit_kw))
    feats, queue_labels = state["feat_queue"], state["label_queue"]  # [Q, D], [Q]
    valid = jnp.ones_like(queue_labels, bool) if cfg.nccl_count_empty_slots else queue_labels >= 0  # [Q]

    # 2. Embedding level, on this device's rows.
    sim = jnp.dot(l2_normalize(emb), feats.T) / tau  # [b, Q]
    weights = (jnp.dot(old, feats.T) + 1.0) / 2.0  # [b, Q]
    l1 = soft_contrastive(sim, weights, labels[:, None] == queue_labels[None, :], valid)  # [b]
    l1_share = cfg.nccl_alpha * jnp.sum(l1) / ctx.global_batch
    if cfg.nccl_amplify_grad:
        l1_share = scale_grad(l1_share, jax.lax.psum(1, axis))

    # 3. Logit level, over the whole global batch: g_i . z_q is a sum over the class shards.
    all_emb = gather_rows(emb, axis)  # [N, D]
    if not cfg.nccl_logit_grad:
        all_emb = jax.lax.stop_gradient(all_emb)
    g = class_logits(all_emb, all_labels, centres, **logit_kw)  # [N, C_local]
    z = state["class_rows"]["logit_queue"]  # [C_local, Q]
    partial = jnp.dot(g.astype(compute_dtype), z.astype(compute_dtype), preferred_element_type=jnp.float32)
    sim2 = sum_over_shards(partial, axis) / tau  # [N, Q], identical on every device
    weights2 = (jnp.dot(all_old, feats.T) + 1.0) / 2.0  # [N, Q]
    l2 = soft_contrastive(sim2, weights2, all_labels[:, None] == queue_labels[None, :], valid)  # [N]
    l2_share = global_mean_share(cfg.nccl_beta * jnp.mean(l2), axis)

    metrics = {
        "nccl/l1": jax.lax.psum(jax.lax.stop_gradient(jnp.sum(l1)) / ctx.global_batch, axis),
        "nccl/l2": jax.lax.stop_gradient(jnp.mean(l2)),
    }  # l2 is already replicated
    return l1_share + l2_share, state, metrics


def check(config) -> list[tuple[str, str]]:
    """The queue must hold a whole global batch (it is enqueued before the loss)."""
    if config.bct.nccl_queue_size < config.data.global_batch:
        return [("bct.nccl_queue_size", f"must be >= config.data.global_batch={config.data.global_batch}")]
    return []


METHOD = api.Method(
    name="nccl",
    config=(
        api.Field("nccl_queue_size", 8192, "Q, >= the global batch", interval=(1, None, True, None)),
        api.Field("nccl_alpha", 1.0, "embedding-level loss weight"),
        api.Field("nccl_beta", 0.01, "logit-level loss weight"),
        api.Field("nccl_temperature", 1.0, "softmax temperature of both NCCL losses", interval=(0, None, False, None)),
        api.Field("nccl_logit_grad", True, "reference: False (its logit loss is built on a non-differentiable gather)"),
        api.Field("nccl_normalize_logits", True, "cosine of logit vectors; reference: False (raw dot products)"),
        api.Field(
            "nccl_clamp_logits", False, "reference: True (clamps the x s logits to [-1, 1], an fp16-branch artefact)"
        ),
        api.Field("nccl_amplify_grad", False, "reference: True (the embedding-level gradient arrives x #devices)"),
        api.Field(
            "nccl_count_empty_slots", False, "reference: True (empty queue slots enter the softmax denominators)"
        ),
    ),
    check=check,
    presets={"nccl": {}},
    per_example=("old_features",),
    class_sharded_state=("class_rows",),  # the [C_padded, Q] logit queue
    init=init,
    extra_loss=extra_loss,
)
