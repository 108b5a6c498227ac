"""RecordIO container, IRHeader and the insightface data-set view (docs/data.md (insightface .rec/.idx))."""

import os
import pickle
import struct

import cv2
import numpy as np
import pytest

from mixbct_jax.data import recordio

MAGIC = 0xCED7230A


def _physical_records(path):
    """Independent parse of a .rec file: [(offset, cflag, payload bytes, pad bytes)]."""
    data = open(path, "rb").read()
    out, pos = [], 0
    while pos < len(data):
        magic, lrec = struct.unpack_from("<II", data, pos)
        assert magic == MAGIC
        length = lrec & ((1 << 29) - 1)
        pad = (4 - length % 4) % 4
        out.append((pos, lrec >> 29, data[pos + 8 : pos + 8 + length], data[pos + 8 + length : pos + 8 + length + pad]))
        pos += 8 + length + pad
    return out


def test_pack_header_layout():
    scalar = recordio.pack_header(7.0, id=3, id2=9)
    assert len(scalar) == 24 == recordio.HEADER_BYTES
    assert struct.unpack("<IfQQ", scalar) == (0, 7.0, 3, 9)
    vector = recordio.pack_header([5.0, 2.5], id=11)
    assert struct.unpack("<IfQQ", vector[:24]) == (2, 0.0, 11, 0)  # flag = len(label), scalar field 0
    assert struct.unpack("<2f", vector[24:]) == (5.0, 2.5)

    header, rest = recordio.unpack(vector + b"IMG")
    assert header.flag == 2 and header.id == 11 and rest == b"IMG"
    np.testing.assert_array_equal(header.label, [5.0, 2.5])
    header, rest = recordio.unpack(scalar + b"x")
    assert header == recordio.IRHeader(0, 7.0, 3, 9) and rest == b"x"
    with pytest.raises(recordio.RecordIOError, match="announces 2 label floats"):
        recordio.unpack(vector[:28])


def test_round_trip_padding_and_idx(tmp_path):
    rng = np.random.default_rng(0)
    payloads = {k: rng.integers(0, 256, size=k, dtype=np.uint8).tobytes() for k in range(0, 14)}
    with recordio.RecordWriter(tmp_path / "a") as w:
        for key, p in payloads.items():
            w.write(key, p)
    phys = _physical_records(tmp_path / "a.rec")
    assert [c for _, c, _, _ in phys] == [0] * len(payloads)
    for (_off, _, body, pad), p in zip(phys, payloads.values()):
        assert body == p and pad == b"\0" * ((4 - len(p) % 4) % 4)
    idx = (tmp_path / "a.idx").read_text().splitlines()
    assert idx == [f"{k}\t{off}" for k, (off, *_) in zip(payloads, phys)]

    reader = recordio.RecordReader(tmp_path / "a")
    assert reader.keys.tolist() == list(payloads)
    for key in reversed(list(payloads)):  # random access, not sequential
        assert reader.read(key) == payloads[key]
    reader.close()


def test_magic_word_at_aligned_offsets_splits_the_record(tmp_path):
    m = struct.pack("<I", MAGIC)
    # Aligned magic at 8 and 24 (split there); one at the unaligned offset 18 stays inside a part.
    payload = b"A" * 8 + m + b"BB" + m + b"CCCCCC" + m + b"tail!"
    offsets = [i for i in range(0, len(payload) - 3) if payload[i : i + 4] == m]
    assert offsets == [8, 14, 24]  # 14 is not a multiple of 4
    with recordio.RecordWriter(tmp_path / "m") as w:
        w.write(0, b"before")
        w.write(1, payload)
        w.write(2, m)  # the whole payload is one magic word: two empty parts
        w.write(3, b"after")
    phys = _physical_records(tmp_path / "m.rec")
    assert [c for _, c, _, _ in phys] == [0, 1, 2, 3, 1, 3, 0]
    assert [body for _, c, body, _ in phys[1:4]] == [b"A" * 8, b"BB" + m + b"CCCCCC", b"tail!"]
    with recordio.RecordReader(tmp_path / "m") as r:
        assert [r.read(k) for k in range(4)] == [b"before", payload, m, b"after"]


def test_writer_is_atomic(tmp_path):
    with pytest.raises(RuntimeError):
        with recordio.RecordWriter(tmp_path / "x") as w:
            w.write(0, b"data")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="already written"):
        with recordio.RecordWriter(tmp_path / "y") as w:
            w.write(0, b"a")
            w.write(0, b"b")


