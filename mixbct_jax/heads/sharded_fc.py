"""Class centres sharded over the device axis, with a distributed margin-softmax cross-entropy.

Described in docs/methods.md (the margin head).

These functions run inside the per-device program (``shard_map`` or ``pmap``) with a named axis. Device ``d``
holds rows ``[d * C_local, (d + 1) * C_local)`` of the (zero-padded) centre matrix. The embeddings of the whole
global batch are all-gathered, every device computes logits against its own centres, and the softmax
normaliser is reduced over the axis, so the loss equals a single-device full-softmax cross-entropy over the
global batch while no device ever holds all ``C`` centres.

Gradients are written out explicitly with ``custom_vjp`` instead of relying on how autodiff transposes
collectives (that differs between ``pmap`` and ``shard_map``'s checked mode):

* ``gather_rows``: forward all-gather; backward reduce-scatter, so each device receives the sum over all
  shards of the gradient for its own rows (the reference's all-gather backward, before its x W).
* ``distributed_cross_entropy``: forward uses the global max and sum; backward is ``(p - onehot) * g`` on the
  local logits, with no collective.

Together, per-device ``jax.grad`` of the returned (global) loss gives complete gradients for the local centres
and for the local embeddings; the caller sums backbone gradients over the axis.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from mixbct_jax.heads import margin


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """``x / max(||x||, eps)``, PyTorch's ``F.normalize``.

    Written with ``rsqrt(max(||x||^2, eps^2))`` so an all-zero row (a padded centre) has a zero gradient
    instead of the NaN that differentiating ``sqrt`` at 0 gives.
    """
    sq = jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps)).astype(x.dtype)


def is_centres(path) -> bool:
    """Whether a leaf's tree path (``jax.tree_util`` keys) lies under a ``'centres'`` key.

    Those leaves are the sharded class centres and their optimizer slots, split by rows over the device axis
    rather than replicated.
    """
    return any(getattr(k, "key", None) == "centres" for k in path)


def rows_per_shard(num_classes: int, num_shards: int) -> int:
    """Centres per device when the matrix is zero-padded to ``rows_per_shard * num_shards`` rows."""
    return -(-num_classes // num_shards)


def padded_rows(num_classes: int, num_shards: int) -> int:
    """Rows of the stored centre matrix: ``C`` rounded up to a multiple of ``lcm(num_shards, 128)``.

    Rounding to a multiple of 128 rather than of the device count alone keeps the checkpointed shape the same
    for 1, 2, 4, ..., 128 devices, so a run resumes on another device count without re-padding.
    """
    multiple = math.lcm(num_shards, 128)
    return -(-num_classes // multiple) * multiple


def init_centres(key: jax.Array, num_rows: int, embedding_size: int, num_classes: int) -> jax.Array:
    """N(0, 0.01^2) centres as the reference; rows past ``num_classes`` (padding) are zero."""
    w = 0.01 * jax.random.normal(key, (num_rows, embedding_size), jnp.float32)
    return jnp.where(jnp.arange(num_rows)[:, None] < num_classes, w, 0.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def gather_rows(x: jax.Array, axis_name: str) -> jax.Array:
    """All-gathers ``x`` [b, ...] along the axis into [W * b, ...] in device order."""
    return jax.lax.all_gather(x, axis_name, tiled=True)


def _gather_rows_fwd(x, axis_name):
    return gather_rows(x, axis_name), None


def _gather_rows_bwd(axis_name, _, ct):
    return (jax.lax.psum_scatter(ct, axis_name, scatter_dimension=0, tiled=True),)


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def distributed_cross_entropy(logits: jax.Array, target_col: jax.Array, axis_name: str) -> jax.Array:
    """Per-example softmax CE over classes split across the axis.

    Args:
      logits: [N, C_local] this device's logits (columns of absent/padded classes at -inf).
      target_col: [N] column of each row's target in this shard, -1 if it lives elsewhere.
      axis_name: the device axis.

    Returns:
      [N] ``-log p_target``, identical on every device. Computed as ``log-sum-exp - target logit``; the
      reference's ``-log(max(p, 1e-30))`` caps the loss at 69.08 where ``p`` underflows, which this does not
      (the gradient, ``p - onehot``, is the same either way).
    """
    return _dist_ce_fwd(logits, target_col, axis_name)[0]


def _dist_ce_fwd(logits, target_col, axis_name):
    logits = logits.astype(jnp.float32)
    # Global max for stability (the reference's all-reduce MAX).
    row_max = jax.lax.pmax(jnp.max(logits, axis=1, keepdims=True), axis_name)
    e = jnp.exp(logits - row_max)
    total = jax.lax.psum(jnp.sum(e, axis=1, keepdims=True), axis_name)  # [N, 1]
    p = e / total  # [N, C_local]
    onehot = jnp.arange(logits.shape[1])[None, :] == target_col[:, None]
    # Each row's target logit lives on exactly one shard.
    target = jax.lax.psum(jnp.sum(jnp.where(onehot, logits - row_max, 0.0), axis=1), axis_name)  # [N]
    return jnp.log(total[:, 0]) - target, (p, onehot)


def _dist_ce_bwd(axis_name, res, g):
    p, onehot = res
    return (p - onehot.astype(p.dtype)) * g[:, None], None


distributed_cross_entropy.defvjp(_dist_ce_fwd, _dist_ce_bwd)


def sample_centres(
    key: jax.Array,
    labels_local_col: jax.Array,
    *,
    num_rows: int,
    num_valid: jax.Array,
    num_keep: jax.Array,
    num_sample: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """PartialFC sampling with static shapes: every positive class plus random negatives, ``num_keep`` in all.

    As the reference, positives get priority 2 and the other real classes a uniform draw; the ``num_keep`` highest
    are kept, or all positives when they are more. ``num_sample`` (static) bounds that count, so the result has a
    fixed shape; the columns past the count are returned with ``kept`` False.

    Args:
      key: RNG for the negatives.
      labels_local_col: [N] each row's target column in this shard, -1 elsewhere.
      num_rows: centres held by this device (padding included).
      num_valid: how many of them are real classes.
      num_keep: centres to keep, ``int(sample_rate * num_valid)`` (raised to the positives' count here).
      num_sample: static size of the result, at least ``max(num_keep, min(N, num_valid))``.

    Returns:
      ``(rows [num_sample] sorted centre rows, target_col [N] position of each row's target in them or -1,
      kept [num_sample] bool, the columns that take part in the softmax)``.
    """
    positive = (
        jnp.zeros((num_rows,), bool)
        .at[jnp.where(labels_local_col >= 0, labels_local_col, num_rows)]
        .set(True, mode="drop")
    )
    priority = jnp.where(positive, 2.0, jax.random.uniform(key, (num_rows,)))  # positives first, as the reference
    priority = jnp.where(jnp.arange(num_rows) < num_valid, priority, -1.0)  # never sample padding rows
    top = jax.lax.top_k(priority, num_sample)[1]  # [S], by decreasing priority
    count = jnp.maximum(num_keep, jnp.sum(positive))
    kept_top = (jnp.arange(num_sample) < count) & (top < num_valid)
    order = jnp.argsort(top)
    rows, kept = top[order], kept_top[order]
    pos = jnp.clip(jnp.searchsorted(rows, labels_local_col), 0, num_sample - 1)
    target_col = jnp.where((labels_local_col >= 0) & (rows[pos] == labels_local_col), pos, -1)
    return rows, target_col, kept


def sample_counts(num_classes: int, rows_local: int, num_shards: int, sample_rate: float) -> list[int]:
    """Centres each device keeps: ``int(sample_rate * C_d)`` of the ``C_d`` real classes it holds.

    The reference's ``int(rate * num_local)`` on its own class split; computed here in Python (float64, as the
    reference) from the padded layout, where device ``d`` holds the real rows ``[d * rows_local, C)`` of its block.
    """
    return [int(sample_rate * min(max(num_classes - d * rows_local, 0), rows_local)) for d in range(num_shards)]


def margin_softmax_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    centres: jax.Array,
    *,
    axis_name: str,
    num_classes: int,
    head: Any,
    key: jax.Array | None = None,
    compute_dtype: Any = jnp.float32,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Margin-softmax CE of this device's batch rows against all classes, centres sharded over ``axis_name``.

    Args:
      embeddings: [b, D] this device's (possibly mixed) embeddings, unnormalised.
      labels: [b] int class ids (global numbering).
      centres: [C_local, D] this device's shard of the (padded) centre matrix.
      axis_name: the device axis.
      num_classes: C (real classes; padded rows are masked out).
      head: ``config.head`` (type, scale, margins, sample_rate, interclass_filtering_threshold).
      key: RNG for PartialFC sampling (only used when ``head.sample_rate < 1``).
      compute_dtype: dtype of the cosine matmul (bfloat16 for mixed precision, as the reference's fp16 matmul).

    Returns:
      ``(loss [N] per example of the global batch, identical on every device; aux)``.
    """
    all_emb = gather_rows(embeddings, axis_name)  # [N, D]
    all_labels = jax.lax.all_gather(labels, axis_name, tiled=True)  # [N]
    rows_local = centres.shape[0]
    start = jax.lax.axis_index(axis_name) * rows_local
    local = all_labels - start
    target_col = jnp.where((local >= 0) & (local < rows_local), local, -1)  # [N]
    num_valid = jnp.clip(num_classes - start, 0, rows_local)

    if head.sample_rate < 1.0:
        n = all_emb.shape[0]
        counts = sample_counts(num_classes, rows_local, jax.lax.axis_size(axis_name), head.sample_rate)
        num_keep = jnp.asarray(counts, jnp.int32)[jax.lax.axis_index(axis_name)]
        # Static bound: the largest count, or every positive of the global batch when they are more.
        num_sample = min(rows_local, max(max(counts), n))
        rows, target_col, valid_col = sample_centres(
            key, target_col, num_rows=rows_local, num_valid=num_valid, num_keep=num_keep, num_sample=num_sample
        )
        w = centres[rows]  # [S, D]
    else:
        w = centres
        valid_col = jnp.arange(rows_local) < num_valid

    cosine = jnp.dot(
        l2_normalize(all_emb).astype(compute_dtype),
        l2_normalize(w).astype(compute_dtype).T,
        preferred_element_type=jnp.float32,
    )
    cosine = jnp.clip(cosine, -1.0, 1.0)  # [N, C_local]
    logits = margin.apply_head(head, cosine, target_col)
    logits = jnp.where(valid_col[None, :], logits, -jnp.inf)
    loss = distributed_cross_entropy(logits, target_col, axis_name)
    return loss, {"gathered_embeddings": all_emb, "gathered_labels": all_labels}
