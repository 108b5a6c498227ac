"""Random-access image sources behind one protocol, opened from a spec string.

* ``synthetic`` or ``synthetic:num_classes=64,min_images=12,max_images=28,image_size=32,seed=0``:
  :class:`SyntheticFaces`;
* ``rec:/path/prefix``: insightface ``.rec/.idx`` (the images are JPEG-decoded to RGB);
* ``folder:/dir[,size=112]``: one sub-folder per class (sorted names -> labels 0..C-1), ``.png/.jpg/.jpeg/.bmp``;
* ``tfds:name[:split][,data_dir=...,image_key=image,label_key=label,size=N]``: a TFDS data set prepared in the
  array_record format (``name`` may carry a config and version, ``mnist/foo:1.0.0``; the split defaults to train);
* ``npz:/path.npz[,size=32]``: arrays ``images`` uint8 [N,H,W] or [N,H,W,3] and ``label``/``labels``.

Options follow the location after commas as ``key=value``, so paths must not contain commas. Every kind also
takes ``classes=A:B``: only the examples with ``A <= label < B``, relabelled to ``0..B-A-1`` (for example, to
hold classes out of training and evaluate retrieval on them). Every source serves
uint8 RGB images of one shape ``image_shape``; greyscale is replicated to three channels. Sources that store
encoded images (rec, folder, tfds) also hand them out undecoded, so the input pipeline decodes them in its worker
processes. Sources pickle (a ``.rec`` reopens its file), so they can be sent to those workers.

JPEGs are decoded by libjpeg-turbo through simplejpeg with the accurate integer IDCT and fancy upsampling, which
gives exactly OpenCV's pixels (``cv2.imdecode``, the reference's ``mx.image.imdecode``); PNG and BMP go through
OpenCV. No TensorFlow is involved.
"""

from __future__ import annotations

import os
import pathlib
import re
import threading
from typing import Protocol, runtime_checkable

import numpy as np

from mixbct_jax.data import recordio
from mixbct_jax.data.recordio import MAX_LABEL
from mixbct_jax.data.synthetic import SyntheticFaces

