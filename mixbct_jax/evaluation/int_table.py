"""Whitespace-separated integer tables read at memory speed (IJB-C's 15.66M-line, 233 MB pair list).

`np.fromfile(path, sep=" ")` parses one number at a time in C (≈ 8 s for IJB-C's pair file on two cores). Here
the bytes are read at once and parsed with array operations on chunks that end at a line break: digits are
found by a byte comparison, numbers are assembled digit column by digit column (Horner's rule over at most as
many passes as the longest number has digits), and each line's field count is checked from the line breaks.
"""

from __future__ import annotations

import os

import numpy as np

_CHUNK_BYTES = 1 << 23  # 8 MiB of text per chunk: its int64 temporaries stay within a few tens of MiB
_MAX_DIGITS = 18  # int64 holds every 18-digit number


def read_int_table(path: str | os.PathLike, ncols: int) -> np.ndarray:
    """int64 [lines, ncols] from a text file of non-negative integers separated by spaces or tabs.

    Blank lines are skipped; a line with another field count, a byte that is not a digit or whitespace (a sign,
    a decimal point, a letter), or a number of more than 18 digits stops with a ValueError naming the file and
    the line.
    """
    path = os.fspath(path)
    data = np.fromfile(path, dtype=np.uint8)
    parts, line0, start = [], 1, 0
    while start < data.size:
        stop = min(start + _CHUNK_BYTES, data.size)
        if stop < data.size:  # end the chunk after a line break; a line longer than a chunk takes the rest
            breaks = np.flatnonzero(data[stop:] == 10)
            stop = stop + int(breaks[0]) + 1 if breaks.size else data.size
        rows, lines = _parse_chunk(data[start:stop], ncols, path, line0)
        parts.append(rows)
        line0 += lines
        start = stop
    table = np.concatenate(parts) if parts else np.zeros((0, ncols), np.int64)
    if table.shape[0] == 0:
        raise ValueError(f"{path}: empty file, expected lines of {ncols} integers")
    return table


def _parse_chunk(text: np.ndarray, ncols: int, path: str, line0: int) -> tuple[np.ndarray, int]:
    """(int64 [rows, ncols], number of line breaks) of one chunk whose first line is file line `line0`."""
    digit_value = text - np.uint8(48)  # wraps below '0'
    is_digit = digit_value < 10
    newline = text == 10
    space = (text == 32) | (text == 9) | (text == 13) | newline
    bad = ~(is_digit | space)
    if bad.any():
        at = int(np.argmax(bad))
        char = bytes(text[at : at + 1]).decode("latin-1")
        raise ValueError(
            f"{path}:{line0 + int(np.count_nonzero(newline[:at]))}: {char!r} where a non-negative integer was "
            f"expected; the file must hold {ncols} integers per line, separated by spaces"
        )
    edge = np.diff(is_digit.view(np.int8), prepend=np.int8(0), append=np.int8(0))
    starts = np.flatnonzero(edge == 1)  # first digit of each number
    lengths = np.flatnonzero(edge == -1) - starts
    if lengths.size and lengths.max() > _MAX_DIGITS:
        at = int(starts[np.argmax(lengths)])
        raise ValueError(
            f"{path}:{line0 + int(np.count_nonzero(newline[:at]))}: a number of more than {_MAX_DIGITS} digits"
        )
    values = np.zeros(starts.size, np.int64)
    for j in range(int(lengths.max()) if lengths.size else 0):
        more = lengths > j
        pos = np.minimum(starts + j, text.size - 1)
        values = np.where(more, values * 10 + digit_value[pos], values)

    # Field count per line: the line of each number is the number of line breaks before it.
    line_of = np.cumsum(newline)[starts] if starts.size else starts
    per_line = np.bincount(line_of, minlength=1)
    wrong = np.flatnonzero((per_line != 0) & (per_line != ncols))
    if wrong.size:
        line = int(wrong[0])
        raise ValueError(f"{path}:{line0 + line}: expected {ncols} integers per line, got {int(per_line[line])}")
    return values.reshape(-1, ncols), int(np.count_nonzero(newline))
