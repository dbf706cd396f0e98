"""Progress notices of a long command, node to requester, against a real nats-server: only
the requester that asks hears them, only its own request's, and a malformed one changes
nothing but a counter."""

from __future__ import annotations

from nats.aio.msg import Msg

from nodes.runtime.calls import Caller
from nodes.runtime.connection import close, connect
from nodes.runtime.requests import Requester
from nodes.runtime.settings import NatsSettings
from protocol import subjects
from protocol.base import make_request
from protocol.progress import CommandProgress
from tests.helpers import running, wait_for
from tests.probe import Done, ProbeNode, Steps


def probe(settings: NatsSettings) -> ProbeNode:
    return ProbeNode(name="p1", nats=settings, heartbeat_interval=0.2)


async def test_a_caller_hears_its_requests_progress_first_and_last_of_a_stage(
        settings: NatsSettings) -> None:
    nc = await connect(settings, name="test")
    seen: list[CommandProgress] = []
    try:
        async with running(probe(settings)):
            done = await Caller(nc).call(Steps(count=50), timeout=5, on_progress=seen.append)
    finally:
        await close(nc)
    # At most 5 a second: the first and the last of the stage go out, most others not.
    assert done == Done(label=f"{len(seen)} sent") and len(seen) < 50
    assert seen[0] == CommandProgress(stage="stepping", done=1, total=50, unit="files")
    assert seen[-1] == CommandProgress(stage="stepping", done=50, total=50, unit="files")


async def test_the_requester_hands_on_notices_only_when_asked(settings: NatsSettings) -> None:
    nc = await connect(settings, name="test")
    heard: list[Msg] = []
    everything: list[str] = []

    async def on_any(msg: Msg) -> None:
        everything.append(msg.subject)

    async def on_progress(msg: Msg) -> None:
        heard.append(msg)

    subject = subjects.command("probe", "steps")
    try:
        await nc.subscribe(subjects.command_progress_all("_INBOX.*."), cb=on_any)
        requester = Requester(nc)
        async with running(probe(settings)):
            asked = await requester.request(subject, make_request(Steps(count=2)), timeout=5,
                                            on_progress=on_progress)
            assert len(heard) == 2
            assert all(m.subject == subjects.command_progress(asked.subject) for m in heard)
            unasked = await requester.request(subject, make_request(Steps(count=2)),
                                              timeout=5)
            # The node told this request's progress too, but the requester did not
            # subscribe to it: its callback got only the first request's notices.
            await wait_for(lambda: subjects.command_progress(unasked.subject) in everything,
                           timeout=5, message="the second request's notices published")
        assert len(heard) == 2
    finally:
        await close(nc)


async def test_a_call_that_does_not_ask_for_progress_is_sent_none(
        settings: NatsSettings) -> None:
    """Without ``on_progress`` a call waits on a re-used reply subject, where nothing
    listens for notices: the node sends none (with auth on, the Design node may not
    publish them there at all)."""
    nc = await connect(settings, name="test")
    try:
        async with running(probe(settings)):
            done = await Caller(nc).call(Steps(count=3), timeout=5)
    finally:
        await close(nc)
    assert done == Done(label="0 sent")


async def test_a_malformed_notice_is_counted_and_ignored_and_the_call_answers(
        settings: NatsSettings) -> None:
    nc = await connect(settings, name="test")
    seen: list[CommandProgress] = []
    caller = Caller(nc)
    garbage = ["not json", '{"type": "command.progress", "stage": "x", "done": -1}',
               '{"type": "command.progress", "stage": "x", "done": 9, "total": 3}',
               '{"type": "command.progress", "stage": "x", "unit": "parsecs"}',
               '{"type": "command.progress", "stage": "' + "s" * 100 + '"}']
    try:
        async with running(probe(settings)):
            done = await caller.call(Steps(count=1, raw=garbage), timeout=5,
                                     on_progress=seen.append)
    finally:
        await close(nc)
    assert done == Done(label="1 sent")
    assert caller.notices_dropped == len(garbage)
    assert seen == [CommandProgress(stage="stepping", done=1, total=1, unit="files")]


def test_reply_tokens_are_random_subject_tokens_that_never_repeat() -> None:
    """An API node may publish to any reply subject: it must not be able to tell the
    token of a request it never saw from one it did."""
    from nodes.runtime.requests import Tokens

    tokens = Tokens()
    drawn = [tokens.next() for _ in range(5000)]  # across batches of the OS's bytes
    assert len(set(drawn)) == len(drawn)
    for t in drawn[:50]:
        assert subjects.token(t, "token") == t and len(t) == 12
    # Consecutive tokens share no structure a counter would leave.
    assert len({t[:6] for t in drawn[:100]}) > 90
