"""jobs.report (QCG's schema: one entry per finished iteration and per job,
JSON lines or text) and final_status.json."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, IO

from nrm.pilot.manager import Manager


class ReportWriter:
    """Appends each final task/job as it ends, so a report survives a crash
    up to its last finished entry."""

    def __init__(self, path: str, fmt: str = "json", fresh: bool = False):
        self.path = path
        self.fmt = fmt
        self.manager: Manager = None  # type: ignore[assignment]
        self._f: IO[str] = open(path, "w" if fresh else "a")

    def __call__(self, item: Any) -> None:
        entry = self.manager.report_entry(item)
        self._f.write(json.dumps(entry) + "\n" if self.fmt == "json" else text_entry(entry))

    def close(self) -> None:
        self._f.close()


def text_entry(entry: Dict[str, Any]) -> str:
    lines = [f"{entry['name']} ({entry['state']})"]
    for h in entry["history"]:
        lines.append(f"\t{h['date']}: {h['state']}")
    for key, value in (entry.get("runtime") or {}).items():
        lines.append(f"\t{key}: {value}")
    if entry.get("messages"):
        lines.append(f"\tmessages: {entry['messages']}")
    return "\n".join(lines) + "\n"


def write_final_status(path: str, manager: Manager) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(manager.final_status(), f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
