"""Opening the node's hardware: the backend factory.

Kept apart from the registry because it imports every backend, and every
backend imports the registry.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Optional

from nrm.hw.emulated import EmulatedPlatform
from nrm.hw.journal import Journal
from nrm.hw.linux.backend import LinuxPlatform, probe_rapl
from nrm.hw.registry import HardwareError, Platform

log = logging.getLogger(__name__)


def open_platform(kind: str = "auto", root: str = "/", journal_path: Optional[str] = None,
                  emulated_options: Optional[Dict[str, Any]] = None) -> Platform:
    """Open the node's hardware, first restoring controls a crash left behind.

    ``auto`` picks the linux backend when RAPL energy is readable under
    ``root`` (powercap ``energy_uj`` or MSR 0x611) and the emulated node
    otherwise, recording why in ``describe()["reasons"]``.
    """
    if kind not in ("auto", "linux", "emulated"):
        raise HardwareError(f"unknown platform kind {kind!r} (auto, linux or emulated)")
    journal = Journal(journal_path) if journal_path else None
    fallback = None
    if kind == "auto":
        ok, why = probe_rapl(root)
        kind = "linux" if ok else "emulated"
        if not ok:
            fallback = why
            log.info("no readable RAPL under %s (%s): using the emulated node", root, why)
    platform: Platform
    if kind == "linux":
        platform = LinuxPlatform(root=root, journal=journal)
    else:
        platform = EmulatedPlatform(root=root, journal=journal, options=emulated_options)
        if fallback:
            platform._reasons.insert(0, f"emulated because RAPL is not readable: {fallback}")
    platform.recover()
    return platform
