"""UniBCT: BCT's influence loss with prototypes refined by graph propagation over the new features.

Described in docs/methods.md (UniBCT).

Training: the BCT influence loss (``mixbct_jax.heads.prototypes``, as ``mixbct_jax.bct.bct``) with weight 0 before
``config.bct.unibct_start_epoch`` (10) and ``config.bct.influence_weight`` from then on; the learning rate follows the
reference's StepLR (``config.optim.schedule = 'step'``, decay epochs 20/26/32).

Refinement (``host_update``), at the start of each epoch in ``config.bct.unibct_refine_epochs`` (10 and 20): for
each class c with n_c examples, old embeddings ``V_old^c`` and current new embeddings ``V_new^c``,

``A = softmax(V_new^c V_new^c^T / t)`` (diagonal excluded), ``M = (1 - lam)(I - lam A)^-1``,
``P_c = mean_rows(M V_old^c)``,

so each old embedding is replaced by a propagation of its class's old embeddings over the new model's affinity
graph, and the prototype is their mean.

The reference normalises A over columns (``softmax_axis=0``), which makes ``M`` column-stochastic and ``P_c`` exactly
the plain class mean of the raw old embeddings, whatever the new features are (docs/deviations.md §8.10). Our default,
``config.bct.unibct_affinity = 'row'``, normalises each row (each example's affinities sum to 1, a random-walk
transition as in the paper), computed on cosines of the new features; ``'column'`` reproduces the reference and needs no
pass of the new model. The refined prototypes are saved in ``<workdir>/unibct/`` so that a resumed run uses the same
table.

References:
  Zhang et al., "Towards Universal Backward-Compatible Representation Learning", IJCAI 2022.
"""

from __future__ import annotations

import pathlib
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mixbct_jax import files
from mixbct_jax.bct import api
from mixbct_jax.data import old_stats
from mixbct_jax.heads.prototypes import influence_loss
from mixbct_jax.numerics import global_mean_share

AFFINITIES = ("row", "column")

# Per-class systems are solved in padded blocks of k classes x s x s; this bounds k * s * s (float64 entries).
_BLOCK_ELEMENTS = 1 << 22
# Examples embedded per call of ``embed_new`` during a refinement.
_EMBED_CHUNK = 65536


def extra_loss(ctx: api.StepContext) -> tuple[jax.Array, dict, dict]:
    """The influence loss, weighted 0 before ``unibct_start_epoch`` (still computed and reported)."""
    cfg = ctx.config.bct
    weight = jnp.where(ctx.epoch >= cfg.unibct_start_epoch, cfg.influence_weight, 0.0)
    loss = jnp.mean(
        influence_loss(ctx.embeddings, ctx.labels, ctx.consts["prototypes"], axis_name=ctx.axis_name)
    )  # replicated on every device
    share = global_mean_share(weight * loss, ctx.axis_name)
    return share, ctx.state, {"bct/influence": jax.lax.stop_gradient(loss)}


