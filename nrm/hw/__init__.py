"""Hardware access for nrm: named signals and controls over a real or emulated node."""

from nrm.hw.open import open_platform
from nrm.hw.registry import ControlInfo, HardwareError, Platform, Sample, SignalInfo

__all__ = ["ControlInfo", "HardwareError", "Platform", "Sample", "SignalInfo",
           "open_platform"]
