r"""Reader and writer of MXNet/insightface RecordIO files (``.rec`` + ``.idx``) without MXNet.

Described in docs/data.md (insightface .rec/.idx)-1.2.

Byte format (little-endian). A ``.rec`` file is a sequence of physical records::

    uint32 magic = 0xCED7230A
    uint32 lrec  = cflag << 29 | length        # cflag 0 whole, 1 first, 2 middle, 3 last part
    length bytes payload, zero-padded to a multiple of 4

A logical record whose 4-aligned payload contains the magic word is stored as parts 1, (2...), 3 with every
aligned magic word cut out; the reader joins the parts and puts the magic word back between them. The ``.idx``
file holds one ``"<key>\t<offset>\n"`` line per logical record.

A logical payload is an ``IRHeader`` (struct ``'IfQQ'``: flag, label, id, id2; 24 bytes), then ``flag`` float32
label values when ``flag > 0``, then the encoded image.

Layers, from bytes up: :func:`pack_header` / :func:`unpack` (one payload), :class:`RecordWriter` /
:class:`RecordReader` (keyed logical records), :class:`RecFile` (the insightface data-set view: image keys,
labels, encoded images) and :func:`write_rec` (writes an insightface-style file from arrays).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import struct
import tempfile
import threading
import warnings
from typing import NamedTuple

import numpy as np

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LENGTH_MASK = (1 << 29) - 1
MAX_RECORD_BYTES = _LENGTH_MASK  # a logical record is at most 2^29 - 1 bytes
_HEADER = struct.Struct("<IfQQ")  # x86-64 native 'IfQQ' has no padding: the same 24 bytes
HEADER_BYTES = _HEADER.size
_LREC = struct.Struct("<II")

# cflag values of a physical record.
_WHOLE, _FIRST, _MIDDLE, _LAST = 0, 1, 2, 3

_log = logging.getLogger(__name__)


class RecordIOError(ValueError):
    """A malformed, truncated or inconsistent ``.rec``/``.idx`` file."""


class IRHeader(NamedTuple):
    """The header of a logical record.

    Attributes:
      flag: 0 for a scalar label, else the number of float32 label values that follow the header.
      label: a float (flag == 0) or a float32 array of ``flag`` values.
      id: uint64 record id (insightface stores the key).
      id2: uint64, unused by insightface.
    """

    flag: int
    label: float | np.ndarray
    id: int
    id2: int


def pack_header(label: float | np.ndarray | list[float], id: int = 0, id2: int = 0) -> bytes:  # noqa: A002
    """Packs an IRHeader and its label vector; append the encoded image to get a payload.

    A scalar label gives ``flag = 0``. An array label gives ``flag = len(label)``, a scalar field of 0 and the
    values as float32 after the header (MXNet ignores a caller's flag in that case, and so do we).

    Args:
      label: a number or a 1-D sequence of numbers.
      id: the record id (uint64).
      id2: the second id (uint64).

    Returns:
      The header bytes (24 + 4·flag).
    """
    if np.ndim(label) == 0:
        return _HEADER.pack(0, float(label), int(id), int(id2))
    values = np.asarray(label, dtype="<f4").reshape(-1)
    return _HEADER.pack(values.size, 0.0, int(id), int(id2)) + values.tobytes()


def unpack(payload: bytes) -> tuple[IRHeader, bytes]:
    """Splits a logical payload into its header (with the label vector) and the remaining bytes.

    Args:
      payload: a logical record as returned by :meth:`RecordReader.read`.

    Returns:
      ``(IRHeader, image_bytes)``.

    Raises:
      RecordIOError: the payload is shorter than its header says.
    """
    if len(payload) < HEADER_BYTES:
        raise RecordIOError(f"record payload has {len(payload)} bytes, fewer than the {HEADER_BYTES}-byte IRHeader")
    flag, scalar, id_, id2 = _HEADER.unpack_from(payload)
    if flag == 0:
        return IRHeader(0, scalar, id_, id2), payload[HEADER_BYTES:]
    end = HEADER_BYTES + 4 * flag
    if len(payload) < end:
        raise RecordIOError(
            f"record payload has {len(payload)} bytes but its IRHeader flag={flag} announces {flag} label floats "
            f"({end} bytes with the header)"
        )
    label = np.frombuffer(payload, dtype="<f4", count=flag, offset=HEADER_BYTES).astype(np.float32)
    return IRHeader(flag, label, id_, id2), payload[end:]


def _split_at_magic(payload: bytes) -> list[bytes]:
    """The parts of a payload cut at every 4-aligned occurrence of the magic word (which is dropped)."""
    aligned = len(payload) // 4 * 4
    words = np.frombuffer(payload, dtype="<u4", count=aligned // 4)
    cuts = np.flatnonzero(words == MAGIC) * 4  # byte offsets of the aligned magic words
    parts, start = [], 0
    for cut in cuts.tolist():
        parts.append(payload[start:cut])
        start = cut + 4
    parts.append(payload[start:])
    return parts


def _atomic_target(path: pathlib.Path):
    """An open temporary file beside ``path``; rename it onto ``path`` to publish it."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    return os.fdopen(fd, "wb"), pathlib.Path(tmp)


class RecordWriter:
    """Writes ``<prefix>.rec`` and ``<prefix>.idx``; use as a context manager.

    Both files are written to temporary names and renamed into place by :meth:`close`, so a crash never leaves a
    half-written pair behind. Leaving the ``with`` block by an exception discards them.
    """

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = pathlib.Path(prefix)
        self._rec_path = self.prefix.with_name(self.prefix.name + ".rec")
        self._idx_path = self.prefix.with_name(self.prefix.name + ".idx")
        self._rec, self._rec_tmp = _atomic_target(self._rec_path)
        self._idx, self._idx_tmp = _atomic_target(self._idx_path)
        self._offset = 0
        self._keys: set[int] = set()

    def write(self, key: int, payload: bytes) -> None:
        """Appends one logical record under ``key`` (a non-negative int, unique in the file)."""
        key = int(key)
        if key < 0 or key in self._keys:
            raise ValueError(f"{self._rec_path}: key {key} is negative or already written; keys must be unique >= 0")
        if len(payload) > MAX_RECORD_BYTES:
            raise ValueError(f"{self._rec_path}: record {key} has {len(payload)} bytes; the format allows 2^29-1")
        self._keys.add(key)
        parts = _split_at_magic(bytes(payload))
        flags = [_WHOLE] if len(parts) == 1 else [_FIRST] + [_MIDDLE] * (len(parts) - 2) + [_LAST]
        chunks = []
        for cflag, part in zip(flags, parts):
            pad = (4 - len(part) % 4) % 4
            chunks += [_LREC.pack(MAGIC, cflag << 29 | len(part)), part, b"\0" * pad]
        data = b"".join(chunks)
        self._rec.write(data)
        self._idx.write(f"{key}\t{self._offset}\n".encode())
        self._offset += len(data)

    def close(self) -> None:
        """Flushes both files and publishes them under their final names."""
        if self._rec.closed:
            return
        for f, tmp, path in ((self._rec, self._rec_tmp, self._rec_path), (self._idx, self._idx_tmp, self._idx_path)):
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.replace(tmp, path)

    def _discard(self) -> None:
        for f, tmp in ((self._rec, self._rec_tmp), (self._idx, self._idx_tmp)):
            f.close()
            tmp.unlink(missing_ok=True)

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._discard()


def _read_idx(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    """Parses a ``.idx`` file into (keys int64 [R], offsets int64 [R]) in file order."""
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: index file not found; a RecordIO data set needs both .rec and .idx") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # older NumPy only warns about a non-number
            table = np.fromstring(text, dtype=np.int64, sep=" ")  # C parser: 5M lines in ~0.2 s
    except ValueError:  # NumPy >= 2.3 raises on a non-number
        table = np.zeros(1, np.int64)  # a size that cannot match: take the careful path below
    rows = text.count(b"\n") + (not text.endswith(b"\n") and bool(text))
    if table.size != 2 * rows:  # a stray character, a blank line or a short line: find it, the slow way
        lines = text.splitlines()
        for number, line in enumerate(lines, 1):
            fields = line.split()
            if fields and (len(fields) != 2 or not all(f.isdigit() for f in fields)):
                raise RecordIOError(
                    f"{path}: line {number} is not '<key>\\t<offset>' ({line[:80]!r}); rebuild the index "
                    "(e.g. with RecordWriter)"
                )
        table = np.array(b" ".join(lines).split(), dtype=np.int64)  # only blank lines were in the way
    table = table.reshape(-1, 2)  # [R, (key, offset)]
    return table[:, 0].copy(), table[:, 1].copy()


class RecordReader:
    """Random access to the logical records of ``<prefix>.rec`` through ``<prefix>.idx``.

    Reads use ``os.pread`` on one shared descriptor, so :meth:`read` is safe to call from many threads. The index
    is kept as two int64 arrays (not a dict), so a 5M-record file costs 80 MB and opens in a fraction of a second.

    Attributes:
      keys: int64 [R] keys in ``.idx`` file order.
      offsets: int64 [R] byte offsets in the same order.
    """

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = pathlib.Path(prefix)
        self.rec_path = self.prefix.with_name(self.prefix.name + ".rec")
        self.idx_path = self.prefix.with_name(self.prefix.name + ".idx")
        self.keys, self.offsets = _read_idx(self.idx_path)
        # Lookup: direct indexing when the keys are 0..R-1 in order (every insightface file), else binary search.
        self._dense = bool(np.array_equal(self.keys, np.arange(self.keys.size)))
        order = np.argsort(self.keys, kind="stable")
        self._sorted_keys, self._sorted_offsets = self.keys[order], self.offsets[order]
        if self.keys.size and np.any(np.diff(self._sorted_keys) == 0):
            dup = self._sorted_keys[np.flatnonzero(np.diff(self._sorted_keys) == 0)[0]]
            raise RecordIOError(f"{self.idx_path}: key {dup} appears more than once; rebuild the index")
        try:
            self._fd = os.open(self.rec_path, os.O_RDONLY)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{self.rec_path}: record file not found (the index {self.idx_path} exists)"
            ) from None
        self.file_size = os.fstat(self._fd).st_size
        if len(self.offsets) and (self.offsets.min() < 0 or self.offsets.max() >= self.file_size):
            outside = np.flatnonzero((self.offsets < 0) | (self.offsets >= self.file_size))
            k = int(outside[np.argmin(self.offsets[outside])])  # the first record lost to a truncation
            raise RecordIOError(
                f"{self.rec_path}: record key {self.keys[k]} at byte offset {self.offsets[k]} lies outside the "
                f"file ({self.file_size} bytes; {outside.size} records affected); the .rec is truncated or the "
                ".idx belongs to another file"
            )

    def _pread_exact(self, n: int, offset: int, key: int) -> bytes:
        data = os.pread(self._fd, n, offset)
        if len(data) != n:
            raise RecordIOError(
                f"{self.rec_path}: record key {key} is truncated at byte offset {offset} (wanted {n} bytes, the "
                f"file has {self.file_size}); the .rec file is incomplete"
            )
        return data

    def read_at(self, offset: int, key: int | None = None) -> bytes:
        """Reads the logical record whose first physical header is at byte ``offset``."""
        parts: list[bytes] = []
        pos = offset
        while True:
            magic, lrec = _LREC.unpack(self._pread_exact(8, pos, key))
            if magic != MAGIC:
                raise RecordIOError(
                    f"{self.rec_path}: record key {key}: bad magic 0x{magic:08X} at byte offset {pos} (expected "
                    f"0x{MAGIC:08X}); the file is corrupt or the .idx offset is wrong"
                )
            cflag, length = lrec >> 29, lrec & _LENGTH_MASK
            expected = (_WHOLE, _FIRST) if not parts else (_MIDDLE, _LAST)
            if cflag not in expected:
                raise RecordIOError(
                    f"{self.rec_path}: record key {key}: unexpected part flag {cflag} at byte offset {pos} "
                    f"(expected one of {expected}); the file is corrupt"
                )
            parts.append(self._pread_exact(length, pos + 8, key) if length else b"")
            pos += 8 + length + (4 - length % 4) % 4
            if cflag in (_WHOLE, _LAST):
                return parts[0] if len(parts) == 1 else _MAGIC_BYTES.join(parts)

    def offsets_of(self, keys: np.ndarray) -> np.ndarray:
        """int64 byte offsets of ``keys`` (any shape); raises KeyError for a key not in the index."""
        keys = np.asarray(keys, dtype=np.int64)
        if self._dense:
            found = (keys >= 0) & (keys < self.keys.size)
            pos = np.where(found, keys, 0)
        else:
            pos = np.minimum(np.searchsorted(self._sorted_keys, keys), max(self.keys.size - 1, 0))
            found = self._sorted_keys[pos] == keys if self.keys.size else np.zeros(keys.shape, bool)
        if not np.all(found):
            raise KeyError(f"{self.idx_path}: no record with key {keys[~found].reshape(-1)[0]}")
        return (self.offsets if self._dense else self._sorted_offsets)[pos]

    def __contains__(self, key: int) -> bool:
        try:
            self.offsets_of(np.array([key]))
        except KeyError:
            return False
        return True

    def read(self, key: int) -> bytes:
        """The logical payload stored under ``key``."""
        key = int(key)
        offset = int(self.offsets[key]) if self._dense and 0 <= key < self.keys.size else int(self.offsets_of(key))
        return self.read_at(offset, key)

    def close(self) -> None:
        """Closes the file descriptor."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> RecordReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    def __getstate__(self) -> dict:
        # A descriptor number means nothing in another process (input workers are spawned): reopen there.
        state = dict(self.__dict__)
        state["_fd"] = -1
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._fd = os.open(self.rec_path, os.O_RDONLY)


MAX_LABEL = 1 << 24  # labels are stored as float32, exact for whole numbers below 2^24
_SCAN_CHUNK = 1 << 20  # records per gather in the label scan, bounds its memory at ~60 MiB


class RecFile:
    """The insightface data-set view of a ``.rec``/``.idx`` pair (docs/data.md).

    If record 0 exists and has ``flag > 0``, it is the insightface header ``[N+1, ...]`` and the images are keys
    ``1 .. int(label[0]) - 1``; otherwise every key is an image. Example ``i`` is the ``i``-th image key.
    """

    def __init__(self, prefix: str | os.PathLike):
        self.reader = RecordReader(prefix)
        self.prefix = self.reader.prefix
        header = None
        if 0 in self.reader:
            try:
                header = unpack(self.reader.read(0))[0]
            except RecordIOError as e:
                raise RecordIOError(f"{self.reader.rec_path}: record key 0 (the header): {e}") from None
        # The insightface header [N+1, N+1+C] announces C identities (C = 0: no identity records).
        self.declared_classes: int | None = None
        if header is not None and header.flag >= 2 and header.label[1] > header.label[0]:
            self.declared_classes = int(header.label[1] - header.label[0])
        if header is not None and header.flag > 0:
            end = int(header.label[0])
            self._keys = np.arange(1, end, dtype=np.int64)
            try:
                self._offsets = self.reader.offsets_of(self._keys)  # int64 [N]
            except KeyError as e:
                raise RecordIOError(
                    f"{self.reader.idx_path}: header record 0 announces image keys 1..{end - 1}, but {e.args[0]}"
                ) from None
        else:
            self._keys, self._offsets = self.reader.keys, self.reader.offsets
        self._labels: np.ndarray | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self._keys.size)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def key(self, i: int) -> int:
        """The record key of example ``i``."""
        return int(self._keys[i])

    def read_example(self, i: int) -> tuple[int, bytes]:
        """``(label, encoded image bytes)`` of example ``i``; the label is ``label[0]`` or the scalar label."""
        key = self.key(i)
        payload = self.reader.read_at(int(self._offsets[i]), key)  # its errors name the file, key and offset
        try:
            header, image = unpack(payload)
        except RecordIOError as e:
            raise RecordIOError(f"{self.reader.rec_path}: record key {key}: {e}") from None
        label = header.label[0] if header.flag > 0 else header.label
        return int(label), image

    # ---- labels -------------------------------------------------------------------------------------------
    @property
    def labels(self) -> np.ndarray:
        """int32 [N] labels of all examples, scanned once and cached as ``<prefix>.labels.npz``."""
        with self._lock:
            if self._labels is None:
                self._labels = self._load_or_scan_labels()
            return self._labels

    def _cache_key(self) -> dict[str, int]:
        st_idx, st_rec = os.stat(self.reader.idx_path), os.stat(self.reader.rec_path)
        return {
            "labels_checked": 1,  # caches written before labels were validated are rescanned
            "idx_size": st_idx.st_size,
            "idx_mtime_ns": st_idx.st_mtime_ns,
            "rec_size": st_rec.st_size,
            "num_examples": len(self),
        }

    @property
    def labels_cache_path(self) -> pathlib.Path:
        return self.prefix.with_name(self.prefix.name + ".labels.npz")

    def _load_or_scan_labels(self) -> np.ndarray:
        path, key = self.labels_cache_path, self._cache_key()
        if path.exists():
            try:
                with np.load(path) as z:
                    if json.loads(str(z["key"])) == key:
                        return z["labels"].astype(np.int32)
            except (OSError, ValueError, KeyError) as e:
                _log.warning("%s: unreadable label cache (%s); rescanning", path, e)
        labels = self.scan_labels()
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            with os.fdopen(fd, "wb") as f:
                np.savez(f, labels=labels, key=np.array(json.dumps(key, sort_keys=True)))
            os.replace(tmp, path)
        except OSError as e:  # a read-only data directory: keep the labels in memory only
            _log.warning("%s: cannot write the label cache (%s); labels will be rescanned next time", path, e)
            if tmp is not None:
                pathlib.Path(tmp).unlink(missing_ok=True)
        return labels

    def scan_labels(self) -> np.ndarray:
        """Reads and validates every example's label from its header words only (no cache).

        Records start at multiples of 4, so the file is memory-mapped as uint32 words and five words per record
        (magic, lrec, flag, scalar label, first vector label) are gathered at the ``.idx`` offsets and parsed as
        arrays. Only records whose first part is too short to hold them (a magic word inside the header) go
        through the full reader.

        Returns:
          int32 [N].

        Raises:
          RecordIOError: a label is not a finite non-negative integer below the class count (see
            :meth:`check_labels`), naming the file and the record key.
        """
        n = len(self)
        labels = np.empty(n, np.float32)
        if n == 0:
            return labels.astype(np.int32)
        size = self.reader.file_size
        if size < 8:
            raise RecordIOError(f"{self.reader.rec_path}: the file has only {size} bytes; it is truncated")
        if np.any(self._offsets % 4):
            k = int(np.argmax(self._offsets % 4))
            raise RecordIOError(
                f"{self.reader.idx_path}: record key {self._keys[k]} has byte offset {self._offsets[k]}, not a "
                "multiple of 4; the .idx does not belong to this .rec"
            )
        words = np.memmap(self.reader.rec_path, dtype="<u4", mode="r", shape=(size // 4,))
        # Word positions inside a record: magic, lrec, IRHeader flag, scalar label, first float after the header.
        fields = np.array([0, 1, 2, 3, 2 + HEADER_BYTES // 4])
        for start in range(0, n, _SCAN_CHUNK):
            off = self._offsets[start : start + _SCAN_CHUNK]  # [n] bytes
            got = words[np.minimum(off[:, None] // 4 + fields, words.size - 1)]  # [n, 5], clipped at EOF
            magic, lrec, flag = got[:, 0], got[:, 1], got[:, 2]
            cflag, length = lrec >> 29, (lrec & _LENGTH_MASK).astype(np.int64)
            first_label = np.where(flag > 0, got[:, 4].view("<f4"), got[:, 3].view("<f4"))
            need = np.where(flag > 0, HEADER_BYTES + 4, HEADER_BYTES)
            # Only the first physical part is checked here; a multi-part record's later parts are checked by the
            # reader when the image is read.
            bad_magic = (magic != MAGIC) | (off + 8 > size)
            truncated = off + 8 + length > size
            for j in np.flatnonzero(bad_magic | truncated)[:1].tolist():
                what = "record truncated" if truncated[j] or off[j] + 8 > size else f"bad magic 0x{int(magic[j]):08X}"
                raise RecordIOError(
                    f"{self.reader.rec_path}: record key {self._keys[start + j]}: {what} at byte offset {off[j]}; "
                    "the .rec file is corrupt, truncated, or does not belong to this .idx"
                )
            labels[start : start + off.size] = first_label
            fine = ((cflag == _WHOLE) | (cflag == _FIRST)) & (length >= need)
            for j in np.flatnonzero(~fine).tolist():  # rare: a magic word cut the header, or a corrupt flag
                labels[start + j] = self._raw_label(start + j)
        del words
        return self.check_labels(labels)

    def _raw_label(self, i: int) -> float:
        key = self.key(i)
        try:
            header, _ = unpack(self.reader.read_at(int(self._offsets[i]), key))
        except RecordIOError as e:
            raise RecordIOError(f"{self.reader.rec_path}: record key {key}: {e}") from None
        return float(header.label[0] if header.flag > 0 else header.label)

    def check_labels(self, raw: np.ndarray) -> np.ndarray:
        """float32 [N] stored labels -> int32 [N], or one clear error naming the file and the first bad key.

        A label must be finite, a whole number, >= 0 and below the class count: the header's identity count C
        when it announces one, else 2^24 (float32 holds whole numbers exactly only up to 2^24, so a larger stored
        label cannot be a faithful class id; without this check a label of 1e9 would size a 1e9-class head).
        """
        bound = self.declared_classes or MAX_LABEL
        checks = (
            (~np.isfinite(raw), "is not a finite number"),
            (np.isfinite(raw) & (raw != np.floor(raw)), "is not a whole number"),
            (raw < 0, "is negative"),
            (
                raw >= bound,
                f"is >= the number of classes {bound}"
                + (" announced by the header record (key 0)" if self.declared_classes else " (at most 2^24)"),
            ),
        )
        for bad, why in checks:
            if np.any(bad):
                j = int(np.argmax(bad))
                raise RecordIOError(
                    f"{self.reader.rec_path}: record key {self.key(j)} (example {j}): label {float(raw[j])!r} {why}; "
                    f"{int(bad.sum())} example(s) are affected. Labels must be class ids 0..C-1: rebuild the .rec "
                    "with correct labels"
                )
        return raw.astype(np.int32)

    def close(self) -> None:
        self.reader.close()


def write_rec(
    prefix: str | os.PathLike,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    encoding: str = ".jpg",
    quality: int = 95,
) -> None:
    """Writes images as an insightface-style ``.rec``/``.idx`` pair.

    Layout: key 0 = header with label ``[N+1, N+1+C]``; keys 1..N = images with label ``[class, 0]`` and
    ``id = key``; keys N+1..N+C = identity records with label ``[first_key, end_key)``.

    Args:
      prefix: output path without extension.
      images: uint8 [N, H, W, 3] RGB.
      labels: int [N], non-decreasing from 0 (examples grouped by identity, as insightface files are).
      encoding: ``'.jpg'`` or ``'.png'`` (lossless, for exact tests).
      quality: JPEG quality.
    """
    import cv2  # only needed to write

    images = np.asarray(images)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] != labels.size:
        raise ValueError(
            f"write_rec({prefix}): need images uint8 [N, H, W, 3] and labels [N]; got {images.dtype} "
            f"{images.shape} and {labels.shape}"
        )
    if labels.size and (labels.min() < 0 or np.any(np.diff(labels) < 0)):
        raise ValueError(f"write_rec({prefix}): labels must be >= 0 and non-decreasing (grouped by identity)")
    n = labels.size
    c = int(labels.max()) + 1 if n else 0
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)] if encoding == ".jpg" else []
    # first_key[j] = 1 + number of images with label < j; identity j covers keys [first_key[j], first_key[j+1]).
    bounds = 1 + np.searchsorted(labels, np.arange(c + 1))
    with RecordWriter(prefix) as w:
        w.write(0, pack_header([n + 1, n + 1 + c]))
        for i in range(n):
            ok, buf = cv2.imencode(encoding, images[i, :, :, ::-1], params)  # cv2 wants BGR
            if not ok:
                raise ValueError(f"write_rec({prefix}): cv2 could not encode image {i} as {encoding}")
            w.write(i + 1, pack_header([labels[i], 0], id=i + 1) + buf.tobytes())
        for j in range(c):
            w.write(n + 1 + j, pack_header([bounds[j], bounds[j + 1]], id=n + 1 + j))
