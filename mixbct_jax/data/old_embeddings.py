"""The trainer's view of the precomputed old-model arrays: memory-mapped, validated, gathered by index.

The files come from ``python -m mixbct_jax.extract`` (``features.npy`` [N, D], ``labels.npy`` [N]) and
``python -m mixbct_jax.prepare`` (``credible.npy`` bool [N] and the per-class files a method declares in its
``bct.api.Method.class_files``, e.g. ``prototypes.npy`` [C, D]). Row i of every per-example array belongs to the
example with ``index == i``; row c of every class table to class c. Nothing here is copied into device memory
or into checkpoints; the trainer gathers one batch at a time.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# Guard of the reference's row-L2-normalise, x / max(||x||, 1e-12).
_EPS = 1e-12
# Finite-value check: rows per chunk, and how many evenly spaced chunks (first and last included)
# a sampled check reads.
_FINITE_CHUNK_ROWS = 4096
_FINITE_MAX_CHUNKS = 64

_EXTRACT_HINT = "re-run `python -m mixbct_jax.extract` on the new model's training set"
PER_EXAMPLE = ("old_features", "credible")  # the per-batch arrays gathered by example index


@dataclasses.dataclass(frozen=True)
class OldEmbeddings:
    """Precomputed per-example and per-class arrays of the old model.

    Attributes:
      features: [N, D] float16/float32 old embeddings (raw), row i = example index i; memory-mapped.
      credible: [N] bool MixBCT credible mask, memory-mapped, or None.
      labels: [N] labels stored by the extraction, used only to validate the row order, or None.
      tables: per-class tables [C, ...] (row c = class c) by name, loaded from a method's class files.
      files: array name -> the file it was loaded from (for error messages).
      commands: table name -> the command that writes its file (for error messages).
    """

    features: np.ndarray
    credible: np.ndarray | None = None
    labels: np.ndarray | None = None
    tables: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    files: Mapping[str, str] = dataclasses.field(default_factory=dict)
    commands: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def source(self, name: str) -> str:
        """The file behind array ``name``, or a description for in-memory arrays."""
        return self.files.get(name, f"<in-memory {name}>")


def load_npy(path: str, what: str, hint: str) -> np.ndarray:
    """Memory-maps a ``.npy`` file; a missing or malformed file raises one line naming it and ``hint``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file {path} does not exist; {hint}")
    try:
        return np.load(path, mmap_mode="r")
    except ValueError as err:
        raise ValueError(f"{what} file {path} is not a .npy array ({err}); {hint}") from None


def open_old_embeddings(
    *,
    features: str,
    credible: str | None = None,
    labels: str | None = None,
    class_files: Sequence[tuple[str, Any]] = (),
) -> OldEmbeddings:
    """Memory-maps the old-embedding files (nothing is read until used, except what a class file's loader reads).

    Args:
      features: path of ``features.npy`` [N, D] written by extract.
      credible: path of the credible mask written by ``prepare denoise``.
      labels: path of ``labels.npy`` written by extract (validation only).
      class_files: ``(path, bct.api.ClassFile)`` pairs: per-class files a method reads, loaded by the
        ``ClassFile``'s own ``load``.

    Returns:
      The arrays; call ``validate`` before training.

    Raises:
      FileNotFoundError: a given file does not exist (the message says how to produce it).
      ValueError: a file is not a .npy/.npz array file or lacks an array.
    """
    files = {"features": features}
    arrays: dict[str, Any] = {"features": load_npy(features, "old features", _EXTRACT_HINT)}
    optional = (
        ("credible", credible, "credible mask", "write it with `python -m mixbct_jax.prepare denoise`"),
        ("labels", labels, "old labels", _EXTRACT_HINT),
    )
    for name, path, what, hint in optional:
        if path is not None:
            files[name] = path
            arrays[name] = load_npy(path, what, hint)
    tables, commands = {}, {}
    for path, class_file in class_files:
        for name, table in class_file.load(path).items():
            tables[name], files[name], commands[name] = table, path, class_file.command
    return OldEmbeddings(**arrays, tables=tables, files=files, commands=commands)