SPEC_FORMS = (
    "synthetic[:num_classes=64,min_images=12,max_images=28,image_size=32,seed=0]",
    "rec:/path/prefix",
    "folder:/dir[,size=112]",
    "tfds:name[:split][,data_dir=/dir,image_key=image,label_key=label,size=N]",
    "npz:/path.npz[,size=32]",
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


@runtime_checkable
class Source(Protocol):
    """A labelled image set with random access.

    Attributes:
      name: the spec it was opened from.
      labels: int32 [N].
      num_classes: ``max(labels) + 1`` unless the source declares more.
      image_shape: ``(H, W, 3)`` of every served image.
    """

    name: str
    labels: np.ndarray
    num_classes: int
    image_shape: tuple[int, int, int]

    def __len__(self) -> int: ...

    def read(self, indices: np.ndarray | list[int]) -> np.ndarray:
        """uint8 [n, H, W, 3] RGB images of examples ``indices``."""
        ...

    def read_encoded(self, index: int) -> bytes | None:
        """The stored encoded (JPEG/PNG/BMP) bytes of one example, or None.

        None when the source stores no encoded bytes, or when decoding them would not give exactly what
        :meth:`read` serves (e.g. a resize is configured).
        """
        ...

    def where(self, index: int) -> str:
        """Names example ``index`` for error messages: its file, record key or row."""
        ...


# ---- shared helpers -------------------------------------------------------------------------------------------


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    """Resizes an [H, W, C] uint8 image to [size, size, C]: area averaging to shrink, bilinear to enlarge."""
    import cv2

    if image.shape[:2] == (size, size):
        return image
    interp = cv2.INTER_AREA if size < min(image.shape[:2]) else cv2.INTER_LINEAR
    out = cv2.resize(image, (size, size), interpolation=interp)
    return out.reshape(size, size, image.shape[2])


def _to_rgb(images: np.ndarray, what: str) -> np.ndarray:
    """[..., H, W] or [..., H, W, 1|3] uint8 -> [..., H, W, 3]."""
    if images.dtype != np.uint8:
        raise ValueError(f"{what}: images must be uint8; got {images.dtype}")
    if images.shape[-1] == 3:
        return images
    if images.shape[-1] == 1:
        return np.repeat(images, 3, axis=-1)
    return np.repeat(images[..., None], 3, axis=-1)


_JPEG_MAGIC = b"\xff\xd8\xff"


def decode_rgb(data: bytes, what: str, out: np.ndarray | None = None, flip: bool = False) -> np.ndarray:
    """Decodes JPEG/PNG/BMP bytes to uint8 [H, W, 3] RGB, pixel for pixel as OpenCV (``mx.image.imdecode``).

    JPEG: simplejpeg (libjpeg-turbo, ISLOW IDCT, fancy upsampling: OpenCV's settings), strict, so a truncated or
    corrupt file is an error instead of a grey-filled image. Other formats: OpenCV. EXIF orientation is ignored.

    Args:
      data: the encoded bytes.
      what: names the image in error messages (file, record key).
      out: optional contiguous uint8 [H, W, 3] buffer: an unflipped JPEG of exactly that size is decoded into it
        (no copy); the returned array is then ``out``. Anything else is decoded as without it (check the returned
        shape and whether it shares memory with ``out``).
      flip: return the image mirrored left-right (a view). It is decoded as BGR and both the width and the channel
        axes are reversed, which numpy copies as one reversed run per row: several times faster than reversing
        the width of an RGB image (3-byte pixels).

    Raises:
      ValueError: the bytes are not a decodable image; the message starts with ``what``.
    """
    if bytes(data[:3]) == _JPEG_MAGIC:
        import simplejpeg

        try:
            if flip:
                bgr = simplejpeg.decode_jpeg(data, colorspace="BGR", fastdct=False, fastupsample=False, strict=True)
                return bgr[:, ::-1, ::-1] if bgr.shape[2] == 3 else np.repeat(bgr[:, ::-1], 3, axis=2)
            if out is not None and simplejpeg.decode_jpeg_header(data)[:2] == out.shape[:2]:
                return simplejpeg.decode_jpeg(
                    data, colorspace="RGB", fastdct=False, fastupsample=False, strict=True, buffer=out
                )
            image = simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=False, fastupsample=False, strict=True)
        except ValueError as e:
            raise ValueError(
                f"{what}: cannot decode the JPEG ({len(data)} bytes): {e}; the file is corrupt or "
                "truncated: re-encode or remove it"
            ) from None
        return image if image.shape[2] == 3 else np.repeat(image, 3, axis=2)
    import cv2

    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if image is None:
        raise ValueError(
            f"{what}: cannot decode the image bytes ({len(data)} bytes, starting {bytes(data[:8])!r}); "
            "it is not a JPEG/PNG/BMP image: re-encode or remove it"
        )
    return image[:, ::-1, ::-1] if flip else image[:, :, ::-1]  # BGR -> RGB


def check_labels(values: np.ndarray, what: str, where=None, num_classes: int | None = None) -> np.ndarray:
    """Validates stored labels and returns them as int32 [N], or raises one clear error.

    A label must be a finite whole number, >= 0 and below ``num_classes`` (when declared) and 2^24.

    Args:
      values: labels of any numeric dtype.
      what: the source's name (file or spec) for the message.
      where: optional ``i -> str`` naming example ``i`` (a file, a record key).
      num_classes: the declared class count, if the source has one.
    """
    raw = np.asarray(values).reshape(-1)
    if raw.dtype.kind not in "iuf" and raw.dtype != bool:
        raise ValueError(f"{what}: labels must be numbers; got dtype {raw.dtype}")
    raw = raw.astype(np.float64)
    bound = min(num_classes, MAX_LABEL) if num_classes else MAX_LABEL
    checks = (
        (~np.isfinite(raw), "is not a finite number"),
        (np.isfinite(raw) & (raw != np.floor(raw)), "is not a whole number"),
        (raw < 0, "is negative"),
        (raw >= bound, f"is >= the number of classes {bound}"),
    )
    for bad, why in checks:
        if np.any(bad):
            j = int(np.argmax(bad))
            at = where(j) if where else f"example {j}"
            raise ValueError(
                f"{what}: {at}: label {float(raw[j])!r} {why} ({int(bad.sum())} example(s) "
                "affected); labels must be class ids 0..C-1: fix the data"
            )
    return raw.astype(np.int32)


