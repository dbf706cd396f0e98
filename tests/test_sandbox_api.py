"""API endpoints of a code environment run in a user-code host of that environment's
interpreter, child of the worker: they see the environment's packages (a fake
``msgspec`` 0.0.1 too), answer exactly as endpoints in the worker do (bodies, codes,
messages), live side by side with other environments in one worker, and a host that
dies takes its worker with it, which the node replaces.  Real nats-server, real worker
processes, real virtualenvs."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import msgspec
import psutil
import pytest

from nodes.api import wire
from nodes.api.metrics import Metrics
from nodes.api.workers import WorkerPool
from nodes.runtime.connection import connect
from nodes.runtime.settings import NatsSettings
from protocol import subjects
from protocol.api import (
    ERROR_CODE_HEADER,
    GENERATION_HEADER,
    OP_HEADER,
    OP_MULTI,
    ApiMapping,
    http_status,
)
from tests.helpers import wait_for
from tests.test_sandbox_support import TINY, make_env, make_wheels

MODEL = """
import math, os, sys
try:
    import sy_tiny
    TINY = sy_tiny.VERSION
except ImportError:
    TINY = None
try:
    import msgspec
    MSGSPEC = msgspec.__version__
except ImportError:
    MSGSPEC = None


def load(directory):
    return {"tiny": TINY, "dir": directory.name}


def predict(features, model):
    if features.get("nan"):
        return {"p": [1.0, float("nan")]}
    if features.get("boom"):
        raise ValueError("boom: " + str(features["boom"]))
    if features.get("die"):
        os._exit(3)
    if features.get("allocate_mb"):
        return {"n": len(bytearray(features["allocate_mb"] * 1024 * 1024))}
    if features.get("where"):
        return {"tiny": model["tiny"], "msgspec": MSGSPEC, "pid": os.getpid(),
                "isolated": sys.flags.isolated}
    return {"x": features.get("x"), "s": "é", "f": 0.1, "l": [1, 2.5, None, True]}


def run(body):
    if isinstance(body, dict) and body.get("inf"):
        return math.inf
    return {"echo": body, "tiny": TINY}
