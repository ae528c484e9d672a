"""The cgroup v2 runtime's file protocol, against a fake cgroup2 tree.

This machine mounts cgroup v1 with an empty unified hierarchy, so v2 cannot
run for real here: these tests check what the runtime writes and removes,
which processes it signals (real ones), how a real spawner uses its
placement, and which runtime is selected. Real v2 kernels are untested.
"""

import asyncio
import os
import signal
import subprocess

import pytest

from nrm.containers.runtimes import make_runtime
from nrm.containers.runtimes.cgroup2 import Cgroup2Runtime, cgroup2_usable
from nrm.containers.spawner import SpawnerPool, Started, env_list
from tests.conftest import needs_root

pytestmark = needs_root()

HOME = "sys/fs/cgroup/nrmd.service"


def _write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def _read(path):
    with open(path) as f:
        return f.read()


def fake_tree(root, controllers="cpuset cpu io memory pids", kill=True):
    _write(f"{root}/proc/self/mounts",
           "sysfs /sys sysfs rw 0 0\ncgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n")
    _write(f"{root}/proc/self/cgroup", "0::/nrmd.service\n")
    _write(f"{root}/{HOME}/cgroup.controllers", controllers + "\n")
    _write(f"{root}/{HOME}/cgroup.subtree_control", "")
    _write(f"{root}/{HOME}/cgroup.procs", f"{os.getpid()}\n")
    if kill:
        _write(f"{root}/{HOME}/cgroup.kill", "")
    return f"{root}/{HOME}"


@pytest.fixture
def tree(tmp_path):
    return str(tmp_path), fake_tree(str(tmp_path))


def _sleeper():
    return subprocess.Popen(["sleep", "60"])


def test_setup_moves_the_daemon_to_a_leaf_and_delegates_controllers(tree):
    root, home = tree
    rt = Cgroup2Runtime("nrm.t", root=root)
    base = f"{home}/nrm.t"
    assert _read(f"{base}/supervisor/cgroup.procs") == str(os.getpid())
    assert _read(f"{home}/cgroup.subtree_control") == "+cpuset +memory"
    assert _read(f"{base}/cgroup.subtree_control") == "+cpuset +memory"
    assert not rt.in_process and rt.isolates_memory
    assert any("untested on a real cgroup v2 kernel" in n for n in rt.notes)
    rt.close()


def test_enabled_controllers_are_not_rewritten(tree):
    root, home = tree
    _write(f"{home}/cgroup.subtree_control", "cpuset memory")
    Cgroup2Runtime("nrm.t", root=root).close()
    assert _read(f"{home}/cgroup.subtree_control") == "cpuset memory"


def test_container_cgroup_gets_its_slice_and_a_placement(tree):
    root, home = tree
    rt = Cgroup2Runtime("nrm.t", root=root)
    h = rt.create("job", [0, 1, 3], [0])
    assert os.path.dirname(h.cgdir) == f"{home}/nrm.t"
    assert _read(f"{h.cgdir}/cpuset.cpus") == "0-1,3"
    assert _read(f"{h.cgdir}/cpuset.mems") == "0"
    assert _read(f"{h.cgdir}/memory.oom.group") == "1"
    p = rt.placement(h, [3])
    assert p == {"join": [f"{h.cgdir}/cgroup.procs"], "cpus": [3]}
    with pytest.raises(Exception, match="spawner"):
        rt.spawn(h, ["true"])
    rt.close()


def test_kill_uses_cgroup_kill_when_present(tree):
    root, _ = tree
    rt = Cgroup2Runtime("nrm.t", root=root)
    h = rt.create("job", [0], [0])
    _write(f"{h.cgdir}/cgroup.procs", "424242\n")
    _write(f"{h.cgdir}/cgroup.kill", "")
    rt.kill_all(h)
    assert _read(f"{h.cgdir}/cgroup.kill") == "1"
    rt.close()