def _check_indices(indices: np.ndarray | list[int], n: int, name: str) -> np.ndarray:
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise IndexError(f"{name}: index out of range [0, {n}): {idx.min()}..{idx.max()}")
    return idx


def _stack(images: list[np.ndarray], shape: tuple[int, int, int], whats: list[str]) -> np.ndarray:
    for image, what in zip(images, whats):
        if image.shape != shape:
            raise ValueError(
                f"{what}: image has shape {image.shape}, but this source serves {shape}; images of one source must "
                "share a size (add ',size=N' to the spec to resize)"
            )
    return np.stack(images) if images else np.zeros((0, *shape), np.uint8)


def _num_classes(labels: np.ndarray) -> int:
    return int(labels.max()) + 1 if labels.size else 0


# ---- sources -------------------------------------------------------------------------------------------------


class SyntheticSource:
    """The embedded synthetic identities (:class:`SyntheticFaces`).

    Rendering an image costs about 1 ms of CPU at 32 × 32 (more than a training step's share on a small CPU), so
    a source of at most ``RENDER_CACHE_BYTES`` keeps every image it has rendered: from the second epoch on a read
    is a gather. The pixels are the same either way (each image is a pure function of its index). The cache is
    filled lazily and is not pickled (input worker processes start with an empty one).
    """

    RENDER_CACHE_BYTES = 512 << 20

    def __init__(self, name: str, faces: SyntheticFaces):
        self.name, self.faces = name, faces
        self.labels = faces.labels
        self.num_classes = faces.num_classes
        self.image_shape = faces.image_shape
        self._cache: np.ndarray | None = None
        self._rendered: np.ndarray | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.faces)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_cache", "_rendered", "_lock")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _cache=None, _rendered=None, _lock=threading.Lock())

    def _buffers(self) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:  # one allocation even when two threads read first at once
            if self._cache is None:
                n = len(self.faces)
                self._cache = np.empty((n, *self.image_shape), np.uint8)  # pages are touched only when written
                self._rendered = np.zeros(n, bool)
            return self._cache, self._rendered

    def read(self, indices: np.ndarray | list[int]) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self.faces)
        too_big = n * int(np.prod(self.image_shape)) > self.RENDER_CACHE_BYTES
        if too_big or len(idx) == 0 or idx.min() < 0 or idx.max() >= n:
            return self.faces.read(idx)  # also raises the out-of-range error
        cache, rendered = self._buffers()
        missing = np.unique(idx[~rendered[idx]])
        if missing.size:
            cache[missing] = self.faces.read(missing)
            rendered[missing] = True  # after the pixels: a concurrent reader never sees unwritten rows
        return cache[idx]

    def read_encoded(self, index: int) -> bytes | None:
        return None

    def where(self, index: int) -> str:
        return f"{self.name} row {int(index)}"


class ArraySource:
    """Images held in memory (the ``npz`` spec)."""

    def __init__(self, name: str, images: np.ndarray, labels: np.ndarray):
        if images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] != labels.shape[0]:
            raise ValueError(f"{name}: need images [N, H, W, 3] and labels [N]; got {images.shape}, {labels.shape}")
        self.name, self.images = name, images
        self.labels = check_labels(labels, name)
        self.num_classes = _num_classes(self.labels)
        self.image_shape = tuple(images.shape[1:])

    def __len__(self) -> int:
        return int(self.labels.size)

    def read(self, indices: np.ndarray | list[int]) -> np.ndarray:
        return self.images[_check_indices(indices, len(self), self.name)]

    def read_encoded(self, index: int) -> bytes | None:
        return None

    def where(self, index: int) -> str:
        return f"{self.name} row {int(index)}"


