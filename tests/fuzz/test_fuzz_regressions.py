"""The minimal failing inputs the fuzzers found, kept as plain tests.

Before the fixes: deep nesting raised RecursionError and invalid UTF-8
inside a string raised UnicodeDecodeError out of every decoder (a request
left unanswered; a downstream drain task ended, silently closing that
endpoint for good); a blank manifest key produced an error naming no field;
a lone surrogate escape ("\\ud800") in a manifest parsed, then could not
be encoded for the daemon.
"""

from __future__ import annotations

import pytest

from nrm import manifest, protocol
from nrm.daemon.ingest import SeedTranslator

NESTED = b"[" * 4000
# Typed decoders refuse a top-level array at once: nest inside a field.
NESTED_FIELD = b'{"type":"run","manifest":{"a":' + b"[" * 2000 + b"]" * 2000 + b"}}"
BAD_UTF8 = [b'{"type":"run","argv":["\xf4"]}', b'{"type":"run","manifest":{"\xf4a":1}}',
            b'{"type":"progress","container":"\xf4"}']


@pytest.mark.parametrize("decode", [protocol.decode_request, protocol.decode_reply,
                                    protocol.decode_downstream,
                                    SeedTranslator().translate])
@pytest.mark.parametrize("data", [NESTED, NESTED_FIELD,
                                  b'{"a":' * 640 + b"1" + b"}" * 640] + BAD_UTF8)
def test_decoders_refuse_with_protocol_error(decode, data):
    with pytest.raises(protocol.ProtocolError) as info:
        decode(data)
    assert info.value.code in ("malformed", "invalid", "unknown")


def test_seed_invalid_utf8_key():
    with pytest.raises(protocol.ProtocolError) as info:
        SeedTranslator().translate(b'{"\xf4ype":"application","event":"exit","uuid":"a"}')
    assert info.value.code == "malformed"


@pytest.mark.parametrize("doc", [{"": None}, {" ": 1}, {"name": "x", "app": {"": 1}}])
def test_blank_manifest_key_is_named(doc):
    with pytest.raises(manifest.ManifestError) as info:
        manifest.parse(doc)
    assert info.value.field and info.value.field.strip()
    assert str(info.value).startswith(info.value.field)


@pytest.mark.parametrize("text", [
    'name: "\\ud800x"\napp: {slice: {cpus: 1, mems: 1}}\n',
    '{"name": "x", "x-a": {"\\udfff": 1}, "app": {"slice": {"cpus": 1, "mems": 1}}}',
    '{"acKind": "ImageManifest", "name": "x", "annotations": [{"name": "a", "value": "\\udfff"}],'
    ' "app": {"isolators": [{"name": "argo/container", "value": {"cpus": "1", "mems": "1"}}]}}'])
def test_lone_surrogate_escapes_refused(text):
    """They parsed, then the client failed encoding the request (tests/fuzz)."""
    with pytest.raises(manifest.ManifestError) as info:
        manifest.parse(text)
    assert info.value.field
