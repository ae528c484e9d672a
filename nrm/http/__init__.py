"""nrmd's web side (``nrmd --http HOST:PORT``): Prometheus metrics at
``/metrics``, the daemon state as JSON at ``/api/v1/state`` and a live
dashboard at ``/``. See docs/telemetry.md.

Kept in its own package, imported only when ``--http`` is given, so that
a daemon without it never loads tornado's web stack.
"""
