"""EventCoalescer on a real event loop: floods become sums, nothing is lost."""

import asyncio

from nrm.daemon.coalesce import EventCoalescer


def progress(payload, total, app="a", task="t1"):
    return {"container": "c1", "task": task, "app": app, "payload": payload, "total": total,
            "rate": 1.0}


def phase(n, cpu=0, rank=0):
    return {"container": "c1", "task": "t1", "app": "a", "rank": rank, "cpu": cpu, "phase": n,
            "aggregation": 1, "computetime": 10, "totaltime": 30}


def run(coro):
    return asyncio.run(coro)


def test_a_flood_becomes_few_events_with_exact_sums():
    async def main():
        out = []
        co = EventCoalescer(asyncio.get_running_loop(), lambda t, b: out.append((t, b)),
                            interval=0.05)
        for i in range(1, 10001):
            co.offer("progress", progress(1, i))
        await asyncio.sleep(0.1)        # the pending sum goes out on the timer
        return out, co.counters
    out, counters = run(main())
    assert len(out) == 2                # the first at once, the rest summed
    assert out[0][1]["payload"] == 1 and "messages" not in out[0][1]
    assert sum(b["payload"] for _, b in out) == 10000
    assert out[-1][1]["total"] == 10000 and out[-1][1]["messages"] == 9999
    assert counters == {"events_published": 2, "events_merged": 9998}


def test_phase_totals_are_summed_and_phase_is_the_latest():
    async def main():
        out = []
        co = EventCoalescer(asyncio.get_running_loop(), lambda t, b: out.append(b), 0.05)
        for n in range(1, 6):
            co.offer("phase_context", phase(n))
        co.offer("phase_context", phase(1, cpu=1))      # another cpu: its own key
        co.flush()
        return out
    out = run(main())
    cpu0 = [b for b in out if b["cpu"] == 0]
    assert [b["phase"] for b in cpu0] == [1, 5]
    assert cpu0[1]["aggregation"] == 4 and cpu0[1]["computetime"] == 40
    assert cpu0[1]["totaltime"] == 120
    assert [b["phase"] for b in out if b["cpu"] == 1] == [1]


def test_other_topics_and_quiet_keys_pass_at_once():
    async def main():
        out = []
        co = EventCoalescer(asyncio.get_running_loop(), lambda t, b: out.append(t), 0.02)
        co.offer("task", {"event": "exit"})
        co.offer("progress", progress(1, 1))
        await asyncio.sleep(0.03)
        co.offer("progress", progress(1, 2))           # quiet for an interval: at once
        co.offer("progress", progress(1, 1, app="b"))  # another app: at once
        return out, co._pending
    out, pending = run(main())
    assert out == ["task", "progress", "progress", "progress"]
    assert not pending


def test_keys_stay_bounded():
    async def main():
        co = EventCoalescer(asyncio.get_running_loop(), lambda t, b: None, 10.0, max_keys=100)
        for i in range(5000):
            co.offer("progress", progress(1, 1, task=f"t{i}"))
        return len(co._last)
    assert run(main()) <= 100
