"""Hostile HTTP clients against both HTTP fronts (an API node and a gateway) serving an
echo service: every route, every method, junk and near-valid bodies; and the same junk
straight to the service's NATS subjects (``sy.api.v1.<service>.<endpoint>``).

Properties, per request: a response always comes; an error is a 4xx (the echo service
never fails, so a 5xx is the stack's fault) with the JSON error body; a 200 comes only
for a valid request and carries exactly what the user code returned (the input, echoed);
unknown paths are 404 and wrong methods 405.  Across requests: every node stays up, and
names of services that do not exist never become metric series.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import anyio
import httpx
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from nodes.runtime.calls import Caller
from nodes.runtime.connection import connect
from nodes.runtime.settings import NatsSettings
from protocol import subjects
from protocol.api import (
    ERROR_CODE_HEADER,
    GENERATION_HEADER,
    OP_HEADER,
    OP_MULTI,
    CreateApiPackage,
    DeployApi,
)
from protocol.deploy import CreateInfra
from tests.fuzz.profile import STATEFUL, TIMEOUT
from tests.fuzz.stack import ERROR_CODES, FuzzStack, node_name, start_stack
from tests.fuzz.strategies import (
    BAD_NAMES,
    clean_json,
    deep_nesting,
    dump,
    junk_bytes,
    junk_values,
    valid_names,
)
from tests.helpers import wait_until

pytestmark = pytest.mark.timeout(TIMEOUT)

SERVICE, PREDICT, FUNCTION, VERSION = "fz-svc", "echo", "fn", "v1"
PREFIX = "/public/api/v1/"
MAX_DEPTH = 32  # deeper than this, a 400 is as right as the echo
MAX_BODY = 512 * 1024

PROJECT = {
    "shipyard.toml": f"""\
[project]
key = "fzproj"

[api_services.{SERVICE}]
description = "Echoes its input, for fuzzing"

[api_services.{SERVICE}.endpoints.{PREDICT}]
kind = "prediction"
code = "api/echo.py"

