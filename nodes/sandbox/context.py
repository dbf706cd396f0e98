"""What user code sees: the ``ctx`` passed to a recipe's or a script's ``run(ctx)``.

A recipe::

    def run(ctx):
        rows = ctx.inputs["raw"].read_text().splitlines()
        ctx.log.info("read %d lines", len(rows), source="raw")
        ctx.outputs["clean"].write_text("\\n".join(r for r in rows if r) + "\\n")
        ctx.metric("dropped", 3)

``ctx.outputs`` are temporary paths beside the real ones: they replace the real
datasets only when ``run`` returns, so a failing recipe never leaves half a file behind.
Log lines (and anything printed) go to the run's log.  Built in the job process, in the
user's interpreter: standard library only.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any


class RecipeLog:
    """``ctx.log``: stdlib-style (``"%d rows", n``) and structlog-style (``rows=n``)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def _emit(self, level: str, msg: object, args: tuple[Any, ...], kw: dict[str, Any]) -> None:
        text = str(msg)
        if args:
            try:
                text = text % args
            except (TypeError, ValueError):
                text = " ".join([text, *map(str, args)])
        if kw:
            text += " " + " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}"
                                   for k, v in kw.items())
        print(f"{level} {text}", file=sys.stderr, flush=True)

    def debug(self, msg: object, *args: Any, **kw: Any) -> None:
        self._emit("DEBUG", msg, args, kw)

    def info(self, msg: object, *args: Any, **kw: Any) -> None:
        self._emit("INFO", msg, args, kw)

    def warning(self, msg: object, *args: Any, **kw: Any) -> None:
        self._emit("WARNING", msg, args, kw)

    warn = warning

    def error(self, msg: object, *args: Any, **kw: Any) -> None:
        self._emit("ERROR", msg, args, kw)

    def __call__(self, msg: object, *args: Any, **kw: Any) -> None:
        self._emit("INFO", msg, args, kw)


class _Base:
    def __init__(self, *, name: str, params: dict[str, Any], data_dir: Path,
                 code_dir: Path) -> None:
        self.name = name
        self.params = params
        self.data_dir = data_dir
        self.code_dir = code_dir
        self.log = RecipeLog(name)
        self.metrics: dict[str, dict[str, int | float]] = {}

    def _record(self, dataset: str, name: str, value: int | float) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"metric {name!r}: expected a number, got {type(value).__name__}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"metric {name!r}: expected a finite number, got {value}")
        self.metrics.setdefault(dataset, {})[str(name)] = value


class RecipeContext(_Base):
    """``ctx`` of a recipe: ``inputs``/``outputs`` (dataset name -> Path), ``params``,
    ``log``, ``metric()``."""

    def __init__(self, *, inputs: dict[str, Path], outputs: dict[str, Path],
                 **kw: Any) -> None:
        super().__init__(**kw)
        self.inputs = inputs
        self.outputs = outputs

    def metric(self, name: str, value: int | float, dataset: str | None = None) -> None:
        """Record metric ``name`` on an output dataset; ``dataset`` is needed only when
        the recipe has several outputs.  Raises ``ValueError``/``TypeError``."""
        if dataset is None:
            if len(self.outputs) != 1:
                raise ValueError(f"recipe {self.name!r} has several outputs "
                                 f"({', '.join(self.outputs)}): pass dataset=")
            dataset = next(iter(self.outputs))
        elif dataset not in self.outputs:
            raise ValueError(f"metric {name!r}: {dataset!r} is not an output of recipe "
                             f"{self.name!r} (outputs: {', '.join(self.outputs)})")
        self._record(dataset, name, value)


class ScriptContext(_Base):
    """``ctx`` of a scenario's python step: ``params``, ``log``, ``metric()`` (recorded
    on the step), and ``datasets`` (every dataset's path, to read)."""

    def __init__(self, *, datasets: dict[str, Path], **kw: Any) -> None:
        super().__init__(**kw)
        self.datasets = datasets

    def metric(self, name: str, value: int | float) -> None:
        self._record(self.name, name, value)
