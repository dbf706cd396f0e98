"""Built-in dataset metrics, measured in the job process right after a recipe wrote its
outputs: ``size_bytes`` (a directory: the sum of its files, plus ``file_count``) and,
for ``.csv``/``.tsv`` files, ``row_count`` (data records, not the header; blank lines
ignored; quoted newlines handled).  Standard library only (it runs in user
environments); the engine uses the same functions (``nodes.flow.metrics``).
"""

from __future__ import annotations

import contextlib
import csv
import os
from pathlib import Path

CHUNK = 1 << 20


def tree_size(path: Path) -> tuple[int, int, int]:
    """(newest mtime_ns, total size, file count) of a directory and its files."""
    newest, total, count = path.stat().st_mtime_ns, 0, 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            count += 1
            with contextlib.suppress(FileNotFoundError):
                s = os.stat(os.path.join(root, f))
                newest, total = max(newest, s.st_mtime_ns), total + s.st_size
    return newest, total, count


def count_rows(path: Path) -> int:
    """Data records of a CSV/TSV file, without its header."""
    quoted = False
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            if b'"' in chunk:
                quoted = True
                break
    if quoted:
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        with path.open(newline="", encoding="utf-8", errors="replace") as t:
            records = sum(1 for row in csv.reader(t, delimiter=delimiter) if row)
    else:
        with path.open("rb") as f:
            records = sum(1 for line in f if line.strip())
    return max(0, records - 1)


def measure(path: Path) -> dict[str, int | float]:
    """Built-in metrics of the dataset at ``path`` (empty if it does not exist)."""
    if path.is_dir():
        try:
            _newest, total, files = tree_size(path)
        except FileNotFoundError:
            return {}
        return {"size_bytes": total, "file_count": files}
    try:
        out: dict[str, int | float] = {"size_bytes": path.stat().st_size}
    except FileNotFoundError:
        return {}
    if path.suffix.lower() in (".csv", ".tsv"):
        out["row_count"] = count_rows(path)
    return out