[api_services.{SERVICE}.endpoints.{FUNCTION}]
kind = "function"
code = "api/fn.py"
function = "handle"
""",
    "api/echo.py": "def predict(features):\n    return {'echo': features}\n",
    "api/fn.py": "def handle(body):\n    return body\n",
}

unknown_services: set[str] = set()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzStack]:
    tmp = tmp_path_factory.mktemp("fuzz-http")
    for name, text in PROJECT.items():
        path = tmp / "ws" / "fzproj" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    s = start_stack(tmp, ("deployer", "design", "api", "gateway"), http=True)
    try:
        anyio.run(_deploy, s.server.url)
        for url in fronts(s):
            wait_until(lambda u=url: httpx.post(
                f"{u}{PREFIX}{SERVICE}/{PREDICT}/predict", json={"features": {}},
                timeout=5).status_code == 200, timeout=60, message=f"{url} serving")
        yield s
    finally:
        s.stop()


async def _deploy(url: str) -> None:
    nc = await connect(NatsSettings(servers=(url,)), name="fuzz-setup")
    try:
        caller = Caller(nc, sender="fuzz")
        await caller.call(CreateInfra(name="api", kind="api", stage="production"))
        await caller.call(CreateApiPackage(project="fzproj", service=SERVICE,
                                           version=VERSION), timeout=30)
        await caller.call(DeployApi(service=SERVICE, infra="api",
                                    generations={VERSION: 100}))
    finally:
        await nc.close()


def fronts(stack: FuzzStack) -> list[str]:
    return [n.http_url for n in stack.nodes.values() if n.http_url]


# -- requests -----------------------------------------------------------------------

@dataclass(frozen=True)
class Call:
    method: str
    path: str  # already percent-encoded
    body: bytes

    def __repr__(self) -> str:
        more = f"...({len(self.body)} bytes)" if len(self.body) > 160 else ""
        return f"Call({self.method} {self.path[:200]!r} {self.body[:160]!r}{more})"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))


segment = st.one_of(valid_names, st.sampled_from(BAD_NAMES), st.text(max_size=20))
methods = st.sampled_from(["POST", "POST", "POST", "GET", "PUT", "DELETE", "PATCH",
                           "OPTIONS"])


def shaped(action: str) -> st.SearchStrategy[Any]:
    """Bodies shaped like what ``action`` takes, with hostile contents."""
    features = st.dictionaries(st.text(max_size=10), clean_json, max_size=4)
    if action == "predict":
        return st.fixed_dictionaries({"features": features | clean_json},
                                     optional={"dispatch_key": clean_json,
                                               "generation": st.just(VERSION) | clean_json})
    if action == "predict-multi":
        item = st.fixed_dictionaries({"features": features | clean_json})
        return st.fixed_dictionaries({"items": st.lists(item, max_size=3) | clean_json})
    return clean_json


def _quote(segment: str) -> str:
    return quote(segment.encode("utf-8", "surrogatepass"), safe="")


@st.composite
def calls(draw: st.DrawFn) -> Call:
    kind = draw(st.sampled_from(["api", "api", "api", "alive", "metrics", "other"]))
    if kind == "api":
        service = draw(st.just(SERVICE) | segment)
        if service != SERVICE:
            unknown_services.add(service)
        endpoint = draw(st.sampled_from([PREDICT, FUNCTION]) | segment)
        action = draw(st.sampled_from(["predict", "predict-multi", "run"]) | segment)
        parts = [service, endpoint, action]
        if draw(st.integers(0, 9)) == 0:
            parts = draw(st.lists(segment, max_size=5))
        path = PREFIX + "/".join(_quote(p) for p in parts)
        body = draw(st.one_of(shaped(action).map(dump), shaped(action).map(dump),
                              junk_values.map(dump), junk_bytes, deep_nesting().map(dump)))
    else:
        path = {"alive": "/isAlive", "metrics": "/metrics"}.get(kind) or "/" + "/".join(
            _quote(p) for p in draw(st.lists(segment, max_size=4)))
        body = draw(junk_bytes)
    return Call(draw(methods), path, body)


# -- the oracle ---------------------------------------------------------------------

class Invalid(Exception):
    pass


class Unsure(Exception):
    """Valid JSON that a server may fairly refuse (too deep, numbers out of range)."""


def _reject_constant(token: str) -> Any:
    raise Invalid(f"{token} is not JSON")


def _check(value: Any, depth: int = 0) -> None:
    if depth > MAX_DEPTH:
        raise Unsure("deep")
    if isinstance(value, float) and not math.isfinite(value):
        raise Invalid("number out of range")
    if isinstance(value, int) and not isinstance(value, bool) and \
            not -(2**63) <= value < 2**64:
        raise Unsure("integer out of 64 bits")
    if isinstance(value, str) and any(0xD800 <= ord(c) <= 0xDFFF for c in value):
        raise Unsure("lone surrogate")
    if isinstance(value, dict):
        for k, v in value.items():
            _check(k, depth + 1)
            _check(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _check(v, depth + 1)


def parse(body: bytes) -> Any:
    """The body as strict JSON; ``Invalid`` or ``Unsure`` if it is not plainly valid."""
    try:
        value = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except RecursionError:
        raise Unsure("nested deeper than Python's json reads") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise Invalid(str(exc)[:80]) from None
    _check(value)
    if body.count(b"{") and _has_duplicate_keys(body):
        raise Unsure("duplicate keys")
    return value


def _has_duplicate_keys(body: bytes) -> bool:
    found = False

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal found
        found = found or len({k for k, _ in pairs}) != len(pairs)
        return dict(pairs)
    json.loads(body.decode("utf-8"), object_pairs_hook=hook)
    return found


def expected_echo(action: str, value: Any) -> Any:
    """What a 200 must carry for a valid request, or ``Invalid`` if it is not valid."""
    if action == "run":
        return {"response": value, "generation": VERSION}
    if not isinstance(value, dict):
        raise Invalid("not an object")
    gen = value.get("generation")
    if gen is not None and gen != VERSION:
        raise Invalid("unknown generation")
    key = value.get("dispatch_key")
    if key is not None and not isinstance(key, str):
        raise Invalid("dispatch_key")
    if gen is not None and not isinstance(gen, str):
        raise Invalid("generation")
    if action == "predict":
        if not isinstance(value.get("features"), dict):
            raise Invalid("features")
        return {"result": {"echo": value["features"]}, "generation": VERSION}
    items = value.get("items")
    if not isinstance(items, list) or not all(
            isinstance(i, dict) and isinstance(i.get("features"), dict) for i in items):
        raise Invalid("items")
    return {"results": [{"echo": i["features"]} for i in items], "generation": VERSION}


def judge(call: Call, r: httpx.Response) -> str | None:
    """Why ``r`` is the wrong answer to ``call``, or None."""
    where = f"{call!r} -> {r.status_code} {r.content[:300]!r}"
    path = r.request.url.path  # as the server sees it: decoded, dot segments resolved
    if r.status_code >= 500:
        return f"5xx for a client's request: {where}"
    if r.status_code >= 400:
        try:
            err = json.loads(r.content)["error"]
            assert err["code"] in ERROR_CODES | {"method_not_allowed"} and err["message"]
        except Exception:
            return f"error without the JSON error body: {where}"
        if not r.headers.get("content-type", "").startswith("application/json"):
            return f"error body not sent as JSON: {where}"
    if path in ("/isAlive", "/metrics"):
        if call.method != "GET":
            return None if r.status_code == 405 else f"{call.method} {path} is not 405: {where}"
        return None if r.status_code == 200 else f"GET {path} failed: {where}"
    if not path.startswith(PREFIX):
        return None if r.status_code == 404 else f"unknown path is not 404: {where}"
    parts = path[len(PREFIX):].split("/")
    known = parts[:2] in ([SERVICE, PREDICT], [SERVICE, FUNCTION]) and len(parts) == 3
    action = parts[2] if len(parts) == 3 else ""
    right = known and (action == "run") == (parts[1] == FUNCTION) and action in (
        "predict", "predict-multi", "run")
    if right and call.method != "POST":
        return None if r.status_code == 405 else f"wrong method is not 405: {where}"
    if not right:
        if r.status_code == 200:
            return f"200 for a route that does not exist: {where}"
        return None
    try:
        expected = expected_echo(action, parse(call.body))
    except Invalid:
        if r.status_code == 200:
            return f"200 for an invalid body: {where}"
        return None if r.status_code in (400, 404, 413) else f"invalid body not 400: {where}"
    except Unsure:
        if r.status_code != 200:
            return None
        expected = None
    if r.status_code != 200:
        return f"valid request refused: {where}"
    try:
        got = json.loads(r.content, parse_constant=_reject_constant)
    except Exception:
        return f"200 whose body is not JSON: {where}"
    if expected is not None and got != expected:
        return f"200 that is not the echo of the input: {where}"
    return None


async def send(http: httpx.AsyncClient, base: str, call: Call) -> httpx.Response:
    return await http.request(call.method, base + call.path, content=call.body)


# Seeds: requests that broke an HTTP front before.
@example(calls=[Call("POST", f"{PREFIX}{SERVICE}/{PREDICT}/predict", b"[" * 2048)])
@example(calls=[Call("POST", f"{PREFIX}{SERVICE}/{FUNCTION}/run", b'{"x": 1e400}')])
@example(calls=[Call("POST", f"{PREFIX}{SERVICE}/{FUNCTION}/run", b"[" * 5000 + b"]" * 5000)])
@example(calls=[Call("POST", "/isAlive", b"")])
@example(calls=[Call("POST", f"{PREFIX}{SERVICE}/{PREDICT}/predict", b"x" * (MAX_BODY + 1))])
@example(calls=[Call("POST", f"{PREFIX}{SERVICE}/{PREDICT}/predict",
                     b'{"features": {"x": NaN}}')])
@STATEFUL
@given(calls=st.lists(calls(), min_size=1, max_size=4))
async def test_every_route_answers_junk_with_a_json_error(stack: FuzzStack,
                                                          calls: list[Call]) -> None:
    failures: list[str] = []
    async with stack.client() as nc:
        await stack.heal(nc)
        async with httpx.AsyncClient(timeout=15) as http:
            for base in fronts(stack):
                for call in calls:
                    try:
                        r = await send(http, base, call)
                    except httpx.HTTPError as exc:
                        failures.append(f"{base}: {call!r}: no response "
                                        f"({type(exc).__name__}: {exc})")
                        continue
                    problem = judge(call, r)
                    if problem:
                        failures.append(f"{base}: {problem}")
        failures += await stack.problems(nc)
    stack.judge(failures, stateful=False)  # HTTP fronts keep no state a request can spoil


@st.composite
def api_requests(draw: st.DrawFn) -> tuple[str, bytes, dict[str, str] | None]:
    """Junk straight to a service's NATS subjects, as a gateway of any version might
    send it: any body, sometimes the predict-multi or generation headers."""
    endpoint = draw(st.sampled_from([PREDICT, FUNCTION]))
    action = "run" if endpoint == FUNCTION else draw(st.sampled_from(
        ["predict", "predict-multi"]))
    body = draw(st.one_of(shaped(action).map(dump), junk_values.map(dump), junk_bytes,
                          deep_nesting().map(dump)))
    headers: dict[str, str] = {}
    if action == "predict-multi":
        headers[OP_HEADER] = OP_MULTI
    if draw(st.integers(0, 4)) == 0:
        headers[GENERATION_HEADER] = draw(st.just(VERSION) | valid_names)
    return subjects.api_endpoint(SERVICE, endpoint), body, headers or None


@STATEFUL
@given(requests=st.lists(api_requests(), min_size=1, max_size=4))
async def test_service_subjects_answer_junk_with_an_error_reply(
        stack: FuzzStack, requests: list[tuple[str, bytes, dict[str, str] | None]]) -> None:
    """A reply with an error header carries a 4xx and the JSON error body; a reply
    without one is JSON.  The echo service never fails, so a 5xx is the stack's."""
    failures: list[str] = []
    async with stack.client() as nc:
        await stack.heal(nc)
        for subject, body, headers in requests:
            where = f"{subject} <- {body[:200]!r} {headers}"
            try:
                msg = await nc.request(subject, body, timeout=15, headers=headers)
            except Exception as exc:
                failures.append(f"{where}: no reply ({type(exc).__name__})")
                continue
            code = (msg.headers or {}).get(ERROR_CODE_HEADER)
            try:
                reply = json.loads(msg.data, parse_constant=_reject_constant)
            except Exception:
                failures.append(f"{where}: reply is not JSON: {msg.data[:200]!r}")
                continue
            if code is None:
                continue
            if not code.isdigit() or not 400 <= int(code) < 500:
                failures.append(f"{where}: error status {code}: {msg.data[:300]!r}")
            elif not (isinstance(reply, dict) and isinstance(reply.get("error"), dict)
                      and reply["error"].get("code") in ERROR_CODES
                      and reply["error"].get("message")):
                failures.append(f"{where}: error without the JSON error body: "
                                f"{msg.data[:300]!r}")
        failures += await stack.problems(nc)
    stack.judge(failures, stateful=False)