class RecSource:
    """An insightface ``.rec/.idx`` pair (:class:`recordio.RecFile`); images decoded to RGB."""

    def __init__(self, name: str, prefix: str | os.PathLike):
        self.name = name
        self.rec = recordio.RecFile(prefix)
        self.labels = self.rec.labels
        self.num_classes = _num_classes(self.labels)
        if len(self.rec) == 0:
            raise ValueError(f"{name}: {self.rec.reader.rec_path} holds no images")
        self.image_shape = tuple(self._decode(0).shape)

    def __len__(self) -> int:
        return len(self.rec)

    def where(self, index: int) -> str:
        return f"{self.rec.reader.rec_path} record key {self.rec.key(int(index))} (example {int(index)})"

    def _decode(self, i: int) -> np.ndarray:
        return decode_rgb(self.rec.read_example(i)[1], self.where(i))

    def read(self, indices: np.ndarray | list[int]) -> np.ndarray:
        idx = _check_indices(indices, len(self), self.name).tolist()
        return _stack([self._decode(i) for i in idx], self.image_shape, [self.where(i) for i in idx])

    def read_encoded(self, index: int) -> bytes:
        return self.rec.read_example(int(index))[1]


class FolderSource:
    """An image folder: ``root/<class name>/<image file>``, class names sorted to labels 0..C-1."""

    def __init__(self, name: str, root: str | os.PathLike, size: int | None = None):
        self.name, self.root, self.size = name, pathlib.Path(root), size
        if not self.root.is_dir():
            raise FileNotFoundError(f"{name}: {self.root} is not a directory")
        classes = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        files, counts = [], []
        for folder in classes:
            found = sorted(
                p
                for p in folder.iterdir()
                if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
            )
            if not found:
                raise ValueError(
                    f"{name}: class folder {folder} has no {'/'.join(IMAGE_SUFFIXES)} files; remove it so labels "
                    "stay contiguous"
                )
            files += found
            counts.append(len(found))
        if not files:
            raise ValueError(f"{name}: {self.root} has no class sub-folders with images")
        self.class_names = [p.name for p in classes]
        self.files = files
        self.labels = np.repeat(np.arange(len(classes), dtype=np.int32), counts)
        self.num_classes = len(classes)
        self.image_shape = (size, size, 3) if size else tuple(self._load(0).shape)
        if not size:
            self._check_sizes()

    def _check_sizes(self) -> None:
        """Every image's size from its header (no decoding), so a mixed folder fails here, not mid-training."""
        from PIL import Image

        want = self.image_shape[:2]
        for path in self.files:
            try:
                with Image.open(path) as im:
                    w, h = im.size
            except Exception as e:  # PIL raises UnidentifiedImageError, OSError, ... for files that are no image
                raise ValueError(f"{self.name}: {path} is not a readable image ({type(e).__name__}: {e})") from None
            if (h, w) != want:
                raise ValueError(
                    f"{self.name}: {path} is {w}x{h} but {self.files[0]} is {want[1]}x{want[0]}; the images of a "
                    f"folder must share one size: add ',size=N' to the spec (e.g. folder:{self.root},size={want[0]}) "
                    "to resize them all to NxN"
                )

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, i: int) -> np.ndarray:
        image = decode_rgb(self.files[i].read_bytes(), str(self.files[i]))
        return _resize(image, self.size) if self.size else image

    def read(self, indices: np.ndarray | list[int]) -> np.ndarray:
        idx = _check_indices(indices, len(self), self.name).tolist()
        return _stack([self._load(i) for i in idx], self.image_shape, [str(self.files[i]) for i in idx])

    def read_encoded(self, index: int) -> bytes | None:
        return None if self.size else self.files[int(index)].read_bytes()

    def where(self, index: int) -> str:
        return str(self.files[int(index)])


