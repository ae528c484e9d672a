"""nrm.pilot.jobfile: QCG request files, one table of good and bad cases."""

from __future__ import annotations

import json

import pytest

from nrm.pilot import jobfile
from nrm.pilot.jobfile import Count, Iteration, JobFileError

TRUE = {"exec": "/bin/true"}


def job(**kw):
    d = {"name": "j", "execution": dict(TRUE)}
    d.update(kw)
    return d


def submit(*jobs):
    return {"request": "submit", "jobs": list(jobs)}


GOOD = [
    (job(), lambda s: s.cores is None and s.execution.exec == "/bin/true"),
    (job(execution={"exec": "echo", "args": ["a", "${it}"], "env": {"A": "1"},
                    "wd": "w", "stdout": "o", "stderr": "e", "stdin": "i",
                    "modules": "gcc", "venv": "/v", "model": "threads"}),
     lambda s: s.execution.modules == ("gcc",) and s.execution.model == "threads"),
    (job(execution={"script": "echo hi"}), lambda s: s.execution.script == "echo hi"),
    (job(resources={"numCores": 4}), lambda s: s.cores == Count(exact=4)),
    (job(resources={"numCores": {"min": 1, "max": 3}, "numNodes": {"exact": 1}}),
     lambda s: s.cores == Count(min=1, max=3) and s.nodes.exact == 1),
    (job(iteration={"stop": 3}), lambda s: list(s.iteration.indexes()) == [0, 1, 2]),
    (job(iteration={"start": 2, "stop": 4}), lambda s: s.iteration.count == 2),
    (job(iteration={"values": ["a", "b"]}),
     lambda s: s.iteration == Iteration(values=("a", "b")) and s.iteration.value(1) == "b"),
    (job(iteration={"stop": 4}, resources={"numCores": {"min": 1, "scheduler": {
        "name": "split-into", "params": {"parts": 2}}}}),
     lambda s: s.cores.scheduler.name == "split-into"),
    (job(dependencies={"after": ["a", "b"]}), lambda s: s.after == ("a", "b")),
    (job(nrm={"power": "ddcm"}), lambda s: s.nrm.power == "DDCM"),
]


@pytest.mark.parametrize("desc,check", GOOD)
def test_good_jobs(desc, check):
    parsed = jobfile.parse_requests([submit(desc)])
    assert not parsed.errors, parsed.errors
    assert check(parsed.requests[0].jobs[0])


BAD = [
    # (job description, the error's field, words in the message)
    (job(dependancies={"after": ["a"]}), "dependancies", "did you mean 'dependencies'"),
    ({"name": "j"}, "execution", "missing"),
    ({"execution": TRUE}, "name", "non-empty string"),
    (job(execution={}), "execution", "neither exec nor script"),
    (job(execution={"exec": "a", "script": "b"}), "execution", "exclude"),
    (job(execution={"exec": "a", "args": "x"}), "execution.args", "list of strings"),
    (job(execution={"exec": "a", "args": [1]}), "execution.args[0]", "string"),
    (job(execution={"exec": "a", "env": []}), "execution.env", "object"),
    (job(execution={"exec": "a", "env": {"A": 1}}), "execution.env.A", "string"),
    (job(execution={"exec": "a", "stdot": "x"}), "execution.stdot", "did you mean 'stdout'"),
    (job(execution={"exec": "a", "model": "intelmpi"}), "execution.model",
     "Intel MPI is not installed"),
    (job(execution={"exec": "a", "model": "thread"}), "execution.model",
     "did you mean 'threads'"),
    (job(execution={"exec": "a", "model_opts": {"mpirun_arg": []}}),
     "execution.model_opts.mpirun_arg", "did you mean"),
    (job(resources={"numCores": {"exact": 2, "min": 1}}), "resources.numCores", "exact"),
    (job(resources={"numCores": {}}), "resources.numCores", "min and/or max"),
    (job(resources={"numCores": {"min": 3, "max": 2}}), "resources.numCores", "larger"),
    (job(resources={"numCores": 0}), "resources.numCores", "at least 1"),
    (job(resources={"numCores": True}), "resources.numCores", "object"),
    (job(resources={"numcores": 1}), "resources.numcores", "did you mean 'numCores'"),
    (job(resources={"numCores": {"min": 1, "scheduler": {"name": "split-into"}}}),
     "resources.numCores.scheduler", "needs iteration"),
    (job(iteration={"stop": 1}, resources={"numCores": {"min": 1, "max": 2, "scheduler": {
        "name": "maximum-iters"}}}), "resources.numCores.max", "maximum-iters"),
    (job(iteration={"stop": 1}, resources={"numCores": {"min": 1, "scheduler": {
        "name": "split"}}}), "resources.numCores.scheduler.name", "did you mean 'split-into'"),
    (job(iteration={"start": 3, "stop": 3}), "iteration", "below stop"),
    (job(iteration={"start": 0}), "iteration", "either stop or values"),
    (job(iteration={"stop": 2, "values": [1]}), "iteration", "either stop or values"),
    (job(iteration={"values": []}), "iteration.values", "non-empty list"),
    (job(dependencies={"after": "a"}), "dependencies.after", "list of strings"),
    (job(dependencies={"before": ["a"]}), "dependencies.before", "after"),
    (job(nrm={"power": "fast"}), "nrm.power", "unknown power policy"),
    (job(nrm={"manifest": "/nonexistent/m.yml"}), "nrm.manifest", "no such file"),
]