def _first_nonfinite_row(features: np.ndarray, *, check_all_rows: bool) -> int | None:
    num_rows = features.shape[0]
    num_chunks = -(-num_rows // _FINITE_CHUNK_ROWS)
    chunks = np.arange(num_chunks)
    if not check_all_rows and num_chunks > _FINITE_MAX_CHUNKS:
        chunks = np.unique(np.linspace(0, num_chunks - 1, _FINITE_MAX_CHUNKS).round().astype(np.int64))
    for chunk in chunks:
        start = int(chunk) * _FINITE_CHUNK_ROWS
        rows = np.asarray(features[start : start + _FINITE_CHUNK_ROWS])
        finite = np.isfinite(rows).all(axis=1)
        if not finite.all():
            return start + int(np.argmin(finite))
    return None


def validate(
    old: OldEmbeddings,
    *,
    num_examples: int,
    source_labels: np.ndarray | None,
    embedding_size: int | None,
    num_classes: int | None,
    check_all_rows: bool = False,
) -> None:
    """Checks the old arrays against the training set; raises on the first problem.

    The finite-value check of the features reads at most 64 evenly spaced chunks of 4096 rows (the
    first and last chunk included), i.e. all of a file up to 262,144 rows and a bounded sample of a
    larger one (0.2 s at 5M x 512), unless ``check_all_rows`` (a full pass: 3-6 s for 5M x 512 float16
    in the page cache on a 2-core CPU, as long as the disk takes to read 4.9 GiB when it is not).

    Args:
      old: the arrays from ``open_old_embeddings``.
      num_examples: N, the number of examples (largest index + 1) of the training set.
      source_labels: [N] labels of the training set by example index, compared with ``old.labels``.
      embedding_size: the new model's D (MixBCT mixes old rows into the new batch, so they must match).
      num_classes: C, the training set's class count, for the per-class arrays.
      check_all_rows: check every feature row for NaN/Inf instead of a sample.

    Raises:
      ValueError: naming the file, what is wrong and how to fix it.
    """
    features, where = old.features, old.source("features")
    if features.ndim != 2 or not np.issubdtype(features.dtype, np.floating):
        raise ValueError(
            f"old features {where} must be a 2-D float array [N, D], got shape {features.shape} "
            f"dtype {features.dtype}; {_EXTRACT_HINT}"
        )
    num_rows, dim = features.shape
    if num_rows != num_examples:
        raise ValueError(
            f"old features {where} has {num_rows} rows but the training set has {num_examples} "
            f"examples (one row per example index is needed); {_EXTRACT_HINT}"
        )
    if embedding_size is not None and dim != embedding_size:
        raise ValueError(
            f"old features {where} have dimension {dim} but the new model's embedding_size is "
            f"{embedding_size}; set config embedding_size={dim} or use an old model with D={embedding_size}"
        )
    bad = _first_nonfinite_row(features, check_all_rows=check_all_rows)
    if bad is not None:
        raise ValueError(
            f"old features {where} row {bad} contains NaN or Inf; the old model or the extraction is "
            f"broken (check the checkpoint and its precision), then {_EXTRACT_HINT}"
        )
    if old.credible is not None:
        _validate_credible(old.credible, old.source("credible"), num_rows)
    if old.labels is not None and source_labels is not None:
        _validate_labels(np.asarray(old.labels), np.asarray(source_labels), old.source("labels"))
    for name, table in old.tables.items():
        command = old.commands.get(name, "python -m mixbct_jax.prepare")
        shape = (num_classes, dim) if np.ndim(table) == 2 else (num_classes,) + tuple(np.shape(table)[1:])
        _validate_per_class(table, old.source(name), name, shape, command)


def _validate_credible(credible: np.ndarray, where: str, num_rows: int) -> None:
    fix = "re-run `python -m mixbct_jax.prepare denoise` on the same features file"
    if credible.dtype != np.bool_ or credible.ndim != 1:
        raise ValueError(
            f"credible mask {where} must be a 1-D bool array, got shape {credible.shape} dtype {credible.dtype}; {fix}"
        )
    if credible.shape[0] != num_rows:
        raise ValueError(
            f"credible mask {where} has {credible.shape[0]} entries but the old features have {num_rows} rows; {fix}"
        )
    if not np.any(credible):
        raise ValueError(f"credible mask {where} is all False, so no old row could be mixed in; {fix}")


def _validate_labels(stored: np.ndarray, source: np.ndarray, where: str) -> None:
    if stored.shape != source.shape:
        raise ValueError(
            f"old labels {where} have shape {stored.shape} but the training set's labels have shape "
            f"{source.shape}; {_EXTRACT_HINT}"
        )
    mismatch = np.flatnonzero(stored != source)
    if mismatch.size:
        i = int(mismatch[0])
        raise ValueError(
            f"old labels {where} differ from the training set's labels at {mismatch.size} indices, "
            f"first at index {i} (stored {stored[i]}, training set {source[i]}): the old features are "
            f"in a different example order or from another data set; {_EXTRACT_HINT}"
        )


def _validate_per_class(array: np.ndarray, where: str, what: str, shape: tuple[int | None, ...], command: str) -> None:
    expected = tuple(size if size is not None else actual for size, actual in zip(shape, array.shape))
    if array.shape != expected or array.ndim != len(shape):
        readable = "[" + ", ".join("C" if s is None else str(s) for s in shape) + "]"
        raise ValueError(
            f"{what} in {where} has shape {array.shape} but {readable} is needed (C = the training "
            f"set's class count, D = the old features' dimension); re-run `{command}` with "
            "--num_classes set to the training set's class count"
        )
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        raise ValueError(f"{what} in {where} contains NaN or Inf; re-run `{command}`")


def gather(old: OldEmbeddings, indices: np.ndarray) -> dict[str, np.ndarray]:
    """The old arrays' rows for a batch of example indices, in batch order.

    Reads each distinct row once, in ascending order (friendly to a memory map), then un-permutes.

    Args:
      old: the arrays from ``open_old_embeddings``.
      indices: [b] integer example indices (any order, duplicates allowed).

    Returns:
      ``old_features`` float32 [b, D], row-L2-normalised (docs/methods.md (MixBCT): the reference normalises the
      old features on load; eps 1e-12), and ``credible`` bool [b] when the mask is present.
    """
    indices = np.asarray(indices)
    if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(f"indices must be a 1-D integer array, got shape {indices.shape} dtype {indices.dtype}")
    num_rows = old.features.shape[0]
    if indices.size and (indices.min() < 0 or indices.max() >= num_rows):
        raise IndexError(
            f"example indices must lie in [0, {num_rows}) for old features {old.source('features')}; "
            f"got min {indices.min()} max {indices.max()}"
        )
    unique, inverse = np.unique(indices, return_inverse=True)
    rows = np.asarray(old.features[unique], dtype=np.float32)  # [u, D]
    rows /= np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), _EPS)
    batch = {"old_features": rows[inverse.reshape(-1)]}  # [b, D]
    if old.credible is not None:
        batch["credible"] = np.asarray(old.credible[unique], dtype=bool)[inverse.reshape(-1)]
    return batch


