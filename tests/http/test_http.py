"""nrmd --http: /metrics, /api/v1/state and the event stream, on a real daemon."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest

from nrm.http import server
from nrm.http.sources import Sources
from nrm.power.node import PowerHistory
from tests.conftest import EXAMPLES
from tests.nrmd import DaemonProcess, wait_for

BASIC = os.path.join(EXAMPLES, "basic.yml")
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_http_daemon():
    port = free_port()
    d = DaemonProcess("--hw", "emulated", "--sensor-period", "0.1",
                      "--http", f"127.0.0.1:{port}").start()
    d.base = f"http://127.0.0.1:{port}"
    d.port = port
    return d


def stop_daemon(d) -> None:
    rc = d.stop()
    assert rc == 0, d.log()
    shutil.rmtree(d.rundir, ignore_errors=True)


@pytest.fixture(scope="module")
def hd():
    d = start_http_daemon()
    yield d
    stop_daemon(d)


def get(d, path: str, timeout: float = 5.0):
    with urllib.request.urlopen(d.base + path, timeout=timeout) as r:
        return r.status, r.headers.get("Content-Type", ""), r.read().decode()


def state(d) -> dict:
    return json.loads(get(d, "/api/v1/state")[2])


SAMPLE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")


def metrics(d) -> dict:
    """{(name, labels text): value} from one scrape."""
    out = {}
    for line in get(d, "/metrics")[2].splitlines():
        if not line or line.startswith("#"):
            continue
        m = SAMPLE_RE.match(line)
        assert m, f"unparsable exposition line {line!r}"
        out[(m.group(1), m.group(2) or "")] = float(m.group(3))
    return out


def value(sample: dict, name: str, labels: str = "") -> float:
    return sample[(name, labels)]


# ---------------------------------------------------------------- address parsing

@pytest.mark.parametrize("spec,expected", [
    ("127.0.0.1:9100", ("127.0.0.1", 9100)),
    (":9100", ("127.0.0.1", 9100)),
    ("0.0.0.0:80", ("0.0.0.0", 80)),
    ("[::1]:9100", ("::1", 9100)),
    ("localhost:0", ("localhost", 0)),
])
def test_parse_address(spec, expected):
    assert server.parse_address(spec) == expected


@pytest.mark.parametrize("spec,message", [
    ("", "HOST:PORT"),
    ("9100", "HOST:PORT"),
    ("::1:9100", "brackets"),
    ("[::1]9100", "[ADDR]:PORT"),
    ("[127.0.0.1]:80", "not an IPv6"),
    ("host:http", "not a number"),
    ("host:70000", "out of range"),
    ("a/b:80", "not an address"),
])
def test_parse_address_rejects(spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        server.parse_address(spec)


def test_bind_failure_is_a_clear_startup_error():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        d = DaemonProcess("--hw", "emulated", "--http", f"127.0.0.1:{port}")
        with pytest.raises(RuntimeError, match="exited"):
            d.start()
        log = d.log()
        shutil.rmtree(d.rundir, ignore_errors=True)
    assert f"http: cannot listen on 127.0.0.1:{port}" in log, log


# ---------------------------------------------------------------------- /metrics

def test_metrics_pass_promtool(hd):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus)")
    wait_for(lambda: ("nrm_package_power_watts", '{package="0"}') in metrics(hd))
    status, ctype, text = get(hd, "/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    for name in ("nrm_info", "nrm_emulated", "nrm_package_power_watts",
                 "nrm_package_energy_joules_total", "nrm_dram_power_watts",
                 "nrm_dram_energy_joules_total", "nrm_package_temperature_celsius",
                 "nrm_cpu_duty_cycle_level", "nrm_cpu_frequency_hertz", "nrm_containers",
                 "nrm_tasks", "nrm_downstream_messages_received_total",
                 "nrm_downstream_messages_dropped_total", "nrm_sensor_tick_duration_seconds",
                 "nrm_sensor_tick_lateness_seconds", "nrm_policy_decisions_total",
                 "nrm_requests_total", "nrm_http_event_clients"):
        assert f"\n{name}" in text, name


def test_metrics_describe_this_daemon(hd):
    m = metrics(hd)
    st = state(hd)
    info = [k for k in m if k[0] == "nrm_info"]
    assert len(info) == 1
    labels = info[0][1]
    assert f'version="{st["version"]}"' in labels
    assert f'backend="{st["hardware"]["backend"]}"' in labels
    assert f'runtime="{st["runtime"]["name"]}"' in labels
    assert value(m, "nrm_emulated") == 1.0
    cpus = [k for k in m if k[0] == "nrm_cpu_duty_cycle_level"]
    assert len(cpus) == st["hardware"]["cpus"]
    assert value(m, "nrm_sensor_period_seconds") == pytest.approx(0.1)


def test_metrics_follow_the_node(hd):
    """Load, a cap and requests show up in the scrape; nothing is a constant."""
    model = state(hd)["hardware"]["model"]
    before = metrics(hd)
    r = hd.cli("run", "--detach", BASIC, PY, "-c", "while True: pass")
    assert r.returncode == 0, r.stderr
    container = r.stdout.decode().split()[0]
    try:
        busy = model["idle_w"] + 0.5 * model["dynamic_w"]
        # One cpu spinning puts the emulated package at least halfway to one
        # cpu's dynamic power, whatever else the machine is doing.
        wait_for(lambda: value(metrics(hd), "nrm_package_power_watts", '{package="0"}')
                 >= busy)
        m = metrics(hd)
        assert value(m, "nrm_containers", '{state="running"}') >= 1
        assert value(m, "nrm_tasks", '{state="running"}') >= 1
        assert value(m, "nrm_tasks_started_total") > value(before, "nrm_tasks_started_total")
        assert (value(m, "nrm_package_energy_joules_total", '{package="0"}')
                > value(before, "nrm_package_energy_joules_total", '{package="0"}'))
        listed = [c for c in state(hd)["container_list"] if c["id"] == container]
        assert listed and listed[0]["tasks"] and "argv" not in listed[0]["tasks"][0]
        assert ("nrm_node_power_cap_watts", "") not in m
        r = hd.cli("setpower", "123.5")
        assert r.returncode == 0, r.stderr
        assert value(metrics(hd), "nrm_node_power_cap_watts") == 123.5
        r = hd.cli("setpower", "off")
        assert r.returncode == 0, r.stderr
        assert ("nrm_node_power_cap_watts", "") not in metrics(hd)
    finally:
        hd.cli("kill", container)
    wait_for(lambda: value(metrics(hd), "nrm_containers", '{state="running"}') == 0)
    m = metrics(hd)
    assert value(m, "nrm_requests_total", '{type="setpower"}') == 2
    assert value(m, "nrm_containers_finished_total") >= 1


# ------------------------------------------------------------------- /api/v1/state

def test_state_matches_nrm_status(hd):
    r = hd.cli("status", "--json")
    assert r.returncode == 0, r.stderr
    status = json.loads(r.stdout)
    st = state(hd)
    assert set(status) <= set(st)
    for key in ("version", "protocol", "pid", "runtime_dir", "runtime", "resources",
                "power_cap_w"):
        assert st[key] == status[key], key
    for key in ("backend", "emulated", "cpus", "packages", "signals", "controls"):
        assert st["hardware"][key] == status["hardware"][key], key
    assert set(st["tasks"]) == set(status["tasks"])
    assert st["latest_sample"]["packages"]["0"]["power_w"] is not None
    assert isinstance(st["container_list"], list)
    assert isinstance(st["decisions"], list)
    assert set(st["policies"]) == {"active", "counters", "latency"}


def test_read_only(hd):
    req = urllib.request.Request(hd.base + "/metrics", data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=5)
    assert err.value.code == 405


def test_dashboard_is_served(hd):
    status, ctype, html = get(hd, "/")
    assert status == 200 and ctype.startswith("text/html")
    assert 'id="node-power"' in html and 'id="cpu-strip"' in html
    for path in re.findall(r'(?:src|href)="(static/[^"]+)"', html):
        assert get(hd, "/" + path)[0] == 200
    # nothing is fetched from outside the daemon
    assert "http://" not in html and "https://" not in html


# ------------------------------------------------------------------- event stream

def open_stream(d) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", d.port), timeout=10)
    s.sendall(b"GET /api/v1/events HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
    return s


def read_first_frame(s: socket.socket) -> dict:
    buf = b""
    while b"\n\n" not in buf.split(b"\r\n\r\n", 1)[-1] or b"data: " not in buf:
        chunk = s.recv(65536)
        assert chunk, "stream closed before the first frame"
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n", 1)[0]
    assert b"text/event-stream" in head
    data = body.split(b"data: ", 1)[1].split(b"\n", 1)[0]
    return json.loads(data)


def test_event_stream_clients_are_released(hd):
    assert state(hd)["http"]["event_clients"] == 0
    socks = [open_stream(hd) for _ in range(50)]
    try:
        frames = [read_first_frame(s) for s in socks]
        assert all(f["history"] and "node_power_w" in f for f in frames)
        assert state(hd)["http"]["event_clients"] == 50
        assert value(metrics(hd), "nrm_http_event_clients") == 50
    finally:
        for s in socks:
            s.close()
    wait_for(lambda: state(hd)["http"]["event_clients"] == 0)
    assert value(metrics(hd), "nrm_http_event_clients") == 0


def test_stop_with_clients_connected():
    d = start_http_daemon()
    socks = [open_stream(d) for _ in range(3)]
    try:
        for s in socks:
            read_first_frame(s)
        rc = d.stop()
        for s in socks:       # the daemon closed them: EOF, not a hang
            s.settimeout(10)
            while s.recv(65536):
                pass
        log = d.log()
    finally:
        for s in socks:
            s.close()
        shutil.rmtree(d.rundir, ignore_errors=True)
    assert rc == 0, log
    assert "nrmd stopped" in log and "Traceback" not in log, log


# ------------------------------------------------------ coalescing (no daemon needed)

def fake_sources():
    """The web side's view with a real power history and nothing else."""
    history = PowerHistory()
    for i in range(5):
        history.add_sample({"wall_time": 100.0 + i, "node_power_w": 20.0 + i})
    power = SimpleNamespace(history=history, cap_w=None, sensors=None)
    return Sources(started=0.0, status=dict, containers=None, runtime=None,
                   request_counts={}, power=power)


