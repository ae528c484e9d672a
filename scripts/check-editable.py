"""Exit 1 when the venv's nrm is not this checkout's, module for module.

An editable install maps module names to files when it is made: a venv
copied from another checkout, or a module that became a package since
(nrm/x.py -> nrm/x/), would import the wrong file or none. `make setup`
reinstalls when this says so. Only packages are imported (finding a module
runs its package's __init__), never the modules themselves.
"""

import importlib.util
import os
import sys

root = os.path.join(sys.argv[1], "nrm")
try:
    import nrm
except ImportError:
    sys.exit(1)
if os.path.dirname(nrm.__file__) != root:
    sys.exit(1)
for dirpath, dirs, files in os.walk(root):
    dirs[:] = [d for d in dirs if d != "__pycache__"]
    package = os.path.relpath(dirpath, os.path.dirname(root)).replace(os.sep, ".")
    for name in files:
        if not name.endswith(".py"):
            continue
        module = package if name == "__init__.py" else f"{package}.{name[:-3]}"
        try:        # finding a submodule runs its packages' __init__: any failure counts
            spec = importlib.util.find_spec(module)
        except Exception:
            sys.exit(1)
        if spec is None or spec.origin != os.path.join(dirpath, name):
            sys.exit(1)
