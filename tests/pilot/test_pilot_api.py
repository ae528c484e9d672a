"""nrm.pilot.qcg: a script written for QCG-PilotJob's API runs with only its
imports changed, against a real nrmd; the API socket answers only its user."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest

from nrm.pilot import qcg
from tests.nrmd import DaemonProcess

# A script in QCG's style (its documentation's examples), imports as QCG's.
QCG_SCRIPT = textwrap.dedent('''
    import sys
    from qcg.pilotjob.api.manager import LocalManager
    from qcg.pilotjob.api.job import Jobs
    from qcg.pilotjob.api.errors import ConnectionError, TimeoutElapsed

    manager = LocalManager(['--wd', sys.argv[1], '--nodes', '4'], {'init_timeout': 60})
    print('available resources: ', manager.resources())

    jobs = Jobs().add(script='echo "job ${it} executed"', stdout='job.out.${it}', iteration=4)
    jobs.add(name='sum', exec='/bin/sh', args=['-c', 'cat job.out.* > all.out'],
             after=jobs.job_names()[0])
    jobs.add(name='wide', exec='/bin/sh', args=['-c', 'echo $QCG_PM_NPROCS > wide.out'],
             numCores={'exact': 2})
    job_ids = manager.submit(jobs)
    print('submitted jobs: ', job_ids)
    try:
        manager.submit(Jobs().add(name='sum', exec='true'))
    except ConnectionError as exc:
        print('duplicate refused:', exc)
    manager.wait4all()
    print('states:', manager.wait4(job_ids))
    print('status:', manager.status(job_ids)['jobs']['sum']['data']['status'])
    info = manager.info_parsed(job_ids, withChilds=True)
    first = info[job_ids[0]]
    print('iterations:', first.iterations['total'], first.iterations['finished'],
          sorted(c.status for c in first.childs))
    print('wide cores:', info['wide'].total_cores, list(info['wide'].nodes))
    print('list:', sorted((n, e['status']) for n, e in manager.list().items()))
    slow = manager.submit(Jobs().add(name='slow', exec='sleep', args=['30'])
                          .add(name='quick', exec='sleep', args=['0.5']))
    try:
        manager.wait4(slow, timeout=0.2)
    except TimeoutElapsed:
        print('timeout elapsed')
    print('any:', manager.wait4_any_job_finish(20))
    manager.cancel('slow')
    print('cancelled:', manager.wait4('slow'))
    manager.remove('wide')
    print('after remove:', 'wide' in manager.list())
    print('system:', manager.system_status()['JobStats']['TotalJobs'])
    manager.finish()
''')

IMPORTS = {
    "from qcg.pilotjob.api.manager import LocalManager": "from nrm.pilot.qcg import LocalManager",
    "from qcg.pilotjob.api.job import Jobs": "from nrm.pilot.qcg import Jobs",
    "from qcg.pilotjob.api.errors import ConnectionError, TimeoutElapsed":
        "from nrm.pilot.qcg import ConnectionError, TimeoutElapsed",
}


@pytest.fixture(scope="module")
def nrmd():
    with DaemonProcess() as d:
        yield d


def test_a_qcg_script_runs_with_only_its_imports_changed(nrmd, tmp_path):
    script = QCG_SCRIPT
    for old, new in IMPORTS.items():
        script = script.replace(old, new)
    path = tmp_path / "script.py"
    path.write_text(script)
    wd = tmp_path / "wd"
    r = subprocess.run([sys.executable, str(path), str(wd)], capture_output=True, text=True,
                       timeout=120, env=nrmd.env, cwd=os.path.dirname(os.path.dirname(
                           os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "'total_cores': 4" in out and "'free_cores': 4" in out
    assert "duplicate refused: Job sum already exist" in out
    assert "states: {'job-" in out and "'sum': 'SUCCEED'" in out
    assert "status: SUCCEED" in out
    assert "iterations: 4 4 ['SUCCEED', 'SUCCEED', 'SUCCEED', 'SUCCEED']" in out
    assert "wide cores: 2 ['n0']" in out
    assert "timeout elapsed" in out and "any: ('quick', 'SUCCEED')" in out
    assert "cancelled: {'slow': 'CANCELED'}" in out
    assert "after remove: False" in out and "system: 4" in out
    expected = [f"job {i} executed" for i in range(4)]
    assert (wd / "all.out").read_text().split("\n")[:4] == expected
    assert (wd / "wide.out").read_text() == "2\n"


def test_jobs_group():
    jobs = qcg.Jobs().add(name="a", exec="true", numCores={"min": 1, "scheduler": "split-into"},
                          iteration=[1, 2]).add_std(name="b", execution={"exec": "true"})
    assert jobs.job_names() == ["a", "b"]
    assert jobs.ordered_jobs()[0]["resources"]["numCores"]["scheduler"] == {"name": "split-into"}
    assert jobs.ordered_jobs()[0]["iteration"] == {"values": [1, 2]}
    with pytest.raises(qcg.InvalidJobDescriptionError, match="already in the group"):
        jobs.add(name="a", exec="true")
    with pytest.raises(qcg.InvalidJobDescriptionError, match="unknown job attribute"):
        jobs.add(name="c", exe="true")
    with pytest.raises(qcg.InvalidJobDescriptionError, match="exec and script"):
        jobs.add(name="c", exec="true", script="true")
    with pytest.raises(qcg.JobNotDefinedError):
        jobs.remove("zz")
    assert jobs.remove("b").clear() == 1


def test_the_api_socket_answers_only_its_user(nrmd, tmp_path):
    manager = qcg.LocalManager(["--wd", str(tmp_path / "wd"), "--nodes", "1"])
    try:
        assert os.stat(os.path.dirname(manager.address)).st_mode & 0o777 == 0o700
        if os.getuid() != 0:
            pytest.skip("needs root to connect as another user")
        # open the 0700 directory and the socket, to reach the peer check behind them
        os.chmod(os.path.dirname(manager.address), 0o711)
        os.chmod(manager.address, 0o666)
        pid = os.fork()
        if pid == 0:                       # as nobody: connected, but never answered
            code = 1
            try:
                os.setgid(65534)
                os.setuid(65534)
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(manager.address)
                s.sendall(b'{"request": "resourcesInfo"}\n')
                code = 0 if s.recv(100) == b"" else 2
            except (ConnectionResetError, BrokenPipeError):
                code = 0                   # closed on it (before or after it wrote): refused
            except OSError as exc:
                os.write(2, f"as nobody: {exc}\n".encode())
                code = 3
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert manager.resources()["total_cores"] == 1
    finally:
        manager.finish()


CANCEL_QUEUED = textwrap.dedent('''
    import os, sys, time
    from nrm.client import Client
    from nrm.manifest import Manifest, Slice
    from nrm.pilot.qcg import Jobs, LocalManager

    wd, rundir = sys.argv[1], sys.argv[2]
    cpu = sorted(os.sched_getaffinity(0))[0]
    with Client(rundir) as c:       # another client holds the cpu the pilot's core maps onto
        c.run(Manifest(name="hog", slice=Slice(cpus=1, mems=1)), ["sleep", "600"],
              container="hog", detach=True, cpus_allowed=[cpu], stdout=None, stderr=None)
        manager = LocalManager(['--wd', wd, '--nodes', '1'], {'init_timeout': 60})
        manager.submit(Jobs().add(name='q', exec='/bin/sh',
                                  args=['-c', 'sleep 1; touch ' + os.path.join(wd, 'ran')]))
        time.sleep(0.5)             # launched: it waits in nrmd's queue for the cpu
        print('before:', manager.status('q')['jobs']['q']['data']['status'])
        manager.cancel('q')
        time.sleep(0.3)
        c.kill("hog")               # the cpu frees: nrmd starts the cancelled launch
        print('cancelled:', manager.wait4('q'))
        time.sleep(2)
        print('ran:', os.path.exists(os.path.join(wd, 'ran')))
        manager.finish()
''')


def test_a_job_cancelled_while_nrmd_queues_its_launch_never_runs_its_command(nrmd, tmp_path):
    """The pilot names its tasks' containers and asks for no started reply:
    a kill that finds no container yet (the launch waits in nrmd's queue
    behind another client's slice) is asked for again until it exists."""
    path = tmp_path / "script.py"
    path.write_text(CANCEL_QUEUED)
    wd = tmp_path / "wd"
    wd.mkdir()
    r = subprocess.run([sys.executable, str(path), str(wd), nrmd.rundir], capture_output=True,
                       text=True, timeout=120, env=nrmd.env, cwd=os.path.dirname(
                           os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr
    assert "before: EXECUTING" in r.stdout, r.stdout
    assert "cancelled: {'q': 'CANCELED'}" in r.stdout
    assert "ran: False" in r.stdout
