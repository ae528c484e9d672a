"""SIGKILL of nrmd mid-run: the next start restores controls and leaves no
task of the dead daemon running."""

import json
import os
import signal
import time

from tests.conftest import EXAMPLES, needs_root
from tests.daemon import DaemonProcess

BASIC = os.path.join(EXAMPLES, "basic.yml")


@needs_root()
def test_restart_after_sigkill_kills_orphans_and_restores_controls():
    d = DaemonProcess("--hw", "emulated", "--runtime", "cgroup").start()
    assert d.cli("run", "-d", "--container", "orphan", BASIC, "sleep", "600").returncode == 0
    listed = json.loads(d.cli("list", "--json").stdout)
    pid = listed[0]["tasks"][0]["pid"]
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    assert os.path.exists(f"/proc/{pid}")          # orphaned, still running
    d2 = DaemonProcess("--hw", "emulated", "--runtime", "cgroup", rundir=d.rundir).start()
    try:
        deadline = time.monotonic() + 5
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not os.path.exists(f"/proc/{pid}")
        assert json.loads(d2.cli("list", "--json").stdout) == []
        assert "killed 1 processes left by a previous nrmd" in d2.log()
    finally:
        assert d2.stop() == 0
