"""The pilot's API endpoint: QCG requests over a Unix socket, for nrm.pilot.qcg.

One JSON object per line each way: a request as QCG's file interface spells
it (``{"request": "submit", "jobs": [...]}``), answered with QCG's envelope
``{"code", "message", "data"}``. One request of nrm's own, ``nrmWait``
(``jobNames``, ``any``, ``timeout``), answers once the named jobs (all, or
any one) are final, so the API's waits need no polling.

Why a Unix socket in a 0700 directory, and SO_PEERCRED on top: the pilot
runs commands as its user, so whoever can talk to it can run code as that
user. Only that user (or root) gets an answer. The same answers travel over
TCP only through :mod:`nrm.pilot.netapi` (``--net``: CurveZMQ, keys the
owner authorized); :meth:`ApiServer.answer` is the one place requests are
served, whatever carried them, and it never raises on what a client sent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import struct
from typing import Any, Dict, List, Optional

from nrm.pilot.jobfile import RequestError, parse_request
from nrm.pilot.model import FINAL
from nrm.pilot.runner import Runner

log = logging.getLogger("nrm.pilot")

MAX_LINE = 64 << 20


def peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


class ApiServer:
    def __init__(self, runner: Runner, path: Optional[str], base_dir: str):
        """``path``: the Unix socket, or None when only ``--net`` serves."""
        self.runner = runner
        self.path = path
        self.base_dir = base_dir
        self.finished = asyncio.Event()
        self.server: Optional[asyncio.AbstractServer] = None
        self._count = 0
        self._waiters: List[tuple] = []

    async def start(self) -> None:
        if self.path is None:
            return
        parent = os.path.dirname(self.path)
        os.makedirs(parent, mode=0o700, exist_ok=True)
        os.chmod(parent, 0o700)
        # bound and listening under a temporary name, then renamed: the path
        # appears only once it accepts (a client that sees it may connect)
        tmp = self.path + ".new"
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        self.server = await asyncio.start_unix_server(self._client, tmp, limit=MAX_LINE)
        os.chmod(tmp, 0o600)
        os.rename(tmp, self.path)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.path is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        uid = peer_uid(sock)
        if uid not in (os.getuid(), 0):
            log.warning("API: refused a connection from uid %d", uid)
            writer.close()
            return
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                response = await self.answer(line)
                writer.write(json.dumps(response).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass
        except asyncio.CancelledError:
            # the pilot ends with this client still connected (LocalManager's
            # finish): ending cancelled would make Python 3.11's stream
            # server print a traceback on the pilot's stderr
            pass
        finally:
            writer.close()

    async def answer(self, line: bytes) -> Dict[str, Any]:
        try:
            req = json.loads(line)
        except (ValueError, RecursionError) as exc:     # RecursionError: nested too deep
            return _error(f"not JSON: {exc}")
        if isinstance(req, dict) and req.get("request") == "nrmWait":
            return await self._wait(req)
        self._count += 1
        try:
            parsed = parse_request(self._count, req, self.base_dir)
        except RequestError as exc:
            return _error(exc.reason if not exc.where else f"{exc.where}: {exc.reason}")
        response = self.runner.handle(parsed)
        if self.runner.journal is not None:
            await self.runner.journal.durable()    # acknowledged = it survives a crash
        if parsed.kind == "finish":
            self.finished.set()
        self.notify()
        return response

    def notify(self) -> None:
        """Something may have become final: wake the waits that are satisfied."""
        keep = []
        for names, any_, fut in self._waiters:
            if fut.done():
                continue
            if self._satisfied(names, any_):
                fut.set_result(None)
            else:
                keep.append((names, any_, fut))
        self._waiters = keep

    def _satisfied(self, names, any_) -> bool:
        jobs = self.runner.manager.jobs
        states = [jobs[n].state if n in jobs else None for n in names]
        if not names:
            return self.runner.manager.done
        final = [s in FINAL or s is None for s in states]
        return any(final) if any_ else all(final)

    async def _wait(self, req: Dict[str, Any]) -> Dict[str, Any]:
        names = req.get("jobNames") or []
        if isinstance(names, str):
            names = [names]
        any_, timeout = bool(req.get("any")), req.get("timeout")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            return _error("nrmWait: jobNames: expected a list of job names")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(
                timeout, (int, float)) or not 0 <= timeout < 1e9):
            return _error(f"nrmWait: timeout: expected seconds (a number >= 0), "
                          f"got {str(timeout)[:40]!r}")
        if not self._satisfied(names, any_):
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append((names, any_, fut))
            try:
                await asyncio.wait_for(fut, timeout)
            except asyncio.TimeoutError:
                return {"code": 0, "message": "timeout", "data": {"timeout": True}}
        jobs = self.runner.manager.jobs
        return {"code": 0, "message": "", "data": {
            "timeout": False,
            "jobs": {n: jobs[n].state if n in jobs else None
                     for n in (names or list(jobs))}}}


def _error(message: str) -> Dict[str, Any]:
    return {"code": 1, "message": message, "data": {}}
