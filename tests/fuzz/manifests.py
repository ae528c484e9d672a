"""Valid manifests (examples/) and a mutator that damages them in place."""

from __future__ import annotations

import copy
import os

import yaml
from hypothesis import strategies as st

from tests.nrmd import REPO
from tests.fuzz.common import json_values, scalars

EXAMPLES_DIR = os.path.join(REPO, "examples")
VALID = []
for _name in sorted(os.listdir(EXAMPLES_DIR)):
    if _name.endswith((".json", ".yml")):
        with open(os.path.join(EXAMPLES_DIR, _name)) as _f:
            VALID.append(yaml.safe_load(_f))
assert any("acKind" in v for v in VALID) and any("acKind" not in v for v in VALID)

FIELD_WORDS = ["name", "version", "app", "slice", "cpus", "mems", "scheduler", "policy",
               "priority", "hwbind", "perfwrapper", "power", "profile", "damper", "slowdown",
               "monitoring", "ratelimit", "enabled", "image", "path", "type", "binds",
               "annotations", "x-tag", "acKind", "acVersion", "isolators", "value",
               "argo/container", "argo/scheduler", "argo/power", "argo/powerpolicy",
               "argo/hwbind", "argo/monitoring", "argo/perfwrapper", "ImageManifest"]


def _paths(obj, prefix=()):
    """Every container path inside ``obj`` (dicts and lists), root included."""
    yield prefix
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) \
        if isinstance(obj, list) else ()
    for k, v in items:
        if isinstance(v, (dict, list)):
            yield from _paths(v, prefix + (k,))


@st.composite
def mutated_manifests(draw):
    doc = copy.deepcopy(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(doc))
        path = draw(st.sampled_from(paths))
        node = doc
        for k in path:
            node = node[k]
        value = draw(st.one_of(json_values(6), scalars()))
        if isinstance(node, dict):
            key = draw(st.one_of(st.sampled_from(sorted(node) or ["name"]),
                                 st.sampled_from(FIELD_WORDS), st.text(max_size=6)))
            if draw(st.booleans()) and key in node:
                del node[key]
            else:
                node[key] = value
        elif isinstance(node, list) and node:
            i = draw(st.integers(0, len(node) - 1))
            node[i] = draw(st.sampled_from([value, {"name": draw(st.sampled_from(FIELD_WORDS)),
                                                    "value": value}]))
    return doc
