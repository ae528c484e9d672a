"""The dashboard in a real browser: headless Chromium reads live values.

``--dump-dom`` with ``--virtual-time-budget`` cannot be used here: virtual
time does not advance while a fetch is pending, and the event stream is a
fetch that never ends, so Chromium waits forever; without the budget it
dumps at the load event, before the first frame arrives. So the test
drives Chromium over the DevTools protocol instead: it polls the page
until the values pushed by the daemon are on it, and takes the screenshot
(kept in tests/artifacts/) from the same browser.
"""

import asyncio
import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request

import sys

import pytest

from tests.conftest import EXAMPLES
from tests.nrmd import REPO
from tests.http.test_http import start_http_daemon, stop_daemon

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = os.path.join(REPO, "tests", "artifacts")
BASIC = os.path.join(EXAMPLES, "basic.yml")
PY = sys.executable

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed")

READ_PAGE = """JSON.stringify({
  power: document.getElementById('node-power').textContent,
  watts: document.getElementById('node-power').dataset.watts,
  frames: Number(document.getElementById('frames').textContent),
  conn: document.getElementById('conn-state').dataset.state,
  cpus: document.querySelectorAll('#cpu-strip .cpu').length,
  levels: Array.from(document.querySelectorAll('#cpu-strip .cpu'))
    .map(function (c) { return c.dataset.level; }),
  packages: document.querySelectorAll('#packages tbody tr').length,
  containers: Array.from(document.querySelectorAll('#containers tbody tr'))
    .map(function (r) { return r.id; }),
  owned: document.querySelectorAll('#cpu-strip .cpu.owned').length,
})"""


class DevTools:
    """The few DevTools-protocol calls the test needs, over one websocket."""

    def __init__(self, ws):
        self.ws = ws
        self.next_id = 0

    async def call(self, method: str, **params) -> dict:
        self.next_id += 1
        my_id = self.next_id
        await self.ws.write_message(json.dumps({"id": my_id, "method": method,
                                                "params": params}))
        while True:
            msg = await asyncio.wait_for(self.ws.read_message(), 20)
            assert msg is not None, "DevTools connection closed"
            reply = json.loads(msg)
            if reply.get("id") == my_id:
                assert "error" not in reply, reply
                return reply["result"]

    async def evaluate(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")


def devtools_page_url(profile: str, proc: subprocess.Popen) -> str:
    port_file = os.path.join(profile, "DevToolsActivePort")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, "chromium exited"
        try:
            with open(port_file) as f:
                port = int(f.readline())
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
                pages = [t for t in json.load(r) if t.get("type") == "page"]
            if pages:
                return pages[0]["webSocketDebuggerUrl"]
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    raise AssertionError("chromium DevTools endpoint did not come up")


async def watch_dashboard(ws_url: str, container: str) -> dict:
    from tornado.websocket import websocket_connect
    ws = await websocket_connect(ws_url)
    try:
        tools = DevTools(ws)
        deadline = time.monotonic() + 30
        page = None
        while time.monotonic() < deadline:
            page = json.loads(await tools.evaluate(READ_PAGE) or "null")
            if (page and page["frames"] >= 3 and page["power"] != "-"
                    and "container-" + container in page["containers"]):
                break
            await asyncio.sleep(0.2)
        shot = await tools.call("Page.captureScreenshot", format="png")
        html = await tools.evaluate("document.documentElement.outerHTML")
        return {"page": page, "png": base64.b64decode(shot["data"]), "html": html}
    finally:
        ws.close()


@pytest.fixture(scope="module")
def hd():
    d = start_http_daemon()
    yield d
    stop_daemon(d)


def test_dashboard_shows_live_values(hd):
    r = hd.cli("run", "--detach", BASIC, PY, "-c", "while True: pass")
    assert r.returncode == 0, r.stderr
    container = r.stdout.decode().split()[0]
    profile = tempfile.mkdtemp(prefix="nrm-chromium-")
    proc = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--disable-extensions", f"--user-data-dir={profile}",
         "--remote-debugging-port=0", "--remote-allow-origins=*", "--window-size=1200,900",
         hd.base + "/"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        result = asyncio.run(watch_dashboard(devtools_page_url(profile, proc), container))
    finally:
        hd.cli("kill", container)
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(profile, ignore_errors=True)
    os.makedirs(ARTIFACTS, exist_ok=True)
    with open(os.path.join(ARTIFACTS, "dashboard.png"), "wb") as f:
        f.write(result["png"])
    with open(os.path.join(ARTIFACTS, "dashboard.html"), "w") as f:
        f.write(result["html"] or "")
    page = result["page"]
    assert page is not None
    assert page["conn"] == "live", page
    assert page["frames"] >= 3, page          # frames keep arriving over the stream
    assert page["power"].endswith(" W"), page
    watts = float(page["watts"])
    st = json.loads(urllib.request.urlopen(hd.base + "/api/v1/state", timeout=5).read())
    idle = st["hardware"]["model"]["idle_w"]
    assert watts >= idle                       # the node's power, not a placeholder
    assert page["cpus"] == st["hardware"]["cpus"]
    assert all(level == "16" for level in page["levels"]), page   # no policy ran
    assert page["packages"] == len(st["hardware"]["packages"])
    assert "container-" + container in page["containers"], page
    assert page["owned"] >= 1, page
    assert result["png"][:8] == b"\x89PNG\r\n\x1a\n"
