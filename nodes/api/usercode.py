"""User code: a generation's modules, loaded once, and calling an endpoint.

A generation's modules are imported under private names, with its own directory first on
``sys.path`` while they import, and their helper modules leave ``sys.modules``
afterwards: two versions of the same code live side by side in one worker.  ``load`` is
called once per module with the package directory (where the artifacts are), and an
optional ``warmup`` after it; an endpoint function that takes two arguments gets what
``load`` returned as its second.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import itertools
import math
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import msgspec

from nodes.api.wire import EndpointCode
from protocol.api import http_status
from protocol.base import NESTED_TOO_DEEPLY

_MODULE_IDS = itertools.count(1)
JSON = msgspec.json.Decoder()
FEATURES = msgspec.json.Decoder(dict[str, Any])


def _enc_hook(obj: Any) -> Any:
    # numpy scalars and arrays, and anything else that knows how to be a list/number.
    for attr in ("tolist", "item"):
        fn = getattr(obj, attr, None)
        if callable(fn):
            return fn()
    raise TypeError(f"{type(obj).__name__} is not JSON-serializable")


_ENCODE = msgspec.json.Encoder(enc_hook=_enc_hook).encode


def encode_result(value: Any, name: str = "result") -> bytes:
    """``value`` as JSON; ``Failed`` (``bad_result``) if it holds NaN or an infinity.

    msgspec writes a non-finite float as ``null``, so a model's NaN would reach the client
    as a 200 that lies; JSON has no such numbers, so such a result is refused.  The check
    walks the value (dicts, lists, tuples, numpy values) only when the encoded text has a
    ``null`` in it, so a result without one costs a substring search."""
    data = _ENCODE(value)
    if b"null" in data:
        where = _non_finite(value, name)
        if where is not None:
            raise Failed("bad_result", f"the result is not valid JSON: {where} is not a "
                                       "finite number (JSON has no NaN or infinity)")
    return data


def _non_finite(value: Any, path: str, depth: int = 0) -> str | None:
    """Where ``value`` holds a NaN or an infinity (a path like ``result.probas[2]``)."""
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{path} ({value})"
    if depth > 200:
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            found = _non_finite(v, f"{path}.{k}", depth + 1)
            if found:
                return found
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            found = _non_finite(v, f"{path}[{i}]", depth + 1)
            if found:
                return found
    elif not isinstance(value, (str, int, bytes)) and value is not None:
        tolist = getattr(value, "tolist", None) or getattr(value, "item", None)
        if callable(tolist):  # numpy arrays and scalars, as the encoder sees them
            return _non_finite(tolist(), path, depth + 1)
    return None


class Failed(Exception):
    """A request refused (or a result rejected) with an error code; the HTTP status is
    the code's, from ``protocol.api.HTTP_STATUS``."""

    def __init__(self, code: str, message: str) -> None:
        self.status, self.code, self.message = http_status(code), code, message
        super().__init__(message)


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
    """One loaded version of one service: its endpoints, ready to call."""

    def __init__(self, service: str, name: str, directory: Path,
                 endpoints: list[EndpointCode]) -> None:
        self.name = name
        self.endpoints: dict[str, Endpoint] = {}
        self.tag = f'"{name}"'.encode()
        modules: dict[str, tuple[ModuleType, Any]] = {}
        root = str(directory)
        before = set(sys.modules)
        sys.path.insert(0, root)
        try:
            for ep_name, kind, code, function in (msgspec.structs.astuple(e)
                                                  for e in endpoints):
                if code not in modules:
                    module = self._import(service, directory, code, len(modules))
                    model = None
                    load = getattr(module, "load", None)
                    if callable(load):
                        model = _call_optional(load, directory)
                    warm = getattr(module, "warmup", None)
                    if callable(warm):
                        _call_optional(warm, model)
                    modules[code] = (module, model)
                module, model = modules[code]
                fn = getattr(module, function, None)
                if not callable(fn):
                    raise AttributeError(f"{code} defines no function {function!r} "
                                         f"(endpoint {ep_name})")
                self.endpoints[ep_name] = Endpoint(kind, fn, model, _takes_model(fn))
        finally:
            with contextlib.suppress(ValueError):
                sys.path.remove(root)
            # Helpers this version imported stay referenced by its modules, but leave
            # sys.modules, so the next version imports its own copies.
            for name in set(sys.modules) - before:
                file = getattr(sys.modules[name], "__file__", None) or ""
                if file.startswith(root):
                    del sys.modules[name]

    @staticmethod
    def _import(service: str, directory: Path, code: str, i: int) -> ModuleType:
        path = directory / code
        name = f"sy_api_{service}_{next(_MODULE_IDS)}_{i}".replace("-", "_")
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot import {code}")
        module = importlib.util.module_from_spec(spec)
        old_path = list(sys.path)
        sys.path.insert(0, str(path.parent))
        try:
            spec.loader.exec_module(module)
        finally:
            sys.path[:] = old_path
        return module


def _strip_generation(body: bytes) -> bytes:
    return body[:body.rfind(b',"generation":')]


def _features(raw: bytes) -> dict[str, Any]:
    try:
        return FEATURES.decode(raw)
    except msgspec.DecodeError as exc:
        raise Failed("bad_request", f"features: {exc}; expected a JSON object of "
                                    "feature values") from None
    except RecursionError:
        raise Failed("bad_request", f"features: {NESTED_TOO_DEEPLY}") from None


def _result(value: Any) -> Any:
    return value if isinstance(value, dict) else {"prediction": value}



OP_PREDICT, OP_MULTI, OP_RUN = 0, 1, 2


def call(gen: Generation, endpoint: str, op: int, payload: Any) -> bytes:
    """Run one request; the reply body (JSON).  Raises ``Failed`` for a bad request,
    anything else for a failure of user code."""
    ep = gen.endpoints.get(endpoint)
    if ep is None:
        raise Failed("not_found", f"generation {gen.name} has no endpoint {endpoint!r}")
    tag = gen.tag
    if op == OP_PREDICT:
        return b'{"result":' + encode_result(_result(ep.call(_features(payload)))) + \
            b',"generation":' + tag + b"}"
    if op == OP_MULTI:
        parts = []
        for i, raw in enumerate(payload):
            try:
                parts.append(encode_result(_result(ep.call(_features(raw)))))
            except Failed as exc:
                raise Failed(exc.code, f"items[{i}]: {exc.message}") from None
        return b'{"results":[' + b",".join(parts) + b'],"generation":' + tag + b"}"
    try:
        arg = JSON.decode(payload)
    except msgspec.DecodeError as exc:
        raise Failed("bad_request", f"malformed JSON body: {exc}; expected any JSON "
                                    "value") from None
    except RecursionError:
        raise Failed("bad_request", f"malformed JSON body: {NESTED_TOO_DEEPLY}") from None
    return b'{"response":' + encode_result(ep.call(arg), "response") + b',"generation":' + \
        tag + b"}"


def same_result(a: bytes, b: bytes) -> bool:
    """Two reply bodies equal but for the generation that made them (shadow checks)."""
    return _strip_generation(a) == _strip_generation(b)
