"""nrm.client.AsyncClient against a real nrmd: many runs over one socket.

The asyncio client drains a plain socket from the loop (nrm.transport.zmqloop), so
replies of concurrent requests must reach the right request, output must
stay byte-exact and in order per stream, and errors must surface as
NrmError on the request that caused them.
"""

import asyncio
import time

import pytest
import zmq

from nrm import paths, protocol
from nrm.client import AsyncClient, NrmError
from nrm.manifest import parse

ONE_CPU = parse({"name": "async", "app": {"slice": {"cpus": 1, "mems": 1}}})


def run(coro):
    return asyncio.run(coro)


def test_many_runs_share_one_socket(daemon):
    async def main():
        async with AsyncClient(daemon.rundir) as c:
            runs = [c.run(ONE_CPU, ["sh", "-c", f"exit {i % 5}"], output=False, wait=True,
                          env={})
                    for i in range(40)]
            return await asyncio.gather(*runs)
    results = run(main())
    assert [r.status for r in results] == [i % 5 for i in range(40)]
    assert len({r.task for r in results}) == 40


def test_output_reaches_its_own_request(daemon):
    async def main():
        async with AsyncClient(daemon.rundir) as c:
            chunks = {i: [] for i in range(6)}

            def sink(i):
                return lambda stream, data: chunks[i].append((stream, data))
            script = "printf 'out-%s'; printf 'err-%s' >&2"
            await asyncio.gather(*(
                c.run(ONE_CPU, ["sh", "-c", script % (i, i)], wait=True, env={},
                      on_output=sink(i))
                for i in range(6)))
            return chunks
    chunks = run(main())
    for i, got in chunks.items():
        out = b"".join(d for s, d in got if s == "stdout")
        err = b"".join(d for s, d in got if s == "stderr")
        assert (out, err) == (f"out-{i}".encode(), f"err-{i}".encode())


def test_errors_belong_to_their_request(daemon):
    too_big = parse({"name": "big", "app": {"slice": {"cpus": 4096, "mems": 1}}})

    async def main():
        async with AsyncClient(daemon.rundir) as c:
            ok = c.run(ONE_CPU, ["true"], output=False, wait=True, env={})
            bad = c.run(too_big, ["true"], output=False, env={})
            status = c.status()
            return await asyncio.gather(ok, bad, status, return_exceptions=True)
    ok, bad, status = run(main())
    assert ok.status == 0
    assert isinstance(bad, NrmError) and bad.code == "no_fit"
    assert "version" in status and status["pid"] > 0


def test_started_callback_and_detach(daemon):
    async def main():
        seen = []
        async with AsyncClient(daemon.rundir) as c:
            result = await c.run(ONE_CPU, ["sleep", "30"], detach=True, env={},
                                 on_started=lambda r: seen.append(r.pid))
            await c.call(protocol.Kill(container=result.container))
        return seen, result
    seen, result = run(main())
    assert seen == [result.pid] and result.pid > 0


def _replies_to(daemon, run: protocol.Run) -> list:
    """Every reply to one run request, on a raw DEALER, up to its exit."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(paths.upstream_uri(daemon.rundir))
    try:
        sock.send(protocol.encode(run))
        replies = []
        while not replies or not isinstance(replies[-1], (protocol.Exit, protocol.Error)):
            assert sock.poll(10000), f"no reply after {replies}"
            replies.append(protocol.decode_reply(sock.recv_multipart()[0]))
        return replies
    finally:
        sock.close()


@pytest.mark.parametrize("started", [True, False])
def test_started_reply_only_when_asked(daemon, started):
    run_msg = protocol.Run(id=5, manifest=ONE_CPU.to_dict(), argv=["true"], cwd="/",
                           output=False, wait=True, started=started)
    before = time.monotonic()
    replies = _replies_to(daemon, run_msg)
    after = time.monotonic()
    assert [type(r).__name__ for r in replies] == (["Started", "Exit"] if started else ["Exit"])
    exit_ = replies[-1]
    assert exit_.id == 5 and exit_.status == 0
    assert exit_.pid > 0 and len(exit_.cpus) == 1 and len(exit_.mems) == 1
    assert before < exit_.started_at < after
    if started:
        assert (replies[0].pid, replies[0].cpus, replies[0].task) == \
            (exit_.pid, exit_.cpus, exit_.task)


def test_result_is_complete_without_a_started_reply(daemon):
    async def main():
        async with AsyncClient(daemon.rundir) as c:
            t0 = time.monotonic()
            result = await c.run(ONE_CPU, ["true"], output=False, wait=True, env={})
            return t0, result, time.monotonic()
    t0, result, t1 = run(main())
    assert result.status == 0 and result.pid > 0 and result.task and result.container
    assert len(result.cpus) == 1 and len(result.mems) == 1
    assert t0 < result.started_at < t1


def test_unknown_runtime_dir_is_a_clear_error(tmp_path):
    with pytest.raises(NrmError, match="not running"):
        AsyncClient(str(tmp_path))
