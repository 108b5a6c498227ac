"""evaluation.int_table.read_int_table against NumPy's own text parser, and its one-line errors."""

import numpy as np
import pytest

from mixbct_jax.evaluation import int_table


def test_matches_numpy_parser_across_chunks(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    table = np.stack([rng.integers(0, 200_000, 5000), rng.integers(0, 10**17, 5000), rng.integers(0, 2, 5000)], axis=1)
    table[:3] = [[0, 7, 1], [10, 0, 0], [999_999_999_999_999_999, 5, 1]]  # zeros and the 18-digit maximum
    lines = [" ".join(map(str, row)) for row in table]
    lines[10] = lines[10].replace(" ", "\t") + "\r"  # tabs and a Windows line end
    lines[20] = "  " + lines[20] + "  "  # leading and trailing spaces
    lines.insert(30, "")  # a blank line
    path = tmp_path / "pairs.txt"
    path.write_text("\n".join(lines))  # no line break after the last line
    monkeypatch.setattr(int_table, "_CHUNK_BYTES", 1000)  # many chunks, each cut after a line break
    out = int_table.read_int_table(path, 3)
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, table)
    np.testing.assert_array_equal(out, np.loadtxt(path, dtype=np.int64))


@pytest.mark.parametrize(
    "text, message",
    [
        ("1 2 1\n3 4\n", r"pairs.txt:2: expected 3 integers per line, got 2"),
        ("1 2 1\n\n3 4 0 9\n", r"pairs.txt:3: expected 3 integers per line, got 4"),
        ("1 2 1\n3 -4 0\n", r"pairs.txt:2: '-' where a non-negative integer"),
        ("1 2 1\n3 4 0.5\n", r"pairs.txt:2: '\.' where a non-negative integer"),
        ("1 2 1\n3 1234567890123456789 0\n", r"pairs.txt:2: a number of more than 18 digits"),
        ("\n\n", r"pairs.txt: empty file"),
    ],
)
def test_bad_lines_are_named(tmp_path, text, message):
    path = tmp_path / "pairs.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        int_table.read_int_table(path, 3)


def test_line_numbers_count_across_chunks(tmp_path, monkeypatch):
    path = tmp_path / "pairs.txt"
    path.write_text("".join(f"{i} {i + 1} 0\n" for i in range(500)) + "7 8\n")
    monkeypatch.setattr(int_table, "_CHUNK_BYTES", 64)
    with pytest.raises(ValueError, match=r"pairs.txt:501: expected 3 integers per line, got 2"):
        int_table.read_int_table(path, 3)
