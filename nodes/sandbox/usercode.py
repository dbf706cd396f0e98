"""API user code: a generation's modules, loaded once, and calling an endpoint.

One implementation for both places API user code runs: the API worker itself (the
builtin environment, ``nodes.api.usercode``, with msgspec as its JSON codec) and a
user-code host in a code environment's interpreter (``apihost``, with the standard
library's ``json``).  So reply bodies, error codes and the conventions below are the
same wherever an endpoint runs.

A generation's modules are imported under private names, with its own directory first on
``sys.path`` while they import and load (two generations with a helper module of the
same name one after the other: ``sys.path`` and ``sys.modules`` belong to the process),
and their helper modules leave ``sys.modules`` afterwards: two versions of the same code
live side by side in one process.  ``load``
is called once per module with the package directory (where the artifacts are), while
the version's helpers are still importable (a lazy import, or a pickled model whose
classes live beside it, finds them), and an optional ``warmup`` after it; an endpoint
function that takes two arguments gets what ``load`` returned as its second.

Standard library only (it runs in user environments).
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import itertools
import json
import math
import re
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from .tracebacks import user_traceback

_MODULE_IDS = itertools.count(1)
# ``sys.path`` and ``sys.modules`` belong to the process, and generations load on
# threads (two services switching at once): two generations whose code has a module of
# the same name (``helpers``, ``utils``, two versions of one service) import and load one
# after the other, or each would find the other's; others load side by side.  A lock per
# module name, created on first use, never dropped (a few per distinct name).
_NAME_LOCKS: dict[str, threading.Lock] = {}
_NAME_LOCKS_GUARD = threading.Lock()
OP_PREDICT, OP_MULTI, OP_RUN = 0, 1, 2
NESTED_TOO_DEEPLY = "JSON nested too deeply (at most about 1,000 levels)"  # protocol.base


class Refused(Exception):
    """A request refused (or a result rejected) with an error code (``bad_request``,
    ``bad_result``, ``not_found``); shipyard maps the code to an HTTP status."""

    def __init__(self, code: str, message: str) -> None:
        self.code, self.message = code, message
        super().__init__(message)


class Codec(Protocol):
    """JSON both ways.  ``features``/``value`` raise ``Refused("bad_request")``;
    ``encode`` raises ``Refused("bad_result")`` for NaN or an infinity."""

    def features(self, raw: bytes) -> dict[str, Any]: ...

    def value(self, raw: bytes) -> Any: ...

    def encode(self, value: Any, name: str = "result") -> bytes: ...


def enc_hook(obj: Any) -> Any:
    """numpy scalars and arrays, and anything else that knows how to be a list/number."""
    for attr in ("tolist", "item"):
        fn = getattr(obj, attr, None)
        if callable(fn):
            return fn()
    raise TypeError(f"{type(obj).__name__} is not JSON-serializable")


def non_finite(value: Any, path: str, depth: int = 0) -> str | None:
    """Where ``value`` holds a NaN or an infinity (a path like ``result.probas[2]``)."""
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{path} ({value})"
    if depth > 200:
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            found = non_finite(v, f"{path}.{k}", depth + 1)
            if found:
                return found
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            found = non_finite(v, f"{path}[{i}]", depth + 1)
            if found:
                return found
    elif not isinstance(value, (str, int, bytes)) and value is not None:
        tolist = getattr(value, "tolist", None) or getattr(value, "item", None)
        if callable(tolist):  # numpy arrays and scalars, as the encoder sees them
            return non_finite(tolist(), path, depth + 1)
    return None


def not_finite(where: str) -> Refused:
    return Refused("bad_result", f"the result is not valid JSON: {where} is not a finite "
                                 "number (JSON has no NaN or infinity)")


_HAS_EXPONENT = re.compile(rb"\de[-+]").search
_EXPONENT = re.compile(rb'"(?:[^"\\]|\\.)*"|(-?)(\d)(?:\.(\d+))?e([-+]\d+)')


def _msgspec_float(m: re.Match[bytes]) -> bytes:
    """A float Python wrote with an exponent (``1e+16``, ``2.5e-05``), as msgspec writes
    it (``1e16``, ``0.000025``): msgspec keeps decimal notation down to 1e-5, and writes
    exponents bare.  Strings (group 0 without group 2) are left alone."""
    if m.group(2) is None:
        return m.group(0)
    sign, first, rest, exp = m.group(1), m.group(2), m.group(3) or b"", int(m.group(4))
    if exp == -5:
        return sign + b"0.0000" + first + rest
    return sign + first + (b"." + rest if rest else b"") + b"e" + str(exp).encode()


class JsonCodec:
    """The standard library's ``json``, writing what msgspec writes (compact, UTF-8,
    msgspec's float notation)."""

    _encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False,
                               default=enc_hook).encode

    def features(self, raw: bytes) -> dict[str, Any]:
        value = self.value(raw)
        if not isinstance(value, dict):
            raise Refused("bad_request", "features: expected a JSON object of feature "
                                         "values")
        return value

    def value(self, raw: bytes) -> Any:
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise Refused("bad_request", f"malformed JSON body: {exc}; expected any JSON "
                                         "value") from None
        except RecursionError:
            raise Refused("bad_request", f"malformed JSON body: {NESTED_TOO_DEEPLY}") \
                from None

    def encode(self, value: Any, name: str = "result") -> bytes:
        try:
            data = self._encode(value).encode()
        except ValueError:
            where = non_finite(value, name)
            if where is None:
                raise
            raise not_finite(where) from None
        if b"e" in data and _HAS_EXPONENT(data):
            data = _EXPONENT.sub(_msgspec_float, data)
        return data


