"""The per-device train step (a pure function) and how it is parallelised (the train step's design (README, Several GPUs)).

``train_step_body`` is one device's program with the named axis ``'data'``: it sees its local batch rows and
its shard of the class centres, and communicates through collectives. ``Parallel`` runs it either as
``jax.jit(jax.shard_map(body))`` over global arrays (default) or as ``jax.pmap(body)`` (``config.parallel =
'pmap'``); the two give the same result.

Gradient bookkeeping: the classification loss is the global-batch mean (identical on every device), and the
head's custom VJPs give each device the complete gradient for its own embeddings and its own centres, so
backbone (and other replicated) gradients are *summed* over the axis while centre gradients stay on their
shard. BatchNorm statistics are computed per device (as per-GPU BN in the reference) and the running averages
are averaged over devices after each step.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mixbct_jax import models
from mixbct_jax.heads import sharded_fc, softmax

AXIS = "data"
PyTree = Any


# ---------------------------------------------------------------------------------------------------------------
# State
# ---------------------------------------------------------------------------------------------------------------
def is_margin_head(config) -> bool:
    return config.head.type != "softmax"


def init_state(config, model: nn.Module, method: types.ModuleType, tx: optax.GradientTransformation, *,
               key: jax.Array, num_classes: int, num_shards: int) -> dict[str, PyTree]:
    """The train state as a plain dict of global arrays (centres padded to a multiple of ``num_shards``)."""
    k_model, k_head, k_method = jax.random.split(key, 3)
    size = config.model.input_size
    variables = model.init(k_model, jnp.zeros((1, size, size, 3), jnp.float32), train=False)
    d = config.model.embedding_size
    if is_margin_head(config):
        rows = sharded_fc.padded_rows(num_classes, num_shards)
        head = {"centres": sharded_fc.init_centres(k_head, rows, d, num_classes)}
    else:
        head = softmax.init(k_head, d, num_classes)
    method_params, method_state = {}, {}
    if hasattr(method, "init"):
        method_params, method_state = method.init(k_method, config=config, embedding_size=d, num_classes=num_classes,
                                                   num_shards=num_shards)
    params = {"backbone": variables["params"], "head": head, "method": method_params}
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "batch_stats": variables.get("batch_stats", {}),
        "opt_state": tx.init(params),
        "method_state": method_state,
    }


def _is_centres(path) -> bool:
    return any(getattr(k, "key", None) == "centres" for k in path)


def _is_class_rows(path) -> bool:
    return any(getattr(k, "key", None) == "class_rows" for k in path)


def state_specs(state: PyTree) -> PyTree:
    """PartitionSpecs: centres (and their optimizer slots) split by rows over the axis, the rest replicated.

    A method's state may also hold class-major tables ``[C_padded, ...]`` under a key named ``'class_rows'`` (NCCL's
    logit queue); they are split by rows like the centres, so device ``d`` holds the rows of its own classes.
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, _: P(AXIS) if _is_centres(path) or _is_class_rows(path) else P(), state)