class TfdsSource:
    """A TFDS data set prepared in the array_record format, read from its local data_dir only.

    Opened with ``tfds.data_source`` (random access to ArrayRecord files, no TensorFlow and no download).
    """

    def __init__(
        self,
        name: str,
        dataset: str,
        split: str = "train",
        *,
        data_dir: str | None = None,
        image_key: str = "image",
        label_key: str = "label",
        size: int | None = None,
    ):
        import tensorflow_datasets as tfds

        self.name, self.size = name, size
        self.image_key, self.label_key = image_key, label_key
        try:
            builder = tfds.builder(dataset, data_dir=data_dir)
        except Exception as e:  # DatasetNotFoundError and friends
            raise FileNotFoundError(
                f"{name}: TFDS data set {dataset!r} is not prepared under data_dir={data_dir or '(the TFDS default)'}; "
                f"prepare it first (e.g. `tfds build {dataset} --file_format=array_record`), nothing is downloaded "
                f"here ({type(e).__name__}: {str(e).splitlines()[0]})"
            ) from None
        if not builder.is_prepared():
            raise FileNotFoundError(
                f"{name}: TFDS data set {dataset!r} is not prepared in {builder.data_dir}; run "
                f"`tfds build {dataset} --file_format=array_record` first (nothing is downloaded here)"
            )
        features = builder.info.features
        for key in (image_key, label_key):
            if key not in features:
                raise ValueError(f"{name}: feature {key!r} not in {list(features.keys())}; pass image_key=/label_key=")
        file_format = str(getattr(builder.info.file_format, "value", builder.info.file_format))
        if file_format != "array_record":
            raise ValueError(
                f"{name}: TFDS data set {dataset!r} in {builder.data_dir} is stored as {file_format}, but random "
                f"access (and reading without TensorFlow) needs array_record: rebuild it with `tfds build {dataset} "
                f"--file_format=array_record --data_dir={data_dir or '<your data_dir>'}`"
            )
        opened = {
            "split": split,
            "data_dir": data_dir,
            "download": False,
            "builder_kwargs": {"file_format": "array_record"},
        }
        try:
            self._decoded = tfds.data_source(dataset, **opened)
            self._raw = tfds.data_source(dataset, decoders={image_key: tfds.decode.SkipDecoding()}, **opened)
        except NotImplementedError as e:
            raise ValueError(
                f"{name}: random access needs the data set prepared as array_record (TFDS >= 4.9, "
                f"`tfds build {dataset} --file_format=array_record`); it is stored as {file_format}"
            ) from e
        self._lock = threading.Lock()  # the data sources are not documented as thread-safe
        shape = features[image_key].shape
        if size:
            self.image_shape = (size, size, 3)
        elif shape[0] is None or shape[1] is None:
            raise ValueError(f"{name}: images have variable size {shape}; add ',size=N' to the spec to resize")
        else:
            self.image_shape = (shape[0], shape[1], 3)
        declared = getattr(features[label_key], "num_classes", None)
        self.labels = check_labels(self._scan_labels(), name, self.where, int(declared) if declared else None)
        self.num_classes = int(declared) if declared else _num_classes(self.labels)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def where(self, index: int) -> str:
        return f"{self.name} example {int(index)}"

    def _scan_labels(self, chunk: int = 4096) -> np.ndarray:
        # Read once through the undecoded source: no image is decoded.
        n = len(self._raw)
        labels = np.empty(n, np.float64)
        for start in range(0, n, chunk):
            rows = self._raw.__getitems__(list(range(start, min(n, start + chunk))))
            labels[start : start + len(rows)] = [r[self.label_key] for r in rows]
        return labels

    def __len__(self) -> int:
        return int(self.labels.size)

    def read(self, indices: np.ndarray | list[int]) -> np.ndarray:
        idx = _check_indices(indices, len(self), self.name).tolist()
        with self._lock:
            rows = self._decoded.__getitems__(idx) if idx else []
        images = [_to_rgb(np.asarray(r[self.image_key]), self.name) for r in rows]
        if self.size:
            images = [_resize(im, self.size) for im in images]
        return _stack(images, self.image_shape, [f"{self.name} example {i}" for i in idx])

    def read_encoded(self, index: int) -> bytes | None:
        if self.size:
            return None
        with self._lock:
            return self._raw[int(index)][self.image_key]


