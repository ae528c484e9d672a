"""docs/protocol.md must describe exactly the types in nrm/protocol.py."""

import os

from nrm import protocol

DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "protocol.md")


def test_generated_reference_is_current():
    text = open(DOC).read()
    start = text.index("<!-- BEGIN GENERATED -->") + len("<!-- BEGIN GENERATED -->")
    end = text.index("<!-- END GENERATED -->")
    assert text[start:end].strip() == protocol.markdown_reference().strip(), \
        "regenerate with: python -m nrm.protocol"


def test_every_tag_is_documented():
    text = open(DOC).read()
    for tag in protocol.request_tags() + protocol.reply_tags() + protocol.downstream_tags():
        assert f"#### `{tag}`" in text


def test_round_trip_and_version_check():
    msg = protocol.Run(id=7, argv=["true"], manifest={"name": "x"})
    assert protocol.decode_request(protocol.encode(msg)) == msg
    bad = protocol.encode(protocol.Status(v=2))
    try:
        protocol.decode_request(bad)
    except protocol.ProtocolError as exc:
        assert exc.code == "version"
    else:
        raise AssertionError("version 2 accepted")