# ---------------------------------------------------------------------------------------------------------------
# The per-device program
# ---------------------------------------------------------------------------------------------------------------
def make_body(config, model: nn.Module, method: types.ModuleType, tx: optax.GradientTransformation,
              schedule: optax.Schedule, *, num_classes: int, global_batch: int, steps_per_epoch: int,
              total_steps: int, trace_counter: list | None = None) -> Callable:
    """Builds ``body(state, batch, key, consts) -> (state, metrics)``, one device's step with axis ``'data'``.

    ``consts`` holds the method's frozen device arrays (e.g. BCT's class prototypes, row-sharded like the
    centres); they are inputs, never part of the state or the checkpoint.
    """
    compute_dtype = jnp.dtype(config.model.dtype)
    margin_head = is_margin_head(config)
    before_head = getattr(method, "before_head", None)
    extra_loss = getattr(method, "extra_loss", None)

    def body(state, batch, key, consts):
        if trace_counter is not None:
            trace_counter.append(1)  # runs at trace time only: counts compilations
        step = state["step"]
        rng = jax.random.fold_in(jax.random.fold_in(key, step), jax.lax.axis_index(AXIS))
        k_mix, k_head, k_method = jax.random.split(rng, 3)
        images = models.normalize_images(batch["image"])
        labels = batch["label"]

        def loss_fn(params):
            # The backbone's own randomness (ViT token masking, drop path) gets a key folded from this device's
            # step key, so the split below (and every method's numbers) stays as it was.
            emb, mutated = model.apply({"params": params["backbone"], "batch_stats": state["batch_stats"]}, images,
                                       train=True, mutable=["batch_stats"],
                                       rngs={"dropout": jax.random.fold_in(rng, 1)})
            emb = emb.astype(jnp.float32)  # [b, D]
            metrics = {}
            emb_head = emb
            if before_head is not None:
                emb_head, m = before_head(emb, batch, key=k_mix, config=config)
                metrics.update(m)
            if margin_head:
                per_example, _ = sharded_fc.margin_softmax_loss(
                    emb_head, labels, params["head"]["centres"], axis_name=AXIS, num_classes=num_classes,
                    head=config.head, key=k_head, compute_dtype=compute_dtype)
                cls_share = jnp.mean(per_example)  # already the global mean, identical on every device
                cls_report = cls_share
            else:
                cls_share = jnp.sum(softmax.cross_entropy(emb_head, labels, params["head"])) / global_batch
                cls_report = jax.lax.psum(cls_share, AXIS)
            extra_share, new_method_state = jnp.zeros((), jnp.float32), state["method_state"]
            if extra_loss is not None:
                ctx = dict(embeddings=emb, batch=batch, labels=labels, params=params["method"],
                           state=state["method_state"], centres=params["head"].get("centres"), key=k_method,
                           config=config, axis_name=AXIS, global_batch=global_batch, step=step,
                           steps_per_epoch=steps_per_epoch, total_steps=total_steps, consts=consts)
                extra_share, new_method_state, m = extra_loss(ctx)
                metrics.update(m)
            aux = (mutated["batch_stats"], new_method_state, cls_report, extra_share, metrics)
            return cls_share + extra_share, aux

        grads, (batch_stats, method_state, cls_loss, extra_share, metrics) = jax.grad(loss_fn, has_aux=True)(
            state["params"])
        # Replicated parameters: sum the per-device shares. Centres: the local gradient is already complete.
        grads = jax.tree_util.tree_map_with_path(lambda p, g: g if _is_centres(p) else jax.lax.psum(g, AXIS), grads)
        backbone_norm = optax.global_norm(grads["backbone"])
        extra_loss_value = jax.lax.psum(extra_share, AXIS)
        loss = cls_loss + extra_loss_value
        # Skip non-finite steps, as the reference's GradScaler does; the schedule still advances.
        finite = jnp.isfinite(loss) & jnp.isfinite(jax.lax.psum(optax.global_norm(grads), AXIS))
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        batch_stats = jax.lax.pmean(batch_stats, AXIS)

        def keep_if_finite(new, old):
            return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)

        new_state = {
            "step": step + 1,
            "params": keep_if_finite(params, state["params"]),
            "batch_stats": keep_if_finite(batch_stats, state["batch_stats"]),
            "opt_state": keep_if_finite(opt_state, state["opt_state"]),
            "method_state": keep_if_finite(method_state, state["method_state"]),
        }
        out = {"loss": loss, "cls_loss": cls_loss, "extra_loss": extra_loss_value, "lr": schedule(step),
               "grad_norm": backbone_norm, "finite": finite.astype(jnp.float32)}
        out.update({k: jax.lax.psum(v, AXIS) for k, v in metrics.items()})  # counts over devices
        return new_state, out

    return body