def _load_npz(name: str, path: str, size: int | None) -> ArraySource:
    try:
        with np.load(path) as z:
            if "images" not in z.files or not ({"label", "labels"} & set(z.files)):
                raise ValueError(f"{name}: {path} needs arrays 'images' and 'label' (or 'labels'); has {z.files}")
            images = z["images"]
            labels = z["label"] if "label" in z.files else z["labels"]
    except FileNotFoundError:
        raise FileNotFoundError(f"{name}: {path} not found") from None
    if images.ndim not in (3, 4) or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{name}: {path}: need images [N,H,W] or [N,H,W,C] and labels [N]; got {images.shape}, {labels.shape}"
        )
    images = _to_rgb(images, f"{name}: {path} 'images'")
    if size:
        images = np.stack([_resize(im, size) for im in images]) if len(images) else images.reshape(0, size, size, 3)
    return ArraySource(name, images, check_labels(labels, f"{name}: {path} 'label'"))


_VERSION = re.compile(r"^\d+\.\d+\.\d+$")


def _parse(spec: str) -> tuple[str, str, dict[str, str]]:
    kind, _, rest = spec.partition(":")
    location, *options = rest.split(",") if rest else [""]
    parsed = {}
    for opt in options:
        key, eq, value = opt.partition("=")
        if not eq or not key:
            raise ValueError(f"source spec {spec!r}: option {opt!r} is not key=value")
        parsed[key.strip()] = value.strip()
    if kind == "synthetic" and "=" in location:  # synthetic:k=v,... has no location
        key, _, value = location.partition("=")
        parsed = {key.strip(): value.strip(), **parsed}
        location = ""
    return kind, location, parsed


def _take_int(options: dict[str, str], key: str, spec: str) -> int | None:
    if key not in options:
        return None
    try:
        value = int(options.pop(key))
    except ValueError:
        raise ValueError(f"source spec {spec!r}: {key} must be an integer") from None
    if value < 1:
        raise ValueError(f"source spec {spec!r}: {key} must be >= 1")
    return value


def _no_more(options: dict[str, str], spec: str, allowed: tuple[str, ...]) -> None:
    if options:
        raise ValueError(f"source spec {spec!r}: unknown option(s) {sorted(options)}; allowed: {allowed or 'none'}")


class ClassRangeSource:
    """The examples of ``base`` whose label lies in ``[first, stop)``, relabelled to start at 0."""

    def __init__(self, name: str, base: Source, first: int, stop: int):
        keep = np.flatnonzero((base.labels >= first) & (base.labels < stop))
        if keep.size == 0:
            raise ValueError(
                f"{name}: no example has a label in [{first}, {stop}) (labels span "
                f"{int(base.labels.min())}..{int(base.labels.max())})"
            )
        self.name, self._base, self._rows = name, base, keep
        self.labels = (base.labels[keep] - first).astype(base.labels.dtype)
        self.num_classes = _num_classes(self.labels)
        self.image_shape = base.image_shape

    def __len__(self) -> int:
        return int(self._rows.size)

    def read(self, indices: np.ndarray | list[int]) -> np.ndarray:
        return self._base.read(self._rows[_check_indices(indices, len(self), self.name)])

    def read_encoded(self, index: int) -> bytes | None:
        return self._base.read_encoded(int(self._rows[index]))

    def where(self, index: int) -> str:
        return self._base.where(int(self._rows[index]))


