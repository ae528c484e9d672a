import os
import shutil

import pytest

from tests import receivers
from tests.nrmd import REPO, RUNDIRS, DaemonProcess, remove_left_cgroups

EXAMPLES = os.path.join(REPO, "examples")


@pytest.fixture(scope="session", autouse=True)
def no_cgroups_left_behind():
    """The cgroups of test daemons killed without a successor
    (tests/nrmd.py, remove_left_cgroups)."""
    yield
    if os.geteuid() == 0:
        remove_left_cgroups(RUNDIRS)


@pytest.fixture(scope="module")
def daemon():
    """One real nrmd per test module, in its own runtime dir."""
    d = DaemonProcess("--hw", "emulated", "--sensor-period", "0.1").start()
    yield d
    rc = d.stop()
    assert rc == 0, d.log()
    shutil.rmtree(d.rundir, ignore_errors=True)


def needs_root():
    return pytest.mark.skipif(os.geteuid() != 0, reason="needs root (cgroups, setuid)")


@pytest.fixture
def pull(tmp_path):
    """A downstream PULL with nrmd's receive mark (tests/receivers.py)."""
    with receivers.pull_socket(tmp_path) as endpoint:
        yield endpoint


@pytest.fixture
def slow_pull(tmp_path):
    """A downstream PULL that is always behind (tests/receivers.py)."""
    with receivers.pull_socket(tmp_path, receivers.SLOW_RCVHWM) as endpoint:
        yield endpoint
