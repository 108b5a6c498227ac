"""The contract between the trainer and a compatibility method: a ``Method`` description and a ``StepContext``.

Every module ``mixbct_jax/bct/<name>.py`` exports ``METHOD = Method(...)``; the module path is the registry
(``bct.get(name)``). A method declares, as data, everything the trainer must do for it:

* its config fields (``config``: ``config.bct.<name>`` with default, meaning and allowed values, collected by
  ``config.default_config``), its own checks of a config (``check``) and its presets (``presets``: the
  reference's recipe quirks, applied by ``config.apply_method``);
* the old model's host arrays it needs: per example (``per_example``: ``'old_features'``, ``'credible'``),
  per class (``class_files``: files named by ``config.old.<field>`` holding ``[C, ...]`` tables, each table fed
  either by label with every batch, ``per_label``, or whole as a frozen constant, ``consts``);
* its extra parameters and state (``init``), with the state's class-major tables named (``class_sharded_state``)
  so the step shards them by rows like the class centres;
* its hooks inside the per-device program (``before_head``, ``extra_loss``, both given a ``StepContext``) and on
  the host between epochs (``host_update``).

Conventions inside the per-device program (named axis ``AXIS``): a loss is returned as this device's *share* of a
global-batch quantity (the step sums the shares' gradients and values over devices); a metric is returned as its
*global* value, identical on every device (reduce it with a collective inside the method).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from mixbct_jax.aliases import PyTree

AXIS = "data"  # the device axis of the per-device program
PER_EXAMPLE = ("old_features", "credible")  # old-model arrays fed by example index (data.old_embeddings.gather)

Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class StepContext:
    """What a method's hooks see inside the per-device program (local rows, this device's class shards).

    Attributes:
      config: the run's config.
      embeddings: [b, D] float32 new embeddings of this device's rows (unmixed).
      labels: [b] their classes.
      batch: this device's batch arrays: ``image``, ``label``, ``index`` and the method's ``per_example`` and
        ``per_label`` arrays.
      params: the method's trainable parameters (from ``init``).
      state: the method's state (from ``init``); ``class_sharded_state`` entries hold this device's rows.
      consts: the method's ``consts`` tables, this device's row block ``[d * C_local, (d + 1) * C_local)``.
      centres: [C_local, D] this device's shard of the class centres, or None with the softmax head.
      key: a PRNG key for this device and step.
      step: the global step (a traced int32 scalar).
      global_batch, steps_per_epoch, total_steps: the run's sizes (Python ints).
      axis_name: the device axis, for collectives.
    """

    config: Any
    embeddings: jax.Array
    labels: jax.Array
    batch: Mapping[str, jax.Array]
    params: PyTree
    state: PyTree
    consts: Mapping[str, jax.Array]
    centres: jax.Array | None
    key: jax.Array
    step: jax.Array
    global_batch: int
    steps_per_epoch: int
    total_steps: int
    axis_name: str = AXIS

    @property
    def epoch(self) -> jax.Array:
        """The current (0-based) epoch."""
        return self.step // self.steps_per_epoch

    @property
    def num_devices(self) -> int:
        return jax.lax.psum(1, self.axis_name)


@dataclasses.dataclass(frozen=True)
class Field:
    """A ``config.bct.<name>`` field of a method, added to ``config.default_config()``.

    Attributes:
      name: the field under ``config.bct``.
      default: its default value.
      doc: one line of meaning (``python -m mixbct_jax.config --show``).
      choices: the allowed values, or () for any.
      interval: ``(low, high, low inclusive, high inclusive)`` for a number, None = unbounded; None for no range.
    """

    name: str
    default: Any
    doc: str
    choices: tuple = ()
    interval: tuple | None = None


@dataclasses.dataclass(frozen=True)
class ClassFile:
    """A file of per-class tables (row c = class c) that a method reads, named by ``config.old.<field>``.

    Attributes:
      field: the ``config.old`` field holding the path.
      command: the command that writes the file (quoted in error messages).
      load: path -> ``{table name: [C, ...] array}``; raises ``FileNotFoundError``/``ValueError`` in one line.
      doc: one line of meaning of the ``config.old`` field.
    """

    field: str
    command: str
    load: Callable[[str], dict[str, np.ndarray]]
    doc: str = ""


def npy_table(name: str, what: str, command: str) -> Callable[[str], dict[str, np.ndarray]]:
    """A ``ClassFile.load`` for one ``.npy`` table (memory-mapped)."""

    def load(path: str) -> dict[str, np.ndarray]:
        from mixbct_jax.data import old_embeddings

        return {name: old_embeddings.load_npy(path, what, f"write it with `{command}`")}

    return load


InitFn = Callable[..., tuple[PyTree, PyTree]]
BeforeHeadFn = Callable[[StepContext], tuple[jax.Array, Metrics]]
ExtraLossFn = Callable[[StepContext], tuple[jax.Array, PyTree, Metrics]]
HostUpdateFn = Callable[..., "dict[str, np.ndarray] | None"]


@dataclasses.dataclass(frozen=True)
class Method:
    """A compatibility method, as the trainer sees it (see the module docstring).

    Attributes:
      name: the ``config.bct.method`` value.
      config: the method's ``config.bct`` fields. A field two methods share (BCT's ``influence_weight``, also
        UniBCT's) is declared identically by both.
      check: ``check(config) -> [(dotted field, why), ...]``: the method's own constraints between fields, checked by
        ``config.validate`` when the method is selected.
      presets: preset name -> ``{dotted config field: value}``, the reference's settings for the method
        (``config.apply_method(c, preset)``); most methods have one preset named like the method.
      per_example: old-model arrays fed with every batch by example index, among ``PER_EXAMPLE``
        (``old_features``: row-L2-normalised old embeddings [b, D]; ``credible``: MixBCT's mask [b]).
      class_files: the per-class files the method reads.
      per_label: tables of ``class_files`` fed with every batch by label (``table[labels]``, [b, ...]).
      consts: tables of ``class_files`` the step receives whole as ``ctx.consts`` (never checkpointed), padded with
        zero rows like the centres and row-sharded over the devices.
      class_sharded_state: top-level keys of the method state holding class-major tables ``[C_padded, ...]``
        (padded like the centres for ``num_shards`` devices), split by rows over the devices; the rest of the
        state is replicated.
      init: ``init(key, *, config, embedding_size, num_classes, num_shards) -> (params, state)``: extra trainable
        parameters (in the backbone's optimizer group) and state.
      before_head: ``before_head(ctx) -> (embeddings, metrics)``: the local embeddings [b, D] fed to the
        classification head (MixBCT's mix-up).
      extra_loss: ``extra_loss(ctx) -> (share, new_state, metrics)``: a loss added to the classification loss, as
        this device's share of a global-batch quantity (its gradients are summed over devices).
      host_update: ``host_update(epoch, *, config, workdir, consts, embed_new, old, subset) -> consts | None``,
        called on the host at the start of every epoch (and on resume): replacement ``consts`` tables (UniBCT's
        prototype refinement) or None. ``embed_new(indices) -> [n, D]`` embeds training examples with the
        current new model; ``old`` is the ``data.old_embeddings.OldEmbeddings``.
    """

    name: str
    config: tuple[Field, ...] = ()
    check: Callable[[Any], list[tuple[str, str]]] | None = None
    presets: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    per_example: tuple[str, ...] = ()
    class_files: tuple[ClassFile, ...] = ()
    per_label: tuple[str, ...] = ()
    consts: tuple[str, ...] = ()
    class_sharded_state: tuple[str, ...] = ()
    init: InitFn | None = None
    before_head: BeforeHeadFn | None = None
    extra_loss: ExtraLossFn | None = None
    host_update: HostUpdateFn | None = None

    def __post_init__(self):
        unknown = [n for n in self.per_example if n not in PER_EXAMPLE]
        if unknown:
            raise ValueError(f"method {self.name!r}: per_example {unknown} are not among {PER_EXAMPLE}")

    @property
    def needs_old(self) -> bool:
        """Whether the method reads the old model's arrays (config.old.features)."""
        return bool(self.per_example or self.class_files)

    def state_specs(self, state: PyTree) -> PyTree:
        """PartitionSpecs of the method state.

        ``class_sharded_state`` is split by rows over ``AXIS``, the rest replicated.
        """
        return {
            k: jax.tree.map(lambda _, s=P(AXIS) if k in self.class_sharded_state else P(): s, v)
            for k, v in state.items()
        }
