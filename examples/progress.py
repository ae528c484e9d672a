#!/usr/bin/env python3
"""progress.py: report application progress to nrm from Python.

usage: progress.py [iterations [unit]]   (defaults: 1000 iterations, 20000
steps of work per iteration).  Outside nrm (no NRM_DOWNSTREAM_URI) the
client is inactive and the script runs unchanged.
"""

import os
import sys

from nrm.downstream import Client


def main() -> int:
    iterations = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    unit = int(sys.argv[2]) if len(sys.argv) > 2 else 20000
    x = 0.5
    with Client("progress.py") as nrm:
        for _ in range(iterations):
            for _ in range(unit):
                x = x * 0.999999 + 0.000001
            nrm.progress(1)
    print(f"progress.py: iterations={iterations} checksum={x:.3f} "
          f"reporting={'on' if os.environ.get('NRM_DOWNSTREAM_URI') else 'off'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
