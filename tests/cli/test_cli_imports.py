"""Which modules the `nrm` CLI imports for a verb: only that verb's, and
for a request (status, run with a JSON manifest) neither asyncio nor PyYAML
nor the CURVE module nor pilot/campaign. Modules, not timings: the timings
are benchmarks/cli_startup.py's."""

import importlib
import os
import subprocess
import sys

import pytest

from nrm.cli.main import VERBS, chosen_verb
from tests.conftest import EXAMPLES

AVOIDABLE = ("asyncio", "yaml", "nrm.transport.curve", "nrm.pilot", "nrm.campaign",
             "nrm.cli.pilot", "nrm.cli.campaign", "hashlib")


def _imported(*argv: str) -> set:
    """Modules a real `nrm ARGV` loaded (against a runtime dir with no nrmd)."""
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "nrm.cli.main",
                        "--runtime-dir", "/nonexistent/nrm", *argv],
                       capture_output=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=os.getcwd()))
    lines = r.stderr.decode().splitlines()
    assert any("nrmd is not running" in line for line in lines), r.stderr
    return {line.split("|")[2].strip() for line in lines if line.startswith("import time:")}


@pytest.mark.parametrize("argv", [
    ("status", "--json"), ("list",), ("listen", "-t", "power"), ("power",),
    ("run", os.path.join(EXAMPLES, "basic.json"), "true"),
])
def test_a_request_imports_nothing_it_does_not_need(argv):
    loaded = _imported(*argv)
    heavy = sorted(m for m in loaded if any(m == a or m.startswith(a + ".") for a in AVOIDABLE))
    assert heavy == [], heavy
    other_verbs = sorted(m for name, (m, _) in VERBS.items() if m in loaded and name != argv[0])
    assert other_verbs == [], other_verbs


def test_yaml_only_for_a_yaml_manifest():
    assert "yaml" in _imported("run", os.path.join(EXAMPLES, "basic.yml"), "true")


def test_the_verb_table_says_what_the_modules_say():
    for name, (module_name, help_text) in VERBS.items():
        module = importlib.import_module(module_name)
        assert (module.NAME, module.HELP) == (name, help_text)


def test_the_verb_is_found_after_global_options():
    assert chosen_verb(["--timeout", "3", "--uri", "tcp://h:1", "run", "m.yml"]) == "run"
    assert chosen_verb(["--runtime-dir=/x", "status"]) == "status"
    assert chosen_verb(["--help", "run"]) == ""
    assert chosen_verb(["nope"]) == "" and chosen_verb([]) == ""


def test_the_client_names_the_same_uri_variable_as_curve():
    from nrm import client
    from nrm.transport import curve
    assert client.ENV_URI == curve.ENV_URI
