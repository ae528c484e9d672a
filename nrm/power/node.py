"""The node-wide power side of nrmd: samples, the power cap, and their history.

The sensor thread samples the platform; each sample hops to the event loop,
feeds the cap control loop, is kept in a bounded history (exit profiles,
the HTTP state and the dashboard read it) and is published as a ``power``
event. The daemon wires one ``NodePower`` and asks it for the node's power
state; it never touches the sensors or the controller itself.

The admin's cap is the node's, not a task's: it is recorded in the runtime
dir while set (``cap_path``), so that the nrmd started after a crash puts
it back (``restore_cap``) instead of leaving the node uncapped; a clean
stop lifts the cap and forgets it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from collections import deque
from typing import Callable, Deque, Optional

from nrm import jsonlines
from nrm.hw.registry import Platform, Sample
from nrm.power.cap import PowerCapController
from nrm.power.sensors import SensorManager

log = logging.getLogger(__name__)

HISTORY_SAMPLES = 20000
HISTORY_DECISIONS = 5000


class PowerUnavailable(Exception):
    """A power request this node cannot honour; the message says why."""


class PowerHistory:
    """Recent node power samples and policy decisions, oldest first.

    Bounded deques: the daemon runs for months, and a profile or a
    dashboard only ever looks back a few hours at most."""

    def __init__(self, samples: int = HISTORY_SAMPLES, decisions: int = HISTORY_DECISIONS):
        self.samples: Deque[dict] = deque(maxlen=samples)
        self.decisions: Deque[dict] = deque(maxlen=decisions)
        self.latest: Optional[dict] = None

    def add_sample(self, body: dict) -> None:
        self.latest = body
        self.samples.append(body)


def since(history, key: str, t0: float) -> list:
    """Entries of a time-ordered history from ``t0`` on, reading from the end
    only as far back as needed: a short task costs nothing, whatever the
    history's length."""
    out = []
    for entry in reversed(history):
        if entry.get(key, 0) < t0:
            break
        out.append(entry)
    out.reverse()
    return out


class NodePower:
    """Owns the sensor loop, the cap controller, the cap set by the admin,
    and the power history."""

    def __init__(self, platform: Platform, sensor_period: float,
                 publish: Callable[[str, dict], None], loop: asyncio.AbstractEventLoop,
                 cap_path: Optional[str] = None):
        self.platform = platform
        self.cap_path = cap_path
        #: the cap a crashed predecessor had set and this daemon put back
        self.cap_restored_w: Optional[float] = None
        self.publish = publish
        self.loop = loop
        self.history = PowerHistory()
        self.cap_w: Optional[float] = None
        self.controller = PowerCapController(platform)
        self.sensors = SensorManager(platform, sensor_period, on_sample=self._from_thread)

    def start(self) -> None:
        self.sensors.start()

    def stop(self, forget_cap: bool = True) -> None:
        """Stop sampling and lift the cap: the node is never left capped.
        ``forget_cap``: a clean stop; a daemon that failed to start keeps
        the record for the next one."""
        self.sensors.stop()
        try:
            self.controller.clear()
        except Exception:
            log.exception("clearing power cap")
        if forget_cap:
            self._record(None)

    def restore_cap(self, max_w: float) -> Optional[float]:
        """Put back the cap a crashed predecessor recorded; the watts, or
        None. A record that is unreadable, out of (0, max_w], or that this
        node cannot honour is logged and dropped, never fatal."""
        if self.cap_path is None:
            return None
        try:
            data = jsonlines.read(self.cap_path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("cannot read the power cap record %s: %s", self.cap_path,
                        exc.strerror or exc)
            return None
        try:
            watts = json.loads(data)["cap_w"]
            if isinstance(watts, bool) or not isinstance(watts, (int, float)) \
                    or not math.isfinite(watts) or not 0 < watts <= max_w:
                raise ValueError(f"cap_w {watts!r} not in (0, {max_w:g}]")
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring the power cap record %s: %s", self.cap_path, exc)
            self._record(None)
            return None
        try:
            self.set_cap(float(watts))
        except PowerUnavailable as exc:
            log.warning("cannot put back the previous nrmd's power cap of %.1f W: %s",
                        watts, exc)
            return None
        self.cap_restored_w = float(watts)
        log.warning("put back the power cap of %.1f W set before the previous nrmd stopped "
                    "uncleanly", watts)
        return self.cap_restored_w

    def _record(self, watts: Optional[float]) -> None:
        if self.cap_path is None:
            return
        try:
            if watts is None:
                os.unlink(self.cap_path)
            else:
                jsonlines.replace(self.cap_path,
                                  json.dumps({"cap_w": watts}).encode() + b"\n", durable=False)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot record the power cap in %s: %s (a restart after a crash "
                        "would not put it back)", self.cap_path, exc.strerror or exc)

    def _from_thread(self, sample: Sample) -> None:
        self.loop.call_soon_threadsafe(self._on_sample, sample)

    def _on_sample(self, sample: Sample) -> None:
        body = sample.to_dict()
        body["wall_time"] = time.time()
        self.history.add_sample(body)
        try:
            self.controller.on_sample(sample)
        except Exception:
            log.exception("power controller failed")
        self.publish("power", dict(body))

    def state(self) -> dict:
        return {"sample": self.history.latest, "cap_w": self.cap_w,
                "backend": self.platform.backend_name, "emulated": bool(self.platform.emulated)}

    def set_cap(self, watts: Optional[float]) -> dict:
        """Set (or clear, with None) the node power cap; raises PowerUnavailable."""
        try:
            self.controller.set_cap(watts)
        except Exception as exc:
            raise PowerUnavailable(str(exc)) from None
        self.cap_w = watts
        self._record(watts)
        self.publish("power", {"event": "cap", "cap_w": watts})
        return {"cap_w": watts}
