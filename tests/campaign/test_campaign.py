"""nrm campaign: the file, the space, the journal, and runs on a real nrmd
(emulated hardware), including a kill -9 of the coordinator and a resume."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from nrm.campaign import Sweep, journal, spec
from nrm.campaign.progress import Progress
from nrm.campaign.runner import Coordinator
from nrm.client import Client
from tests.nrmd import DaemonProcess, wait_for

MANIFEST = "name: app\napp:\n  slice: {cpus: 1, mems: 1}\n"
BASE = """\
name: t
manifest: m.yml
command: [sh, -c, "echo {size}"]
parameters:
  policy: [NONE, DDCM]
  cap_w: [off, 150, 120]
  size: [40, 80]
exclude: [{policy: NONE, cap_w: 120}]
repetitions: 2
"""


def write(tmp_path, text, name="c.yml"):
    (tmp_path / "m.yml").write_text(MANIFEST)
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


# -- the file -----------------------------------------------------------------

@pytest.mark.parametrize("text, where", [
    (BASE.replace("echo {size}", "echo {sise}"), ":3: command[2]: placeholder {sise} names"),
    (BASE.replace("size: [40, 80]", "size: []"), ":7: parameters.size: empty list"),
    (BASE.replace("[NONE, DDCM]", "[NONE, FAST]"), ":5: parameters.policy[1]: unknown power"),
    (BASE.replace("m.yml", "missing.yml"), ":2: manifest: "),
    (BASE.replace("{policy: NONE, cap_w: 120}", "{polcy: NONE}"),
     ":8: exclude[0].polcy: names no parameter"),
    (BASE + "repetition: 3\n", ":10: repetition: unknown key"),
    (BASE.replace("repetitions: 2", "repetitions: 0"), ":9: repetitions: expected a positive"),
    (BASE + "timeout: soon\n", ":10: timeout: expected a duration"),
    (BASE + "metrics: {x: '(('}\n", ":10: metrics.x: bad regular expression"),
    (BASE + "set: {app.slice.cpus: '{nope}'}\n", ":10: set.app.slice.cpus: placeholder"),
])
def test_bad_campaign_files_name_the_line_and_key(tmp_path, text, where):
    path = write(tmp_path, text)
    with pytest.raises(spec.CampaignError) as err:
        spec.load(path)
    assert str(err.value).startswith(path + where), str(err.value)


def test_space_product_exclude_include_and_repetitions(tmp_path):
    camp = spec.load(write(tmp_path, BASE + "include: [{policy: DVFS, cap_w: 150}]\n"))
    combos = camp.combinations()
    # 2 x 3 x 2 = 12, minus NONE/120 (2), plus DVFS/150 over both sizes (2)
    assert len(combos) == 12
    assert not [c for c in combos if c["policy"] == "NONE" and c["cap_w"] == 120]
    assert [c["size"] for c in combos if c["policy"] == "DVFS"] == [40, 80]
    assert {c["cap_w"] for c in combos} == {"off", 150, 120}   # a bare YAML off is "off"
    runs = camp.runs()
    assert len(runs) == 24 and len({r.id for r in runs}) == 24
    assert [r.repetition for r in runs[:12]] == [0] * 12


def test_run_ids_are_stable_across_processes_and_key_order():
    code = ("from nrm.campaign.spec import run_id;"
            "print(run_id({'b': [0, 1], 'a': 'x'}, 3), run_id({'a': 'x', 'b': [0, 1]}, 3))")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env=dict(os.environ, PYTHONHASHSEED=seed)).stdout
            for seed in ("1", "2", "3")}
    assert len(outs) == 1
    a, b = outs.pop().split()
    assert a == b


def test_parameters_set_manifest_fields_with_their_type(tmp_path):
    text = BASE.replace("size: [40, 80]", "size: [1, 2]") + "set: {app.slice.cpus: '{size}'}\n"
    camp = spec.load(write(tmp_path, text))
    run = camp.runs()[-1]
    m = camp.manifest_for(run)
    assert m.slice.cpus == 2 and m.power.policy == "DDCM" and m.power.profile


def test_policy_fixed_pins_the_settings_the_campaign_sets(tmp_path):
    """The oracle in a campaign: FIXED beside the policies, its settings set once for all
    (the others ignore them, with a warning)."""
    text = (BASE.replace("[NONE, DDCM]", "[NONE, DDCM, fixed]")
            + "set: {app.power.settings: {'1': {level: 8, frequency: 1.2GHz}}}\n")
    camp = spec.load(write(tmp_path, text))
    by_policy = {r.params["policy"]: camp.manifest_for(r) for r in camp.runs()}
    assert sorted(by_policy) == ["DDCM", "FIXED", "NONE"]
    assert by_policy["FIXED"].power.settings == {1: {"level": 8, "frequency": 1.2e9}}
    assert any("ignored: policy DDCM" in w for w in by_policy["DDCM"].warnings)


def test_dry_run_lists_every_run_and_starts_nothing(tmp_path):
    path = write(tmp_path, BASE)
    r = subprocess.run([sys.executable, "-m", "nrm.cli.main", "campaign", "run", path, "--dir",
                        str(tmp_path / "d"), "--dry-run"], capture_output=True, text=True,
                       env=dict(os.environ, NRM_RUNTIME_DIR=str(tmp_path / "nodaemon")))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "20 runs (10 combinations x 2 repetitions)" in lines[0]
    assert len(lines) == 21 and not (tmp_path / "d").exists()


def test_bad_file_exits_2_with_one_line(tmp_path):
    path = write(tmp_path, BASE.replace("[NONE, DDCM]", "[NONE, FAST]"))
    r = subprocess.run([sys.executable, "-m", "nrm.cli.main", "campaign", "run", path],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2
    assert len(r.stderr.splitlines()) == 1 and "parameters.policy[1]" in r.stderr
    assert not list(tmp_path.glob("campaign-*"))


# -- the journal ---------------------------------------------------------------

def test_torn_last_record_is_skipped_and_cut_by_the_next_writer(tmp_path):
    j = journal.Journal(str(tmp_path))
    j.append({"e": "started", "id": "a", "attempt": 1, "params": {"x": 1}})
    j.append({"e": "finished", "id": "a", "attempt": 1, "outcome": "ok"})
    j.close()
    with open(tmp_path / journal.JOURNAL, "ab") as f:
        f.write(b'{"e":"started","id":"b","att')
    records, warnings = journal.read(str(tmp_path))
    assert len(records) == 2 and "torn last record" in warnings[0]
    assert journal.fold(records)["a"].state == "done"
    seen = []
    journal.Journal(str(tmp_path), warn=seen.append).close()
    assert seen and journal.read(str(tmp_path)) == (records, [])


def test_a_bad_record_before_the_end_is_an_error(tmp_path):
    (tmp_path / journal.JOURNAL).write_text('{"e":"started","id":"a"}\nnot json\n{"e":"x"}\n')
    with pytest.raises(journal.JournalError, match=":2: not a JSON record"):
        journal.read(str(tmp_path))


def test_one_coordinator_per_directory(tmp_path):
    with journal.DirLock(str(tmp_path)):
        with pytest.raises(journal.Busy, match=f"pid {os.getpid()} on host"):
            journal.DirLock(str(tmp_path)).acquire()
    journal.DirLock(str(tmp_path)).acquire().release()


def test_sweep_api_resumes_interrupted_and_keeps_failed(tmp_path):
    combos = [{"cpus": [0, 1]}, {"cpus": [2]}, {"cpus": [3]}]
    s = Sweep(str(tmp_path), combos)
    first = s.next()
    s.done(first, {"value": 1})
    second = s.next()
    s.failed(second, "boom")
    s.next()                      # started, then the process "dies"
    s.journal.close()
    s.lock.release()
    again = Sweep(str(tmp_path), combos)
    left = again.remaining()
    assert [r.params for r in left] == [{"cpus": [3]}]
    run = again.next()
    assert again._attempt[run.id] == 2
    again.done(run)
    assert again.next() is None
    again.close()
    retry = Sweep(str(tmp_path), combos, retry_failed=True)
    assert [r.params for r in retry.remaining()] == [{"cpus": [2]}]
    retry.close()


# -- on a real nrmd ----------------------------------------------------------------

@pytest.fixture(scope="module")
def nrmd():
    d = DaemonProcess("--hw", "emulated", "--sensor-period", "0.05").start()
    yield d
    d.stop()


def campaign(nrmd, *args, **kwargs):
    return nrmd.cli("campaign", *args, **kwargs)


def cap(nrmd):
    return json.loads(nrmd.cli("status", "--json").stdout)["power_cap_w"]


OUTCOMES = """\
name: outcomes
manifest: m.yml
command: [sh, -c, "case {case} in ok) echo 'GFLOPS: 2.5';; three) exit 3;;
  segv) kill -SEGV $$;; slow) sleep 30;; esac"]
