"""Save/restore of controls and crash recovery through the journal."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from nrm.hw import HardwareError, open_platform
from nrm.hw.journal import Journal
from tests.fakehw import FakeNode

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CRASHER = """
import os, sys
sys.path.insert(0, {repo!r})
from nrm.hw import open_platform
p = open_platform("linux", root={root!r}, journal_path={journal!r})
p.write("cpu.duty_cycle", 1, 4)
p.write("cpu.duty_cycle", 1, 6)
p.write("cpu.frequency", 0, 1.2e9)
p.write("package.power_limit", 0, 50)
os._exit(3)        # no close(): controls stay applied, as after a crash
"""


def state(node: FakeNode):
    return (node.get_msr(1, 0x19A),
            node.read(f"{node.cpufreq_dir(0)}/scaling_governor"),
            node.read(f"{node.zone(0)}/constraint_0_power_limit_uw"))


def test_restore_after_crash_of_another_process(tmp_path, caplog):
    node = FakeNode(tmp_path / "hw", msr=True)
    journal = str(tmp_path / "run" / "controls.journal")
    original = state(node)
    code = CRASHER.format(repo=REPO, root=node.root, journal=journal)
    rc = subprocess.run([sys.executable, "-c", code], timeout=60).returncode
    assert rc == 3
    assert state(node) == (0x10 | 6, "userspace", "50000000")
    entries = Journal(journal).load()
    assert [(e["name"], e["index"]) for e in entries] == [
        ("cpu.duty_cycle", 1), ("cpu.frequency", 0), ("package.power_limit", 0)]
    with open_platform("linux", root=node.root, journal_path=journal) as p:
        assert state(node) == original
        assert not os.path.exists(journal)
        assert p.saved() == {}
    assert "restored cpu.duty_cycle[1]" in caplog.text


def test_restore_after_dropped_platform(tmp_path):
    node = FakeNode(tmp_path / "hw", msr=True)
    journal = str(tmp_path / "j")
    p = open_platform("linux", root=node.root, journal_path=journal)
    p.write("cpu.duty_cycle", 1, 3)
    del p                                            # never closed
    assert node.get_msr(1, 0x19A) == 0x13
    with open_platform("auto", root=node.root, journal_path=journal) as p2:
        assert node.get_msr(1, 0x19A) == 0
        assert p2.describe()["saved_controls"] == {}


def test_original_is_saved_once_and_dropped_on_restore(tmp_path):
    node = FakeNode(tmp_path / "hw", msr=True)
    journal = str(tmp_path / "j")
    with open_platform("linux", root=node.root, journal_path=journal) as p:
        p.write("cpu.duty_cycle", 0, 8)
        p.write("cpu.duty_cycle", 0, 4)
        p.write("cpu.duty_cycle", 1, 4)
        assert [json.loads(x)["original"] for x in open(journal)] == [0, 0]
        p.restore("cpu.duty_cycle", [0])
        assert node.get_msr(0, 0x19A) == 0 and node.get_msr(1, 0x19A) == 0x14
        assert [(e["name"], e["index"]) for e in Journal(journal).load()] == [
            ("cpu.duty_cycle", 1)]
    assert node.get_msr(1, 0x19A) == 0                # close restores the rest
    assert not os.path.exists(journal)


def test_unwritable_journal_refuses_the_write(tmp_path):
    node = FakeNode(tmp_path / "hw", msr=True)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    # the journal's directory is a regular file: ENOTDIR even for root
    with open_platform("linux", root=node.root, journal_path=str(blocker / "j")) as p:
        with pytest.raises(HardwareError, match="cannot journal"):
            p.write("cpu.duty_cycle", 0, 8)
        assert node.get_msr(0, 0x19A) == 0            # hardware untouched
        assert p.saved() == {}


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_full_disk_refuses_the_write(tmp_path):
    node = FakeNode(tmp_path / "hw", msr=True)
    with open_platform("linux", root=node.root, journal_path="/dev/full") as p:
        with pytest.raises(HardwareError, match="cannot journal.*No space left"):
            p.write("cpu.duty_cycle", 0, 8)
        assert node.get_msr(0, 0x19A) == 0


def test_torn_and_duplicate_lines(tmp_path):
    path = tmp_path / "j"
    first = {"backend": "linux", "name": "cpu.duty_cycle", "index": 0, "original": 0}
    later = dict(first, original=0x13)
    path.write_text(json.dumps(first) + "\n" + json.dumps(later) + "\n{\"backend\": \"li")
    entries = Journal(str(path)).load()
    assert entries == [first]                         # first original wins, torn line skipped


def test_unrestorable_entry_is_kept_as_the_original(tmp_path):
    node = FakeNode(tmp_path / "hw", msr=True)
    journal = tmp_path / "j"
    gone = {"backend": "linux", "name": "cpu.frequency", "index": 0,
            "original": {"no": "governor"}}
    other = {"backend": "emulated", "name": "cpu.duty_cycle", "index": 0, "original": 16}
    journal.write_text(json.dumps(gone) + "\n" + json.dumps(other) + "\n")
    p = open_platform("linux", root=node.root, journal_path=str(journal))
    try:
        # the bad entry stays the saved original: a new write must not replace it
        assert p.saved() == {"cpu.frequency": {0: {"no": "governor"}}}
        p.write("cpu.frequency", 0, 1.2e9)
        kept = Journal(str(journal)).load()
        assert {e["backend"] for e in kept} == {"linux", "emulated"}
        assert len(kept) == 2
        with pytest.raises(HardwareError, match="restore failed"):
            p.restore("cpu.frequency")
    finally:
        p.close()
