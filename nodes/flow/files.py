"""Dataset files: freshness, temporary outputs, atomic commits, seeding.

All blocking; the engine calls these from worker threads.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from nodes.flow.metrics import stamp


@dataclass(frozen=True)
class Freshness:
    up_to_date: bool
    missing_inputs: list[str]
    reason: str


def freshness(inputs: dict[str, Path], outputs: dict[str, Path], code: Path) -> Freshness:
    """make's rule: up to date when every output exists and none is older than any
    input or the code file."""
    missing = [name for name, p in inputs.items() if not p.exists()]
    if missing:
        return Freshness(False, missing, "input missing")
    out_stamps = {name: stamp(p) for name, p in outputs.items()}
    absent = [name for name, s in out_stamps.items() if s is None]
    if absent:
        return Freshness(False, [], f"output {', '.join(absent)} missing")
    oldest = min(s.mtime_ns for s in out_stamps.values() if s is not None)
    newer = [name for name, p in inputs.items()
             if (s := stamp(p)) is not None and s.mtime_ns > oldest]
    if newer:
        return Freshness(False, [], f"input {', '.join(newer)} changed")
    code_stamp = stamp(code)
    if code_stamp is not None and code_stamp.mtime_ns > oldest:
        return Freshness(False, [], "code changed")
    return Freshness(True, [], "up to date")


def temp_outputs(outputs: dict[str, Path]) -> dict[str, Path]:
    """A temporary path beside each output (same directory, so the final rename is
    atomic; same suffix, so libraries that go by extension write the right format).
    Creates the directories."""
    token = secrets.token_hex(4)
    temps = {}
    for name, p in outputs.items():
        p.parent.mkdir(parents=True, exist_ok=True)
        stem = p.name[: -len("".join(p.suffixes))] if p.suffixes else p.name
        temps[name] = p.with_name(f".{stem or p.name}.sy-tmp-{token}{''.join(p.suffixes)}")
    return temps


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def commit(temps: dict[str, Path], outputs: dict[str, Path]) -> None:
    """Move each temporary output into place with an atomic rename.  A directory
    output replaces the old directory (moved aside first, then removed)."""
    for name, tmp in temps.items():
        final = outputs[name]
        if tmp.is_dir() and final.is_dir() and not final.is_symlink():
            old = final.with_name(f".{final.name}.sy-old-{secrets.token_hex(4)}")
            os.replace(final, old)
            os.replace(tmp, final)
            remove(old)
        else:
            if final.is_dir() and not final.is_symlink():
                remove(final)
            os.replace(tmp, final)


def discard(temps: dict[str, Path]) -> None:
    for tmp in temps.values():
        remove(tmp)


def seed(datasets: dict[str, Path], seed_dir: Path, data_dir: Path) -> list[str]:
    """Copy each shipped dataset (name -> path relative to both dirs) from
    ``seed_dir`` into ``data_dir`` where ``data_dir`` does not have it yet.  Keeps
    mtimes, so what was up to date when shipped is up to date here.  Returns the
    names copied."""
    copied = []
    for name, rel in datasets.items():
        src, dst = seed_dir / rel, data_dir / rel
        if dst.exists() or not src.exists():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.sy-seed-{secrets.token_hex(4)}")
        try:
            if src.is_dir():
                shutil.copytree(src, tmp)
            else:
                shutil.copy2(src, tmp)
            os.replace(tmp, dst)
        except BaseException:
            remove(tmp)
            raise
        copied.append(name)
    return copied
