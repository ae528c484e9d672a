"""The daemon's side of in-wait throttling: who does it, how, and the restore.

The ranks throttle their own cores inside MPI waits (the PMPI interposer,
libnrm/src/inwait.h): a daemon round trip is too slow for waits of a
millisecond. The daemon decides whether a container does it (its policy,
``nrm.power.policy.inwait.for_policy``), tells its ranks how through their
environment, and owns the safety net: on real hardware it claims every
cpu's clock modulation (and, for the frequency form, its IA32_PERF_CTL)
before the container's ranks run (saved and journaled, like any control
it writes), puts it back on the cpus of a task
that ends while its container lives on (cpus no other task of the
container is bound to), and releases the claim when the container ends, so
a rank killed inside a throttled wait never leaves its core slow.
Containers sharing cpus each hold a claim; the last one out restores.

Backends (``Platform.wait_throttle_target``):

* ``msr``: the ranks write IA32_CLOCK_MODULATION (0x19A, the duty cycle)
  and/or IA32_PERF_CTL (0x199, the target ratio: the frequency form)
  through msr-safe. Offered only when every cpu of the container has an
  ``msr_safe`` device the container's user may write and the allowlist
  (when readable) lets bits 4:0 of 0x19A (duty cycle), bits 15:8 of 0x199
  (frequency) be written; the frequency form also needs hardware P-states
  off (the linux backend's ``wait_throttle_target``).
* ``counters``: the emulated node. The ranks count their throttled time in
  per-process files under ``<rundir>/inwait/<container>``, which the
  platform reads and bills at the power of the container's setting (its
  level, and its frequency: DVFS and COMBINED drop it to the lowest).

A setting whose frequency form is not available on the node (DVFS and
COMBINED) does not throttle in waits at all there (one warning), rather
than throttle a knob other than its own. The ranks get
``NRM_INWAIT_LEVEL=16`` when the duty cycle stays (DVFS: the interposer
never touches 0x19A then) and ``NRM_INWAIT_PERF_CTL`` (bits 15:8) when the
frequency drops.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from nrm.hw.registry import HardwareError
from nrm.hw.waitcounters import read as read_counters
from nrm.power.policy.inwait import LEVELS, WaitThrottle, for_policy

log = logging.getLogger(__name__)

DUTY_CYCLE = "cpu.duty_cycle"
PERF_CTL = "cpu.perf_ctl"
#: counter files read for a container's totals, per cpu of it (the
#: directory is writable by its ranks: what they leave there is bounded)
FILES_PER_CPU = 4
MIN_FILES = 64


@dataclass
class _Throttling:
    kind: str
    setting: WaitThrottle
    cpus: List[int]
    env: Dict[str, str]
    container: object
    directory: Optional[str] = None
    errors: List[str] = field(default_factory=list)
    #: the platform controls claimed for the ranks (msr)
    controls: List[str] = field(default_factory=list)


class WaitThrottleActuation:
    """Owns the in-wait throttling of containers whose policy carries it:
    their ranks' environment, their counter directories (emulated node) and
    the saved clock modulation of their cpus (hardware), restored at the
    container's end (a container listener)."""

    def __init__(self, platform, rundir: str, pids_of: Callable[[object], Iterable[int]]):
        self.platform = platform
        self.root = os.path.join(rundir, "inwait")
        self.pids_of = pids_of
        self.active: Dict[str, _Throttling] = {}
        # what the sensor thread reads (counter_dirs): replaced, never
        # mutated, whenever ``active`` changes on the loop
        self._published: Tuple[_Throttling, ...] = ()
        self.target = None
        if platform is not None:
            try:
                self.target = platform.wait_throttle_target()
            except HardwareError as exc:
                log.warning("in-wait throttling unavailable: %s", exc)
        if self.target is not None and self.target["kind"] == "counters":
            platform.set_wait_counters(self.counter_dirs)
        if self.target is None:
            log.info("in-wait throttling: no actuator on this node (needs msr-safe or the "
                     "emulated node)")
        else:
            log.info("in-wait throttling through %s", self.target["kind"])

    # -- lifecycle (ContainerListener) -------------------------------------
    def container_started(self, container) -> None:
        setting = for_policy(container.manifest.power.policy)
        if setting is None or self.target is None:
            return
        cpus = sorted(container.slice.cpus)
        # level 16: the duty cycle stays (the frequency form alone); the
        # counters' level field is informational, the platform bills the
        # container's setting
        env = {"NRM_INWAIT_DELAY": f"{int(round(setting.delay_s * 1e9))}ns",
               "NRM_INWAIT_LEVEL": str(setting.level)}
        if self.target["kind"] == "msr":
            state = self._start_msr(container, setting, cpus, env)
        else:
            state = self._start_counters(container, setting, cpus, env)
        if state is not None:
            self.active[container.id] = state
            self._publish()

    def _publish(self) -> None:
        self._published = tuple(s for s in self.active.values() if s.directory is not None)

    def _start_msr(self, container, setting, cpus, env) -> Optional[_Throttling]:
        perf = self.target.get("perf_ctl")
        if setting.frequency is not None and perf is None:
            log.warning("container %s: no in-wait throttling: policy %s drops the frequency "
                        "in waits, and IA32_PERF_CTL is not writable here: %s",
                        container.id, container.manifest.power.policy,
                        self.target.get("perf_ctl_why"))
            return None
        modulate = setting.level < LEVELS
        bits = self.target["bits"].get(setting.level) if modulate else None
        missing = [c for c in cpus if c not in self.target["cpus"]
                   or (setting.frequency is not None and c not in perf["lowest"])]
        denied = [] if missing else self.platform.wait_throttle_denied(cpus, container.uid)
        if (modulate and bits is None) or missing or denied:
            log.warning("container %s: no in-wait throttling: %s", container.id,
                        f"level {setting.level} not available" if modulate and bits is None
                        else f"no msr_safe for cpus {missing}" if missing else
                        f"uid {container.uid} may not write msr_safe of cpus {denied}")
            return None
        controls = ([DUTY_CYCLE] if modulate else []) \
            + ([PERF_CTL] if setting.frequency is not None else [])
        claimed: List[str] = []
        try:
            for name in controls:
                self.platform.claim(name, cpus)
                claimed.append(name)
        except HardwareError as exc:
            for name in claimed:
                try:
                    self.platform.release(name, cpus)
                except HardwareError as exc2:
                    log.error("container %s: releasing %s of cpus %s: %s",
                              container.id, name, cpus, exc2)
            log.warning("container %s: no in-wait throttling: %s", container.id, exc)
            return None
        env["NRM_INWAIT_MSR_DIR"] = self.target["dir"]
        if modulate:
            env["NRM_INWAIT_MSR_BITS"] = f"{bits:#x}"
        if setting.frequency is not None:
            env["NRM_INWAIT_PERF_CTL"] = f"{self._ratio(setting, perf, cpus) << 8:#06x}"
        return _Throttling("msr", setting, cpus, env, container, controls=controls)

    @staticmethod
    def _ratio(setting: WaitThrottle, perf: dict, cpus: List[int]) -> int:
        """IA32_PERF_CTL's ratio for the setting's frequency on ``cpus``:
        never below the lowest of any of them (one value for all ranks)."""
        floor = max(perf["lowest"][c] for c in cpus)
        hz = setting.frequency_hz([floor * perf["bus_hz"], perf["highest"] * perf["bus_hz"]])
        return int(min(perf["highest"], max(floor, math.ceil(hz / perf["bus_hz"] - 1e-9))))

    def _start_counters(self, container, setting, cpus, env) -> Optional[_Throttling]:
        directory = os.path.join(self.root, container.id)
        try:
            os.makedirs(self.root, mode=0o755, exist_ok=True)
            # exists when a restarted nrmd adopts the container: its ranks
            # still write there
            os.makedirs(directory, 0o700, exist_ok=True)
            if os.path.islink(directory):
                raise OSError(f"{directory} is a symbolic link")
            if container.uid != os.geteuid():
                os.chown(directory, container.uid, -1)
        except OSError as exc:
            log.warning("container %s: no in-wait throttling: cannot create %s: %s",
                        container.id, directory, exc.strerror or exc)
            return None
        env["NRM_INWAIT_COUNTERS"] = directory
        return _Throttling("counters", setting, cpus, env, container, directory)

    def environment(self, container) -> Dict[str, str]:
        """What the container's tasks need to throttle in waits ({} when they do not)."""
        state = self.active.get(container.id)
        return dict(state.env) if state is not None else {}

    def task_ended(self, task) -> None:
        """Put back clock modulation on the cpus of a task that ended while
        its container lives on, unless another of its tasks may run there:
        a rank killed in a throttled wait left its core throttled, and the
        next rank there would take that for the value to restore. The
        originals stay saved (claimed) for the container's end."""
        container = task.container
        state = self.active.get(container.id)
        if state is None or state.kind != "msr" or container.ending:
            return
        busy = set()
        for other in list(container.tasks.values()) + list(container.starting.values()):
            if other is not task:
                busy.update(other.cpus or state.cpus)
        free = sorted((set(task.cpus or state.cpus) & set(state.cpus)) - busy)
        if not free:
            return
        for name in state.controls:
            try:
                self.platform.restore(name, free, keep=True)
            except HardwareError as exc:
                log.error("container %s: restoring %s of cpus %s after task %s: %s",
                          container.id, name, free, task.id, exc)

    def container_ended(self, container) -> Optional[dict]:
        state = self.active.pop(container.id, None)
        if state is None:
            return None
        self._publish()
        out = {"backend": state.kind, "delay_s": state.setting.delay_s,
               "level": state.setting.level}
        if state.setting.frequency is not None:
            out["frequency"] = state.setting.frequency
        if state.kind == "msr":
            errors = []
            for name in state.controls:
                try:
                    self.platform.release(name, state.cpus)
                except HardwareError as exc:
                    log.error("container %s: restoring %s of cpus %s: %s",
                              container.id, name, state.cpus, exc)
                    errors.append(str(exc))
            if errors:
                out["restore_error"] = "; ".join(errors)
            else:
                out["restored_cpus"] = state.cpus
        else:
            out.update(self._totals(state.directory,
                                    max(MIN_FILES, FILES_PER_CPU * len(state.cpus))))
            shutil.rmtree(state.directory, ignore_errors=True)
        return {"inwait": out}

    # -- emulated node -------------------------------------------------------
    def counter_dirs(self) -> List[Tuple[str, List[int], int, object]]:
        """(directory, pids, level, frequency) of every throttling container
        (frequency: None, ``inwait.LOWEST`` or Hz, which the platform
        resolves); called from the platform's sensor thread, so it reads
        the published tuple, never ``active``."""
        out = []
        for state in self._published:
            try:
                out.append((state.directory, list(self.pids_of(state.container)),
                            state.setting.level, state.setting.frequency))
            except Exception as exc:  # a container going away under us
                log.debug("pids of %s: %r", state.directory, exc)
        return out

    @staticmethod
    def _totals(directory: str, limit: int) -> dict:
        """What the ranks reported, summed over at most ``limit`` counter
        files (``<pid>``; anything else the ranks left there is skipped)."""
        cpu = wall = waits = files = 0
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    if not entry.name.isdigit():
                        continue
                    if files == limit:
                        log.warning("%s: more than %d counter files, the rest not summed",
                                    directory, limit)
                        break
                    files += 1
                    for c in read_counters(os.path.join(directory, entry.name)).values():
                        cpu += c.cpu_ns
                        wall += c.wall_ns
                        waits += c.waits
        except OSError:
            pass
        return {"throttled_cpu_s": cpu / 1e9, "throttled_wall_s": wall / 1e9,
                "throttled_waits": waits}
