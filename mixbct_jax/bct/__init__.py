"""Backward-compatible training methods, one small module each; the module path is the registry.

A method module may define any of these (the trainer uses defaults for the others):

``NEEDS: tuple[str, ...]``
    Per-example host arrays fed with every batch (``data.old_embeddings.batch_arrays``): by example index
    ``'old_features'`` (old embeddings, row-L2-normalised), ``'credible'`` (MixBCT's denoised mask); by label
    ``'advbct_center'``, ``'advbct_radius_max'``, ``'advbct_num_kept'`` (AdvBCT's class meta).
``CONSTS: tuple[str, ...]``
    Frozen arrays the step receives as ``ctx['consts']`` (never checkpointed): ``'prototypes'`` ([C_padded, D]
    class means, row-sharded over the device axis like the centres, so the local block is rows
    ``[d * C_local, (d + 1) * C_local)``).
``init(key, *, config, embedding_size, num_classes, num_shards) -> (params, state)``
    Extra trainable parameters (in the backbone's optimizer group) and non-trainable state. State leaves under
    a key ``'class_rows'`` are class-major tables ``[C_padded, ...]`` (padded like the centres for ``num_shards``
    devices), row-sharded like the centres (NCCL's logit queue); the rest is replicated.
``before_head(embeddings, batch, *, key, config) -> (embeddings, metrics)``
    Per device, transforms the local embeddings [b, D] fed to the classification head (MixBCT's mix-up).
``extra_loss(ctx) -> (loss, new_state, metrics)``
    Per device, a loss added to the classification loss, expressed as this device's share of a global-batch
    mean (its gradients are summed over devices). ``ctx`` is a dict: ``embeddings`` [b, D] (new, unmixed),
    ``batch`` (local arrays), ``labels``, ``params``/``state`` (the method's), ``centres`` (local shard or None),
    ``key``, ``config``, ``axis_name``, ``global_batch``, ``step``, ``steps_per_epoch``, ``total_steps``,
    ``consts`` (local blocks of the CONSTS arrays).
``host_update(epoch, *, config, workdir, consts, embed_new, old, subset) -> consts | None``
    Called by the trainer on the host at the start of every epoch (and on resume); returns replacement consts
    (UniBCT's prototype refinement) or None. ``embed_new(indices) -> [n, D]`` embeds training examples with the
    current new model; ``old`` is the ``OldEmbeddings``.
"""

from __future__ import annotations

import importlib
import types

METHODS = ("none", "mixbct", "l2", "bct", "unibct", "nccl", "advbct")


def get(name: str) -> types.ModuleType:
    """The method module ``mixbct_jax.bct.<name>``."""
    try:
        return importlib.import_module(f"mixbct_jax.bct.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"mixbct_jax.bct.{name}":
            raise
        raise ValueError(f"config.bct.method={name!r} is not a known method; choose one of {METHODS}") from None
