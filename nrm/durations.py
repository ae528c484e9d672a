"""The one duration grammar of nrm: manifests, environment variables, files.

A duration is a non-negative number with an optional unit (ns, us, µs, ms,
s). What a bare number means depends on where it is written (seconds in an
nrm manifest, nanoseconds in ``NRM_RATELIMIT`` and in the seed-era
manifest's ratelimit), so callers pass that rule. Decimal arithmetic keeps
"0.1ms" equal to the literal 0.0001 instead of one ulp away from it.

Kept free of heavy imports: instrumented programs import it through
``nrm.downstream``.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation
from typing import Any, Callable

NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_DURATION = re.compile(r"(%s)\s*(ns|us|\u00b5s|ms|s)?" % NUMBER)
UNIT_EXPONENTS = {"ns": -9, "us": -6, "\u00b5s": -6, "ms": -3, "s": 0}
EXPECTED = "a non-negative duration (seconds, or a number with ns/us/ms/s)"


def bare_seconds(dec: Decimal) -> Decimal:
    return dec


def bare_nanoseconds(dec: Decimal) -> Decimal:
    return dec.scaleb(-9)


def seconds(value: Any, bare: Callable[[Decimal], Decimal] = bare_seconds) -> Decimal:
    """Seconds from a number or a string with a unit; ValueError(EXPECTED)
    for anything else (a bool, a negative, inf, nan, an unknown unit)."""
    if isinstance(value, bool):
        raise ValueError(EXPECTED)
    unit = None
    if isinstance(value, int):
        dec = Decimal(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(EXPECTED)
        dec = Decimal(repr(value))
    elif isinstance(value, str):
        m = _DURATION.fullmatch(value.strip())
        if not m:
            raise ValueError(EXPECTED)
        try:
            dec = Decimal(m.group(1))
        except InvalidOperation:  # pragma: no cover - the regex admits only numbers
            raise ValueError(EXPECTED) from None
        unit = m.group(2)
    else:
        raise ValueError(EXPECTED)
    if dec < 0:
        raise ValueError(EXPECTED)
    secs = dec.scaleb(UNIT_EXPONENTS[unit]) if unit else bare(dec)
    if not math.isfinite(float(secs)):
        raise ValueError(EXPECTED)
    return secs
