"""The protocol decoders either return a typed message or raise ProtocolError.

Nothing else may escape them: the daemon catches ProtocolError around every
decode and turns it into an error reply or a counted drop, so any other
exception is a request without a reply or a dead drain loop.
"""

from __future__ import annotations

import json

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from nrm import protocol
from nrm.daemon.ingest import SeedTranslator
from tests.fuzz.common import FUZZ, count, messages
from tests.fuzz.samples import (DOWNSTREAM, DOWNSTREAM_KEYS, REQUEST_KEYS, REQUESTS, SEED,
                                SEED_KEYS)

UPSTREAM_CODES = {"malformed", "invalid", "version", "too_large"}
SEED_CODES = UPSTREAM_CODES | {"unknown"}


def _check(target: str, decode, union, data: bytes, codes=UPSTREAM_CODES):
    """Decode ``data``; assert the outcome is one of the two allowed."""
    try:
        msg = decode(data)
    except protocol.ProtocolError as exc:
        assert exc.code in codes, (exc.code, str(exc))
        assert str(exc)
        count(target, faults=1)
        return None
    count(target)
    assert isinstance(msg, union.__args__), type(msg)
    assert msg.v == protocol.PROTOCOL_VERSION
    # What was decoded must travel back out: replies echo the request id,
    # events echo downstream fields.
    again = msgspec.json.decode(protocol.encode(msg), type=union)
    assert again == msg
    return msg


@FUZZ
@given(st.binary(max_size=512))
def test_request_decoder_arbitrary_bytes(data):
    _check("upstream.decode.bytes", protocol.decode_request, protocol.Request, data)


@FUZZ
@given(messages(REQUESTS, REQUEST_KEYS))
def test_request_decoder_mutated(data):
    msg = _check("upstream.decode.mutated", protocol.decode_request, protocol.Request, data)
    if msg is not None:
        assert protocol.encode(protocol.Error(id=msg.id, code="x"))


@FUZZ
@given(messages(DOWNSTREAM, DOWNSTREAM_KEYS))
def test_downstream_decoder_mutated(data):
    _check("downstream.decode.mutated", protocol.decode_downstream, protocol.Downstream,
           data)


@FUZZ
@given(st.binary(max_size=512))
def test_downstream_decoder_arbitrary_bytes(data):
    _check("downstream.decode.bytes", protocol.decode_downstream, protocol.Downstream, data)


@FUZZ
@given(st.lists(messages(SEED, SEED_KEYS), min_size=1, max_size=8))
def test_seed_translator_mutated(datas):
    """Stateful (uuid -> container, phase counts): feed a sequence to one."""
    translator = SeedTranslator(bound=4)
    for data in datas:
        _check("seed.decode.mutated", translator.translate, protocol.Downstream, data,
               SEED_CODES)
    assert len(translator._containers) <= 4 and len(translator._phases) <= 4


@FUZZ
@given(st.binary(max_size=512))
def test_seed_translator_arbitrary_bytes(data):
    _check("seed.decode.bytes", SeedTranslator().translate, protocol.Downstream, data,
           SEED_CODES)


REPLIES = [json.loads(protocol.encode(m)) for m in (
    protocol.Error(id=1, code="invalid", message="m"), protocol.Ack(id=2, data={"a": [1]}),
    protocol.Started(id=3, container="c", task="t", pid=1, cpus=[0], mems=[0]),
    protocol.Output(id=4, task="t", stream="stderr"),
    protocol.Exit(id=5, task="t", container="c", code=1, status=1, profile={"e": 1.0}),
    protocol.Exits(id=6, exits=[protocol.BatchExit(key="k", container="c", pid=1, status=0,
                                                   started_at=1.0)]))]


@FUZZ
@given(messages(REPLIES, REQUEST_KEYS))
def test_reply_decoder(data):
    """The client's side of the channel obeys the same contract."""
    _check("upstream.decode.reply", protocol.decode_reply, protocol.Reply, data)
