"""Junk to every command subject of every role: each reply is a typed error or a valid
reply, and every node stays up, connected and answering.

The subjects come from the protocol's families and the role classes (``command_targets``),
so a new verb is fuzzed as soon as it exists.
"""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodes.roles import ROLES
from protocol import subjects
from protocol.base import Family
from protocol.errors import DecodeError
from protocol.families import ALL
from tests.fuzz.profile import STATEFUL, TIMEOUT
from tests.fuzz.stack import ERROR_CODES, FuzzStack, command_targets, node_name, start_stack
from tests.fuzz.strategies import (
    Context,
    Sent,
    envelope,
    junk_or,
    junk_values,
    message,
    valid_names,
)

pytestmark = pytest.mark.timeout(TIMEOUT)

TARGETS = command_targets(ROLES)
CTX = Context(names=(*(node_name(r) for r in ROLES), *ROLES, "prod", "control"))
REPLY_TIMEOUT = 10.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzStack]:
    s = start_stack(tmp_path_factory.mktemp("fuzz-commands"), ROLES)
    try:
        yield s
    finally:
        s.stop()


@st.composite
def request(draw: st.DrawFn) -> Sent:
    """A subject some node answers, and bytes for it: junk, or an envelope around a
    (mutated) command of that verb, of another verb of the family, or any value."""
    subject, family, verb = draw(st.sampled_from(TARGETS))
    if draw(st.integers(0, 9)) == 0:  # a verb nobody serves, under the same prefix
        subject = subject[: -len(verb)] + draw(valid_names)
    own = family.verbs[verb]
    other = draw(st.sampled_from(sorted(family.verbs.values(), key=str)))
    body = draw(st.one_of(message(own, CTX), message(other, CTX), junk_values))
    payload = draw(junk_or(envelope(st.just(body))))
    return Sent(subject, payload, family.role)


def judge(family: Family, data: bytes) -> str | None:
    """Why ``data`` is not an acceptable reply to junk, or None if it is."""
    try:
        reply = family.replies.decode(data)
    except DecodeError as exc:
        return f"reply is not a {family.role} reply: {exc.reason}: {data[:300]!r}"
    if reply.error is not None:
        if reply.error.code not in ERROR_CODES:
            return f"unknown error code {reply.error.code!r}: {reply.error.message[:300]}"
        if reply.error.code == "internal":
            return f"internal error: {reply.error.message[:300]}"
        if not reply.error.message:
            return f"error {reply.error.code} says nothing"
        return None
    if reply.ok is None:
        return "reply has neither ok nor error"
    return None


def shown(payload: bytes) -> str:
    return f"{len(payload)} bytes {payload[:200]!r}" + ("..." if len(payload) > 200 else "")


FAMILIES = {f.role: f for f in ALL}


@STATEFUL
@given(batch=st.lists(request(), min_size=1, max_size=4))
async def test_every_command_subject_answers_junk_with_a_typed_error(
        stack: FuzzStack, batch: list[Sent]) -> None:
    async with stack.client() as nc:
        await stack.heal(nc)
        failures: list[str] = []

        async def send(subject: str, family: Family, payload: bytes) -> None:
            try:
                msg = await nc.request(subject, payload, timeout=REPLY_TIMEOUT)
            except Exception as exc:
                failures.append(f"{subject} <- {shown(payload)}: no reply "
                                f"({type(exc).__name__})")
                return
            problem = judge(family, msg.data)
            if problem:
                failures.append(f"{subject} <- {shown(payload)}: {problem}")

        async with anyio.create_task_group() as tg:
            for sent in batch:
                tg.start_soon(send, sent.subject, FAMILIES[sent.family], sent.payload)
        failures += await stack.problems(nc)
    stack.judge(failures)


def test_every_family_and_verb_is_fuzzed() -> None:
    """The targets cover every verb of every family, and no subject twice."""
    verbs = {(f.role, v) for _, f, v in TARGETS}
    assert verbs == {(f.role, v) for f in ALL for v in f.verbs}
    assert len({s for s, _, _ in TARGETS}) == len(TARGETS)
    assert all(s.startswith(f"{subjects.ROOT}.") for s, _, _ in TARGETS)


async def test_stack_answers_after_the_fuzzing(stack: FuzzStack) -> None:
    """Whatever the examples did, the stack works at the end: every node answers."""
    async with stack.client() as nc:
        assert await stack.problems(nc) == []
        assert {n.name for n in (await stack.list_nodes(nc)).nodes} >= set(stack.nodes)