"""

SERVICE = "sandboxed"
ENDPOINTS = [wire.EndpointCode("predict", "prediction", "api/model.py", "predict"),
             wire.EndpointCode("echo", "function", "api/model.py", "run")]
KINDS = {"predict": "prediction", "echo": "function"}


@pytest.fixture(scope="module")
def envs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("api-envs")
    wheels = make_wheels(root / "wheels")
    return {"one": make_env(root / "one", wheels, [f"{TINY}==1.0", "msgspec==0.0.1"]),
            "two": make_env(root / "two", wheels, [f"{TINY}==2.0"])}


def _package(root: Path) -> Path:
    (root / "api").mkdir(parents=True, exist_ok=True)
    (root / "api" / "model.py").write_text(MODEL)
    return root


@asynccontextmanager
async def _workers(settings: NatsSettings, tmp_path: Path, *, size: int = 1,
                   memory_mb: int | None = None) -> AsyncIterator[tuple[WorkerPool, Any]]:
    nc = await connect(settings, name="test")
    pool = WorkerPool(size, nats=settings, node="api-1", infra="prod",
                      run_dir=tmp_path / "run", metrics=Metrics("api-1", "api"),
                      max_body=1 << 20, queue_timeout=10.0, request_timeout=10.0,
                      kill_grace=1.0, debug=False, memory_mb=memory_mb)
    pool.nc = nc
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(pool.run)
            yield pool, nc
            tg.cancel_scope.cancel()
    finally:
        await nc.close()


async def _serve(pool: WorkerPool, service: str, gens: dict[str, tuple[Path, str]]) -> None:
    """Load each generation (directory, python) and route them all, equal weights."""
    for gen, (directory, python) in gens.items():
        error = await pool.load(service, gen, directory, ENDPOINTS, python=python)
        assert error == "", error
    mapping = msgspec.json.encode(ApiMapping(generations={g: 1 for g in gens}))
    error = await pool.route(service, mapping, {g: KINDS for g in gens}, "test")
    assert error == "", error


async def _ask(nc: Any, service: str, endpoint: str, body: Any, *,
               generation: str | None = None, multi: bool = False) -> tuple[int, Any]:
    headers = {}
    if generation:
        headers[GENERATION_HEADER] = generation
    if multi:
        headers[OP_HEADER] = OP_MULTI
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    msg = await nc.request(subjects.api_endpoint(service, endpoint), data, timeout=10,
                           headers=headers or None)
    status = int((msg.headers or {}).get(ERROR_CODE_HEADER, 200))
    return status, json.loads(msg.data)


# (endpoint, body, multi, the error code expected or "" for a 200)
REQUESTS: list[tuple[str, Any, bool, str]] = [
    ("predict", {"features": {"x": 1}}, False, ""),
    ("predict", {"features": {"x": "ü", "y": [1e-7, 1e21, -0.0, 12345678901234567]}}, False,
     ""),
    ("predict", {"features": {"nan": 1}}, False, "bad_result"),
    ("predict", {"features": {"boom": "bad row"}}, False, "user_code"),
    ("predict", {"features": [1, 2]}, False, "bad_request"),
    ("predict", {"features": {"x": 1e400}}, False, "bad_request"),
    ("predict", b'{"features": {"x": ', False, "bad_request"),
    ("predict", {"items": [{"features": {"x": 1}}, {"features": {"x": 2}}]}, True, ""),
    ("predict", {"items": [{"features": {"x": 1}}, {"features": 3}]}, True, "bad_request"),
    ("predict", {"items": [{"features": {"x": 1}}, {"features": {"nan": 1}}]}, True,
     "bad_result"),
    ("echo", {"a": [1, 2, {"b": None}]}, False, ""),
    ("echo", "just a string", False, ""),
    ("echo", {"inf": True}, False, "bad_result"),
    ("echo", b"[1, 2", False, "bad_request"),
    ("echo", b"[" * 5000, False, "bad_request"),
]


async def test_an_environment_endpoint_answers_exactly_as_one_in_the_worker(
        settings: NatsSettings, tmp_path: Path, envs: dict[str, str]) -> None:
    d = _package(tmp_path / "pkg")
    async with _workers(settings, tmp_path) as (pool, nc):
        await _serve(pool, "local", {"v1": (d, "")})
        await _serve(pool, "remote", {"v1": (d, envs["two"])})
        for endpoint, body, multi, code in REQUESTS:
            here = await _ask(nc, "local", endpoint, body, multi=multi)
            there = await _ask(nc, "remote", endpoint, body, multi=multi)
            assert there[0] == (http_status(code) if code else 200), (body, there)
            assert code == (there[1]["error"]["code"] if code else ""), (body, there)
            if endpoint == "echo" and not code:
                assert here[1]["response"].pop("tiny") is None
                assert there[1]["response"].pop("tiny") == "2.0"
            assert there == here, (endpoint, body)


async def test_an_environment_endpoint_sees_the_environment_packages_and_errors_are_typed(
        settings: NatsSettings, tmp_path: Path, envs: dict[str, str]) -> None:
    d = _package(tmp_path / "pkg")
    async with _workers(settings, tmp_path) as (pool, nc):
        await _serve(pool, SERVICE, {"v1": (d, envs["one"])})
        status, body = await _ask(nc, SERVICE, "predict", {"features": {"where": 1}})
        assert status == 200, body
        seen = body["result"]
        assert (seen["tiny"], seen["msgspec"], seen["isolated"]) == ("1.0", "0.0.1", 1)
        assert body["generation"] == "v1"
        worker = pool.pids()[0]
        assert seen["pid"] != worker and psutil.Process(seen["pid"]).ppid() == worker
        status, body = await _ask(nc, SERVICE, "echo", [1, "two"])
        assert (status, body) == (200, {"response": {"echo": [1, "two"], "tiny": "1.0"},
                                        "generation": "v1"})
        status, body = await _ask(nc, SERVICE, "predict", {"items": [
            {"features": {"x": 1}}, {"features": {"where": 1}}]}, multi=True)
        assert status == 200 and body["results"][1]["tiny"] == "1.0", body
        status, body = await _ask(nc, SERVICE, "predict", {"features": {"nan": 1}})
        assert body["error"]["code"] == "bad_result", body
        assert "result.p[1] (nan) is not a finite number" in body["error"]["message"]
        status, body = await _ask(nc, SERVICE, "predict", {"features": {"boom": 7}})
        assert (status, body["error"]["code"]) == (500, "user_code")
        assert body["error"]["message"] == "ValueError: boom: 7"
        assert pool.pids() == [worker]  # nothing of that cost the worker


async def test_two_environments_serve_side_by_side_in_one_worker(
        settings: NatsSettings, tmp_path: Path, envs: dict[str, str]) -> None:
    async with _workers(settings, tmp_path) as (pool, nc):
        await _serve(pool, SERVICE, {"v1": (_package(tmp_path / "v1"), envs["one"]),
                                     "v2": (_package(tmp_path / "v2"), envs["two"]),
                                     "v3": (_package(tmp_path / "v3"), "")})
        seen = {}
        for gen in ("v1", "v2", "v3", "v1"):
            status, body = await _ask(nc, SERVICE, "predict", {"features": {"where": 1}},
                                      generation=gen)
            assert status == 200 and body["generation"] == gen, body
            seen[gen] = body["result"]
        assert [seen[g]["tiny"] for g in ("v1", "v2", "v3")] == ["1.0", "2.0", None]
        assert [seen[g]["msgspec"] for g in ("v1", "v2", "v3")] == \
            ["0.0.1", None, msgspec.__version__]
        worker = pool.pids()[0]
        assert seen["v3"]["pid"] == worker
        hosts = {c.pid for c in psutil.Process(worker).children()}
        assert {seen["v1"]["pid"], seen["v2"]["pid"]} == hosts and len(hosts) == 2
        # v2 leaves the route: the others keep answering
        mapping = msgspec.json.encode(ApiMapping(generations={"v1": 1, "v3": 1}))
        assert await pool.route(SERVICE, mapping, {"v1": KINDS, "v3": KINDS}, "t") == ""
        status, body = await _ask(nc, SERVICE, "predict", {"features": {"where": 1}},
                                  generation="v1")
        assert status == 200 and body["result"]["tiny"] == "1.0"


async def test_a_host_that_dies_takes_its_worker_which_is_replaced(
        settings: NatsSettings, tmp_path: Path, envs: dict[str, str]) -> None:
    d = _package(tmp_path / "pkg")
    async with _workers(settings, tmp_path) as (pool, nc):
        await _serve(pool, SERVICE, {"v1": (d, envs["one"])})
        # killed while idle
        _, body = await _ask(nc, SERVICE, "predict", {"features": {"where": 1}})
        worker, host = pool.pids()[0], body["result"]["pid"]
        os.kill(host, signal.SIGKILL)
        await wait_for(lambda: pool.crashes == 1 and len(pool.pids()) == 1
                       and pool.pids()[0] != worker and all(w.ready for w in pool.workers),
                       timeout=30, message="worker replaced")
        status, body = await _ask(nc, SERVICE, "predict", {"features": {"where": 1}})
        assert status == 200 and body["result"]["tiny"] == "1.0"
        assert body["result"]["pid"] != host  # the replacement started its own host
        # dying while running a request: the node answers it
        status, body = await _ask(nc, SERVICE, "predict", {"features": {"die": 1}})
        assert (status, body["error"]["code"]) == (500, "user_code"), body
        assert "worker process running this request died" in body["error"]["message"]
        await wait_for(lambda: pool.crashes == 2 and len(pool.pids()) == 1
                       and all(w.ready for w in pool.workers),
                       timeout=30, message="worker replaced again")
        assert (await _ask(nc, SERVICE, "predict", {"features": {"x": 1}}))[0] == 200


async def test_a_host_past_the_memory_limit_fails_the_request_and_retires_the_worker(
        settings: NatsSettings, tmp_path: Path, envs: dict[str, str]) -> None:
    d = _package(tmp_path / "pkg")
    async with _workers(settings, tmp_path, memory_mb=1024) as (pool, nc):
        await _serve(pool, SERVICE, {"v1": (d, envs["one"])})
        status, body = await _ask(nc, SERVICE, "predict", {"features": {"allocate_mb": 64}})
        assert status == 200 and body["result"]["n"] == 64 * 1024 * 1024, body
        worker = pool.pids()[0]
        status, body = await _ask(nc, SERVICE, "predict", {"features": {"allocate_mb": 2048}})
        assert (status, body["error"]["code"]) == (500, "user_code"), body
        assert "MemoryError" in body["error"]["message"]
        assert "limit of 1024 MB" in body["error"]["message"]
        await wait_for(lambda: len(pool.pids()) == 1 and pool.pids()[0] != worker
                       and all(w.ready for w in pool.workers),
                       timeout=30, message="worker retired and replaced")
        assert (await _ask(nc, SERVICE, "predict", {"features": {"x": 1}}))[0] == 200


async def test_an_interpreter_that_cannot_start_fails_the_load_with_the_reason(
        settings: NatsSettings, tmp_path: Path) -> None:
    d = _package(tmp_path / "pkg")
    async with _workers(settings, tmp_path) as (pool, _nc):
        error = await pool.load(SERVICE, "v1", d, ENDPOINTS, python=str(tmp_path / "nope"))
        assert error.startswith(f"cannot start a user-code host with {tmp_path}/nope: "), error
        assert len(pool.pids()) == 1 and pool.crashes == 0


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def test_a_host_dies_with_its_worker(
        settings: NatsSettings, tmp_path: Path, envs: dict[str, str]) -> None:
    d = _package(tmp_path / "pkg")
    async with _workers(settings, tmp_path) as (pool, nc):
        await _serve(pool, SERVICE, {"v1": (d, envs["two"])})
        _, body = await _ask(nc, SERVICE, "predict", {"features": {"where": 1}})
        worker, host = pool.pids()[0], body["result"]["pid"]
        assert not _gone(host)
        os.kill(worker, signal.SIGKILL)
        await wait_for(lambda: _gone(host), timeout=10, message="host gone with its worker")
        await wait_for(lambda: pool.crashes == 1 and all(w.ready for w in pool.workers)
                       and len(pool.pids()) == 1, timeout=30, message="worker replaced")
        _, body = await _ask(nc, SERVICE, "predict", {"features": {"where": 1}})
        assert body["result"]["tiny"] == "2.0" and body["result"]["pid"] != host
