"""Manifests: what a user asks of the slice a command runs in.

Two spellings reach this module and leave it as one :class:`Manifest`:

* the seed-era ACI image manifest (``acKind: ImageManifest`` with ``argo/*``
  isolators whose values are strings), which existing users still have on
  disk and must keep working;
* the documented nrm format (``name``, ``version``, ``app.slice`` ...), in
  YAML or JSON.

The client parses and validates the file (so errors show up before anything
is sent), then ships :meth:`Manifest.to_dict`; the daemon, which runs as
root, trusts nothing and rebuilds the model with :meth:`Manifest.from_dict`.
That is why every rule lives here once, and why errors carry the dotted path
of the offending field: the same message is meaningful on both sides.

``docs/manifest.md`` is the user-facing description of every field.
"""

__all__ = [
    "MAX_MANIFEST_BYTES", "FORMAT_VERSION", "SCHED_POLICIES", "POWER_POLICIES",
    "IMAGE_TYPES", "ManifestError", "Slice", "Scheduler", "Power", "Monitoring",
    "Image", "Manifest", "parse", "load", "parse_duration",
]

from nrm.manifest.model import (FORMAT_VERSION, IMAGE_TYPES, MAX_MANIFEST_BYTES, POWER_POLICIES,
                                SCHED_POLICIES, Image, Manifest, ManifestError, Monitoring, Power,
                                Scheduler, Slice)
from nrm.manifest.rules import parse_duration
from nrm.manifest.text import load, parse