class Endpoint:
    def __init__(self, kind: str, fn: Callable[..., Any], model: Any, with_model: bool) -> None:
        self.kind = kind
        self.fn = fn
        self.model = model
        self.with_model = with_model

    def call(self, arg: Any) -> Any:
        return self.fn(arg, self.model) if self.with_model else self.fn(arg)


def _takes_model(fn: Callable[..., Any]) -> bool:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)


def _call_optional(fn: Callable[..., Any], *args: Any) -> Any:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return fn(*args)
    return fn(*args[:len(params)]) if params else fn()


class Generation:
    """One loaded version of one service: its endpoints, ready to call.  ``endpoints``:
    (name, kind, code file, function) each."""

    def __init__(self, service: str, name: str, directory: Path,
                 endpoints: Sequence[Sequence[str]]) -> None:
        self.name = name
        self.endpoints: dict[str, Endpoint] = {}
        self.tag = f'"{name}"'.encode()
        modules: dict[str, ModuleType] = {}
        models: dict[str, Any] = {}
        codes = {directory / code for _, _, code, _ in endpoints}
        helpers = _module_names({directory, *(c.parent for c in codes)}, besides=codes)
        with _holding(helpers):
            root = str(directory)
            before = set(sys.modules)
            sys.path.insert(0, root)
            try:
                for _, _, code, _ in endpoints:
                    if code not in modules:
                        modules[code] = self._import(service, directory, code, len(modules))
                # load() and warmup() run while the version's helpers are importable: a
                # load that imports lazily, or unpickles a model whose classes live beside
                # it, finds this version's modules.
                for code, module in modules.items():
                    with _on_path(str((directory / code).parent)):
                        models[code] = self._load(module, directory)
            finally:
                with contextlib.suppress(ValueError):
                    sys.path.remove(root)
                # Helpers this version imported stay referenced by its modules, but leave
                # sys.modules, so the next version imports its own copies.
                for name in set(sys.modules) - before:
                    file = getattr(sys.modules[name], "__file__", None) or ""
                    if file.startswith(root):
                        del sys.modules[name]
        for ep_name, kind, code, function in endpoints:
            fn = getattr(modules[code], function, None)
            if not callable(fn):
                raise AttributeError(f"{code} defines no function {function!r} "
                                     f"(endpoint {ep_name})")
            self.endpoints[ep_name] = Endpoint(kind, fn, models[code], _takes_model(fn))

    @staticmethod
    def _load(module: ModuleType, directory: Path) -> Any:
        """``load(directory)`` then ``warmup(model)``, where the module defines them."""
        model = None
        load = getattr(module, "load", None)
        if callable(load):
            model = _call_optional(load, directory)
        warm = getattr(module, "warmup", None)
        if callable(warm):
            _call_optional(warm, model)
        return model

    @staticmethod
    def _import(service: str, directory: Path, code: str, i: int) -> ModuleType:
        path = directory / code
        name = f"sy_api_{service}_{next(_MODULE_IDS)}_{i}".replace("-", "_")
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot import {code}")
        module = importlib.util.module_from_spec(spec)
        with _on_path(str(path.parent)):
            spec.loader.exec_module(module)
        return module


