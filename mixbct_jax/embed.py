"""Inference: a jitted, device-sharded embedding function rebuilt from a run directory alone.

``load_embedder(workdir)`` reads ``config.json`` and the ``model`` checkpoint item, rebuilds the backbone and
returns a callable that maps normalised float images [n, H, W, 3] to raw embeddings [n, D] (BatchNorm in
inference mode). Batches are padded to a fixed size that is a multiple of the device count, so the function is
compiled once, and sharded over all local devices along the batch.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mixbct_jax import checkpoint, models
from mixbct_jax.models import normalize_images  # noqa: F401 (the input convention, re-exported for callers)


@dataclasses.dataclass
class ModelEmbedder:
    """Embeds normalised images with one model; see the module docstring.

    An ``evaluation.embedding.Embedder`` (any callable of that signature) built from a checkpoint.
    """

    apply_fn: Callable[[Any, jax.Array], jax.Array]
    variables: Any
    image_size: int
    embedding_size: int
    batch_size: int

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """float32 [n, H, W, 3] (already normalised) -> float32 [n, D] raw embeddings."""
        images = np.asarray(images, dtype=np.float32)
        if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(
                f"the embedder expects images [n, {self.image_size}, {self.image_size}, 3], got {images.shape}"
            )
        out = np.empty((len(images), self.embedding_size), np.float32)
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            n = len(chunk)
            if n < self.batch_size:  # pad the last batch so the function keeps one compiled shape
                chunk = np.concatenate([chunk, np.zeros((self.batch_size - n,) + chunk.shape[1:], np.float32)])
            out[start : start + n] = np.asarray(self.apply_fn(self.variables, chunk))[:n]
        return out


def make_embedder(config, variables: Any, *, batch_size: int = 256, devices=None) -> ModelEmbedder:
    """A ``ModelEmbedder`` for an in-memory model (used by ``load_embedder`` and by evaluation during training)."""
    devices = list(devices if devices is not None else jax.local_devices())
    batch_size = max(len(devices), (batch_size + len(devices) - 1) // len(devices) * len(devices))
    model = models.build_from_config(config.model)
    mesh = Mesh(np.array(devices), ("data",))
    replicated, batch_sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    variables = jax.device_put(variables, replicated)

    @jax.jit
    def apply(variables, x):
        x = jax.lax.with_sharding_constraint(x, batch_sharded)
        return model.apply(variables, x, train=False).astype(jnp.float32)

    def apply_fn(variables, x):
        return apply(variables, jax.device_put(x, batch_sharded))

    return ModelEmbedder(
        apply_fn=apply_fn,
        variables=variables,
        image_size=config.model.input_size,
        embedding_size=config.model.embedding_size,
        batch_size=batch_size,
    )


def check_variables(config, variables: Any, where: str) -> None:
    """Raises one line when a checkpoint's backbone does not fit the model ``config.json`` describes.

    Without it a checkpoint copied from another run (or a ``config.json`` replaced by hand) fails inside Flax with
    a shape error that names neither file.
    """
    model = models.build_from_config(config.model)
    x = jax.ShapeDtypeStruct((1, config.model.input_size, config.model.input_size, 3), jnp.float32)
    expected = jax.eval_shape(lambda k, x: model.init(k, x, train=False), jax.random.key(0), x)
    want = {jax.tree_util.keystr(p): tuple(v.shape) for p, v in jax.tree_util.tree_leaves_with_path(expected)}
    have = {jax.tree_util.keystr(p): tuple(np.shape(v)) for p, v in jax.tree_util.tree_leaves_with_path(variables)}
    if want == have:
        return
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    shape = [k for k in sorted(set(want) & set(have)) if want[k] != have[k]]
    detail = (
        f"{shape[0]} is {have[shape[0]]} in the checkpoint but {want[shape[0]]} for the model"
        if shape
        else f"{len(missing)} arrays missing (e.g. {missing[:1]}) and {len(extra)} unexpected (e.g. {extra[:1]})"
    )
    raise ValueError(
        f"{where}: the checkpoint does not match the model its config.json describes "
        f"(model.arch={config.model.arch!r}, embedding_size={config.model.embedding_size}, "
        f"width={config.model.get('width', 1.0)}): {detail}; the checkpoint or config.json comes from "
        f"another run: point --workdir at the run that wrote both."
    )


def load_embedder(workdir: str | os.PathLike, *, batch_size: int = 256, step: int | None = None) -> ModelEmbedder:
    """The backbone of the run in ``workdir`` (latest checkpoint unless ``step``) as a ``ModelEmbedder``."""
    config, variables = checkpoint.load_params(workdir, step)
    check_variables(config, variables, os.fspath(workdir))
    return make_embedder(config, variables, batch_size=batch_size)
