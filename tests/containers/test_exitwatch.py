"""ExitWatch with real child processes and their pidfds."""

import asyncio
import os
import subprocess
import sys

from nrm.containers.exits import ExitWatch


def _child(code: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", f"import sys; sys.exit({code})"])


def test_exits_reach_their_callbacks_and_a_removed_pidfd_is_not_called():
    async def scenario():
        loop = asyncio.get_running_loop()
        watch = ExitWatch(loop)
        procs = [_child(3), _child(4), _child(5)]
        fds = [os.pidfd_open(p.pid) for p in procs]
        seen, done = {}, loop.create_future()

        def exited(i):
            seen[i] = procs[i].wait()
            for fd in fds:              # the others' exits are in this batch: never called now
                watch.remove(fd)
            loop.call_later(0.05, done.set_result, None)
        for i, fd in enumerate(fds):
            watch.add(fd, exited, i)
        for p in procs:
            os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)   # all exited, none reaped
        await asyncio.wait_for(done, 10)
        ((i, code),) = seen.items()
        assert code == 3 + i
        assert len(watch) == 0
        watch.close()
        for fd in fds:
            os.close(fd)
    asyncio.run(scenario())


def test_each_exit_reaches_its_own_callback():
    async def scenario():
        loop = asyncio.get_running_loop()
        watch = ExitWatch(loop)
        procs = [_child(code) for code in (0, 7, 9)]
        seen, done = {}, loop.create_future()

        def exited(p, fd):
            watch.remove(fd)
            os.close(fd)
            seen[p.pid] = p.wait()
            if len(seen) == len(procs):
                done.set_result(None)
        for p in procs:
            fd = os.pidfd_open(p.pid)
            watch.add(fd, exited, p, fd)
        await asyncio.wait_for(done, 10)
        assert seen == {procs[0].pid: 0, procs[1].pid: 7, procs[2].pid: 9}
        watch.close()
    asyncio.run(scenario())


def test_a_failing_callback_does_not_stop_the_others():
    async def scenario():
        loop = asyncio.get_running_loop()
        watch = ExitWatch(loop)
        procs = [_child(0), _child(0)]
        fds = [os.pidfd_open(p.pid) for p in procs]
        for p in procs:
            p.wait()
        calls, done = [], loop.create_future()

        def exited(i):
            calls.append(i)
            watch.remove(fds[i])
            if i == 0:
                raise RuntimeError("handler bug")
            done.set_result(None)
        for i, fd in enumerate(fds):
            watch.add(fd, exited, i)
        await asyncio.wait_for(done, 10)
        assert sorted(calls) == [0, 1]
        watch.close()
        watch.close()       # twice is harmless (daemon shutdown paths)
        for fd in fds:
            os.close(fd)
    asyncio.run(scenario())
