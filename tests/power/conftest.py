"""Fixtures the power tests share."""

import os
import subprocess

import pytest

from tests.conftest import EXAMPLES


@pytest.fixture(scope="module")
def imbalance():
    r = subprocess.run(["make", "-s", "-C", EXAMPLES, "imbalance"], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot build examples/imbalance: " + r.stderr.decode()[-500:])
    return os.path.join(EXAMPLES, "imbalance")