def test_kill_spares_the_daemon_itself(tree):
    """cgroup.kill would take this process too: signal the others one by one."""
    root, _ = tree
    rt = Cgroup2Runtime("nrm.t", root=root)
    h = rt.create("job", [0], [0])
    victim = _sleeper()
    try:
        _write(f"{h.cgdir}/cgroup.procs", f"{victim.pid}\n{os.getpid()}\n")
        _write(f"{h.cgdir}/cgroup.kill", "")
        rt.kill_all(h)
        assert victim.wait(5) == -signal.SIGKILL
        assert _read(f"{h.cgdir}/cgroup.kill") == ""
    finally:
        _write(f"{h.cgdir}/cgroup.procs", "")
        rt.close()


def test_kill_without_cgroup_kill_signals_each_process(tmp_path):
    root = str(tmp_path)
    fake_tree(root, kill=False)
    rt = Cgroup2Runtime("nrm.t", root=root)
    h = rt.create("job", [0], [0])
    victims = [_sleeper(), _sleeper()]
    _write(f"{h.cgdir}/cgroup.procs", "".join(f"{p.pid}\n" for p in victims))
    assert sorted(rt.pids(h)) == sorted(p.pid for p in victims)
    rt.kill_all(h, signal.SIGTERM)
    assert [p.wait(5) for p in victims] == [-signal.SIGTERM] * 2
    rt.close()


def test_pids_never_include_the_daemon(tree):
    root, _ = tree
    rt = Cgroup2Runtime("nrm.t", root=root)
    h = rt.create("job", [0], [0])
    _write(f"{h.cgdir}/cgroup.procs", f"{os.getpid()}\n12345\n")
    assert rt.pids(h) == [12345]
    rt.close()


def test_remove_kills_pools_and_close_removes_everything(tree):
    root, home = tree
    rt = Cgroup2Runtime("nrm.t", root=root)
    h = rt.create("job", [0], [0])
    victim = _sleeper()
    _write(f"{h.cgdir}/cgroup.procs", f"{victim.pid}\n")
    os.unlink(f"{home}/cgroup.kill")
    rt.can_kill = False
    rt.remove(h)
    assert victim.wait(5) == -signal.SIGKILL
    _write(f"{h.cgdir}/cgroup.procs", "")
    h2 = rt.create("next", [1], [0])
    assert h2.cgdir == h.cgdir                   # reused from the pool
    assert _read(f"{h2.cgdir}/cpuset.cpus") == "1"
    rt.remove(h2)
    rt.close()
    assert sorted(os.listdir(f"{home}/nrm.t")) == ["cgroup.subtree_control", "supervisor"]


def test_a_predecessors_processes_are_taken_over(tmp_path):
    root = str(tmp_path)
    home = fake_tree(root, kill=False)
    victim = _sleeper()
    try:
        _write(f"{home}/nrm.t/c1-1/cgroup.procs", f"{victim.pid}\n")
        rt = Cgroup2Runtime("nrm.t", root=root)
        stale = {"unified": f"{home}/nrm.t/c1-1"}
        assert rt.stale_pids(stale) == [victim.pid]
        assert rt.stale_pids({"unified": f"{home}/elsewhere/c1-1"}) == []
        h = rt.create("kept", [0], [0])
        _write(f"{h.cgdir}/cgroup.procs", "")
        rt.take_over(h, [victim.pid])
        assert _read(f"{h.cgdir}/cgroup.procs") == str(victim.pid)
        _write(f"{home}/nrm.t/c1-1/cgroup.procs", "")     # the kernel would have moved it
        assert rt.reap_stale() == []
        assert victim.poll() is None and os.path.exists(h.cgdir)
        assert not os.path.exists(f"{home}/nrm.t/c1-1")
        rt.close()
    finally:
        victim.kill()
        victim.wait()


def test_stale_container_cgroups_are_killed_and_removed_at_start(tmp_path):
    root = str(tmp_path)
    home = fake_tree(root, kill=False)
    victim = _sleeper()
    _write(f"{home}/nrm.t/c1-1/cgroup.procs", f"{victim.pid}\n")
    _write(f"{home}/nrm.t/supervisor/cgroup.procs", "1\n")
    rt = Cgroup2Runtime("nrm.t", root=root)
    assert rt.reap_stale() == [victim.pid]         # the daemon calls it after reconciling
    assert victim.wait(5) == -signal.SIGKILL
    assert os.path.exists(f"{home}/nrm.t/supervisor")
    assert not os.path.exists(f"{home}/nrm.t/c1-1")
    assert _read(f"{home}/nrm.t/supervisor/cgroup.procs") == str(os.getpid())
    rt.close()


