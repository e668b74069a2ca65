"""How much memory this machine has and how much a new job can use (cgroup limits included)."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from pathlib import Path

GIB = 1024**3


def _meminfo() -> dict[str, int]:
    info = {}
    with open("/proc/meminfo") as fh:
        for line in fh:
            name, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                info[name] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return info


def _cgroup_limit() -> tuple[int, int] | None:
    """(limit, usage) of a cgroup v2 memory limit, if the process runs under one."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        usage = int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else (int(limit), usage)


def _sysctl(name: str) -> int | None:
    try:
        return int(subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5).stdout)
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def total_memory_bytes() -> int | None:
    if platform.system() == "Darwin":
        return _sysctl("hw.memsize")
    try:
        total = _meminfo().get("MemTotal")
    except OSError:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cgroup = _cgroup_limit()
    return min(total, cgroup[0]) if cgroup and total else total


def available_memory_bytes() -> int | None:
    """Memory a new job can use: MemAvailable, capped by a cgroup limit (containers); None if unknown."""
    if platform.system() == "Darwin":
        # vm_stat is awkward to parse; free + inactive pages via sysctl is close enough to sizing a batch.
        page = _sysctl("hw.pagesize") or 4096
        free = (_sysctl("vm.page_free_count") or 0) + (_sysctl("vm.page_inactive_count") or 0)
        return free * page or None
    try:
        available = _meminfo().get("MemAvailable")
    except OSError:
        available = None
    if available is None:
        with contextlib.suppress(ValueError, OSError, AttributeError):
            available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    cgroup = _cgroup_limit()
    if cgroup and available is not None:
        available = min(available, max(0, cgroup[0] - cgroup[1]))
    return available
