"""The host side of a compatibility method during training: its old-model arrays, per batch and per epoch.

Generic over ``bct.api.Method``: the method declares what it reads (``per_example``, ``class_files``,
``per_label``, ``consts``) and this module opens, validates and feeds it; no method is named here.
"""

from __future__ import annotations

import pathlib

import numpy as np

from mixbct_jax.aliases import PyTree
from mixbct_jax.data import old_embeddings


class MethodHost:
    """Opens the method's old arrays (validated against the training set) and keeps its frozen consts.

    Args:
      config: the run's config.
      train_step: the ``step.TrainStep`` (the method, the devices, the class-table row count).
      subset: the training subset (``data.splits.Subset``).
      workdir: the run directory (a method's host updates may save files there).
    """

    def __init__(self, config, train_step, subset, workdir: pathlib.Path):
        self.config, self.train_step, self.subset, self.workdir = config, train_step, subset, workdir
        self.method = train_step.method
        self.old = old_embeddings.open_for_method(
            config,
            self.method,
            num_examples=len(subset),
            source_labels=subset.labels,
            num_classes=train_step.num_classes,
        )
        self.needs = self.method.per_example + self.method.per_label
        self.consts = train_step.pad_consts({name: self.old.tables[name] for name in self.method.consts})
        self.device_consts = train_step.consts_to_device(self.consts)

    def batch(self, host: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One host batch with the method's per-example and per-label arrays added."""
        arrays = {"image": host["image"], "label": host["label"], "index": host["index"]}
        if self.needs:
            arrays.update(old_embeddings.batch_arrays(self.old, self.needs, host["index"], host["label"]))
        return arrays

    def refresh(self, epoch: int, state: PyTree) -> PyTree:
        """Returns the device consts for the next steps.

        Called at an epoch boundary (and on resume); lets the method replace its consts first (UniBCT's
        refinement).
        """
        if self.method.host_update is None:
            return self.device_consts
        cache = {}

        def embed_new(indices: np.ndarray) -> np.ndarray:
            """Embeds training examples with the current new model (built once per update)."""
            from mixbct_jax import embed, models
            from mixbct_jax.data import sources

            if not cache:
                cache["embedder"] = embed.make_embedder(self.config, self.train_step.model_variables(state))
                cache["source"] = sources.open_source(self.config.data.source)
            images = cache["source"].read(self.subset.indices[indices])
            return cache["embedder"](models.normalize_images(images))

        new = self.method.host_update(
            epoch,
            config=self.config,
            workdir=self.workdir,
            consts=self.consts,
            embed_new=embed_new,
            old=self.old,
            subset=self.subset,
        )
        if new is not None:
            self.consts.update(new)
            self.device_consts = self.train_step.consts_to_device(self.consts)
        return self.device_consts