class FakeHandler:
    request = None


def test_events_are_coalesced_per_flush():
    t = server.Telemetry(fake_sources())
    client = t.add_client(FakeHandler())
    for _ in range(1000):
        t.on_event("power", {})
    t._flush()
    assert len(client.queue) == 1
    t._flush()             # nothing happened since: nothing sent
    assert len(client.queue) == 1
    frame = json.loads(client.queue[0].decode().split("data: ", 1)[1])
    assert frame["points"] == [[100.0 + i, 20.0 + i] for i in range(5)]
    t.sources.power.history.add_sample({"wall_time": 200.0, "node_power_w": 50.0})
    t.on_event("power", {})
    t._flush()
    frame = json.loads(client.queue[1].decode().split("data: ", 1)[1])
    assert frame["points"] == [[200.0, 50.0]]


def test_slow_client_buffer_is_bounded():
    t = server.Telemetry(fake_sources())
    client = t.add_client(FakeHandler())
    for _ in range(server.CLIENT_QUEUE * 3):
        t.on_event("power", {})
        t._flush()
    assert len(client.queue) == server.CLIENT_QUEUE
    assert t.stats()["event_dropped"] == server.CLIENT_QUEUE * 2
    t.remove_client(client)
    assert t.stats()["event_clients"] == 0


def test_client_limit():
    t = server.Telemetry(fake_sources())
    clients = [t.add_client(FakeHandler()) for _ in range(server.MAX_EVENT_CLIENTS)]
    assert all(clients)
    assert t.add_client(FakeHandler()) is None
    assert t.stats()["event_refused"] == 1
