"""Every decoder of the protocol refuses junk with ``DecodeError`` and nothing else, so
the one place that turns a decode failure into ``bad_request`` (or a dropped message)
sees every bad input.  Pure: no server."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.base import Codec
from protocol.errors import DecodeError
from protocol.families import ALL
from protocol.heartbeat import HEARTBEAT
from protocol.reports import REPORT
from protocol.stream import EVENT
from tests.fuzz.strategies import dump, junk_bytes, message, message_types

CODECS: dict[str, Codec[Any]] = {"heartbeat": HEARTBEAT, "report": REPORT, "event": EVENT}
for _family in ALL:
    CODECS[f"{_family.role} requests"] = _family.requests
    CODECS[f"{_family.role} replies"] = _family.replies


@given(name=st.sampled_from(sorted(CODECS)),
       data=junk_bytes | st.sampled_from(message_types()).flatmap(message).map(dump))
def test_codec_refuses_junk_with_decode_error_only(name: str, data: bytes) -> None:
    refused: DecodeError | None = None
    try:
        CODECS[name].decode(data, "sy.fuzz")
    except DecodeError as exc:
        refused = exc
    if refused is not None:
        assert refused.subject == "sy.fuzz" and refused.reason and refused.raw == data[:512]


def test_deep_nesting_is_a_decode_error() -> None:
    with pytest.raises(DecodeError, match="nested too deeply"):
        HEARTBEAT.decode(b'{"a":' * 5000 + b"1" + b"}" * 5000)
