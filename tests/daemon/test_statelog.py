"""The state log: what the next nrmd reads after a crash."""

import subprocess

from nrm.daemon.statelog import (COMPACT_BYTES, ContainerRecord, StateLog, TaskRecord,
                                 pid_start_time)


def _container(cid="c1"):
    return ContainerRecord(id=cid, uid=1000, manifest={"name": "x"}, cpus=[0], mems=[0],
                           shared=False, cgroups={"cpuset": "/sys/fs/cgroup/cpuset/nrm/s1"})


def _task(proc, tid="t1", cid="c1"):
    return TaskRecord(id=tid, container=cid, pid=proc.pid, start=pid_start_time(proc.pid),
                      argv=["sleep", "60"], detach=False)


def test_replay_keeps_what_is_still_running(tmp_path):
    path = str(tmp_path / "state.log")
    with subprocess.Popen(["sleep", "60"]) as a, subprocess.Popen(["sleep", "60"]) as b:
        log = StateLog(path)
        log.open()
        log.container_started(_container("c1"))
        log.task_started(_task(a, "t1", "c1"))
        log.task_started(_task(b, "t2", "c1"))
        log.container_started(_container("c2"))
        log.task_ended("c1", "t2")
        log.container_ended("c2")
        found = StateLog(path).load()
        assert list(found) == ["c1"] and list(found["c1"].tasks) == ["t1"]
        assert found["c1"].tasks["t1"].alive()
        a.kill(), b.kill()
        a.wait()
        assert not found["c1"].tasks["t1"].alive()


def test_a_reused_pid_is_not_ours(tmp_path):
    with subprocess.Popen(["sleep", "60"]) as p:
        rec = _task(p)
        rec.start -= 1               # same pid, another process's start time
        assert not rec.alive()
        p.kill()


def test_torn_and_garbage_lines_are_skipped(tmp_path):
    path = tmp_path / "state.log"
    with subprocess.Popen(["sleep", "60"]) as p:
        log = StateLog(str(path))
        log.open()
        log.container_started(_container())
        log.task_started(_task(p))
        with open(path, "ab") as f:
            f.write(b'{"op": "task_end", "id": "t1", "conta')     # cut by a crash
            f.write(b"\n\xff\xfe not json\n" + b"x" * 300000 + b"\n")
        found = StateLog(str(path)).load()
        assert list(found["c1"].tasks) == ["t1"]
        p.kill()


def test_compaction_keeps_live_state_only(tmp_path):
    path = tmp_path / "state.log"
    log = StateLog(str(path))
    log.open()
    log.container_started(_container("live"))
    for i in range(COMPACT_BYTES // 150 + 10):
        log.container_started(_container(f"gone{i}"))
        log.container_ended(f"gone{i}")
    assert path.stat().st_size < COMPACT_BYTES
    assert list(StateLog(str(path)).load()) == ["live"]


def test_clean_close_removes_the_log(tmp_path):
    path = tmp_path / "state.log"
    log = StateLog(str(path))
    log.open()
    log.container_started(_container())
    log.close(clean=True)
    assert not path.exists() and StateLog(str(path)).load() == {}


def test_records_from_one_manifest_object_share_its_dict_and_json(tmp_path):
    from nrm.manifest import parse
    log = StateLog(str(tmp_path / "state"))
    log.open()
    one = parse({"name": "a", "app": {"slice": {"cpus": 1, "mems": 1}}})
    same_text = parse({"name": "a", "app": {"slice": {"cpus": 1, "mems": 1}}})
    d1, d2, d3 = (log.manifest_dict(m) for m in (one, one, same_text))
    assert d1 is d2 and d1 is not d3 and d1 == d3 == one.to_dict()
    for cid, m in (("c1", one), ("c2", one), ("c3", same_text)):
        log.container_started(ContainerRecord(id=cid, uid=0, manifest=log.manifest_dict(m),
                                              cpus=[0], mems=[0], shared=False, cgroups={}), m)
    # a record whose dict did not come from manifest_dict is encoded as it is
    log.container_started(ContainerRecord(id="c4", uid=0, manifest={"name": "other"}, cpus=[0],
                                          mems=[0], shared=False, cgroups={}), one)
    log.flush()
    found = StateLog(str(tmp_path / "state")).load()
    assert [found[c].manifest["name"] for c in ("c1", "c2", "c3", "c4")] == ["a", "a", "a", "other"]
    log.close(clean=True)