# ---------------------------------------------------------------------------------------------------------------
# Parallelisation
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Parallel:
    """Runs ``body`` over ``mesh``'s devices with ``shard_map`` (global arrays) or ``pmap`` (stacked arrays).

    ``to_device``/``from_device`` convert between the canonical global-array state (what checkpoints hold) and
    the layout the step consumes: for ``shard_map`` that is the same global arrays placed with their shardings,
    for ``pmap`` arrays stacked along a leading device axis.
    """

    mesh: Mesh
    mode: str
    step: Callable[[PyTree, PyTree, jax.Array, PyTree], tuple[PyTree, PyTree]]
    specs: PyTree
    const_specs: PyTree

    @property
    def num_devices(self) -> int:
        return self.mesh.devices.size

    def shardings(self, specs: PyTree) -> PyTree:
        return jax.tree.map(lambda s: NamedSharding(self.mesh, s), specs, is_leaf=lambda x: isinstance(x, P))

    def state_shardings(self) -> PyTree:
        return self.shardings(self.specs)

    def batch_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, P(AXIS))

    def to_device(self, state: PyTree, specs: PyTree | None = None) -> PyTree:
        """Global state (or, with ``specs``, any tree such as the consts) -> the step's layout."""
        specs = self.specs if specs is None else specs
        if self.mode == "shard_map":
            return jax.device_put(state, self.shardings(specs))
        w = self.num_devices

        def stack(x, spec):  # host arrays with a leading device axis; pmap places them
            x = np.asarray(jax.device_get(x))
            return x.reshape((w, -1) + x.shape[1:]) if spec == P(AXIS) else np.broadcast_to(x, (w,) + x.shape)

        return jax.tree.map(stack, state, specs, is_leaf=lambda x: isinstance(x, P))

    def consts_to_device(self, consts: PyTree) -> PyTree:
        return self.to_device(consts, self.const_specs)

    def from_device(self, state: PyTree) -> PyTree:
        if self.mode == "shard_map":
            return state
        return jax.tree.map(
            lambda x, s: np.asarray(x).reshape((-1,) + x.shape[2:]) if s == P(AXIS) else np.asarray(x[0]),
            state, self.specs)

    def model_variables(self, state: PyTree) -> dict[str, PyTree]:
        """The backbone's ``{'params', 'batch_stats'}`` as host arrays (replicated, so every process can fetch them)."""
        tree = {"params": state["params"]["backbone"], "batch_stats": state["batch_stats"]}
        if self.mode == "pmap":
            tree = jax.tree.map(lambda x: x[0], tree)
        return jax.tree.map(np.asarray, jax.device_get(tree))

    def put_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows of the global batch -> device arrays in the step's layout."""
        if self.mode == "shard_map":
            sharding = self.batch_sharding()
            return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
        w = self.num_devices
        return {k: v.reshape((w, -1) + v.shape[1:]) for k, v in local_batch.items()}


def const_specs(consts: PyTree) -> PyTree:
    """Method constants: 2-D class tables (``[C_padded, D]`` prototypes) row-sharded, the rest replicated."""
    return jax.tree.map(lambda x: P(AXIS) if np.ndim(x) == 2 else P(), consts)


def parallelize(body: Callable, state: PyTree, *, mesh: Mesh, mode: str = "shard_map",
                consts: PyTree = None) -> Parallel:
    """Wraps ``body`` for ``mode`` ('shard_map' or 'pmap'); the state is donated."""
    specs = state_specs(state)
    cspecs = const_specs(consts if consts is not None else {})
    if mode == "shard_map":
        mapped = jax.shard_map(body, mesh=mesh, in_specs=(specs, P(AXIS), P(), cspecs), out_specs=(specs, P()),
                               check_vma=False)
        step = jax.jit(mapped, donate_argnums=0)
    elif mode == "pmap":
        pmapped = jax.pmap(body, axis_name=AXIS, in_axes=(0, 0, None, 0), donate_argnums=0,
                           devices=list(mesh.devices.flat))

        def step(state, batch, key, consts):
            new_state, metrics = pmapped(state, batch, key, consts)
            return new_state, jax.tree.map(lambda m: m[0], metrics)
    else:
        raise ValueError(f"config.parallel={mode!r}: choose 'shard_map' or 'pmap'")
    return Parallel(mesh=mesh, mode=mode, step=step, specs=specs, const_specs=cspecs)