def _images(n, size=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def test_insightface_layout_header_gives_keys_1_to_n(tmp_path):
    labels = np.array([0, 0, 0, 1, 2, 2])
    images = _images(6)
    recordio.write_rec(tmp_path / "t", images, labels, encoding=".png")
    f = recordio.RecFile(tmp_path / "t")
    assert len(f) == 6 and [f.key(i) for i in range(6)] == [1, 2, 3, 4, 5, 6]
    with recordio.RecordReader(tmp_path / "t") as r:
        assert r.keys.tolist() == list(range(10))  # header, 6 images, 3 identity records
        header, _ = recordio.unpack(r.read(0))
        np.testing.assert_array_equal(header.label, [7, 10])  # [N+1, N+1+C]
        ranges = [recordio.unpack(r.read(k))[0].label.tolist() for k in (7, 8, 9)]
        assert ranges == [[1, 4], [4, 5], [5, 7]]
        img_header, _ = recordio.unpack(r.read(4))
        assert img_header.flag == 2 and img_header.id == 4
        np.testing.assert_array_equal(img_header.label, [1, 0])
    for i in range(6):
        label, data = f.read_example(i)
        assert label == labels[i]
        decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
        np.testing.assert_array_equal(decoded, images[i])  # PNG: lossless
    np.testing.assert_array_equal(f.labels, labels)


def test_no_header_record_means_every_key_is_an_image(tmp_path):
    with recordio.RecordWriter(tmp_path / "s") as w:
        for key, label in [(0, 4.0), (1, 4.0), (5, 9.0)]:  # scalar labels (flag 0), record 0 is an image
            w.write(key, recordio.pack_header(label, id=key) + b"img%d" % key)
    f = recordio.RecFile(tmp_path / "s")
    assert len(f) == 3 and [f.key(i) for i in range(3)] == [0, 1, 5]
    assert f.read_example(2) == (9, b"img5")
    np.testing.assert_array_equal(f.labels, [4, 4, 9])


def test_label_vector_flag_uses_first_value(tmp_path):
    with recordio.RecordWriter(tmp_path / "v") as w:
        w.write(0, recordio.pack_header([4, 99]))
        w.write(1, recordio.pack_header([3, 1, 2]) + b"x")  # flag 3
        w.write(2, recordio.pack_header([8, 0]) + b"y")
        w.write(3, recordio.pack_header([2, 0], id=MAGIC) + b"z")  # the id puts the magic word inside the header
    phys = _physical_records(tmp_path / "v.rec")
    assert [c for _, c, _, _ in phys] == [0, 0, 0, 1, 3]
    f = recordio.RecFile(tmp_path / "v")
    assert [f.read_example(i) for i in range(3)] == [(3, b"x"), (8, b"y"), (2, b"z")]
    np.testing.assert_array_equal(f.scan_labels(), [3, 8, 2])  # the split record goes through the fallback


def _plain_rec(prefix, n):
    """Header record + n PNG images, no identity records: the last image is the last record in the file."""
    with recordio.RecordWriter(prefix) as w:
        w.write(0, recordio.pack_header([n + 1, n + 1]))
        for i, image in enumerate(_images(n)):
            w.write(i + 1, recordio.pack_header([i % 2, 0], id=i + 1) + cv2.imencode(".png", image)[1].tobytes())
    with recordio.RecordReader(prefix) as r:
        return dict(zip(r.keys.tolist(), r.offsets.tolist()))


def test_truncated_record_names_key_and_offset(tmp_path):
    offsets = _plain_rec(tmp_path / "t", 4)
    with open(tmp_path / "t.rec", "r+b") as fh:
        fh.truncate(offsets[4] + 8 + 30)  # inside record 4's image
    f = recordio.RecFile(tmp_path / "t")
    assert f.read_example(0)[0] == 0  # earlier records still read
    message = rf"t\.rec: record key 4 is truncated at byte offset {offsets[4] + 8}"
    with pytest.raises(recordio.RecordIOError, match=message):
        f.read_example(3)
    message = rf"t\.rec: record key 4: record truncated at byte offset {offsets[4]}"
    with pytest.raises(recordio.RecordIOError, match=message):
        f.scan_labels()

    # Cut before record 3: the index points past the end, which opening the file already reports.
    with open(tmp_path / "t.rec", "r+b") as fh:
        fh.truncate(offsets[3] - 2)
    with pytest.raises(recordio.RecordIOError, match=rf"record key 3 at byte offset {offsets[3]} lies outside"):
        recordio.RecFile(tmp_path / "t")


def test_corrupt_magic_names_key_and_offset(tmp_path):
    offsets = _plain_rec(tmp_path / "c", 4)
    with open(tmp_path / "c.rec", "r+b") as fh:
        fh.seek(offsets[2])
        fh.write(b"\0\0\0\0")
    f = recordio.RecFile(tmp_path / "c")
    with pytest.raises(recordio.RecordIOError, match=rf"key 2: bad magic 0x00000000 at byte offset {offsets[2]}"):
        f.read_example(1)
    with pytest.raises(recordio.RecordIOError, match=rf"key 2: bad magic 0x00000000 at byte offset {offsets[2]}"):
        f.scan_labels()


def test_labels_scan_is_cached_and_invalidated(tmp_path, monkeypatch):
    labels = np.repeat(np.arange(5), [3, 1, 4, 2, 2])
    recordio.write_rec(tmp_path / "t", _images(labels.size), labels, encoding=".png")
    f = recordio.RecFile(tmp_path / "t")
    np.testing.assert_array_equal(f.labels, labels)
    assert f.labels.dtype == np.int32
    assert f.labels_cache_path.exists()

    # A fresh view loads the cache and does not scan.
    monkeypatch.setattr(recordio.RecFile, "scan_labels", lambda self: pytest.fail("scanned despite the cache"))
    np.testing.assert_array_equal(recordio.RecFile(tmp_path / "t").labels, labels)
    monkeypatch.undo()

    # Rewriting the file (new .idx size/mtime) invalidates the cache.
    labels2 = np.repeat(np.arange(3), [2, 2, 1])
    recordio.write_rec(tmp_path / "t", _images(labels2.size), labels2, encoding=".png")
    st = os.stat(tmp_path / "t.idx")
    os.utime(tmp_path / "t.idx", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    np.testing.assert_array_equal(recordio.RecFile(tmp_path / "t").labels, labels2)


def test_write_rec_validates_input(tmp_path):
    with pytest.raises(ValueError, match="non-decreasing"):
        recordio.write_rec(tmp_path / "t", _images(3), np.array([1, 0, 0]))
    with pytest.raises(ValueError, match=r"uint8 \[N, H, W, 3\]"):
        recordio.write_rec(tmp_path / "t", _images(3).astype(np.float32), np.array([0, 0, 1]))


def test_index_errors(tmp_path):
    with recordio.RecordWriter(tmp_path / "i") as w:
        for key in (0, 3, 7):  # sparse keys: looked up by binary search
            w.write(key, b"k%d" % key)
    with recordio.RecordReader(tmp_path / "i") as r:
        assert r.read(7) == b"k7" and 3 in r and 4 not in r
        with pytest.raises(KeyError, match=r"i\.idx: no record with key 4"):
            r.read(4)
    good = (tmp_path / "i.idx").read_text()
    (tmp_path / "i.idx").write_text(good + "\n")  # a trailing blank line is tolerated
    assert recordio.RecordReader(tmp_path / "i").read(3) == b"k3"
    (tmp_path / "i.idx").write_text(good.replace("3\t", "3x\t"))
    with pytest.raises(recordio.RecordIOError, match=r"i\.idx: line 2 is not '<key>\\t<offset>'"):
        recordio.RecordReader(tmp_path / "i")
    (tmp_path / "i.idx").write_text(good + "7\t0\n")
    with pytest.raises(recordio.RecordIOError, match="key 7 appears more than once"):
        recordio.RecordReader(tmp_path / "i")


@pytest.mark.parametrize(
    "label, why",
    [
        (-1.0, "is negative"),
        (float("nan"), "is not a finite number"),
        (2.5, "is not a whole number"),
        (3.0, "is >= the number of classes 3 announced by the header"),
        (1e9, "is >= the number of classes 3 announced by the header"),
    ],
)
def test_bad_label_names_file_and_key_when_opened(tmp_path, label, why):
    with recordio.RecordWriter(tmp_path / "b") as w:
        w.write(0, recordio.pack_header([5, 8]))  # 4 images, 3 identities
        for key, value in zip(range(1, 5), [0.0, 1.0, label, 2.0]):
            w.write(key, recordio.pack_header([value, 0], id=key) + b"img")
    f = recordio.RecFile(tmp_path / "b")
    with pytest.raises(recordio.RecordIOError, match=rf"b\.rec: record key 3 \(example 2\): label .* {why}"):
        f.labels  # noqa: B018
    assert not f.labels_cache_path.exists()  # nothing cached for a bad file


def test_absurd_label_without_header_is_an_error(tmp_path):
    with recordio.RecordWriter(tmp_path / "s") as w:
        for key, value in [(0, 4.0), (1, 1e9)]:  # scalar labels, no header: the bound is 2^24
            w.write(key, recordio.pack_header(value, id=key) + b"img")
    message = r"record key 1 \(example 1\): label 1000000000.0 is >= the number of classes 16777216 \(at most 2\^24\)"
    with pytest.raises(recordio.RecordIOError, match=message):
        recordio.RecFile(tmp_path / "s").scan_labels()


def test_rec_file_pickles_and_reopens(tmp_path):
    labels = np.array([0, 1, 1])
    recordio.write_rec(tmp_path / "p", _images(3), labels, encoding=".png")
    f = recordio.RecFile(tmp_path / "p")
    g = pickle.loads(pickle.dumps(f))
    assert g.reader._fd >= 0
    assert g.read_example(2) == f.read_example(2)
    np.testing.assert_array_equal(g.labels, labels)
