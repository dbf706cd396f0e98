"""Junk on every plain subscription: heartbeats (``sy.hb.<role>.<node>``), reports
(``sy.rpt.<kind>.<node>``: exits, metrics, API progress, activations) and events
(``sy.evt.>``).  Nobody answers these, so the properties are about what survives:

* every node stays up, connected and answering a ping;
* the Deployer's registry keeps working: a valid heartbeat sent after the junk is listed
  by ``ListNodes`` and persisted in the registry bucket, and every live node is listed
  online (a forged message does not make a beating node lost);
* what the registry lists is sane: names that could be subject tokens, finite numbers,
  and no node that only a heartbeat on another node's subject claimed to be;
* memory stays bounded while junk keeps coming.

The report and event kinds come from the protocol (every message type with a
``subject()``), so a new kind is fuzzed as soon as it exists.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterator
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from nats.aio.client import Client as NATS

import nodes
from nodes.runtime import natscompat
from protocol import subjects
from protocol.base import Family, make_request
from protocol.errors import BadName, DecodeError
from protocol.heartbeat import HEARTBEAT, Heartbeat
from protocol.registry import ONLINE, NodeInfo
from protocol.scenarios import ListRuns
from tests.fuzz.profile import STATEFUL, TIMEOUT
from tests.fuzz.stack import ERROR_CODES, HB, FuzzStack, node_name, start_stack
from tests.fuzz.strategies import (
    Context,
    Sent,
    dump,
    junk_or,
    message,
    published_types,
    sample,
    valid_names,
)
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(TIMEOUT)

ROLES = ("deployer", "automation")
PUBLISHED = published_types()
MAX_SANE_INTERVAL_S = 3600.0
"""No heartbeat interval above an hour is believed: a node claiming more would never be
judged lost."""
SETTLE_S = 3.0
"""How long a working registry may take to list and persist a beat (15 of its intervals)."""

_probes = itertools.count(1)
PID = 424242424
"""Stands for the pid of the live node a forged message names; filled in when sent, as
nodes get new pids when an earlier example made the stack restart them."""


def forge(body: Any, i: int) -> Any:
    """Make ``body`` speak for live node ``i`` of the stack: its name and its pid."""
    if isinstance(body, dict):
        body.update(node=node_name(ROLES[i % len(ROLES)]), pid=PID)
    return body


def filled(stack: FuzzStack, sent: Sent) -> bytes:
    """``sent``'s payload with the pid of the node it names in place of ``PID``."""
    if str(PID).encode() not in sent.payload:
        return sent.payload
    for node in stack.nodes.values():
        if f'"{node.name}"'.encode() in sent.payload:
            return sent.payload.replace(str(PID).encode(), str(node.pid).encode())
    return sent.payload


CTX = Context(names=(*(node_name(r) for r in ROLES), *ROLES, "control", "automation",
                     "fz"), ints=(1,))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzStack]:
    s = start_stack(tmp_path_factory.mktemp("fuzz-subscriptions"), ROLES)
    try:
        yield s
    finally:
        s.stop()


def _token_or(value: Any, fallback: str) -> str:
    try:
        return subjects.token(value)
    except BadName:
        return fallback


@st.composite
def heartbeat(draw: st.DrawFn) -> Sent:
    """A heartbeat (junk, or a mutated one that may name a live node or use its pid) on
    a heartbeat subject: its own node's, or another one's."""
    body = draw(message(Heartbeat, CTX))
    if draw(st.integers(0, 2)) == 0:
        body = forge(body, draw(st.integers(0, 7)))
    payload = draw(junk_or(st.just(body)))
    node = body.get("node") if isinstance(body, dict) else None
    role = body.get("role") if isinstance(body, dict) else None
    subject_node = draw(st.just(_token_or(node, "fz-x")) | valid_names)
    return Sent(subjects.heartbeat(_token_or(role, "automation"), subject_node), payload)


@st.composite
def published(draw: st.DrawFn) -> Sent:
    """A report or event of a kind the protocol defines, mutated or junk, on that kind's
    subject (built from the message when it is valid enough to have one)."""
    cls, template = draw(st.sampled_from(PUBLISHED))
    body = draw(message(cls, CTX))
    if draw(st.integers(0, 2)) == 0:
        body = forge(body, draw(st.integers(0, 7)))
    subject = template
    try:
        subject = msgspec.convert(body, cls).subject()
    except (msgspec.ValidationError, BadName, TypeError, ValueError):
        head = template.rsplit(".", 1)[0]
        subject = f"{head}.{draw(valid_names)}"
    payload = draw(junk_or(st.just(body)))
    return Sent(subject, payload)


batches = st.lists(heartbeat() | published(), min_size=1, max_size=6)


