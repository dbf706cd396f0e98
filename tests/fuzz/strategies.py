"""Hypothesis strategies for junk: raw bytes, hostile JSON, and mutated messages.

Messages are generated from the msgspec type information of the protocol's Structs
(``msgspec.inspect``), so a new message type or field is fuzzed without a change here.
Values are plain Python data serialised by ``dump``, which can also write what JSON
encoders refuse to: ``NaN`` and ``Infinity`` tokens, numbers out of every range, nesting
thousands deep, strings that are not valid UTF-8.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import pkgutil
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
from hypothesis import strategies as st
from msgspec import inspect as mi

import protocol
from protocol.base import Message


@dataclass(frozen=True)
class Raw:
    """Bytes written into a JSON document as they are."""

    data: bytes


def dump(value: Any) -> bytes:
    """JSON-ish bytes for ``value``: ``Raw`` verbatim, lone surrogates as invalid UTF-8."""
    if isinstance(value, Raw):
        return value.data
    if isinstance(value, dict):
        return b"{" + b",".join(dump(str(k)) + b":" + dump(v) for k, v in value.items()) + b"}"
    if isinstance(value, list | tuple):
        return b"[" + b",".join(dump(v) for v in value) + b"]"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return json.dumps(value, allow_nan=True).encode()


# -- leaves ---------------------------------------------------------------------------

SPECIAL_NUMBERS = [b"1e308", b"-1e308", b"1e400", b"-1e400", b"NaN", b"Infinity",
                   b"-Infinity", b"-1", b"-0.0", b"18446744073709551616",
                   b"9223372036854775808", b"-9223372036854775809", b"1" + b"0" * 400,
                   b"0.0000000000000000000000000000000000001e-400"]

BAD_NAMES = ["", "*", ">", ".", " ", "a b", "a.b", "a*", "b>", ".a", "a.", "a..b", "$SYS",
             "ü", "名前", "\x00", "a\nb", "a\tb", "a/b", "\\", "\ud800", "x" * 129,
             "x" * 5000, "y" * 4000 + "." + "z" * 100, "bad name*"]

_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,128}")
valid_names = st.from_regex(r"[A-Za-z0-9_-]{1,24}", fullmatch=True)
bad_names = st.sampled_from(BAD_NAMES) | st.text(min_size=1, max_size=40).filter(
    lambda s: not _TOKEN.fullmatch(s))
special_numbers = st.sampled_from(SPECIAL_NUMBERS).map(Raw)
huge_ints = st.sampled_from([-1, -(2**31), 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64,
                             -(2**63) - 1, 10**30])
odd_floats = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [1e308, -1e308, 5e-324, -0.0, 1e9, 1e15])


@st.composite
def deep_nesting(draw: st.DrawFn) -> Raw:
    """Thousands of ``[`` (or objects, or both), closed or left open."""
    depth = draw(st.integers(200, 6000))
    opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}"),
                                           (b'[{"a":', b"}]"), (b'{"features":', b"}")]))
    inner = draw(st.sampled_from([b"1", b"[]", b"{}", b'"x"', b"NaN"]))
    closed = draw(st.booleans())
    return Raw(opener * depth + inner + (closer * depth if closed else b""))


def names(known: Sequence[str] = ()) -> st.SearchStrategy[str]:
    """Names that are valid, invalid, long, or the names of things that exist."""
    options = [valid_names, bad_names]
    if known:
        options.append(st.sampled_from(list(known)))
    return st.one_of(*options)


finite_floats = st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from(
    [1e308, -1e308, 5e-324, -0.0, -1.0, 1e9, 1e15])
int64s = st.integers(-(2**63), 2**64 - 1) | st.sampled_from(
    [-1, 0, 2**31, 2**53 + 1, 2**63 - 1, 2**64 - 1, -(2**63)])
clean_leaves = (st.none() | st.booleans() | int64s | finite_floats | st.text(max_size=30)
                | bad_names)
json_leaves = clean_leaves | huge_ints | odd_floats | special_numbers


def json_values(max_leaves: int = 12, leaves: st.SearchStrategy[Any] = json_leaves,
                ) -> st.SearchStrategy[Any]:
    return st.recursive(leaves, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=12), inner, max_size=4),
                        max_leaves=max_leaves)


clean_json = json_values(8, clean_leaves)
"""Valid JSON of any shape, with hostile contents (numbers at the edges, odd strings)."""


junk_values = json_values() | deep_nesting()


@st.composite
def invalid_utf8(draw: st.DrawFn) -> bytes:
    bad = draw(st.sampled_from([b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xed\xa0\x80",
                                b"\xf4\x90\x80\x80", b"\xc0\xaf", b"\x80"]))
    where = draw(st.sampled_from(["key", "value", "bare"]))
    if where == "key":
        return b'{"' + bad + b'": 1, "type": "x"}'
    if where == "value":
        return b'{"type": "' + bad + b'", "node": "a' + bad + b'"}'
    return bad + draw(st.binary(max_size=20))


def junk_or(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    """Mostly ``valid`` (serialised), sometimes plain junk bytes."""
    encoded = valid.map(dump)
    return st.one_of(encoded, encoded, encoded, junk_bytes)


junk_bytes: st.SearchStrategy[bytes] = st.one_of(
    st.binary(max_size=512),
    invalid_utf8(),
    junk_values.map(dump),
    st.builds(lambda n: b"[" * n, st.integers(1000, 5000)),
    st.sampled_from(SPECIAL_NUMBERS),
    st.sampled_from([b"", b"{}", b"[]", b"null", b"true", b'""', b"{", b'{"type":']),
)
"""Bytes that are not any message: random, invalid UTF-8, JSON of the wrong shape."""


# -- messages from their types -------------------------------------------------------

@dataclass(frozen=True)
class Context:
    """Names of things that exist (nodes, roles, infras), numbers they use (pids), so
    mutated messages can hit real records and not only unknown ones."""

    names: tuple[str, ...] = ()
    ints: tuple[int, ...] = ()


def _value(t: mi.Type, ctx: Context, depth: int) -> st.SearchStrategy[Any]:
    """Values of type ``t`` as the wire sees it (so they decode), with hostile contents:
    invalid and long names, numbers at the edges of their range.  Values of the wrong
    type come from ``_mutated``."""
    if isinstance(t, mi.StrType):
        return names(ctx.names) | st.text(max_size=20)
    if isinstance(t, mi.BoolType):
        return st.booleans()
    if isinstance(t, mi.IntType):
        known = [st.sampled_from(ctx.ints)] if ctx.ints else []
        return st.one_of(st.integers(0, 10**6), int64s, *known)
    if isinstance(t, mi.FloatType):
        return st.one_of(st.floats(0, 1e4), finite_floats)
    if isinstance(t, mi.NoneType):
        return st.none()
    if isinstance(t, mi.ListType | mi.SetType | mi.FrozenSetType | mi.VarTupleType):
        return st.lists(_value(t.item_type, ctx, depth + 1), max_size=3)
    if isinstance(t, mi.DictType):
        return st.dictionaries(_value(t.key_type, ctx, depth + 1),
                               _value(t.value_type, ctx, depth + 1), max_size=3)
    if isinstance(t, mi.UnionType):
        return st.one_of(*(_value(x, ctx, depth) for x in t.types))
    if isinstance(t, mi.LiteralType):
        return st.sampled_from(list(t.values))
    if isinstance(t, mi.StructType) and depth < 4:
        return _struct(t, ctx, depth + 1)
    if isinstance(t, mi.Metadata):
        return _value(t.type, ctx, depth)
    return clean_json


def _struct(t: mi.StructType, ctx: Context, depth: int) -> st.SearchStrategy[Any]:
    required = {f.encode_name: _value(f.type, ctx, depth) for f in t.fields if f.required}
    optional = {f.encode_name: _value(f.type, ctx, depth) for f in t.fields if not f.required}
    if t.tag_field is not None:
        required[t.tag_field] = st.just(t.tag)
    shaped = st.fixed_dictionaries(required, optional=optional)
    if t.array_like:
        order = [f.encode_name for f in t.fields]
        return shaped.map(lambda d: [d[k] for k in order if k in d])
    return shaped


@functools.cache
def _info(cls: type[Any]) -> mi.Type:
    return mi.type_info(cls)


def well_typed(cls: type[Any], ctx: Context = Context()) -> st.SearchStrategy[Any]:
    """Values shaped like ``cls`` (right field names and types, hostile contents)."""
    return _value(_info(cls), ctx, 0)


@st.composite
def _mutated(draw: st.DrawFn, cls: type[Any], ctx: Context) -> Any:
    value = draw(well_typed(cls, ctx))
    if not isinstance(value, dict) or not value:
        return draw(junk_values)
    key = draw(st.sampled_from(sorted(value)))
    how = draw(st.sampled_from(["wrong", "drop", "extra", "tag"]))
    if how == "wrong":
        value[key] = draw(junk_values)
    elif how == "drop":
        del value[key]
    elif how == "extra":
        value[draw(st.text(max_size=12))] = draw(junk_values)
    else:
        value["type"] = draw(names() | st.sampled_from(list(all_tags())))
    return value


def message(cls: type[Any], ctx: Context = Context()) -> st.SearchStrategy[Any]:
    """A message of type ``cls``: well typed (hostile contents), or with one field wrong,
    missing, added or a wrong tag."""
    typed = well_typed(cls, ctx)
    return st.one_of(typed, typed, _mutated(cls, ctx))  # two in three decode


def envelope(body: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A request envelope around ``body``, its metadata sometimes hostile too."""
    return st.fixed_dictionaries(
        {"body": body, "id": names() | st.text(max_size=20), "ts": odd_floats},
        optional={"sender": names(), "identity": st.none() | names(),
                  "signature": st.none() | st.text(max_size=10),
                  "v": st.integers() | huge_ints | special_numbers},
    ) | st.fixed_dictionaries({"body": body}) | st.fixed_dictionaries(
        {"body": body, "id": junk_values, "ts": junk_values})


# -- the protocol's message types ------------------------------------------------------

@functools.cache
def message_types() -> tuple[type[Message], ...]:
    """Every concrete message type the protocol package defines."""
    for info in pkgutil.iter_modules(protocol.__path__):
        importlib.import_module(f"protocol.{info.name}")
    seen: dict[str, type[Message]] = {}
    stack: list[type[Any]] = [Message]
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        tag = cls.__struct_config__.tag
        if isinstance(tag, str) and cls.__module__.startswith("protocol"):
            seen[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return tuple(seen[k] for k in sorted(seen))


@functools.cache
def all_tags() -> tuple[str, ...]:
    return tuple(sorted({str(c.__struct_config__.tag) for c in message_types()}))


def sample(cls: type[Any]) -> Any:
    """The simplest valid instance of ``cls`` (names "fz", numbers 1)."""
    return msgspec.convert(_simple(_info(cls)), cls)


def _simple(t: mi.Type) -> Any:
    if isinstance(t, mi.StructType):
        out = {f.encode_name: _simple(f.type) for f in t.fields if f.required}
        if t.tag_field is not None:
            out[t.tag_field] = t.tag
        return [out[f.encode_name] for f in t.fields if f.required] if t.array_like else out
    if isinstance(t, mi.UnionType):
        return _simple(next(x for x in t.types if not isinstance(x, mi.NoneType)))
    if isinstance(t, mi.Metadata):
        return _simple(t.type)
    simple: dict[type[Any], Any] = {mi.StrType: "fz", mi.IntType: 1, mi.FloatType: 1.0,
                                    mi.BoolType: False, mi.ListType: [], mi.DictType: {}}
    return simple.get(type(t))


def published_types() -> list[tuple[type[Message], str]]:
    """Message types a node publishes on a plain subject (reports, events), with the
    subject of their simplest instance: those types have a ``subject()`` method."""
    out = []
    for cls in message_types():
        fn = getattr(cls, "subject", None)
        if fn is None or not inspect.isfunction(fn):
            continue
        try:
            out.append((cls, sample(cls).subject()))
        except NotImplementedError:
            continue
    return out


@dataclass(frozen=True)
class Sent:
    """One message of an example: where it goes and its bytes (shown shortened)."""

    subject: str
    payload: bytes
    family: str = ""  # for commands: the role whose family the reply belongs to

    def __repr__(self) -> str:
        data = self.payload
        more = f"...({len(data)} bytes)" if len(data) > 160 else ""
        return f"Sent({self.subject!r}, {data[:160]!r}{more})"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # Hypothesis's printer
        p.text(repr(self))
