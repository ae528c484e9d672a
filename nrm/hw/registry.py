"""Named signals and controls over hardware domains, with save/restore.

Every backend speaks the same small vocabulary (``package.energy``,
``cpu.duty_cycle`` ...) so the daemon and the policies never learn where a
number comes from. The base :class:`Platform` owns what must be identical
for all backends: validation of names and indices, the rule that the
original value of a control is journaled (and fsynced) before its first
write, and putting originals back. Backends only implement the raw hooks.

The daemon must never crash on hardware, so everything that can go wrong
below this layer surfaces as :class:`HardwareError` carrying the path and a
reason a sysadmin can act on.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from nrm.hw.topology import Topology, format_cpulist

log = logging.getLogger(__name__)


class HardwareError(Exception):
    """A hardware access that failed or was refused; the message says why."""


@dataclass(frozen=True)
class SignalInfo:
    name: str
    domain: str
    unit: str
    aggregation: str
    description: str
    indices: Tuple[int, ...] = ()

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "domain": self.domain, "unit": self.unit,
                "aggregation": self.aggregation, "description": self.description,
                "indices": list(self.indices)}


@dataclass(frozen=True)
class ControlInfo(SignalInfo):
    """A writable quantity; ``minimum``/``maximum`` are None when unknown."""
    minimum: Optional[float] = None
    maximum: Optional[float] = None

    def to_dict(self) -> Dict[str, Any]:
        return {**super().to_dict(), "minimum": self.minimum, "maximum": self.maximum}


@dataclass
class Sample:
    """One reading of the node's sensors.

    ``packages[p]`` holds ``energy_j`` (cumulative and wrap-corrected: only
    differences are meaningful), ``power_w`` (since the previous sample taken
    from the same platform, None for the first), ``dram_energy_j``,
    ``dram_power_w`` and ``temperature_c``; any of them is None when the
    node cannot measure it.
    """
    time: float
    packages: Dict[int, Dict[str, Optional[float]]] = field(default_factory=dict)
    node_power_w: Optional[float] = None
    emulated: bool = False

    def to_dict(self) -> Dict[str, Any]:
        return {"time": self.time,
                "packages": {str(p): dict(v) for p, v in sorted(self.packages.items())},
                "node_power_w": self.node_power_w, "emulated": self.emulated}


def package_entry(energy_j=None, power_w=None, dram_energy_j=None, dram_power_w=None,
                  temperature_c=None) -> Dict[str, Optional[float]]:
    return {"energy_j": energy_j, "power_w": power_w, "dram_energy_j": dram_energy_j,
            "dram_power_w": dram_power_w, "temperature_c": temperature_c}


def node_power(packages: Dict[int, Dict[str, Optional[float]]]) -> Optional[float]:
    """Sum of package and DRAM power; None until a package has a power value."""
    total = None
    for entry in packages.values():
        for key in ("power_w", "dram_power_w"):
            v = entry.get(key)
            if v is not None:
                total = (total or 0.0) + v
    return total


def format_indices(indices: Iterable[int]) -> str:
    return format_cpulist(indices) or "none"


class Platform:
    """The node's hardware as named signals and controls.

    Subclasses fill ``_signals``/``_controls`` and implement ``_read``,
    ``_write`` (returns the applied value), ``_snapshot`` (a JSON-able
    original) and ``_put_back``. Control writes are serialized by one lock;
    ``sample()`` may run concurrently from the sensor thread, so backends
    guard their sampling state separately.
    """

    backend_name = "base"
    emulated = False

    def __init__(self, topology: Topology, journal=None):
        self.topology = topology
        self.duty_cycle_levels = 16
        self._journal = journal
        self._lock = threading.RLock()
        self._saved: Dict[Tuple[str, int], Any] = {}
        #: holders of claimed controls (containers sharing cpus claim each one)
        self._claims: Dict[Tuple[str, int], int] = {}
        #: originals a previous nrmd journaled and this one put back at start
        self._recovered: Dict[Tuple[str, int], Any] = {}
        self._signals: Dict[str, SignalInfo] = {}
        self._controls: Dict[str, ControlInfo] = {}
        self._reasons: List[str] = []
        self._closed = False

    # ------------------------------------------------------------ backend hooks

    def _read(self, name: str, index: int) -> float:
        raise NotImplementedError

    def _write(self, name: str, index: int, value: float) -> float:
        raise NotImplementedError

    def _snapshot(self, name: str, index: int) -> Any:
        raise NotImplementedError

    def _put_back(self, name: str, index: int, original: Any) -> None:
        raise NotImplementedError

    def _claim_snapshot(self, name: str, index: int) -> Any:
        """The original to save for a claim; backends whose controls the
        claimers may have written already (clock modulation in waits) return
        the unmodulated value when the current one is a claimer's."""
        return self._snapshot(name, index)

    def _sample(self) -> Sample:
        raise NotImplementedError

    def _describe_backend(self) -> Dict[str, Any]:
        return {}

    def _actuation_effective(self) -> bool:
        return bool(self._controls)

    def _close_backend(self) -> None:
        pass

    # ------------------------------------------------------------------ public

    def signals(self) -> List[SignalInfo]:
        return list(self._signals.values())

    def controls(self) -> List[ControlInfo]:
        return list(self._controls.values())

    def signal_info(self, name: str) -> SignalInfo:
        info = self._signals.get(name)
        if info is None:
            raise HardwareError(f"unknown signal {name!r} on the {self.backend_name} backend; "
                                f"available: {', '.join(self._signals) or 'none'}")
        return info

    def control_info(self, name: str) -> ControlInfo:
        info = self._controls.get(name)
        if info is None:
            raise HardwareError(f"unknown control {name!r} on the {self.backend_name} backend; "
                                f"available: {', '.join(self._controls) or 'none'}")
        return info

    @staticmethod
    def _check_index(info, index: int) -> int:
        try:
            i = int(index)
        except (TypeError, ValueError):
            raise HardwareError(f"{info.name}: index {index!r} is not an integer") from None
        if i != index or i not in info.indices:
            raise HardwareError(f"{info.name} has no index {index!r} ({info.domain} domain "
                                f"indices: {format_indices(info.indices)})")
        return i

    def read(self, name: str, index: int) -> float:
        info = self.signal_info(name)
        return float(self._read(name, self._check_index(info, index)))

    def write(self, name: str, index: int, value: float) -> float:
        info = self.control_info(name)
        i = self._check_index(info, index)
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise HardwareError(f"{name}[{i}]: value {value!r} is not a number") from None
        if not math.isfinite(v):
            raise HardwareError(f"{name}[{i}]: value {value!r} is not finite")
        with self._lock:
            if self._closed:
                raise HardwareError(f"{name}[{i}]: platform is closed")
            key = (name, i)
            if key not in self._saved:
                original = self._snapshot(name, i)
                if self._journal is not None:
                    self._journal.append({"backend": self.backend_name, "name": name,
                                          "index": i, "original": original})
                self._saved[key] = original
            return float(self._write(name, i, v))

    def saved(self) -> Dict[str, Dict[int, Any]]:
        """Originals currently held (what a restore would put back)."""
        with self._lock:
            out: Dict[str, Dict[int, Any]] = {}
            for (name, i), orig in self._saved.items():
                out.setdefault(name, {})[i] = orig
            return out

    def restore(self, name: Optional[str] = None, indices: Optional[Iterable[int]] = None,
                keep: bool = False) -> None:
        """Put saved originals back; raise HardwareError listing any failure.

        Entries that fail stay saved (and journaled) so a later restore or
        the next daemon start retries them. Entries still claimed
        (``claim``), or all with ``keep``, are put back but stay saved: a
        holder may yet leave the control changed again.
        """
        wanted = None if indices is None else {int(i) for i in indices}
        failures = []
        with self._lock:
            keys = [k for k in self._saved
                    if (name is None or k[0] == name) and (wanted is None or k[1] in wanted)]
            done = []
            for key in keys:
                try:
                    self._put_back(key[0], key[1], self._saved[key])
                    if not keep and key not in self._claims:
                        done.append(key)
                except HardwareError as e:
                    failures.append(f"{key[0]}[{key[1]}]: {e}")
            for key in done:
                del self._saved[key]
            if done and self._journal is not None:
                try:
                    self._journal.drop(self.backend_name, done)
                except HardwareError as e:
                    # The hardware is back to its originals; a stale entry only
                    # means the next start re-applies the same originals.
                    log.warning("%s", e)
        if failures:
            raise HardwareError("restore failed for " + "; ".join(failures))

    def restore_all(self) -> None:
        with self._lock:
            self._claims.clear()
        self.restore()

    def recover(self) -> List[Dict[str, Any]]:
        """Put back controls journaled by a previous daemon that did not close.

        Entries that cannot be put back now are kept as saved originals, so
        a later first write does not mistake a throttled value for the
        original.
        """
        if self._journal is None:
            return []
        entries = self._journal.load()
        if not entries:
            return []
        restored, kept = [], []
        with self._lock:
            for e in entries:
                if e.get("backend") != self.backend_name:
                    log.warning("journal entry %s[%s] was written by the %s backend, this is %s: "
                                "kept, not restored", e.get("name"), e.get("index"),
                                e.get("backend"), self.backend_name)
                    kept.append(e)
                    continue
                name, index = e.get("name"), e.get("index")
                try:
                    if name not in self._controls:
                        raise HardwareError("control no longer available")
                    self._put_back(name, int(index), e.get("original"))
                    restored.append(e)
                    self._recovered[(name, int(index))] = e.get("original")
                    log.warning("restored %s[%s] to %r, left by a previous nrmd that did not "
                                "shut down cleanly", name, index, e.get("original"))
                except (HardwareError, TypeError, ValueError) as err:
                    log.error("cannot restore %s[%s] to %r from the journal: %s",
                              name, index, e.get("original"), err)
                    kept.append(e)
                    if name in self._controls and isinstance(index, int):
                        self._saved[(name, index)] = e.get("original")
            try:
                self._journal.rewrite(kept)
            except HardwareError as err:
                log.error("%s", err)
        return restored

    def frequencies(self, cpu: int) -> List[float]:
        return []

    def sample(self) -> Sample:
        return self._sample()

    def set_task_provider(self, fn: Optional[Callable[[], Iterable[int]]]) -> None:
        pass

    def set_wait_counters(self, fn) -> None:
        """``fn()`` -> ``(directory, pids, level, frequency)`` tuples: where
        each container's ranks count their throttled waits, and the level
        and frequency (None: unchanged) the daemon set for them, the ones
        billed (backends that bill them: emulated)."""

    def wait_throttle_target(self) -> Optional[Dict[str, Any]]:
        """How a rank can throttle its own core inside MPI waits, or None.

        ``{"kind": "msr", "dir": ..., "bits": {level: bits 4:0 of 0x19A},
        "perf_ctl": {"lowest": {cpu: ratio}, "highest": ..., "bus_hz": ...}
        or None}`` on hardware with msr-safe, ``{"kind": "counters"}`` on
        the emulated node (docs/hardware.md, "In-wait throttling").
        """
        return None

    def claim(self, name: str, indices: Iterable[int]) -> None:
        """Save (and journal) the originals of a control that someone else
        will write, so that ``restore`` puts them back: the interposer
        writes clock modulation from the ranks, the daemon restores it.

        Claims are counted per index: holders sharing an index each claim
        and each ``release``; the original goes back when the last one
        does. The original is the one a previous nrmd journaled when this
        one put it back at start (its ranks, adopted, may have written the
        control since), else the backend's ``_claim_snapshot``.
        """
        info = self.control_info(name)
        keys = [(name, self._check_index(info, index)) for index in indices]
        with self._lock:
            if self._closed:
                raise HardwareError(f"{name}: platform is closed")
            taken: List[int] = []
            try:
                for key in keys:
                    if key not in self._saved:
                        if key in self._recovered:
                            original = self._recovered[key]
                        else:
                            original = self._claim_snapshot(*key)
                        if self._journal is not None:
                            self._journal.append({"backend": self.backend_name, "name": name,
                                                  "index": key[1], "original": original})
                        self._saved[key] = original
                        self._recovered.pop(key, None)
                    self._claims[key] = self._claims.get(key, 0) + 1
                    taken.append(key[1])
            except HardwareError:
                self.release(name, taken)
                raise

    def release(self, name: str, indices: Iterable[int]) -> None:
        """End one claim of each index; put back the originals of those no
        one holds any more (raise HardwareError as ``restore`` does)."""
        last = []
        with self._lock:
            for index in indices:
                key = (name, int(index))
                held = self._claims.get(key, 0)
                if held > 1:
                    self._claims[key] = held - 1
                elif held == 1:
                    del self._claims[key]
                    last.append(key[1])
            if last:
                self.restore(name, last)

    def claimed(self, name: str) -> Dict[int, int]:
        """How many holders claim each index of ``name``."""
        with self._lock:
            return {i: n for (c, i), n in self._claims.items() if c == name}

    def wait_throttle_denied(self, cpus: Iterable[int], uid: int) -> List[int]:
        """The cpus of ``cpus`` whose in-wait actuator (``wait_throttle_target``)
        a process of ``uid`` may not write: all of them unless the backend
        hands the ranks a device."""
        return sorted(cpus)

    def describe(self) -> Dict[str, Any]:
        d = {
            "backend": self.backend_name,
            "emulated": self.emulated,
            "actuation_effective": self._actuation_effective(),
            "reasons": list(self._reasons),
            "signals": [s.name for s in self.signals()],
            "controls": [c.name for c in self.controls()],
            "duty_cycle_levels": self.duty_cycle_levels,
            "packages": self.topology.packages,
            "cpus": len(self.topology.cpus),
            "journal": None if self._journal is None else self._journal.path,
            "saved_controls": {n: sorted(v) for n, v in self.saved().items()},
        }
        d.update(self._describe_backend())
        return d

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                self.restore_all()
            except HardwareError as e:
                log.error("on close: %s", e)
            self._closed = True
            self._close_backend()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