# ---------------------------------------------------------------------------------------------------------------
# Prototype refinement (host, NumPy)
# ---------------------------------------------------------------------------------------------------------------
def _masked_softmax(logits: np.ndarray, valid: np.ndarray, axis: int) -> np.ndarray:
    """Softmax over ``axis`` among ``valid`` entries; all-invalid lines give zeros instead of NaN."""
    masked = np.where(valid, logits, -np.inf)
    top = np.max(masked, axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    e = np.where(valid, np.exp(masked - top), 0.0)
    total = np.sum(e, axis=axis, keepdims=True)
    return e / np.where(total > 0, total, 1.0)


def _refine_block(
    v_new: np.ndarray, v_old: np.ndarray, valid: np.ndarray, *, lam: float, temperature: float, softmax_axis: int
) -> np.ndarray:
    """Refined prototypes of k classes padded to s rows: [k, s, D] x2, valid [k, s] -> [k, D]."""
    k, s = valid.shape
    sim = np.einsum("kid,kjd->kij", v_new, v_new) / temperature  # [k, s, s]
    eye = np.eye(s, dtype=bool)[None]
    # The reference excludes self-affinity with -1e9 rather than -inf, so a singleton class still gets A = [[1]].
    sim = np.where(eye, -1e9, sim)
    pair = valid[:, :, None] & valid[:, None, :]
    a = _masked_softmax(sim, pair, axis=1 + softmax_axis)  # [k, s, s]; padded rows/columns are zero
    # mean_rows(M V) = (1 - lam) / n * u^T V with (I - lam A)^T u = 1: one vector solve per class instead of an
    # inverse. Padded rows of A are zero, so the padded part of u is 0 and padded rows of V do not count.
    system = np.eye(s)[None] - lam * np.swapaxes(a, 1, 2)
    u = np.linalg.solve(system, valid.astype(np.float64)[:, :, None])[:, :, 0]  # [k, s]
    n = valid.sum(axis=1, keepdims=True)  # [k, 1]
    return (1.0 - lam) / n * np.einsum("ks,ksd->kd", u, v_old)


def _refine_present(
    v_new: np.ndarray, v_old: np.ndarray, labels: np.ndarray, *, lam: float, temperature: float, softmax_axis: int
) -> tuple[np.ndarray, np.ndarray]:
    """(classes present [k], their refined prototypes [k, D] float64); see ``refine_prototypes``."""
    if softmax_axis not in (0, 1):
        raise ValueError(f"softmax_axis must be 0 (columns, the reference) or 1 (rows); got {softmax_axis}")
    labels = np.asarray(labels).astype(np.int64)
    v_new = np.asarray(v_new, np.float64)
    v_old = np.asarray(v_old, np.float64)
    order = np.argsort(labels, kind="stable")
    classes, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
    out = np.zeros((classes.size, v_old.shape[1]), np.float64)
    # Classes of similar size share one padded block: sizes (s/2, s] are padded to s, s a power of two.
    padded = 1 << np.ceil(np.log2(counts)).astype(np.int64)
    for s in np.unique(padded):
        members = np.flatnonzero(padded == s)
        per_block = max(1, _BLOCK_ELEMENTS // (int(s) * int(s)))
        for first in range(0, members.size, per_block):
            block = members[first : first + per_block]
            offsets = np.arange(s)[None, :]
            valid = offsets < counts[block, None]  # [k, s]
            rows = order[starts[block, None] + np.where(valid, offsets, 0)]  # [k, s]
            out[block] = _refine_block(
                np.where(valid[..., None], v_new[rows], 0.0),
                np.where(valid[..., None], v_old[rows], 0.0),
                valid,
                lam=lam,
                temperature=temperature,
                softmax_axis=softmax_axis,
            )
    return classes, out


def refine_prototypes(
    v_new: np.ndarray,
    v_old: np.ndarray,
    labels: np.ndarray,
    *,
    lam: float = 0.9,
    temperature: float = 0.05,
    softmax_axis: int = 0,
    num_classes: int | None = None,
) -> np.ndarray:
    """UniBCT's propagated class prototypes, vectorised over classes (padded blocks of similar-size classes).

    Args:
      v_new: [n, D] new-model embeddings, used as given (the reference passes raw features; ``host_update``
        passes L2-normalised ones in 'row' mode).
      v_old: [n, D] old-model embeddings of the same examples (raw).
      labels: [n] class ids.
      lam: propagation weight lambda (0.9).
      temperature: affinity temperature (0.05).
      softmax_axis: 0 normalises each column of A (the reference; the result is the class mean of ``v_old``),
        1 each row.
      num_classes: rows of the output; defaults to ``max(labels) + 1``.

    Returns:
      [num_classes, D] float32 prototypes (not normalised); classes without examples get zero rows.
    """
    classes, protos = _refine_present(v_new, v_old, labels, lam=lam, temperature=temperature, softmax_axis=softmax_axis)
    num_classes = int(np.max(labels)) + 1 if num_classes is None else num_classes
    out = np.zeros((num_classes, protos.shape[1]), np.float32)
    out[classes] = protos
    return out


def _normalize_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def compute_prototypes(
    config, *, embed_new: Callable[[np.ndarray], np.ndarray], old, labels: np.ndarray, num_classes: int
) -> np.ndarray:
    """The refined [num_classes, D] table from the old embeddings and (in 'row' mode) the current new model.

    'column' (the reference) is the plain class mean of the raw old embeddings, so it is computed directly,
    without a new-model pass. 'row' embeds the training set in chunks of whole classes, so the host holds one
    chunk of new embeddings at a time.
    """
    cfg = config.bct
    if cfg.unibct_affinity not in AFFINITIES:
        raise ValueError(f"config.bct.unibct_affinity={cfg.unibct_affinity!r}: choose one of {AFFINITIES}")
    if cfg.unibct_affinity == "column":
        table = old_stats.class_means(old.features, labels, num_classes, normalize=False)
    else:
        order = np.argsort(labels, kind="stable")
        sorted_labels = labels[order]
        table = np.zeros((num_classes, old.features.shape[1]), np.float32)
        start = 0
        while start < order.size:
            # Extend the chunk to the end of its last class: a class's system needs all of its rows.
            end = min(start + _EMBED_CHUNK, order.size)
            end = int(np.searchsorted(sorted_labels, sorted_labels[end - 1], side="right"))
            idx = np.sort(order[start:end])
            v_new = _normalize_rows(np.asarray(embed_new(idx), np.float64))  # cosine affinities
            v_old = np.asarray(old.features[idx], np.float64)
            classes, protos = _refine_present(
                v_new, v_old, labels[idx], lam=cfg.unibct_lambda, temperature=cfg.unibct_temperature, softmax_axis=1
            )
            table[classes] = protos
            start = end
    if cfg.unibct_normalize_prototypes:
        table = _normalize_rows(table)
    return table.astype(np.float32)


def host_update(
    epoch: int, *, config, workdir, consts: dict, embed_new: Callable[[np.ndarray], np.ndarray], old, subset
) -> dict | None:
    """Refines the prototypes at the refinement epochs; on a resume, reloads the latest refined table.

    Returns:
      ``{'prototypes': [C_padded, D]}`` zero-padded to the current table's row count, or None when the consts
      stay as they are.
    """
    done = [e for e in config.bct.unibct_refine_epochs if e <= epoch]
    if not done:
        return None
    latest = max(done)
    path = pathlib.Path(workdir) / "unibct" / f"prototypes_epoch{latest:03d}.npy"
    current = consts["prototypes"]
    if path.exists():
        # Every epoch after a refinement lands here; only a resumed run (initial table) needs the reload.
        table = np.load(path)
        return None if np.array_equal(current[: table.shape[0]], table) else _pad(table, current.shape[0])
    if latest < epoch:
        warnings.warn(
            f"UniBCT: {path} is missing; refining the prototypes of epoch {latest} again with the "
            f"current model at epoch {epoch}",
            stacklevel=2,
        )
    labels = np.asarray(subset.labels).astype(np.int64)
    num_classes = config.model.num_classes if config.model.num_classes > 0 else subset.num_classes
    table = compute_prototypes(config, embed_new=embed_new, old=old, labels=labels, num_classes=num_classes)
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        files.atomic_write(path, lambda tmp: np.save(tmp, table))
    return _pad(table, current.shape[0])


def _pad(table: np.ndarray, rows: int) -> dict[str, np.ndarray]:
    return {"prototypes": np.concatenate([table, np.zeros((rows - table.shape[0], table.shape[1]), np.float32)])}


_CLASS_MEANS = "python -m mixbct_jax.prepare class-means"

METHOD = api.Method(
    name="unibct",
    config=(
        api.Field(
            "influence_weight",
            1.0,
            "BCT/UniBCT: weight of the influence loss (CE of n(e) . prototypes)",
            interval=(0, None, True, None),
        ),
        api.Field("unibct_start_epoch", 10, "influence loss weight 0 before this epoch"),
        api.Field("unibct_refine_epochs", (10, 20), "prototype refinement at the start of these epochs"),
        api.Field(
            "unibct_affinity",
            "row",
            '"row": row-stochastic affinity (paper); "column": reference (= class mean)',
            choices=AFFINITIES,
        ),
        api.Field("unibct_lambda", 0.9, "propagation weight of (1 - lam)(I - lam A)^-1", interval=(0, 1, True, False)),
        api.Field(
            "unibct_temperature",
            0.05,
            "affinity temperature on cosines of the new features",
            interval=(0, None, False, None),
        ),
        api.Field("unibct_normalize_prototypes", False, "reference: refined prototypes stay unnormalised"),
    ),
    # The reference's StepLR at epochs 20/26/32.
    presets={"unibct": {"optim.schedule": "step", "optim.decay_epochs": (20, 26, 32)}},
    class_files=(
        api.ClassFile(
            field="prototypes",
            command=_CLASS_MEANS,
            load=api.npy_table("prototypes", "prototypes", _CLASS_MEANS),
            doc="class means [C, D] (BCT, UniBCT)",
        ),
    ),
    consts=("prototypes",),
    extra_loss=extra_loss,
    host_update=host_update,
)