parameters:
  case: [ok, three, segv, slow]
timeout: 1s
metrics: {gflops: 'GFLOPS:\\s*([0-9.]+)'}
"""


def test_outcomes_are_data_and_failed_runs_stay_failed(nrmd, tmp_path):
    path = write(tmp_path, OUTCOMES)
    d = str(tmp_path / "d")
    r = campaign(nrmd, "run", path, "--dir", d)
    assert r.returncode == 1, r.stderr
    assert len([x for x in r.stderr.decode().splitlines() if "] case=" in x]) == 4
    out = str(tmp_path / "t.csv")
    assert campaign(nrmd, "table", d, "-o", out).returncode == 0
    rows = {row["case"]: row for row in csv.DictReader(open(out))}
    assert rows["ok"]["outcome"] == "ok" and rows["ok"]["gflops"] == "2.5"
    assert rows["ok"]["energy_source"] == "emulated" and float(rows["ok"]["energy_j"]) > 0
    assert rows["three"]["outcome"] == "nonzero" and rows["three"]["exit_code"] == "3"
    assert rows["segv"]["outcome"] == "signaled" and rows["segv"]["signal"] == "SIGSEGV"
    assert rows["slow"]["outcome"] == "timeout"
    assert [c for c in nrmd_containers(nrmd) if c.startswith("campaign-outcomes")] == []
    # failed runs are not started again, until --retry-failed
    r = campaign(nrmd, "run", path, "--dir", d)
    assert r.returncode == 1 and "] case=" not in r.stderr.decode()
    r = campaign(nrmd, "run", path, "--dir", d, "--retry-failed")
    ran = [x for x in r.stderr.decode().splitlines() if "] case=" in x]
    assert len(ran) == 3 and all("attempt 2" in x for x in ran)
    missing = write(tmp_path, OUTCOMES.replace("[sh, -c,", "[/nonexistent/prog, -c,"), "m2.yml")
    r = campaign(nrmd, "run", missing, "--dir", str(tmp_path / "d2"))
    assert r.returncode == 1
    status = json.loads(campaign(nrmd, "status", str(tmp_path / "d2"), "--json").stdout)
    assert status["outcomes"] == {"launch_error": 4}


def nrmd_containers(nrmd):
    return [c["id"] for c in json.loads(nrmd.cli("list", "--json").stdout)]


RESUME = """\
name: resume
manifest: m.yml
command: [sh, -c, "if [ -e {marker} ]; then echo GFLOPS: {n}; else touch {marker}; sleep 60; fi"]
parameters:
  cap_w: [150]
  n: [1, 2]
  marker: [MARKER]
