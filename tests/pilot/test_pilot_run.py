"""nrm pilot end to end: real nrmd, real tasks, real slices."""

from __future__ import annotations

import glob
import json
import os
import tempfile

import pytest

from tests.nrmd import DaemonProcess


@pytest.fixture(scope="module")
def nrmd():
    with DaemonProcess() as d:
        yield d


def pilot(nrmd, tmp_path, requests, *args, name="jobs.json"):
    path = tmp_path / name
    path.write_text(requests if isinstance(requests, str) else json.dumps(requests))
    return nrmd.cli("pilot", "--file-path", str(path), "--wd", str(tmp_path / "wd"), *args)


def report(tmp_path):
    (path,) = glob.glob(str(tmp_path / "wd" / ".nrm-pilot-*" / "jobs.report"))
    with open(path) as f:
        return {e["name"]: e for e in map(json.loads, f)}


def submit(*jobs):
    return [{"request": "submit", "jobs": list(jobs)},
            {"request": "control", "command": "finishAfterAllTasksDone"}]


def test_each_task_runs_in_exactly_its_cores(nrmd, tmp_path):
    probe = ("echo $QCG_PM_CPU_SET $QCG_PM_NPROCS $QCG_PM_NODELIST "
             "$(grep Cpus_allowed_list /proc/self/status | cut -f2); sleep 0.3")
    jobs = [{"name": f"t{i}", "execution": {"script": probe, "stdout": f"t{i}.out"}}
            for i in range(2)]
    jobs.append({"name": "both", "execution": {"script": probe, "stdout": "both.out"},
                 "resources": {"numCores": {"exact": 2}}, "dependencies": {"after": ["t0"]}})
    r = pilot(nrmd, tmp_path, submit(*jobs), "--nodes", "2")
    assert r.returncode == 0, r.stderr
    seen = []
    for i in range(2):
        cpuset, nprocs, nodes, allowed = (tmp_path / "wd" / f"t{i}.out").read_text().split()
        assert (nprocs, nodes, allowed) == ("1", "n0", cpuset)
        seen.append(cpuset)
    assert sorted(seen) == ["0", "1"]               # two tasks at once, distinct cpus
    assert (tmp_path / "wd" / "both.out").read_text().split() == ["0,1", "2", "n0", "0-1"]


def test_report_states_and_exit_status(nrmd, tmp_path):
    r = pilot(nrmd, tmp_path, submit(
        {"name": "it", "execution": {"exec": "sh", "args": ["-c", "exit $0", "${itval}"]},
         "iteration": {"values": [0, 3]}},
        {"name": "next", "execution": {"exec": "true"}, "dependencies": {"after": ["it"]}},
        {"name": "missing", "execution": {"exec": "/nonexistent/prog"}},
        {"name": "fine", "execution": {"exec": "true"}}), "--nodes", "2")
    assert r.returncode == 1
    rep = report(tmp_path)
    assert {n: e["state"] for n, e in rep.items()} == {
        "it:0": "SUCCEED", "it:1": "FAILED", "it": "FAILED", "next": "OMITTED",
        "missing": "FAILED", "fine": "SUCCEED"}
    assert rep["it:1"]["runtime"]["exit_code"] == 3
    assert rep["missing"]["runtime"]["exit_code"] == -1 and rep["missing"]["messages"]
    assert [h["state"] for h in rep["fine"]["history"]] == [
        "QUEUED", "SCHEDULED", "EXECUTING", "SUCCEED"]
    assert rep["fine"]["runtime"]["allocation"] in ("n0[0]", "n0[1]")
    (status,) = glob.glob(str(tmp_path / "wd" / ".nrm-pilot-*" / "final_status.json"))
    stats = json.load(open(status))
    assert stats["JobStats"]["TotalJobs"] == 4 and stats["IterationStats"]["FailedIterations"] == 1


def test_all_good_exits_zero_text_report_file_relative_to_wd(nrmd, tmp_path):
    r = pilot(nrmd, tmp_path, submit({"name": "a", "execution": {"exec": "true"}}),
              "--report-format", "text", "--report-file", "rep.txt")
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "wd" / "rep.txt").read_text()
    assert text.startswith("a (SUCCEED)\n") and "\texit_code: 0" in text


