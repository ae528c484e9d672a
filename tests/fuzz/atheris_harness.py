"""Coverage-guided fuzzing (atheris, i.e. libFuzzer) of what parses input.

    .venv/bin/python tests/fuzz/atheris_harness.py TARGET [libFuzzer options]

TARGET is ``request``, ``downstream``, ``seed`` or ``manifest``. The same
contract as the hypothesis suites: the decoder returns a message or raises
ProtocolError, the parser returns a Manifest or raises ManifestError; any
other exception is reported by libFuzzer as a crash, with the input saved
as ``crash-*``. Our modules and PyYAML (pure Python here) are instrumented,
so coverage of the manifest path guides the search; msgspec is C and opaque.

Not part of ``make test``: atheris is optional (``make fuzz`` installs it
when it can), and a run is bounded by ``-max_total_time``.
"""

from __future__ import annotations

import os
import sys

import atheris

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, REPO)

with atheris.instrument_imports(include=["nrm", "yaml"]):
    import yaml  # noqa: F401  (instrumented for the manifest target)
    from nrm import manifest, protocol
    from nrm.daemon.ingest import SeedTranslator


def _seeds(target: str):
    """Valid inputs to start from, so the search begins inside the format."""
    import json

    from tests.fuzz import samples
    if target == "manifest":
        ex = os.path.join(REPO, "examples")
        for name in sorted(os.listdir(ex)):
            if name.endswith((".json", ".yml")):
                with open(os.path.join(ex, name), "rb") as f:
                    yield f.read()
        return
    pool = {"request": samples.REQUESTS, "downstream": samples.DOWNSTREAM,
            "seed": samples.SEED}[target]
    for msg in pool:
        yield json.dumps(msg).encode()


def _tokens(target: str):
    from tests.fuzz import samples
    from tests.fuzz.manifests import FIELD_WORDS
    keys = {"request": samples.REQUEST_KEYS, "downstream": samples.DOWNSTREAM_KEYS,
            "seed": samples.SEED_KEYS, "manifest": FIELD_WORDS}[target]
    yield from ('"%s":' % k for k in keys)
    yield from ("{", "}", "[", "]", ",", "null", "true", "false", "-1", "1e400",
                "18446744073709551616", '"\\u0000"', "\udcf4", ": ", "- ", "&a ", "*a",
                "!!binary ", "<<: ")
    if target != "manifest":
        tags = protocol.request_tags() + protocol.downstream_tags() + [
            "application", "start", "progress", "phase_context", "exit"]
        yield from ('"%s"' % t for t in tags)


def _escape(word: str) -> str:
    """libFuzzer dictionary syntax: printable ASCII, else \\xHH per byte."""
    return "".join(chr(b) if 32 <= b < 127 and b not in (34, 92) else "\\x%02X" % b
                   for b in word.encode("utf-8", "surrogateescape"))


def _manifest(data: bytes):
    try:
        manifest.parse(data)
    except manifest.ManifestError:
        pass


def _decoder(decode):
    def one(data: bytes):
        try:
            decode(data)
        except protocol.ProtocolError:
            pass
    return one


def _seed(data: bytes):
    # One translator per input would hide state bugs; one per process could
    # grow: it is bounded (4096 uuids), which this also exercises.
    try:
        _TRANSLATOR.translate(data)
    except protocol.ProtocolError:
        pass


_TRANSLATOR = SeedTranslator()
TARGETS = {"request": _decoder(protocol.decode_request),
           "downstream": _decoder(protocol.decode_downstream),
           "seed": _seed, "manifest": _manifest}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit("usage: atheris_harness.py {%s} [libFuzzer options]" % ",".join(TARGETS))
    target = sys.argv[1]
    corpus = os.path.join(REPO, ".hypothesis", "atheris", target)
    os.makedirs(corpus, exist_ok=True)
    for i, data in enumerate(_seeds(target)):
        with open(os.path.join(corpus, "seed-%d" % i), "wb") as f:
            f.write(data)
    # msgspec gives no coverage feedback, so hand libFuzzer the tokens.
    words = os.path.join(REPO, ".hypothesis", "atheris", target + ".dict")
    with open(words, "w") as f:
        for word in _tokens(target):
            f.write('"%s"\n' % _escape(word))
    argv = [sys.argv[0], "-dict=" + words] + sys.argv[2:] + [corpus]
    atheris.Setup(argv, TARGETS[target])
    atheris.Fuzz()


if __name__ == "__main__":
    main()
