"""The house rules (docs/architecture.md), checked on every import in nrm/.

Each module belongs to a wing (its first package under nrm/; the root
modules are the public contracts). A wing may import only the wings its
rule names: a new import that breaks the architecture fails here, with the
module, the line and the rule. Imports inside functions count too: lazy
is not allowed to mean hidden.
"""

from __future__ import annotations

import ast
import os
from typing import Dict, Iterator, List, Set, Tuple

import pytest

NRM = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nrm")

#: modules at the root: what users and both sides import
CONTRACTS = {"client", "client_batch", "downstream", "manifest", "protocol", "paths", "log",
             "durations", "jsonlines"}
#: contracts that open sockets; the rest import no wing at all
CONNECTED = {"client", "client_batch", "downstream"}
BASE = "base"          # the root contracts that import no wing

#: wing -> wings it may import (besides itself)
ALLOWED: Dict[str, Set[str]] = {
    BASE: set(),
    "connected": {BASE, "transport"},
    "transport": {BASE},
    "hw": {BASE},
    "hpc": {BASE},
    "containers": {BASE, "hw"},
    "power": {BASE, "hw"},
    "http": {BASE},
    "daemon": {BASE, "connected", "transport", "hw", "hpc", "containers", "power", "http"},
    "tools": {BASE, "connected", "transport", "hpc"},
    # the CLI fronts the layers above the client too (nrm pilot, nrm campaign)
    "cli": {BASE, "connected", "transport", "hpc", "tools", "pilot", "campaign"},
    # the layers above nrm.client: never the daemon's wings
    "pilot": {BASE, "connected", "transport", "hpc", "tools"},
    "campaign": {BASE, "connected", "transport", "hpc", "tools", "pilot"},
}


def wing_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return BASE                                  # nrm/__init__.py: the version
    if parts[1] in CONTRACTS or len(parts) == 2 and parts[1] == "__init__":
        return "connected" if parts[1] in CONNECTED else BASE
    return parts[1]


def modules() -> Iterator[Tuple[str, str]]:
    root = os.path.dirname(NRM)
    for dirpath, _dirs, files in os.walk(NRM):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                yield (rel[:-len(".__init__")] if rel.endswith(".__init__") else rel), path


def nrm_imports(module: str, path: str) -> Iterator[Tuple[int, str, bool]]:
    """(line, imported nrm module, at module level?) for every import."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    top = set(id(n) for n in tree.body)
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            # "from nrm.x import y": y may be a module or a name in nrm.x
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for name in names:
            if name == "nrm" or name.startswith("nrm."):
                yield node.lineno, name, id(node) in top


def resolve(name: str, known: Set[str]) -> str:
    while name not in known and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def test_every_wing_has_a_rule():
    wings = {wing_of(m) for m, _ in modules()}
    assert wings <= set(ALLOWED), sorted(wings - set(ALLOWED))


def test_no_wing_imports_what_its_rule_forbids():
    known = {m for m, _ in modules()}
    bad: List[str] = []
    for module, path in modules():
        wing = wing_of(module)
        for line, name, _ in nrm_imports(module, path):
            target = wing_of(resolve(name, known))
            if target != wing and target not in ALLOWED[wing]:
                bad.append(f"{os.path.relpath(path, os.path.dirname(NRM))}:{line}: "
                           f"{wing} imports {name} ({target})")
    assert not bad, "\n".join(sorted(set(bad)))


def test_no_import_cycles_at_module_level():
    known = {m for m, _ in modules()}
    graph: Dict[str, Set[str]] = {m: set() for m in known}
    for module, path in modules():
        for _line, name, top in nrm_imports(module, path):
            target = resolve(name, known)
            if top and target != module and not module.startswith(target + "."):
                graph[module].add(target)
    # a package's __init__ imports its own modules: that is not a cycle
    cycles = []
    state: Dict[str, int] = {}

    def visit(node: str, stack: List[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, "\n".join(cycles)


@pytest.mark.parametrize("rule, example", [
    ("pilot", "nrm.daemon.core"), ("campaign", "nrm.power.node"), ("hw", "nrm.power.cap"),
    ("containers", "nrm.daemon.statelog"), ("http", "nrm.daemon.core"),
])
def test_the_rules_forbid_what_the_house_plan_forbids(rule, example):
    assert wing_of(example) not in ALLOWED[rule]
