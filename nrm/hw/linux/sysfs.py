"""Attribute-file access for sysfs/devfs with errors a sysadmin can act on.

Writes use O_TRUNC like a shell redirection: sysfs ignores it, and a fake
tree made of regular files then holds exactly the value written.

Hot files (energy counters, package temperatures) stay open and are read
with ``os.pread`` at offset 0, which makes sysfs regenerate the value: a
pread costs about 2 us where open/read/close costs about 18 us.
"""

from __future__ import annotations

import errno
import os
from typing import Optional

from nrm.hw.registry import HardwareError


def reason(path: str, err: int) -> str:
    """Why an access to ``path`` failed with ``err``, phrased as what to do."""
    base = os.path.basename(path)
    if err in (errno.EACCES, errno.EPERM):
        if base == "energy_uj":
            return ("energy_uj is readable by root only since Linux 5.10 (CVE-2020-8694); "
                    "run nrmd as root or relax the file mode at boot")
        if base in ("msr", "msr_safe"):
            return ("MSR access needs root with CAP_SYS_RAWIO for msr, or an msr-safe "
                    "allowlist and group permissions for msr_safe")
        return "permission denied: nrmd usually runs as root"
    if err == errno.ENOENT:
        if base == "msr":
            return "no MSR device: load the msr kernel module (modprobe msr) or msr-safe"
        return "file does not exist on this kernel/hardware"
    if err == errno.EIO and base in ("msr", "msr_safe"):
        return "register not implemented by this cpu or not in the msr-safe allowlist"
    return os.strerror(err) if err else "unknown error"


def hw_error(path: str, exc: OSError, action: str = "read") -> HardwareError:
    return HardwareError(f"cannot {action} {path}: {reason(path, exc.errno or 0)}")


def read_text(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode("ascii", "replace").strip()
    except OSError as e:
        raise hw_error(path, e) from None


def read_int(path: str) -> int:
    text = read_text(path)
    try:
        return int(text.split()[0])
    except (ValueError, IndexError):
        raise HardwareError(f"cannot parse {path}: expected an integer, got {text[:40]!r}") \
            from None


def try_read_text(path: str, default: Optional[str] = None) -> Optional[str]:
    try:
        return read_text(path)
    except HardwareError:
        return default


def write_text(path: str, text: str) -> None:
    data = text.encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
    except OSError as e:
        raise hw_error(path, e, "open for writing") from None
    try:
        os.write(fd, data)
    except OSError as e:
        raise HardwareError(f"cannot write {text!r} to {path}: "
                            f"{e.strerror or e}") from None
    finally:
        os.close(fd)


class AttrFile:
    """A sysfs attribute kept open for repeated reads."""

    __slots__ = ("path", "fd")

    def __init__(self, path: str):
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise hw_error(path, e) from None

    def read_int(self) -> int:
        try:
            data = os.pread(self.fd, 64, 0)
        except OSError as e:
            raise hw_error(self.path, e) from None
        try:
            return int(data.split()[0])
        except (ValueError, IndexError):
            raise HardwareError(f"cannot parse {self.path}: expected an integer, "
                                f"got {data[:40]!r}") from None

    def close(self) -> None:
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1
