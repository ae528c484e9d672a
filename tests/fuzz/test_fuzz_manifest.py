"""Manifests: parse into the model, or raise ManifestError naming the field.

The daemon (root) rebuilds every manifest a user sends with
``Manifest.from_dict``; any exception other than ManifestError would be an
``internal`` error at best. A structural error must say which field to fix.
"""

from __future__ import annotations

import json

import yaml
from hypothesis import given
from hypothesis import strategies as st

from nrm import manifest, protocol
from nrm.manifest import Manifest, ManifestError
from tests.fuzz.common import FUZZ, count, deep_nesting, scalars
from tests.fuzz.manifests import FIELD_WORDS, mutated_manifests


def _check(target: str, value, source: str = "<fuzz>"):
    """Parse; assert the only two outcomes the daemon can handle."""
    try:
        m = manifest.parse(value, source=source)
    except ManifestError as exc:
        count(target, faults=1)
        text = str(exc)
        assert text
        if isinstance(value, dict) and "nested too deeply" not in text:
            assert exc.field, text  # a structural problem names its field
            assert text.startswith(exc.field)
        else:
            assert exc.field or source in text, text
        return None
    count(target)
    assert isinstance(m, Manifest)
    # What the client ships, the daemon must accept unchanged.
    canonical = m.to_dict()
    wire = protocol.encode(protocol.Run(manifest=canonical))  # what nrm.client sends
    again = Manifest.from_dict(protocol.decode_request(wire).manifest)
    assert again.to_dict() == canonical
    return m


def structures():
    keys = st.one_of(st.sampled_from(FIELD_WORDS), st.text(max_size=6))
    return st.recursive(scalars(), lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=5)),
        max_leaves=20).filter(lambda v: isinstance(v, dict)) | st.dictionaries(
        keys, st.recursive(scalars(), lambda inner: st.one_of(
            st.lists(inner, max_size=3), st.dictionaries(keys, inner, max_size=4))),
        max_size=5)


@FUZZ
@given(structures())
def test_arbitrary_structures(d):
    _check("manifest.dict.arbitrary", d)
    try:
        Manifest.from_dict(d)
    except ManifestError as exc:
        assert exc.field or "nested too deeply" in str(exc)


@FUZZ
@given(mutated_manifests())
def test_mutated_valid_manifests(d):
    _check("manifest.dict.mutated", d)


@FUZZ
@given(mutated_manifests(), st.sampled_from(["json", "yaml", "yaml-flow"]))
def test_mutated_manifest_text(d, form):
    if form == "json":
        text = json.dumps(d)
    else:
        text = yaml.safe_dump(d, default_flow_style=(form == "yaml-flow"), allow_unicode=True)
    _check("manifest.text.mutated", text, source="m." + form)
    _check("manifest.text.mutated", text.encode("utf-8", "surrogatepass"), source="m." + form)


YAML_BITS = ["name: x\n", "version: 1\n", "app:\n", "  slice: {cpus: 1, mems: 1}\n",
             "  power: {policy: DDCM, damper: 1ms}\n", "acKind: ImageManifest\n",
             "  isolators:\n", "  - name: argo/container\n", "    value: {cpus: '1'}\n",
             "&a [1, 2]\n", "x-a: &b {k: *b}\n", "b: *a\n", "<<: {name: y}\n", "? [a]\n",
             "!!python/object:os.system {}\n", "!!binary aGVsbG8=\n", "!!set {a, b}\n",
             "2001-12-14\n", ".inf\n", ".nan\n", "0x1F\n", "1_000\n", "- \n", "\t\n", "{", "}",
             "[", "]", ":", "'", '"', "\ufeff", "\x00", "\u2028", "#c\n", "---\n", "...\n",
             "%YAML 1.1\n", "  ", "name: x\nname: y\n"]


@FUZZ
@given(st.one_of(st.text(max_size=300), st.binary(max_size=300),
                 st.lists(st.sampled_from(YAML_BITS), max_size=20).map("".join),
                 deep_nesting(), st.sampled_from(["a: " + "[" * 100000, "x" * 70000])))
def test_arbitrary_text(text):
    _check("manifest.text.arbitrary", text)