async def test_unknown_names_never_become_metric_series(stack: FuzzStack) -> None:
    """After the fuzzing (and 1,000 more requests to services that do not exist), no
    name of a service that does not exist shows in /metrics, and /metrics stays small."""
    api = stack.nodes[node_name("api")]
    assert api.http_url is not None
    async with httpx.AsyncClient(timeout=15) as http:
        before = len((await http.get(f"{api.http_url}/metrics")).content)
        rss = api.rss()
        for i in range(1000):
            name = f"nosuch-{i}-" + "x" * 100
            unknown_services.add(name)
            r = await http.post(f"{api.http_url}{PREFIX}{name}/{PREDICT}/predict",
                                content=b'{"features": {}}')
            assert r.status_code == 404, r.text
        text = (await http.get(f"{api.http_url}/metrics")).text
    grown_rss = api.rss() - rss
    assert len(text) - before < 16 * 1024, (
        f"/metrics grew from {before} to {len(text)} bytes after requests to unknown "
        f"services (RSS +{grown_rss / 2**20:.1f} MiB)")
    shown = sorted(n for n in unknown_services if n and f'service="{n}"' in text)
    assert not shown, f"{len(shown)} unknown service names are metric series: {shown[:5]}"


async def test_api_node_memory_stays_bounded_under_junk_bodies(stack: FuzzStack) -> None:
    """400 refused bodies of 128 KiB (50 MiB in all), after a warm-up, grow the API node
    by less than 16 MiB."""
    api = stack.nodes[node_name("api")]
    url = f"{api.http_url}{PREFIX}{SERVICE}/{PREDICT}/predict"
    junk = [b"[" * 128 * 1024, b'{"features": ' + b" " * 128 * 1024 + b"1}",
            b'{"features": {"x": "' + b"\xff" * 128 * 1024 + b'"}}']

    async def flood(n: int, http: httpx.AsyncClient) -> None:
        async def one(i: int) -> None:
            r = await http.post(url, content=junk[i % len(junk)])
            assert 400 <= r.status_code < 500, (r.status_code, r.content[:200])
        for start in range(0, n, 8):
            async with anyio.create_task_group() as tg:
                for i in range(start, min(n, start + 8)):
                    tg.start_soon(one, i)

    async with httpx.AsyncClient(timeout=15) as http:
        await flood(100, http)
        before = api.rss()
        await flood(400, http)
        grown = api.rss() - before
    assert grown < 16 * 1024 * 1024, f"the API node grew by {grown / 2**20:.1f} MiB"


async def test_http_nodes_answer_after_the_fuzzing(stack: FuzzStack) -> None:
    async with stack.client() as nc, httpx.AsyncClient(timeout=15) as http:
        assert await stack.problems(nc) == []
        for base in fronts(stack):
            r = await http.post(f"{base}{PREFIX}{SERVICE}/{PREDICT}/predict",
                                json={"features": {"a": [1, 2.5, "x", None]}})
            assert r.status_code == 200, r.text
            assert r.json()["result"] == {"echo": {"a": [1, 2.5, "x", None]}}

