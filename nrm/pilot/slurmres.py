"""The nodes and cores of the Slurm allocation the pilot runs in.

As QCG-PilotJob reads them: node names from ``SLURM_JOB_NODELIST`` (or
``SLURM_NODELIST``) expanded by ``scontrol show hostnames``, cores per node
from ``SLURM_JOB_CPUS_PER_NODE`` (Slurm's run-length form ``2(x3),1``).
``--nodes`` on the command line overrides all of this (the caller decides).
"""

from __future__ import annotations

import re
import subprocess
from typing import List, Mapping, Tuple


class SlurmResourcesError(ValueError):
    """The allocation cannot be read; the message is one line."""


_RUN = re.compile(r"^(\d+)(?:\(x(\d+)\))?$")


def expand_counts(text: str) -> List[int]:
    """``2(x3),1`` -> ``[2, 2, 2, 1]``."""
    out: List[int] = []
    for part in text.split(","):
        m = _RUN.match(part.strip())
        if not m:
            raise SlurmResourcesError(f"SLURM_JOB_CPUS_PER_NODE={text}: {part!r} is not "
                                      "N or N(xK)")
        out.extend([int(m.group(1))] * int(m.group(2) or 1))
    return out


def expand_hostlist(text: str) -> List[str]:
    """Slurm's host list without scontrol: ``n[1-3,5],gpu01`` (one bracket
    group per name, the common case); scontrol is asked first."""
    names: List[str] = []
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", text):
        m = re.match(r"^(.*)\[([^\]]*)\](.*)$", item)
        if not m:
            names.append(item)
            continue
        prefix, ranges, suffix = m.groups()
        for r in ranges.split(","):
            lo, _, hi = r.partition("-")
            width = len(lo)
            for i in range(int(lo), int(hi or lo) + 1):
                names.append(f"{prefix}{i:0{width}d}{suffix}")
    return names


def hostnames(nodelist: str) -> List[str]:
    try:
        r = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                           text=True, timeout=30)
        if r.returncode == 0 and r.stdout.split():
            return r.stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return expand_hostlist(nodelist)


def allocation(env: Mapping[str, str]) -> List[Tuple[str, int]]:
    """``[(node, cores), ...]`` of the allocation described by ``env``."""
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise SlurmResourcesError("not in a Slurm allocation (no SLURM_JOB_NODELIST); "
                                  "give --nodes or --resources local")
    counts_text = env.get("SLURM_JOB_CPUS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if not counts_text:
        raise SlurmResourcesError("SLURM_JOB_CPUS_PER_NODE is not set")
    names = hostnames(nodelist)
    counts = expand_counts(counts_text)
    if len(counts) != len(names):
        raise SlurmResourcesError(f"SLURM_JOB_CPUS_PER_NODE={counts_text} gives {len(counts)} "
                                  f"nodes, {nodelist} names {len(names)}")
    return list(zip(names, counts))
