"""The QCG API over TCP (``nrm pilot --net``, CurveZMQ) against its Unix socket.

One pilot serves both (``--api-socket`` and ``--net`` on loopback); one
``nrm.pilot.qcg.Manager`` per transport takes turns in rounds, so a change
of load hits both alike. Measured: the round trip of ``resources`` (the
transport alone: no journal, no launch) and of ``submit`` (the
acknowledgement, its ``fdatasync`` included), and the TCP Manager's
connect (CURVE handshake included). The Unix socket is the baseline.
``PILOT_NET_N`` requests per transport and round (default 200),
``PILOT_NET_ROUNDS`` rounds (5). Prints JSON (p50 / p99, ms).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nrm.pilot.qcg import Jobs, Manager  # noqa: E402
from nrm.tools.localnrmd import LocalNrmd  # noqa: E402

N = int(os.environ.get("PILOT_NET_N", "200"))
ROUNDS = int(os.environ.get("PILOT_NET_ROUNDS", "5"))


def stats(samples):
    samples = sorted(samples)
    return [round(statistics.median(samples) * 1e3, 3),
            round(samples[int(0.99 * (len(samples) - 1))] * 1e3, 3)]


def main() -> None:
    tmp = tempfile.mkdtemp(prefix="nrm-pilot-net-bench-")
    daemon = LocalNrmd(log_level="warning").start()
    env = dict(os.environ, NRM_RUNTIME_DIR=daemon.rundir)
    sock = os.path.join(tmp, "api", "sock")
    wd = os.path.join(tmp, "wd")
    pilot = subprocess.Popen([sys.executable, "-m", "nrm.cli.main", "pilot", "--net",
                              "--net-host", "127.0.0.1", "--api-socket", sock, "--nodes", "2",
                              "--wd", wd, "--progress", "none"], env=env,
                             stderr=subprocess.DEVNULL)
    try:
        while not (glob.glob(os.path.join(wd, ".nrm-pilot-*", "address"))
                   and os.path.exists(sock)):
            if pilot.poll() is not None:
                raise SystemExit("the pilot exited")
            time.sleep(0.02)
        aux = os.path.dirname(glob.glob(os.path.join(wd, ".nrm-pilot-*", "address"))[0])
        t = time.perf_counter()
        tcp = Manager(aux)
        connect = time.perf_counter() - t
        managers = {"unix": Manager(sock), "tcp": tcp}
        rtt = {name: [] for name in managers}
        sub = {name: [] for name in managers}
        for r in range(ROUNDS):
            for name, m in managers.items():
                for _ in range(N):
                    t = time.perf_counter()
                    m.resources()
                    rtt[name].append(time.perf_counter() - t)
                for i in range(N // 5):
                    jobs = Jobs().add(name=f"{name}-{r}-{i}", exec="true")
                    t = time.perf_counter()
                    m.submit(jobs)
                    sub[name].append(time.perf_counter() - t)
                m.wait4all()
        out = {"load": os.getloadavg()[0], "n": N, "rounds": ROUNDS,
               "tcp_connect_ms": round(connect * 1e3, 2)}
        for name in managers:
            out[f"resources_{name}"] = stats(rtt[name])
            out[f"submit_{name}"] = stats(sub[name])
        out["resources_ratio_tcp_unix"] = round(out["resources_tcp"][0]
                                                / out["resources_unix"][0], 2)
        out["submit_ratio_tcp_unix"] = round(out["submit_tcp"][0] / out["submit_unix"][0], 2)
        managers["unix"].cleanup()
        tcp.finish()
        pilot.wait(60)
        print(json.dumps(out))
    finally:
        if pilot.poll() is None:
            pilot.kill()
            pilot.wait()
        daemon.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