def batch_arrays(
    old: OldEmbeddings, needs: Sequence[str], indices: np.ndarray, labels: np.ndarray
) -> dict[str, np.ndarray]:
    """The host arrays a method needs for one batch (its ``per_example`` and ``per_label`` names).

    Args:
      old: the arrays from ``open_old_embeddings``.
      needs: names among ``old_features`` (row-L2-normalised float32 [b, D]) and ``credible`` (bool [b]),
        gathered by example index, and the names of ``old.tables``, gathered by label (row ``labels[i]``).
      indices: [b] example indices.
      labels: [b] the examples' labels (the model's numbering).

    Returns:
      Exactly the named arrays, in batch order.

    Raises:
      ValueError: a name that is neither, or the credible mask when it was not given.
    """
    unknown = [name for name in needs if name not in PER_EXAMPLE and name not in old.tables]
    if unknown:
        raise ValueError(
            f"unknown per-batch arrays {unknown}: neither per-example arrays {list(PER_EXAMPLE)} nor "
            f"class tables loaded from a method's class files ({sorted(old.tables)})"
        )
    out: dict[str, np.ndarray] = {}
    if any(name in PER_EXAMPLE for name in needs):
        if "credible" in needs and old.credible is None:
            raise ValueError(
                "this method needs the credible mask: set config.old.credible (python -m mixbct_jax.prepare denoise)"
            )
        gathered = gather(old, indices)
        out.update({name: gathered[name] for name in needs if name in PER_EXAMPLE})
    labels = np.asarray(labels).astype(np.int64)
    out.update({name: np.asarray(old.tables[name][labels]) for name in needs if name not in PER_EXAMPLE})
    return out


def open_for_method(
    config, method, *, num_examples: int, source_labels: np.ndarray, num_classes: int
) -> OldEmbeddings | None:
    """Opens and validates the old arrays ``method`` (a ``bct.api.Method``) declares, from ``config.old``.

    Returns None for a method that reads none. Every array is checked against the training set (row count,
    labels, embedding size, class count, finite values; ``config.old.finite_check``) before training starts.
    """
    if not method.needs_old:
        return None
    flag = f"config.bct.method={config.bct.method!r}"
    if not config.old.features:
        raise ValueError(
            f"{flag} needs the old model's embeddings of this run's training set: set "
            f"--config.old.features=<dir>/features.npy, written by `python -m mixbct_jax.extract --workdir <old run> "
            f"--scenario {config.data.scenario} --role {config.data.role} --out <dir>`."
        )
    if "credible" in method.per_example and not config.old.credible:
        raise ValueError(f"{flag} needs config.old.credible (python -m mixbct_jax.prepare denoise ...)")
    for class_file in method.class_files:
        if not config.old[class_file.field]:
            raise ValueError(f"{flag} needs config.old.{class_file.field} (written by `{class_file.command}`)")
    old = open_old_embeddings(
        features=config.old.features,
        credible=config.old.credible or None,
        labels=config.old.labels or None,
        class_files=[(config.old[f.field], f) for f in method.class_files],
    )
    validate(
        old,
        num_examples=num_examples,
        source_labels=source_labels,
        # every method compares or mixes old and new embeddings: the sizes must agree
        embedding_size=config.model.embedding_size,
        num_classes=num_classes,
        # every row by default (streamed): a NaN row outside a sample poisons training
        check_all_rows=config.old.finite_check == "full",
    )
    return old
