"""The one durable JSON-lines helper (nrm/jsonlines.py) that the control
journal, the state log and the campaign journal share."""

import os

import pytest

from nrm import jsonlines


def test_append_then_read_back(tmp_path):
    path = str(tmp_path / "j")
    fd = jsonlines.open_append(path)
    try:
        for durable in (True, False):
            jsonlines.append(fd, b'{"a":1}\n', durable)
    finally:
        os.close(fd)
    assert jsonlines.read(path) == b'{"a":1}\n{"a":1}\n'
    assert os.stat(path).st_mode & 0o777 == 0o600


@pytest.mark.parametrize("data, kept, torn", [
    (b"", b"", 0), (b"a\n", b"a\n", 0), (b"a\nb", b"a\n", 1), (b"abc", b"", 3),
    (b"a\nb\n", b"a\nb\n", 0),
])
def test_a_torn_last_line_is_left_out(data, kept, torn):
    assert jsonlines.complete(data) == (kept, torn)


def test_cutting_a_torn_tail_lets_the_next_record_start_clean(tmp_path):
    path = str(tmp_path / "j")
    with open(path, "wb") as f:
        f.write(b'{"a":1}\n{"b":')
    fd = jsonlines.open_append(path, readable=True)
    try:
        assert jsonlines.cut_torn_tail(fd) == 5
        assert jsonlines.cut_torn_tail(fd) == 0
        jsonlines.append(fd, b'{"c":3}\n', durable=True)
    finally:
        os.close(fd)
    assert jsonlines.read(path) == b'{"a":1}\n{"c":3}\n'


def test_replace_is_whole_and_removes_a_planted_tmp_link(tmp_path):
    path = str(tmp_path / "j")
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    os.symlink(victim, path + ".tmp")
    jsonlines.replace(path, b'{"new":1}\n', durable=True)
    assert jsonlines.read(path) == b'{"new":1}\n'
    assert victim.read_bytes() == b"precious\n"
    assert not os.path.lexists(path + ".tmp")


@pytest.mark.parametrize("kind", ["link", "fifo", "dir"])
def test_nothing_is_read_or_appended_through_what_is_not_a_plain_file(tmp_path, kind):
    path = str(tmp_path / "j")
    target = tmp_path / "target"
    target.write_bytes(b'{"planted":1}\n')
    if kind == "link":
        os.symlink(target, path)
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        os.mkdir(path)
    with pytest.raises(OSError):
        jsonlines.read(path)
    if kind == "link":
        with pytest.raises(OSError):
            jsonlines.open_append(path)
        assert target.read_bytes() == b'{"planted":1}\n'


def test_one_holder_at_a_time_and_the_refused_learn_who(tmp_path):
    path = str(tmp_path / "lock")
    fd = jsonlines.hold(path, "pid 42 on host h")
    try:
        with pytest.raises(jsonlines.Locked) as refused:
            jsonlines.hold(path, "pid 43")
        assert refused.value.holder == "pid 42 on host h"
    finally:
        os.close(fd)
    os.close(jsonlines.hold(path, "pid 43"))     # released with its fd


def test_a_lock_is_never_taken_through_a_link(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("precious\n")
    os.symlink(target, tmp_path / "lock")
    with pytest.raises(OSError):
        jsonlines.hold(str(tmp_path / "lock"), "pid 1")
    assert target.read_text() == "precious\n"


def test_a_turn_log_writes_once_per_turn_and_compacts_to_its_snapshot(tmp_path):
    path = str(tmp_path / "log")
    turns, errors, live = [], [], ['{"live":1}']
    log = jsonlines.TurnLog(path, lambda: live, errors.append, defer=turns.append,
                            compact=lambda size: size > 40)
    log.rewrite()                                   # open: the snapshot
    log.add('{"a":1}')
    log.add('{"b":2}')
    assert len(turns) == 1                          # one flush scheduled for the turn
    assert open(path).read() == '{"live":1}\n'     # nothing written before it
    turns.pop()()
    assert open(path).read() == '{"live":1}\n{"a":1}\n{"b":2}\n'
    log.add('{"c":"' + "x" * 30 + '"}')
    turns.pop()()                                   # past 40 bytes: rewritten from the snapshot
    assert open(path).read() == '{"live":1}\n'
    log.close()
    log.add('{"d":4}')                              # closed: dropped, never raised
    assert open(path).read() == '{"live":1}\n' and errors == []


def test_a_turn_log_reports_a_failed_write_and_goes_on(tmp_path):
    errors = []
    log = jsonlines.TurnLog(str(tmp_path / "missing" / "log"), lambda: [], errors.append)
    log.rewrite()                                   # its directory does not exist
    assert len(errors) == 1 and isinstance(errors[0], OSError)
    log.add('{"a":1}')                              # not open: nothing, no error
    assert len(errors) == 1