def test_execution_keys_env_and_slurm_schema(nrmd, tmp_path):
    (tmp_path / "wd").mkdir()
    (tmp_path / "wd" / "in.txt").write_text("from stdin\n")
    r = pilot(nrmd, tmp_path, submit({
        "name": "x", "execution": {
            "script": "cat; echo $GREETING $SLURM_NTASKS $SLURM_TASKS_PER_NODE; pwd; "
                      "echo oops >&2",
            "env": {"GREETING": "hi-${jname}"}, "wd": "sub-${it}", "stdin": "../in.txt",
            "stdout": "out", "stderr": "err"},
        "iteration": {"stop": 1}}), "--envschema", "slurm", "--nodes", "n:2")
    assert r.returncode == 0, r.stderr
    out = (tmp_path / "wd" / "sub-0" / "out").read_text().splitlines()
    assert out == ["from stdin", "hi-x 1 1", str(tmp_path / "wd" / "sub-0")]
    assert (tmp_path / "wd" / "sub-0" / "err").read_text() == "oops\n"


def test_bad_request_is_one_line_and_the_rest_runs(nrmd, tmp_path):
    reqs = submit({"name": "good", "execution": {"exec": "true"}})
    reqs.insert(1, {"request": "submit", "jobs": [
        {"name": "bad", "execution": {"exec": "true"}, "dependancies": {"after": []}}]})
    r = pilot(nrmd, tmp_path, reqs)
    assert r.returncode == 1
    errors = [line for line in r.stderr.decode().splitlines() if "request 2" in line]
    assert errors == [f"nrm pilot: {tmp_path / 'jobs.json'}: request 2 (submit), job 'bad': "
                      "dependancies: unknown key (did you mean 'dependencies'?)"]
    assert set(report(tmp_path)) == {"good"}


@pytest.mark.parametrize("content,args,words", [
    ('[{"request": "listJobs"},\n {bad}]', (), "line 2"),
    ('{"request": "listJobs"}', (), "expected a list"),
    ("[]", ("--resume", "x"), "x/journal.jsonl: cannot read"),
    ("[]", ("--governor",), "not supported by nrm pilot yet"),
    ("[]", ("--nodes", "0"), "CORES at least 1"),
])
def test_unusable_input_exits_2(nrmd, tmp_path, content, args, words):
    r = pilot(nrmd, tmp_path, content, *args)
    assert r.returncode == 2
    lines = r.stderr.decode().splitlines()
    assert len(lines) == 1 and words in lines[0]


def test_finish_cancels_running_tasks(nrmd, tmp_path):
    r = pilot(nrmd, tmp_path, [
        {"request": "submit", "jobs": [{"name": "long", "execution": {"exec": "sleep",
                                                                      "args": ["30"]}},
                                       {"name": "after", "execution": {"exec": "true"},
                                        "dependencies": {"after": ["long"]}}]},
        {"request": "finish"}])
    assert r.returncode == 1
    rep = report(tmp_path)
    assert (rep["long"]["state"], rep["after"]["state"]) == ("CANCELED", "CANCELED")
    assert rep["long"]["runtime"]["rtime"] < "0:00:10"


def test_starts_a_private_nrmd_when_none_answers(tmp_path):
    empty = tempfile.mkdtemp(prefix="nrmt-none-", dir="/tmp")
    with DaemonProcess() as other:      # only for its cli() helper and env
        wf = tmp_path / "wf.yaml"
        wf.write_text("jobs:\n  - name: a\n    execution: {exec: 'true'}\n"
                      "    nrm: {power: NONE}\n")
        r = other.cli("pilot", "--file-path", str(wf), "--wd", str(tmp_path / "wd"),
                      env={"NRM_RUNTIME_DIR": empty})
    assert r.returncode == 0, r.stderr
    assert report(tmp_path)["a"]["state"] == "SUCCEED"
    os.rmdir(empty)
