"""Report how many inputs each fuzz target saw, and how many it refused."""

from tests.fuzz import common


def pytest_terminal_summary(terminalreporter):
    if not common.STATS:
        return
    terminalreporter.section("fuzz inputs (tried / refused and survived)")
    for target, c in sorted(common.STATS.items()):
        terminalreporter.write_line(f"{target:36s} {c['inputs']:9d} {c['faults']:9d}")
    common.write_stats()
