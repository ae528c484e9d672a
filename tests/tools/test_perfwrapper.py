"""nrm-perfwrapper: perf's interval lines become performance messages."""

import json
import shutil
import sys

import pytest
import zmq

from nrm import paths
from nrm.tools.perfwrapper import parse_line
from tests.nrmd import wait_subscribed


@pytest.mark.parametrize("line,expected", [
    ("     0.200252721,0.62,msec,task-clock,621554,100.00,0.003,CPUs utilized",
     (0.200252721, 0.62, "task-clock")),
    ("1.000,123456,,instructions,1000000,100.00,,", (1.0, 123456.0, "instructions")),
    ("     0.400670608,<not counted>,msec,task-clock,0,100.00,,", None),
    ("<not supported>,,instructions,0,100.00,,", None),
    ("# started on Sat", None),
])
def test_parse_line(line, expected):
    assert parse_line(line) == expected


@pytest.mark.skipif(not shutil.which("perf"), reason="perf not installed")
def test_perfwrapper_reports_through_the_daemon(daemon, tmp_path):
    manifest = tmp_path / "perf.yml"
    manifest.write_text("name: perf\napp:\n  slice: {cpus: 1, mems: 1}\n  perfwrapper: true\n")
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.connect(paths.events_uri(daemon.rundir))
    sub.setsockopt(zmq.SUBSCRIBE, b"performance")
    try:
        wait_subscribed(daemon, "performance")
        busy = "import time\nt = time.time()\nwhile time.time() - t < 2.5: pass\nprint('done')"
        r = daemon.cli("run", str(manifest), sys.executable, "-c", busy)
        assert r.returncode == 0, r.stderr
        assert r.stdout == b"done\n"      # the task's output is untouched
        assert sub.poll(5000), daemon.log()[-2000:]
        event = json.loads(sub.recv_multipart()[1])
    finally:
        sub.close(linger=0)
    assert event["event"] in ("instructions", "task-clock"), event
    assert event["payload"] > 0