def test_a_real_spawners_child_joins_the_container_and_the_spawner_stays_home(tree):
    root, home = tree
    rt = Cgroup2Runtime("nrm.t", root=root)
    h = rt.create("job", [0], [0])
    _write(f"{h.cgdir}/cgroup.procs", "")
    _write(f"{home}/nrm.t/supervisor/cgroup.procs", "")

    async def launch():
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        pool = SpawnerPool(1, loop)
        pool.start()
        try:
            req = {"argv": ["/bin/true"], "env": env_list({}), "cwd": "/", "capture": False,
                   **rt.placement(h, None)}
            pool.submit(req, done.set_result)
            started = await done
            assert isinstance(started, Started), started
            os.close(started.pidfd)
            return os.waitpid(started.pid, 0)[1]        # our child (CLONE_PARENT)
        finally:
            pool.close()

    assert asyncio.run(launch()) == 0
    # the child wrote itself ("0") into the container; the spawner never moved
    assert _read(f"{h.cgdir}/cgroup.procs") == "0"
    assert _read(f"{home}/nrm.t/supervisor/cgroup.procs") == ""
    rt.close()


def test_selection_prefers_v2_only_with_spawners(tree):
    root, _ = tree
    rt = make_runtime("auto", "nrm.t", spawners=2, root=root)
    assert isinstance(rt, Cgroup2Runtime)
    rt.close()
    rt = make_runtime("cgroup", "nrm.t2", spawners=0, root=root)
    try:
        assert not isinstance(rt, Cgroup2Runtime)
        assert any("needs spawner processes" in n for n in rt.notes)
    finally:
        rt.close()


def test_selection_without_memory_controller_falls_back(tmp_path):
    root = str(tmp_path)
    fake_tree(root, controllers="cpuset cpu pids")
    assert "lacks the memory controller" in cgroup2_usable(root)
    rt = make_runtime("auto", "nrm.t", spawners=2, root=root)
    try:
        assert not isinstance(rt, Cgroup2Runtime)
        assert any("lacks the memory controller" in n for n in rt.notes)
    finally:
        rt.close()


def test_this_machine_picks_v1():
    """Hybrid here: the unified hierarchy has no controllers."""
    reason = cgroup2_usable("/")
    assert reason is not None
    rt = make_runtime("auto", "nrm.t", spawners=2)
    try:
        assert rt.name == "cgroup" and not isinstance(rt, Cgroup2Runtime)
        assert rt.notes[0].startswith("cgroup v1")
        assert any(n.startswith("cgroup v2 not used") for n in rt.notes)
    finally:
        rt.close()


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2 or cgroup2_usable("/") is None,
                    reason="needs 2 cpus and the cgroup v1 cpuset")
def test_a_v1_launch_from_a_pinned_thread_gives_the_task_the_containers_cpus(tmp_path):
    """Without spawners the launching thread joins the container's cpuset
    while it forks. nrmd may have pinned that thread to the waiting rank's
    cpu (nrm/daemon/affinity.py): the task must still get every cpu of its
    container, and the thread its own mask back."""
    mask = os.sched_getaffinity(0)
    first, second = sorted(mask)[:2]
    out = tmp_path / "mask"
    rt = make_runtime("cgroup", "nrm.tmask", spawners=0)
    handle = rt.create("c1", [first, second], [0])
    try:
        os.sched_setaffinity(0, {second})
        pid, _, _ = rt.spawn(handle, ["sh", "-c",
                                      f"grep Cpus_allowed_list /proc/self/status > {out}"])
        os.waitpid(pid, 0)
        assert os.sched_getaffinity(0) == {second}
    finally:
        os.sched_setaffinity(0, mask)
        rt.remove(handle)
        rt.close()
    expected = f"{first}-{second}" if second == first + 1 else f"{first},{second}"
    assert out.read_text().split()[-1] == expected
