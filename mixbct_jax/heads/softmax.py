"""The plain linear softmax head of the reference's "softmax" old models (docs/methods.md (the margin head)).

``logits = features @ W + b`` with no normalisation and no margin; the classifier belongs to the backbone's
parameter group (clipped and weight-decayed with it) and is replicated, not sharded.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mixbct_jax.initializers import torch_linear_uniform


def init(key: jax.Array, embedding_size: int, num_classes: int) -> dict[str, jax.Array]:
    """PyTorch ``nn.Linear(D, C)`` default init."""
    k1, k2 = jax.random.split(key)
    init_fn = torch_linear_uniform(embedding_size)
    return {"kernel": init_fn(k1, (embedding_size, num_classes)), "bias": init_fn(k2, (num_classes,))}


def cross_entropy(embeddings: jax.Array, labels: jax.Array, params: dict[str, jax.Array]) -> jax.Array:
    """Per-example CE [b] of the local rows."""
    logits = embeddings.astype(jnp.float32) @ params["kernel"] + params["bias"]  # [b, C]
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
