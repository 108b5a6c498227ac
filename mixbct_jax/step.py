"""The train step (a pure per-device function), how it is parallelised, and ``build``, its one constructor.

``build(config, ...)`` returns a ``TrainStep``: the model, the method (``bct.api.Method``), the optimizer, the
initial state and the jitted step, run either as ``jax.jit(jax.shard_map(body))`` over global arrays (default) or
as ``jax.pmap(body)`` (``config.parallel = 'pmap'``); the two give the same result, and every difference between
them is confined to ``TrainStep``'s methods (placing the state, the consts and the batches on the devices).

``_make_body`` is one device's program with the named axis ``'data'``: it sees its local batch rows and its shard
of the class centres, and communicates through collectives.

Gradient bookkeeping: the classification loss is the global-batch mean (identical on every device), and the
head's custom VJPs give each device the complete gradient for its own embeddings and its own centres, so
backbone (and other replicated) gradients are *summed* over the axis while centre gradients stay on their
shard. BatchNorm statistics are computed per device (as per-GPU BN in the reference) and the running averages
are averaged over devices after each step. A method's loss is its per-device share (summed over the axis); its
metrics are global values, logged as they are.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mixbct_jax import bct, models, optim
from mixbct_jax.aliases import PyTree
from mixbct_jax.bct.api import AXIS, Method, StepContext
from mixbct_jax.heads import sharded_fc, softmax


# ---------------------------------------------------------------------------------------------------------------
# Devices
# ---------------------------------------------------------------------------------------------------------------
def maybe_initialize_distributed(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """Joins a multi-process run when a coordinator is given (flags or JAX_COORDINATOR_ADDRESS etc.).

    On Cloud TPU pods and SLURM, ``MIXBCT_DISTRIBUTED=auto`` calls ``jax.distributed.initialize()`` with no
    arguments and lets JAX detect the cluster.
    """
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if coordinator:
        num_processes = num_processes if num_processes is not None else int(os.environ["JAX_NUM_PROCESSES"])
        process_id = process_id if process_id is not None else int(os.environ["JAX_PROCESS_ID"])
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    elif os.environ.get("MIXBCT_DISTRIBUTED") == "auto":
        jax.distributed.initialize()


def make_mesh(config) -> Mesh:
    """The devices of the run (``config.num_devices`` of them, or all) along the axis ``'data'``."""
    devices = jax.devices()
    if config.num_devices > 0:
        if jax.process_count() > 1 or config.num_devices > len(devices):
            raise ValueError(
                f"config.num_devices={config.num_devices}: choose at most {len(devices)} devices, and "
                f"only in a single-process run"
            )
        devices = devices[: config.num_devices]
    if config.data.global_batch % len(devices):
        raise ValueError(
            f"config.data.global_batch={config.data.global_batch} must be divisible by the {len(devices)} devices"
        )
    return Mesh(np.array(devices), (AXIS,))


# ---------------------------------------------------------------------------------------------------------------
# State
# ---------------------------------------------------------------------------------------------------------------
def is_margin_head(config) -> bool:
    return config.head.type != "softmax"


def init_state(
    config,
    model: nn.Module,
    method: Method,
    tx: optax.GradientTransformation,
    *,
    key: jax.Array,
    num_classes: int,
    num_shards: int,
) -> dict[str, PyTree]:
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
    if method.init is not None:
        method_params, method_state = method.init(
            k_method, config=config, embedding_size=d, num_classes=num_classes, num_shards=num_shards
        )
    params = {"backbone": variables["params"], "head": head, "method": method_params}
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "batch_stats": variables.get("batch_stats", {}),
        "opt_state": tx.init(params),
        "method_state": method_state,
    }


def state_specs(state: PyTree, method: Method) -> PyTree:
    """PartitionSpecs of the train state.

    Centres (and their optimizer slots) and the method's ``class_sharded_state`` are split by rows over the axis,
    the rest replicated.
    """
    specs = jax.tree_util.tree_map_with_path(lambda path, _: P(AXIS) if sharded_fc.is_centres(path) else P(), state)
    return {**specs, "method_state": method.state_specs(state["method_state"])}


# ---------------------------------------------------------------------------------------------------------------
# The per-device program
# ---------------------------------------------------------------------------------------------------------------
def _make_body(
    config,
    model: nn.Module,
    method: Method,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    num_classes: int,
    global_batch: int,
    steps_per_epoch: int,
    total_steps: int,
) -> Callable:
    """Builds ``body(state, batch, key, consts) -> (state, metrics)``, one device's step with axis ``'data'``.

    ``consts`` holds the method's frozen device arrays (e.g. BCT's class prototypes, row-sharded like the
    centres); they are inputs, never part of the state or the checkpoint.
    """
    compute_dtype = jnp.dtype(config.model.dtype)
    margin_head = is_margin_head(config)

    def body(state, batch, key, consts):
        step = state["step"]
        rng = jax.random.fold_in(jax.random.fold_in(key, step), jax.lax.axis_index(AXIS))
        k_mix, k_head, k_method = jax.random.split(rng, 3)
        images = models.normalize_images(batch["image"])
        labels = batch["label"]

        def loss_fn(params):
            # The backbone's own randomness (ViT token masking, drop path) gets a key folded from this device's
            # step key, so the split below (and every method's numbers) stays as it was.
            emb, mutated = model.apply(
                {"params": params["backbone"], "batch_stats": state["batch_stats"]},
                images,
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": jax.random.fold_in(rng, 1)},
            )
            emb = emb.astype(jnp.float32)  # [b, D]
            ctx = StepContext(
                config=config,
                embeddings=emb,
                labels=labels,
                batch=batch,
                params=params["method"],
                state=state["method_state"],
                consts=consts,
                centres=params["head"].get("centres"),
                key=k_method,
                step=step,
                global_batch=global_batch,
                steps_per_epoch=steps_per_epoch,
                total_steps=total_steps,
            )
            metrics = {}
            emb_head = emb
            if method.before_head is not None:
                emb_head, m = method.before_head(dataclasses.replace(ctx, key=k_mix))
                metrics.update(m)
            if margin_head:
                per_example, _ = sharded_fc.margin_softmax_loss(
                    emb_head,
                    labels,
                    params["head"]["centres"],
                    axis_name=AXIS,
                    num_classes=num_classes,
                    head=config.head,
                    key=k_head,
                    compute_dtype=compute_dtype,
                )
                cls_share = jnp.mean(per_example)  # already the global mean, identical on every device
                cls_report = cls_share
            else:
                cls_share = jnp.sum(softmax.cross_entropy(emb_head, labels, params["head"])) / global_batch
                cls_report = jax.lax.psum(cls_share, AXIS)
            extra_share, new_method_state = jnp.zeros((), jnp.float32), state["method_state"]
            if method.extra_loss is not None:
                extra_share, new_method_state, m = method.extra_loss(ctx)
                metrics.update(m)
            aux = (mutated["batch_stats"], new_method_state, cls_report, extra_share, metrics)
            return cls_share + extra_share, aux

        grads, (batch_stats, method_state, cls_loss, extra_share, metrics) = jax.grad(loss_fn, has_aux=True)(
            state["params"]
        )
        # Replicated parameters: sum the per-device shares. Centres: the local gradient is already complete.
        grads = jax.tree_util.tree_map_with_path(
            lambda p, g: g if sharded_fc.is_centres(p) else jax.lax.psum(g, AXIS), grads
        )
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
        out = {
            "loss": loss,
            "cls_loss": cls_loss,
            "extra_loss": extra_loss_value,
            "lr": schedule(step),
            "grad_norm": backbone_norm,
            "finite": finite.astype(jnp.float32),
        }
        out.update(metrics)  # the method's metrics are already global values
        return new_state, out

    return body


# ---------------------------------------------------------------------------------------------------------------
# Parallelisation and the constructor
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TrainStep:
    """The built step: ``step(state, batch, key, consts) -> (state, metrics)`` over ``mesh``'s devices.

    Also what it needs around it (the model, the method, the optimizer, the initial state, device placement).

    ``to_device``/``from_device`` convert between the canonical global-array state (what checkpoints hold) and
    the layout the step consumes: for ``shard_map`` that is the same global arrays placed with their shardings,
    for ``pmap`` arrays stacked along a leading device axis.
    """

    config: Any
    model: nn.Module
    method: Method
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    mesh: Mesh
    mode: str
    num_classes: int
    step: Callable[[PyTree, PyTree, jax.Array, PyTree], tuple[PyTree, PyTree]]
    specs: PyTree
    const_specs: PyTree
    init_fn: Callable[[jax.Array], PyTree]

    @property
    def num_devices(self) -> int:
        return self.mesh.devices.size

    def shardings(self, specs: PyTree) -> PyTree:
        return jax.tree.map(lambda s: NamedSharding(self.mesh, s), specs, is_leaf=lambda x: isinstance(x, P))

    def state_shardings(self) -> PyTree:
        return self.shardings(self.specs)

    def abstract_state(self) -> PyTree:
        """The global state's shapes, dtypes and shardings (what a checkpoint restore fills)."""
        shapes = jax.eval_shape(self.init_fn, jax.random.key(0))
        return jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, self.state_shardings()
        )

    def init(self, key: jax.Array) -> PyTree:
        """The initial global state, computed under jit and laid out with the state's shardings."""
        return jax.jit(self.init_fn, out_shardings=self.state_shardings())(key)

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

    def from_device(self, state: PyTree) -> PyTree:
        """The step's layout -> the global state (a no-op for ``shard_map``)."""
        if self.mode == "shard_map":
            return state
        return jax.tree.map(
            lambda x, s: np.asarray(x).reshape((-1,) + x.shape[2:]) if s == P(AXIS) else np.asarray(x[0]),
            state,
            self.specs,
        )

    def class_rows(self) -> int:
        """Rows of the class-major tables: the centres' padded row count, or C with the softmax head."""
        if is_margin_head(self.config):
            return sharded_fc.padded_rows(self.num_classes, self.num_devices)
        return self.num_classes

    def pad_consts(self, tables: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The method's consts tables [C, ...] zero-padded to ``class_rows()`` rows (host arrays)."""
        rows = self.class_rows()
        return {
            name: np.concatenate([np.asarray(t, np.float32), np.zeros((rows - t.shape[0],) + t.shape[1:], np.float32)])
            for name, t in tables.items()
        }

    def consts_to_device(self, consts: PyTree) -> PyTree:
        """Padded consts tables -> the step's layout, row-sharded like the centres."""
        return self.to_device(consts, self.const_specs)

    def model_variables(self, state: PyTree) -> dict[str, PyTree]:
        """The backbone's ``{'params', 'batch_stats'}`` as host arrays (replicated, so every process can fetch them)."""
        tree = {"params": state["params"]["backbone"], "batch_stats": state["batch_stats"]}
        if self.mode == "pmap":
            tree = jax.tree.map(lambda x: x[0], tree)
        return jax.tree.map(np.asarray, jax.device_get(tree))

    def host_state(self, state: PyTree) -> PyTree:
        """The state in the checkpoint's layout: global arrays (``shard_map``) or host arrays (``pmap``)."""
        return self.from_device(state) if self.mode == "pmap" else state

    def put_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows of the global batch -> device arrays in the step's layout."""
        if self.mode == "shard_map":
            sharding = NamedSharding(self.mesh, P(AXIS))
            return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
        w = self.num_devices
        return {k: v.reshape((w, -1) + v.shape[1:]) for k, v in local_batch.items()}


def _parallelize(body: Callable, specs: PyTree, const_specs: PyTree, *, mesh: Mesh, mode: str) -> Callable:
    """Wraps ``body`` for ``mode`` ('shard_map' or 'pmap'); the state is donated."""
    if mode == "shard_map":
        mapped = jax.shard_map(
            body, mesh=mesh, in_specs=(specs, P(AXIS), P(), const_specs), out_specs=(specs, P()), check_vma=False
        )
        return jax.jit(mapped, donate_argnums=0)
    if mode == "pmap":
        pmapped = jax.pmap(
            body, axis_name=AXIS, in_axes=(0, 0, None, 0), donate_argnums=0, devices=list(mesh.devices.flat)
        )

        def step(state, batch, key, consts):
            new_state, metrics = pmapped(state, batch, key, consts)
            return new_state, jax.tree.map(lambda m: m[0], metrics)

        return step
    raise ValueError(f"config.parallel={mode!r}: choose 'shard_map' or 'pmap'")


def build(
    config,
    *,
    num_classes: int,
    steps_per_epoch: int,
    total_steps: int,
    mesh: Mesh | None = None,
    model: nn.Module | None = None,
) -> TrainStep:
    """The train step of ``config`` (its model, ``config.bct.method``, optimizer and ``config.parallel``).

    Args:
      config: the run's config; ``config.data.global_batch`` rows per step.
      num_classes: C, the classes of the head.
      steps_per_epoch: the run's steps per epoch (epochs are resolved once, by the caller).
      total_steps: the run's length in steps.
      mesh: the devices, with the axis ``'data'``; default every device.
      model: the backbone; default ``models.build_from_config(config.model)``.
    """
    mesh = mesh if mesh is not None else Mesh(np.array(jax.devices()), (AXIS,))
    model = model if model is not None else models.build_from_config(config.model)
    method = bct.get(config.bct.method)
    schedule = optim.make_schedule(config.optim, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
    tx = optim.make_optimizer(config.optim, schedule)

    def init_fn(key: jax.Array) -> PyTree:
        return init_state(config, model, method, tx, key=key, num_classes=num_classes, num_shards=mesh.devices.size)

    specs = state_specs(jax.eval_shape(init_fn, jax.random.key(0)), method)
    const_specs = {name: P(AXIS) for name in method.consts}  # class tables, row-sharded like the centres
    body = _make_body(
        config,
        model,
        method,
        tx,
        schedule,
        num_classes=num_classes,
        global_batch=config.data.global_batch,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
    )
    step = _parallelize(body, specs, const_specs, mesh=mesh, mode=config.parallel)
    return TrainStep(
        config=config,
        model=model,
        method=method,
        tx=tx,
        schedule=schedule,
        mesh=mesh,
        mode=config.parallel,
        num_classes=num_classes,
        step=step,
        specs=specs,
        const_specs=const_specs,
        init_fn=init_fn,
    )
