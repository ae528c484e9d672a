"""Settings, input counters and strategies shared by the fuzz suites.

The example budget comes from the environment so that one set of properties
serves both CI (a few seconds) and ``make fuzz`` (tens of thousands of
inputs): ``NRM_FUZZ_EXAMPLES`` per property, ``NRM_FUZZ_LONG=1`` for random
(non-derandomized) generation with the example database under
``.hypothesis/`` (git-ignored), so a failure found once is replayed first.
Settings are applied per test, never loaded as a global profile, so the
other hypothesis tests of the suite keep their own.
"""

from __future__ import annotations

import collections
import json
import os
from typing import Any, Dict

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

LONG = os.environ.get("NRM_FUZZ_LONG") == "1"
EXAMPLES = int(os.environ.get("NRM_FUZZ_EXAMPLES", "20000" if LONG else "100"))
#: daemon properties send a batch per example, so they get a quarter
DAEMON_EXAMPLES = max(5, EXAMPLES // 4)

_COMMON = dict(deadline=None, derandomize=not LONG, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.filter_too_much,
                                      HealthCheck.function_scoped_fixture])
FUZZ = settings(max_examples=EXAMPLES, **_COMMON)
FUZZ_DAEMON = settings(max_examples=DAEMON_EXAMPLES, **_COMMON)

#: target name -> {"inputs": n, "faults": n}; printed at the end of the run
#: (tests/fuzz/conftest.py) and written to $NRM_FUZZ_STATS as JSON.
STATS: Dict[str, Dict[str, int]] = collections.defaultdict(
    lambda: {"inputs": 0, "faults": 0})


def count(target: str, inputs: int = 1, faults: int = 0) -> None:
    """``faults``: inputs the code under test had to refuse (and survived)."""
    STATS[target]["inputs"] += inputs
    STATS[target]["faults"] += faults


def write_stats() -> None:
    path = os.environ.get("NRM_FUZZ_STATS")
    if path and STATS:
        with open(path, "w") as f:
            json.dump(dict(STATS), f, indent=1, sort_keys=True)


# ------------------------------------------------------------ strategies ---

HUGE_INTS = st.sampled_from([2 ** 63, -2 ** 63 - 1, 2 ** 64, 2 ** 200, -(10 ** 40)])
WEIRD_TEXT = st.sampled_from(["", " ", "\x00", "\u202e", "\U0001f600", "\ud800x", "a" * 5000,
                              "../../etc/passwd", "%s%n", "NaN", "1e400", "-0", "0x10",
                              "SCHED_FIFO", "DDCM", "  1  ", "true", "null"])


def scalars() -> st.SearchStrategy:
    return st.one_of(
        st.none(), st.booleans(), st.integers(), HUGE_INTS,
        st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20), WEIRD_TEXT)


def json_values(max_leaves: int = 12) -> st.SearchStrategy:
    """Arbitrary JSON-able values, unicode and huge numbers included."""
    return st.recursive(
        scalars(),
        lambda inner: st.one_of(st.lists(inner, max_size=4),
                                st.dictionaries(st.text(max_size=8), inner, max_size=4)),
        max_leaves=max_leaves)


def deep_nesting() -> st.SearchStrategy:
    """Text nested deep enough to reach recursion limits, yet small in bytes."""
    return st.tuples(st.integers(1, 6000), st.sampled_from(["[]", "{}", "{\"a\":}"])).map(
        lambda t: ("[" * t[0] + "]" * t[0]) if t[1] == "[]"
        else ("{\"a\":" * t[0] + "1" + "}" * t[0]))


@st.composite
def mutated(draw, valid: Dict[str, Any], keys=()) -> Any:
    """A valid message with one to three fields replaced, removed or added.

    ``keys`` are field names worth adding even when ``valid`` lacks them.
    """
    obj: Any = dict(valid)
    names = sorted(set(valid) | set(keys) | {"v", "type"})
    for _ in range(draw(st.integers(1, 3))):
        if not isinstance(obj, dict):
            break
        action = draw(st.sampled_from(["replace", "replace", "delete", "add", "version",
                                       "wrap"]))
        key = draw(st.sampled_from(names))
        if action == "replace":
            obj[key] = draw(json_values())
        elif action == "delete":
            obj.pop(key, None)
        elif action == "add":
            obj[draw(st.text(max_size=10))] = draw(json_values(4))
        elif action == "version":
            obj["v"] = draw(st.one_of(st.integers(-3, 3), HUGE_INTS, st.text(max_size=3)))
        else:
            obj = draw(st.sampled_from([[obj], {"msg": obj}, [obj, obj]]))
    return obj


def dumps(value: Any, draw) -> bytes:
    """Encode as JSON, then maybe damage the bytes."""
    text = json.dumps(value, ensure_ascii=draw(st.booleans()))
    data = text.encode("utf-8", "surrogatepass")
    damage = draw(st.sampled_from(["none", "none", "none", "truncate", "flip", "pad"]))
    if damage == "truncate" and data:
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif damage == "flip" and data:
        i = draw(st.integers(0, len(data) - 1))
        data = data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1:]
    elif damage == "pad":
        data = data + b" " * draw(st.sampled_from([1, 5000, 70000]))
    return data


@st.composite
def messages(draw, valid_examples, keys=()) -> bytes:
    """Bytes for one frame: random bytes, deep nesting, or a mutated valid message."""
    kind = draw(st.sampled_from(["bytes", "nested", "valid", "mutated", "mutated", "mutated"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "nested":
        return draw(deep_nesting()).encode()
    base = draw(st.sampled_from(valid_examples))
    if kind == "valid":
        return json.dumps(base).encode()
    return dumps(draw(mutated(base, keys)), draw)


# ------------------------------------------------- plain random corpus ---

NASTY = [None, True, -1, 0, 2 ** 63, 2 ** 64, -(2 ** 70), 1e308, -0.0, 0.5, "", "\u202e",
         "\U0001f600", "x" * 3000, [], {}, [[[]]], {"a": {"b": None}}, "1e400", "-5"]


def random_message(rng, valid) -> bytes:
    """One frame from a seeded ``random.Random``: for volume runs (memory
    growth), where hypothesis' per-example overhead would dominate."""
    kind = rng.randrange(6)
    if kind == 0:
        return rng.randbytes(rng.randrange(0, 300))
    if kind == 1:
        n = rng.randrange(1, 3000)
        return b"[" * n + b"]" * n
    obj = dict(rng.choice(valid))
    for _ in range(rng.randrange(1, 4)):
        key = rng.choice(sorted(obj) + ["v", "type", "extra"])
        if rng.random() < 0.2:
            obj.pop(key, None)
        else:
            obj[key] = rng.choice(NASTY)
    data = json.dumps(obj).encode()
    if kind == 3 and data:
        data = data[:rng.randrange(len(data))]
    elif kind == 4 and data:
        i = rng.randrange(len(data))
        data = data[:i] + bytes([rng.randrange(128, 256)]) + data[i + 1:]
    return data