"""


def _journal(d):
    try:
        return journal.read(d)[0]
    except journal.JournalError:
        return []


def test_kill_9_then_resume_runs_the_interrupted_run_again(nrmd, tmp_path):
    marker = str(tmp_path / "marker")
    path = write(tmp_path, RESUME.replace("MARKER", marker))
    d = str(tmp_path / "d")
    assert cap(nrmd) is None
    p = nrmd.popen_cli("campaign", "run", path, "--dir", d, stderr=subprocess.DEVNULL)
    wait_for(lambda: os.path.exists(marker))
    name = wait_for(lambda: [c for c in nrmd_containers(nrmd) if c.startswith("campaign-resume")])
    assert cap(nrmd) == 150
    p.kill()
    p.wait()
    wait_for(lambda: name[0] not in nrmd_containers(nrmd), timeout=5)
    st = campaign(nrmd, "status", d, "--json")
    assert st.returncode == 0 and b"Traceback" not in st.stderr
    assert json.loads(st.stdout)["states"] == {"running": 1, "pending": 1}
    assert os.path.exists(os.path.join(d, "cap.json"))
    r = campaign(nrmd, "run", path, "--dir", d)
    assert r.returncode == 0, r.stderr
    assert "attempt 2" in r.stderr.decode()
    assert cap(nrmd) is None and not os.path.exists(os.path.join(d, "cap.json"))
    out = str(tmp_path / "all.csv")
    assert campaign(nrmd, "table", d, "-o", out, "--attempts", "all").returncode == 0
    outcomes = sorted((row["n"], row["attempt"], row["outcome"])
                      for row in csv.DictReader(open(out)))
    assert outcomes == [("1", "1", "interrupted"), ("1", "2", "ok"), ("2", "1", "ok")]
    # widening runs only what is new; a changed command is refused, then kept
    wider = write(tmp_path, RESUME.replace("MARKER", marker).replace("[1, 2]", "[1, 2, 3]"))
    r = campaign(nrmd, "run", wider, "--dir", d)
    assert r.returncode == 0 and len([x for x in r.stderr.decode().splitlines()
                                      if "] cap_w=" in x]) == 1
    changed = write(tmp_path, RESUME.replace("MARKER", marker).replace("echo GFLOPS", "echo G"))
    r = campaign(nrmd, "run", changed, "--dir", d)
    assert r.returncode == 2 and b"--rerun-changed" in r.stderr
    assert campaign(nrmd, "run", changed, "--dir", d, "--keep-changed").returncode == 0


def test_ctrl_c_interrupts_the_task_and_exits_130(nrmd, tmp_path):
    marker = str(tmp_path / "marker")
    path = write(tmp_path, RESUME.replace("MARKER", marker).replace("[150]", "[off]"))
    d = str(tmp_path / "d")
    p = nrmd.popen_cli("campaign", "run", path, "--dir", d, stderr=subprocess.PIPE)
    name = wait_for(lambda: [c for c in nrmd_containers(nrmd) if c.startswith("campaign-resume")])
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=20)
    assert p.returncode == 130, err
    assert name[0] not in nrmd_containers(nrmd)
    last = [r for r in _journal(d) if r["e"] == "finished"][-1]
    assert last["outcome"] == "interrupted"


def test_a_second_coordinator_is_refused(nrmd, tmp_path):
    path = write(tmp_path, RESUME.replace("MARKER", str(tmp_path / "x")))
    d = tmp_path / "d"
    d.mkdir()
    with journal.DirLock(str(d)):
        r = campaign(nrmd, "run", path, "--dir", str(d))
    assert r.returncode == 2 and f"pid {os.getpid()}".encode() in r.stderr


def test_summary_and_plot(nrmd, tmp_path):
    pytest.importorskip("pandas")
    pytest.importorskip("matplotlib")
    path = write(tmp_path, """\
        name: sp
        manifest: m.yml
        command: [sh, -c, "echo {policy}"]
        parameters:
          policy: [NONE, DDCM]
          size: [1]
        repetitions: 2
        """)
    d = str(tmp_path / "d")
    assert campaign(nrmd, "run", path, "--dir", d).returncode == 0
    r = campaign(nrmd, "summary", d, "--json")
    assert r.returncode == 0, r.stderr
    entries = {e["policy"]: e for e in json.loads(r.stdout)}
    assert entries["NONE"]["runs"] == 2 and entries["NONE"]["energy_vs_none"] == 1.0
    assert entries["DDCM"]["energy_vs_none"] > 0
    png = str(tmp_path / "f.png")
    assert campaign(nrmd, "plot", d, "-o", png).returncode == 0
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert campaign(nrmd, "table", d, "-o", str(tmp_path / "t.parquet")).returncode == 0


# -- progress ----------------------------------------------------------------------

class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_plain_lines_in_a_log_and_a_bar_on_a_terminal():
    log = io.StringIO()
    p = Progress(log)
    p.begin(4)
    p.finished()
    p.say("[1/4] n=1 rep=0: ok")
    p.tick()
    p.end()
    assert log.getvalue() == "nrm campaign: [1/4] n=1 rep=0: ok\n"
    term = _Terminal()
    p = Progress(term)
    p.begin(4)
    p.finished()
    p.running = 1
    p.say("[1/4] n=1 rep=0: ok")
    p.end()
    text = term.getvalue()
    # the line is printed whole (the bar erased first), then the bar comes back below it
    assert "\r\x1b[Knrm campaign: [1/4] n=1 rep=0: ok\n\r[" in text
    assert " 1/4, 1 running, 00:00" in text and "#" in text
    assert text.endswith("\r\x1b[K")           # nothing of the bar left behind


def test_the_coordinator_draws_a_bar_only_on_a_terminal(nrmd, tmp_path):
    path = write(tmp_path, """\
        name: bar
        manifest: m.yml
        command: [sh, -c, "echo {n}"]
        parameters:
          n: [1, 2]
        """)
    for out, bar in ((io.StringIO(), False), (_Terminal(), True)):
        d = str(tmp_path / f"d{bar}")
        camp = spec.load(path)
        coord = Coordinator(camp, d, client=lambda: Client(nrmd.rundir), out=out)
        assert coord.run() == 0
        text = out.getvalue()
        assert text.count("] n=") == 2
        assert ("\r[" in text) == bar and ("\x1b[K" in text) == bar
