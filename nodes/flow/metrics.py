"""Dataset metrics and checks.

Built-in metrics: ``size_bytes`` (a directory: the sum of its files, plus
``file_count``) and, for ``.csv``/``.tsv`` files, ``row_count`` (data records, not the
header; blank lines ignored; quoted newlines handled), measured by
``nodes.sandbox.measure`` (the job process measures its outputs with it).  Recipes add
their own with ``ctx.metric``.

Metrics persist beside the data in ``<data_dir>/.shipyard/metrics/<dataset>.json``,
stamped with the file's mtime and size: a later check step reads them without
rebuilding, and a dataset changed behind the engine's back (edited by hand, re-seeded)
gets its built-in metrics measured again (its custom ones are dropped: they described
other data).

Blocking functions: callers run them in worker threads or in the job process.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import msgspec

from nodes.flow.results import CheckResult, CheckStatus, Metrics, Number
from nodes.project.manifest import Check
from nodes.sandbox.measure import count_rows as count_rows
from nodes.sandbox.measure import measure as measure

METRICS_DIR = Path(".shipyard") / "metrics"
BUILTIN = ("row_count", "size_bytes", "file_count")


class Stamp(msgspec.Struct, frozen=True):
    mtime_ns: int
    size: int


class Sidecar(msgspec.Struct, frozen=True, kw_only=True):
    dataset: str
    stamp: Stamp
    metrics: Metrics
    updated_at: float
    recipe: str = ""
    env: str = ""  # the code environment (its interpreter) that wrote it; "" builtin


_sidecar = msgspec.json.Decoder(Sidecar)


def stamp(path: Path) -> Stamp | None:
    """mtime and size of a dataset (a directory: its newest file and total size)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    if not path.is_dir():
        return Stamp(st.st_mtime_ns, st.st_size)
    newest, total = st.st_mtime_ns, 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(FileNotFoundError):
                s = os.stat(os.path.join(root, f))
                newest, total = max(newest, s.st_mtime_ns), total + s.st_size
    return Stamp(newest, total)


def sidecar_path(data_dir: Path, dataset: str) -> Path:
    return data_dir / METRICS_DIR / f"{dataset}.json"


def save_metrics(data_dir: Path, dataset: str, path: Path, metrics: Metrics, *,
                 recipe: str = "", env: str = "") -> Metrics:
    """Persist ``metrics`` for the dataset now at ``path``; returns them."""
    st = stamp(path)
    if st is None:
        return metrics
    target = sidecar_path(data_dir, dataset)
    target.parent.mkdir(parents=True, exist_ok=True)
    body = msgspec.json.encode(Sidecar(dataset=dataset, stamp=st, metrics=metrics,
                                       updated_at=time.time(), recipe=recipe, env=env))
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_bytes(body)
    os.replace(tmp, target)
    return metrics


def built_in_env(data_dir: Path, dataset: str) -> str:
    """The code environment the dataset was last written in (``""``: the builtin one,
    or not recorded)."""
    try:
        return _sidecar.decode(sidecar_path(data_dir, dataset).read_bytes()).env
    except (FileNotFoundError, msgspec.DecodeError):
        return ""


def load_metrics(data_dir: Path, dataset: str, path: Path) -> Metrics:
    """The metrics of the dataset at ``path``: the persisted ones while they describe
    the current file, else freshly measured built-in ones (persisted again)."""
    st = stamp(path)
    if st is None:
        return {}
    try:
        side = _sidecar.decode(sidecar_path(data_dir, dataset).read_bytes())
    except (FileNotFoundError, msgspec.DecodeError):
        side = None
    if side is not None and side.stamp == st:
        return dict(side.metrics)
    return save_metrics(data_dir, dataset, path, measure(path))


def _fmt(v: Number | None) -> str:
    if v is None:
        return "?"
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def evaluate(dataset: str, check: Check, metrics: Metrics, *, present: bool = True,
             ) -> CheckResult:
    """One check against a dataset's metrics: ERROR on a hard bound, WARNING on a soft
    one, EMPTY when the metric has no value, else OK."""
    value = metrics.get(check.metric)
    name = f"{dataset}.{check.metric}"
    if value is None:
        why = "dataset not found" if not present else "metric never recorded"
        return CheckResult(dataset=dataset, metric=check.metric, status=CheckStatus.EMPTY,
                           message=f"{name} has no value ({why})", check=check)
    for bound, status, op in ((check.min, CheckStatus.ERROR, "min"),
                              (check.max, CheckStatus.ERROR, "max"),
                              (check.soft_min, CheckStatus.WARNING, "soft_min"),
                              (check.soft_max, CheckStatus.WARNING, "soft_max")):
        if bound is None:
            continue
        low = op.endswith("min")
        if (value < bound) if low else (value > bound):
            sign = "<" if low else ">"
            return CheckResult(dataset=dataset, metric=check.metric, status=status,
                               value=value, check=check,
                               message=f"{name} = {_fmt(value)} {sign} {op} {_fmt(bound)}")
    lo = max((b for b in (check.min, check.soft_min) if b is not None), default=None)
    hi = min((b for b in (check.max, check.soft_max) if b is not None), default=None)
    within = f"[{_fmt(lo) if lo is not None else '-inf'}, {_fmt(hi) if hi is not None else 'inf'}]"
    return CheckResult(dataset=dataset, metric=check.metric, status=CheckStatus.OK,
                       value=value, check=check, message=f"{name} = {_fmt(value)} in {within}")
