"""The shared words (``proto.vocab``) read and write as the plain strings the wire carries."""

from __future__ import annotations

import json

from proto import strata_pb2
from proto.vocab import EventKind, FinishReason, Role, Tier


def test_members_are_their_strings_everywhere() -> None:
    assert Tier.HOST == "host" and {"host": 1}[Tier.HOST] == 1 and Tier("disk") is Tier.DISK
    assert f"{Role.PREFILL}-0" == "prefill-0" and str(EventKind.REMOVED) == "removed"
    assert json.dumps({Tier.DISK: [FinishReason.STOP]}) == '{"disk": ["stop"]}'
    assert [str(t) for t in Tier] == ["device", "host", "disk"]  # fastest first


def test_protobuf_fields_take_them_as_strings() -> None:
    msg = strata_pb2.GenerateResponse(finish_reason=FinishReason.LENGTH)
    msg.usage.cached_tokens_by_tier[Tier.HOST] = 32
    back = strata_pb2.GenerateResponse.FromString(msg.SerializeToString())
    assert back.finish_reason == "length" and dict(back.usage.cached_tokens_by_tier) == {"host": 32}
    assert type(back.finish_reason) is str