@pytest.mark.parametrize("desc,where,words", BAD)
def test_bad_jobs_one_error_naming_request_job_field(desc, where, words):
    good = {"request": "listJobs"}
    parsed = jobfile.parse_requests([good, submit(job(name="ok"), desc), good])
    assert [r.index for r in parsed.requests] == [1, 3]     # the others still run
    (err,) = parsed.errors
    assert err.index == 2 and err.where == where
    line = str(err)
    assert "\n" not in line and line.startswith("request 2 (submit), job ")
    assert words in line


BAD_REQUESTS = [
    ({"request": "sumbit", "jobs": []}, "did you mean 'submit'"),
    ({"jobs": []}, "unknown request type"),
    ("submit", "expected an object"),
    ({"request": "submit", "jobs": []}, "non-empty list"),
    ({"request": "submit", "jobs": [job(), job()]}, "given twice"),
    ({"request": "jobStatus"}, "jobNames"),
    ({"request": "jobInfo", "jobNames": ["a"], "withChilds": "yes"}, "withChilds"),
    ({"request": "control", "command": "finishAfterAll"}, "finishAfterAllTasksDone"),
    ({"request": "listJobs", "x": 1}, "unknown key"),
]


@pytest.mark.parametrize("req,words", BAD_REQUESTS)
def test_bad_requests(req, words):
    parsed = jobfile.parse_requests([req])
    assert not parsed.requests
    assert words in str(parsed.errors[0])


def test_every_request_type_parses():
    reqs = [submit(job()), {"request": "listJobs"}, {"request": "jobStatus", "jobNames": ["j"]},
            {"request": "jobInfo", "jobNames": ["j"], "withChilds": True},
            {"request": "cancelJob", "jobNames": ["j"]}, {"request": "removeJob",
                                                          "jobNames": ["j"]},
            {"request": "resourcesInfo"}, {"request": "control",
                                           "command": "finishAfterAllTasksDone"},
            {"request": "status"}, {"request": "finish"}]
    parsed = jobfile.parse_requests(reqs)
    assert not parsed.errors
    assert [r.kind for r in parsed.requests] == [r["request"] for r in reqs]
    assert parsed.requests[3].with_childs


@pytest.mark.parametrize("text,words", [
    ("[{\"request\": \"listJobs\"},\n  {oops}]", "line 2"),
    ("{\"request\": \"listJobs\"}", "expected a list"),
    ("", "line 1"),
])
def test_malformed_file(tmp_path, text, words):
    p = tmp_path / "jobs.json"
    p.write_text(text)
    with pytest.raises(JobFileError, match=words):
        jobfile.load(str(p))


def test_missing_file(tmp_path):
    with pytest.raises(JobFileError, match="cannot read"):
        jobfile.load(str(tmp_path / "none.json"))


def test_yaml_workflow_with_manifest(tmp_path):
    (tmp_path / "m.yml").write_text("name: m\napp: {slice: {cpus: 1, mems: 1}}\n")
    (tmp_path / "wf.yaml").write_text(
        "jobs:\n  - name: a\n    execution: {exec: /bin/true}\n"
        "    nrm: {manifest: m.yml, power: NONE}\n")
    parsed = jobfile.load(str(tmp_path / "wf.yaml"))
    assert [r.kind for r in parsed.requests] == ["submit", "control"]
    assert parsed.requests[0].jobs[0].nrm.manifest == str(tmp_path / "m.yml")


def test_yaml_list_is_the_json_model(tmp_path):
    reqs = [submit(job()), {"request": "control", "command": "finishAfterAllTasksDone"}]
    (tmp_path / "a.yml").write_text(json.dumps(reqs))   # JSON is YAML
    assert len(jobfile.load(str(tmp_path / "a.yml")).requests) == 2


def test_yaml_errors(tmp_path):
    (tmp_path / "b.yml").write_text("jobs: [\n  {a: 1\n")
    with pytest.raises(JobFileError, match="line"):
        jobfile.load(str(tmp_path / "b.yml"))
    (tmp_path / "c.yml").write_text("jobs: []\nfinish: true\n")
    with pytest.raises(JobFileError, match="unknown: finish"):
        jobfile.load(str(tmp_path / "c.yml"))