def forged_names(batch: list[Sent], known: set[str]) -> set[str]:
    """Nodes that only a heartbeat on another node's subject claimed to be."""
    claimed: set[str] = set()
    honest: set[str] = set()
    for sent in batch:
        if not sent.subject.startswith(f"{subjects.ROOT}.hb."):
            continue
        try:
            hb = HEARTBEAT.decode(sent.payload)
        except DecodeError:
            continue
        (honest if sent.subject.rsplit(".", 1)[1] == hb.node else claimed).add(hb.node)
    return claimed - honest - known


def insane(info: NodeInfo) -> list[str]:
    """What a registry record says that no working node could have said."""
    out = []
    for what, value in (("name", info.name), ("role", info.role), ("infra", info.infra)):
        try:
            subjects.token(value)
        except BadName:
            out.append(f"{what} {value[:80]!r} is not a valid name")
    for what, number in (("interval_s", info.interval_s), ("uptime_s", info.uptime_s),
                         ("last_seen", info.last_seen)):
        if not math.isfinite(number) or number < 0:
            out.append(f"{what} is {number}")
    if not 0 < info.interval_s <= MAX_SANE_INTERVAL_S:
        out.append(f"interval_s {info.interval_s} is outside (0, {MAX_SANE_INTERVAL_S:g}]")
    if info.pid < 0:
        out.append(f"pid {info.pid}")
    return [f"registry lists {info.name[:80]!r}: {p}" for p in out]


async def registry_problems(stack: FuzzStack, nc: NATS, known: set[str],
                            forged: set[str]) -> list[str]:
    """A fresh node's beat is listed and persisted; live nodes are online; new records
    (not in ``known``) are sane; forged nodes are absent."""
    probe = f"fz-probe-{next(_probes)}"
    beat = Heartbeat(node=probe, role="automation", infra="automation",
                     version=nodes.__version__, host="fuzz", pid=1, uptime_s=1.0,
                     interval_s=60.0, seq=1, ts=time.time())
    await nc.publish(subjects.heartbeat(beat.role, probe), HEARTBEAT.encode(beat))
    out: list[str] = []
    kv = await nc.jetstream().key_value(subjects.REGISTRY_BUCKET)

    async def settled() -> bool:
        listed = {n.name: n for n in (await stack.list_nodes(nc)).nodes}
        if probe not in listed or any(listed.get(n) is None
                                      or listed[n].status != ONLINE for n in stack.nodes):
            return False
        try:
            await kv.get(probe)
        except (nats.js.errors.KeyNotFoundError, nats.errors.TimeoutError):
            return False
        return True

    try:
        await wait_for(settled, timeout=SETTLE_S, interval=0.05)
    except AssertionError:
        listed = {n.name: n for n in (await stack.list_nodes(nc)).nodes}
        if probe not in listed:
            out.append(f"a valid heartbeat of {probe} is not listed after {SETTLE_S}s")
        else:
            try:
                await kv.get(probe)
            except (nats.js.errors.KeyNotFoundError, nats.errors.TimeoutError):
                out.append(f"a valid heartbeat of {probe} is listed but not persisted in "
                           f"{subjects.REGISTRY_BUCKET} after {SETTLE_S}s")
        for name in stack.nodes:
            info = listed.get(name)
            if info is None or info.status != ONLINE:
                out.append(f"{name} beats every {HB}s but is listed as "
                           f"{info.status if info else 'absent'} after {SETTLE_S}s")
    listed = {n.name: n for n in (await stack.list_nodes(nc)).nodes}
    for name, info in listed.items():
        if name not in known:  # records an earlier example left are its failure, not ours
            out += insane(info)
    out += [f"registry lists {n[:80]!r}, claimed only by a heartbeat on another node's "
            "subject" for n in sorted(forged & set(listed))]
    return out


async def deployer_answers(nc: NATS) -> list[str]:
    """The Deployer's run desk, fed by run events, still answers."""
    family = Family.of(ListRuns)
    msg = await nc.request(subjects.command(family.role, "run.list"),
                           make_request(ListRuns(project="fz"), sender="fuzz"), timeout=5)
    reply = family.replies.decode(msg.data)
    if reply.error is not None and (reply.error.code not in ERROR_CODES
                                    or reply.error.code == "internal"):
        return [f"ListRuns after the junk: {reply.error.code}: {reply.error.message[:300]}"]
    return []


def _beat(subject_node: str, **fields: Any) -> Sent:
    body = {"type": "heartbeat", "node": subject_node, "role": "automation",
            "infra": "automation", "version": "0", "host": "h", "pid": 7, "uptime_s": 1.0,
            "interval_s": 1.0, **fields}
    return Sent(subjects.heartbeat("automation", subject_node), dump(body))