@contextlib.contextmanager
def _on_path(folder: str) -> Iterator[None]:
    """``folder`` first on ``sys.path`` for the block (user code imports its neighbours).
    Removed by value, not by restoring a copy: another generation may be loading."""
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(folder)


def _module_names(folders: Iterable[Path], besides: set[Path]) -> set[str]:
    """The top-level names the modules and packages in ``folders`` can be imported as,
    but the endpoint files ``besides`` (imported under private names).  A folder without
    ``__init__.py`` (``api/``, ``models/``: in every package) is left out."""
    names: set[str] = set()
    for folder in folders:
        with contextlib.suppress(OSError):
            for entry in folder.iterdir():
                name = entry.name.split(".", 1)[0]
                if not name.isidentifier() or entry in besides:
                    continue
                if (entry.suffix in _MODULE_SUFFIXES and entry.is_file()) or (
                        entry.is_dir() and (entry / "__init__.py").is_file()):
                    names.add(name)
    return names


_MODULE_SUFFIXES = frozenset({".py", ".pyc", ".so", ".pyd"})


@contextlib.contextmanager
def _holding(names: Iterable[str]) -> Iterator[None]:
    """Hold the lock of each module name, taken in sorted order (no two holders wait on
    each other)."""
    with _NAME_LOCKS_GUARD:
        locks = [_NAME_LOCKS.setdefault(n, threading.Lock()) for n in sorted(set(names))]
    with contextlib.ExitStack() as held:
        for lock in locks:
            held.enter_context(lock)
        yield


def _result(value: Any) -> Any:
    return value if isinstance(value, dict) else {"prediction": value}


def call(gen: Generation, endpoint: str, op: int, payload: Any, codec: Codec) -> bytes:
    """Run one request; the reply body (JSON).  ``payload``: the features (predict), a
    list of them (multi) or the body (run), as raw JSON.  Raises ``Refused`` for a bad
    request or result, anything else for a failure of user code."""
    ep = gen.endpoints.get(endpoint)
    if ep is None:
        raise Refused("not_found", f"generation {gen.name} has no endpoint {endpoint!r}")
    tag = gen.tag
    encode = codec.encode
    if op == OP_PREDICT:
        return b'{"result":' + encode(_result(ep.call(codec.features(payload)))) + \
            b',"generation":' + tag + b"}"
    if op == OP_MULTI:
        parts = []
        for i, raw in enumerate(payload):
            try:
                parts.append(encode(_result(ep.call(codec.features(raw)))))
            except Refused as exc:
                raise Refused(exc.code, f"items[{i}]: {exc.message}") from None
        return b'{"results":[' + b",".join(parts) + b'],"generation":' + tag + b"}"
    return b'{"response":' + encode(ep.call(codec.value(payload)), "response") + \
        b',"generation":' + tag + b"}"


def describe(exc: BaseException, debug: bool) -> str:
    """How a failure of user code reads in an error reply."""
    message = f"{type(exc).__name__}: {exc}".rstrip(": ")
    if debug:
        message += "\n" + user_traceback(exc)
    return message
