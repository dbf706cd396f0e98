"""The wire contract: envelopes, evolution rules, subjects, typed errors."""

from __future__ import annotations

import msgspec
import pytest

from protocol import subjects
from protocol.base import Reply, Request, encode, make_request
from protocol.deployer import DEPLOYER
from protocol.errors import DecodeError, Internal, NotFound, error_from_wire
from protocol.events import NodeLost, NodeOnline
from protocol.heartbeat import HEARTBEAT, Heartbeat
from protocol.registry import ListNodes, NodeList
from protocol.state import ApiState
from protocol.stream import EVENT


def test_request_round_trip_keeps_body_type_and_metadata() -> None:
    data = make_request(ListNodes(role="api"), sender="cli", request_id="r1")
    req = DEPLOYER.requests.decode(data)
    assert isinstance(req.body, ListNodes)
    assert req.body.role == "api"
    assert (req.id, req.sender, req.identity, req.signature) == ("r1", "cli", None, None)
    assert req.v == 1 and req.body.v == 1


def test_unknown_fields_are_ignored_so_newer_senders_stay_readable() -> None:
    raw = (b'{"id":"x","ts":1,"future":true,"body":{"type":"nodes.list","role":"api",'
           b'"added_later":[1,2]}}')
    req = DEPLOYER.requests.decode(raw)
    assert req.body == ListNodes(role="api")


def test_unknown_message_type_is_a_decode_error_that_keeps_the_bytes() -> None:
    raw = b'{"id":"x","ts":1,"body":{"type":"nodes.explode"}}'
    with pytest.raises(DecodeError) as info:
        DEPLOYER.requests.decode(raw, "sy.cmd.deployer.nodes.explode")
    assert info.value.raw == raw
    assert "nodes.explode" in str(info.value)
    assert isinstance(info.value.__cause__, msgspec.ValidationError)


def test_reply_carries_a_typed_result_or_a_typed_error() -> None:
    ok = DEPLOYER.replies.decode(encode(Reply(ok=NodeList(nodes=[]))))
    assert isinstance(ok.ok, NodeList) and ok.error is None
    err = NotFound("no such node: n1")
    raw = b'{"error":{"code":"not_found","message":"no such node: n1"}}'
    bad = DEPLOYER.replies.decode(raw)
    assert bad.ok is None and bad.error is not None
    rebuilt = error_from_wire(bad.error.code, bad.error.message)
    assert type(rebuilt) is type(err) and rebuilt.message == err.message


def test_unknown_error_code_from_a_newer_peer_is_kept() -> None:
    rebuilt = error_from_wire("quota_exceeded", "too many")
    assert isinstance(rebuilt, Internal)
    assert rebuilt.details["code"] == "quota_exceeded"


def test_events_are_a_tagged_union_with_their_own_subjects() -> None:
    online = NodeOnline(node="a1", role="automation", infra="prod", host="h", pid=1)
    lost = NodeLost(node="a1", role="automation", infra="prod", last_seen=1.0, silent_s=6.0)
    for ev in (online, lost):
        back = EVENT.decode(encode(ev))
        assert back == ev
        assert ev.subject() == "sy.evt.node.a1"
    assert "lost" in lost.summary() and "6.0s" in lost.summary()


def test_heartbeat_round_trip() -> None:
    hb = Heartbeat(node="n", role="api", infra="i", version="1", host="h", pid=2, uptime_s=1.5,
                   interval_s=2.0, state=ApiState(workers=2))
    assert HEARTBEAT.decode(HEARTBEAT.encode(hb)) == hb


@pytest.mark.parametrize("bad", ["a.b", "a b", "*", ">", "", "ü"])
def test_subject_tokens_reject_wildcards_dots_and_spaces(bad: str) -> None:
    with pytest.raises(ValueError, match="expected letters, digits"):
        subjects.heartbeat("api", bad)


def test_names_are_bounded_in_length_and_refused_as_bad_request() -> None:
    """A name travels into subjects and KV keys; nats-server closes a connection whose
    control line passes 4 KiB, so a long name must be refused before it gets there."""
    from protocol.errors import BadRequest

    assert subjects.token("a" * subjects.MAX_TOKEN) == "a" * subjects.MAX_TOKEN
    with pytest.raises(BadRequest, match="at most 128") as info:
        subjects.heartbeat("api", "a" * 5000)
    assert info.value.code == "bad_request"
    assert len(str(info.value)) < 300  # the message does not echo 5,000 characters
    with pytest.raises(ValueError, match="expected letters"):
        subjects.token("")


def test_subject_space_is_namespaced() -> None:
    assert subjects.heartbeat("api", "n1") == "sy.hb.api.n1"
    assert subjects.command("deployer", "nodes.list") == "sy.cmd.deployer.nodes.list"
    assert subjects.node_command("n1", "ping") == "sy.node.n1.ping"
    assert subjects.api_endpoint("churn", "predict") == "sy.api.v1.churn.predict"
    assert subjects.event("deploy", "prod", "churn") == "sy.evt.deploy.prod.churn"


def test_request_envelope_leaves_room_for_identity_and_signature() -> None:
    req = Request(body=ListNodes(), id="1", ts=0.0, identity="UABC", signature="sig")
    back = DEPLOYER.requests.decode(encode(req))
    assert (back.identity, back.signature) == ("UABC", "sig")


def test_a_command_finds_its_family_whatever_was_imported_first() -> None:
    import subprocess
    import sys
    code = ("from protocol.registry import ListNodes\nfrom protocol.base import Family\n"
            "print(Family.of(ListNodes).role)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "deployer"