# Seeds: one message of each kind that broke a node before.
@example(batch=[_beat("long", node="n" * 5000)])
@example(batch=[_beat("bad", node="bad name*")])
@example(batch=[_beat("phantom", interval_s=1e9)])
@example(batch=[_beat("someone-else", node="fz-forged")])
@example(batch=[Sent(subjects.report("exit", "fz-automation"), dump(
    {"type": "node.exit", "node": "fz-automation", "role": "automation",
     "infra": "automation", "pid": PID, "reason": "forged"}))])
@example(batch=[Sent(subjects.heartbeat("automation", "deep"), b'{"a":' * 5000)])
@STATEFUL
@given(batch=batches)
async def test_junk_on_plain_subscriptions_leaves_nodes_and_registry_working(
        stack: FuzzStack, batch: list[Sent]) -> None:
    async with stack.client() as nc:
        await stack.heal(nc)
        known = {n.name for n in (await stack.list_nodes(nc)).nodes}
        for sent in batch:
            await nc.publish(sent.subject, filled(stack, sent))
        await natscompat.flush(nc)
        failures = await stack.problems(nc)
        if not failures:
            failures += await registry_problems(stack, nc, known, forged_names(batch, known))
            failures += await deployer_answers(nc)
            failures += await stack.problems(nc)
    stack.judge(failures)


def test_every_report_and_event_kind_is_fuzzed() -> None:
    kinds = {s.split(".")[1] for _, s in PUBLISHED}
    assert {"rpt", "evt"} <= kinds
    reports = {s.split(".")[2] for _, s in PUBLISHED if s.startswith("sy.rpt.")}
    assert {"exit", "metrics"} <= reports
    assert all(sample(cls).subject() == s for cls, s in PUBLISHED)


def junk_stream(n: int, size: int, tag: str) -> Iterator[tuple[str, bytes]]:
    """``n`` messages of about ``size`` bytes that no node should keep: malformed, or well
    formed but naming a node that cannot exist."""
    pad = "p" * size
    for i in range(n):
        bad, sender = f"bad name*{tag}{i}", f"m{tag}{i}"
        kind = i % 4
        if kind == 0:
            yield subjects.heartbeat("automation", sender), b"[" * size
        elif kind == 1:
            yield subjects.heartbeat("automation", sender), HEARTBEAT.encode(Heartbeat(
                node=bad, role="automation", infra="automation", version="0", host="h",
                pid=i, uptime_s=1.0, interval_s=1.0, state={"pad": pad}))
        elif kind == 2:
            yield subjects.report("metrics", sender), (
                b'{"type":"api.metrics","node":"' + bad.encode() + b'","infra":"x","ts":1,'
                b'"interval_s":1,"endpoints":[],"pad":"' + pad.encode() + b'"}')
        else:
            yield subjects.report("exit", sender), (
                b'{"type":"node.exit","node":"' + bad.encode() + b'","role":"r","infra":"i",'
                b'"pid":-1,"reason":"' + pad.encode() + b'"}')


async def drained(stack: FuzzStack, nc: NATS) -> list[str]:
    """Wait until the Deployer has read every heartbeat sent so far (they are handled in
    order, so a last valid one being listed says so); what is wrong if it never does."""
    probe = f"fz-probe-{next(_probes)}"
    beat = Heartbeat(node=probe, role="fzprobe", infra="automation", version="0",
                     host="fuzz", pid=1, uptime_s=1.0, interval_s=60.0)
    await nc.publish(subjects.heartbeat(beat.role, probe), HEARTBEAT.encode(beat))

    async def listed() -> bool:
        try:  # only probes: the full list may be too large to send (a finding of its own)
            nodes = (await stack.list_nodes(nc, role="fzprobe")).nodes
            return any(n.name == probe for n in nodes)
        except Exception:
            return False
    try:
        await wait_for(listed, timeout=30, message=f"the Deployer to list {probe}")
    except AssertionError as exc:
        return [str(exc), *await stack.problems(nc)]
    return await stack.problems(nc)


async def test_memory_stays_bounded_under_junk(stack: FuzzStack) -> None:
    """Junk that no node should keep does not grow the Deployer: 8,000 messages of 16 KiB
    (128 MiB in all) after a warm-up grow it by less than 24 MiB (keeping the quarter of
    them that are well formed would take 32 MiB)."""
    async with stack.client() as nc:
        await stack.heal(nc)
        deployer = stack.nodes[node_name("deployer")]

        async def send(n: int, tag: str) -> None:
            for i, (subject, payload) in enumerate(junk_stream(n, 16 * 1024, tag)):
                await nc.publish(subject, payload)
                if i % 100 == 0:
                    await natscompat.flush(nc)
            await natscompat.flush(nc)
            stack.judge(await drained(stack, nc))

        await send(1000, "w")
        before = deployer.rss()
        await send(8000, "m")
        grown = deployer.rss() - before
        print(f"the Deployer grew by {grown / 2**20:.1f} MiB")
    assert grown < 24 * 1024 * 1024, f"the Deployer grew by {grown / 2**20:.1f} MiB"