def _class_range(spec: str, value: str) -> tuple[int, int]:
    first, colon, stop = value.partition(":")
    try:
        first_i, stop_i = int(first), int(stop)
    except ValueError:
        raise ValueError(f"source spec {spec!r}: classes must be A:B (integers), got {value!r}") from None
    if not colon or first_i < 0 or stop_i <= first_i:
        raise ValueError(f"source spec {spec!r}: classes must be A:B with 0 <= A < B, got {value!r}")
    return first_i, stop_i


def open_source(spec: str) -> Source:
    """Opens a source from a spec string (see the module docstring for the forms).

    A ``classes=A:B`` option, accepted by every kind, restricts the source to a range of labels.
    """
    kind, location, options = _parse(spec)
    if "classes" in options:
        first, stop = _class_range(spec, options.pop("classes"))
        rest = ",".join([location] * bool(location) + [f"{k}={v}" for k, v in options.items()])
        base_spec = f"{kind}:{rest}" if rest else kind
        return ClassRangeSource(spec, open_source(base_spec), first, stop)
    return _open_unrestricted(spec)


def _open_unrestricted(spec: str) -> Source:
    """Opens a source without a ``classes`` option.

    Args:
      spec: e.g. ``'synthetic:num_classes=8'``, ``'rec:/data/ms1m/train'``, ``'folder:/imgs,size=112'``,
        ``'tfds:mnist:test'``, ``'npz:/data/omniglot_small_28.npz,size=32'``.

    Returns:
      A :class:`Source`.
    """
    kind, location, options = _parse(spec)
    if kind == "synthetic":
        fields = {f.name for f in SyntheticFaces.__dataclass_fields__.values()}
        unknown = set(options) - fields
        if location or unknown:
            raise ValueError(f"source spec {spec!r}: synthetic takes only key=value options from {sorted(fields)}")
        try:
            values = {k: int(v) for k, v in options.items()}
        except ValueError:
            raise ValueError(f"source spec {spec!r}: synthetic options must be integers") from None
        return SyntheticSource(spec, SyntheticFaces(**values))
    if not location and kind in ("rec", "folder", "tfds", "npz"):
        raise ValueError(f"source spec {spec!r}: {kind} needs a location after '{kind}:'")
    if kind == "rec":
        _no_more(options, spec, ())
        prefix = re.sub(r"\.(rec|idx)$", "", location)
        return RecSource(spec, prefix)
    if kind == "folder":
        size = _take_int(options, "size", spec)
        _no_more(options, spec, ("size",))
        return FolderSource(spec, location, size)
    if kind == "npz":
        size = _take_int(options, "size", spec)
        _no_more(options, spec, ("size",))
        return _load_npz(spec, location, size)
    if kind == "tfds":
        dataset, split = location, "train"
        head, colon, tail = location.rpartition(":")
        if colon and not _VERSION.match(tail):  # 'name:1.2.3' is a version, 'name:test' a split
            dataset, split = head, tail
        size = _take_int(options, "size", spec)
        kwargs = {k: options.pop(k) for k in ("data_dir", "image_key", "label_key") if k in options}
        _no_more(options, spec, ("data_dir", "image_key", "label_key", "size"))
        return TfdsSource(spec, dataset, split, size=size, **kwargs)
    raise ValueError(f"unknown source spec {spec!r}; use one of:\n  " + "\n  ".join(SPEC_FORMS))


def open_training_data(config):
    """(the image source, the run's training subset, the head's class count C) of ``config``."""
    from mixbct_jax.data import splits

    source = open_source(config.data.source)
    subset = splits.scenario(config.data.scenario, source.labels, config.data.split_ratio)[config.data.role]
    if tuple(source.image_shape[:2]) != (config.model.input_size,) * 2:
        raise ValueError(
            f"config.data.source={config.data.source!r} has {source.image_shape[:2]} images but "
            f"config.model.input_size={config.model.input_size}; make them agree."
        )
    return source, subset, config.model.num_classes if config.model.num_classes > 0 else subset.num_classes
