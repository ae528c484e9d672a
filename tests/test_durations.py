"""One duration grammar (nrm/durations.py): the manifest and the
downstream environment read every unit-carrying duration the same way."""

from decimal import Decimal

import pytest

from nrm import durations
from nrm.downstream import parse_duration_ns
from nrm.manifest import ManifestError, parse_duration

WITH_UNITS = ["10ms", "250us", "250\u00b5s", "2s", "0.5ms", "7ns", "1e3ms", " 5 ms ",
              "0.010000000s", ".5s", "0s"]


@pytest.mark.parametrize("text", WITH_UNITS)
def test_manifest_and_downstream_agree_on_durations_with_units(text):
    assert parse_duration_ns(text) == round(parse_duration(text) * 1e9)


@pytest.mark.parametrize("text", ["", "ms", "fast", "1h", "10 parsecs", "-1ms", "inf", "nan",
                                  "1e400s", "5 m s"])
def test_both_refuse_the_same_text(text):
    with pytest.raises(ValueError):
        parse_duration_ns(text)
    with pytest.raises(ManifestError):
        parse_duration(text)


@pytest.mark.parametrize("value, bare, expected", [
    ("3", durations.bare_seconds, Decimal(3)),
    ("3", durations.bare_nanoseconds, Decimal("3e-9")),
    (3, durations.bare_seconds, Decimal(3)),
    (0.1, durations.bare_seconds, Decimal("0.1")),
    ("0.1ms", durations.bare_nanoseconds, Decimal("0.0001")),
])
def test_a_bare_number_means_what_the_caller_says(value, bare, expected):
    assert durations.seconds(value, bare) == expected


@pytest.mark.parametrize("value", [True, None, [1], float("inf"), -0.5])
def test_non_durations_are_refused(value):
    with pytest.raises(ValueError):
        durations.seconds(value)
