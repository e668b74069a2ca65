"""finetune.system.resources: total and available memory of this machine, cgroup limits included."""

import os
from pathlib import Path

from finetune.system.resources import GIB, available_memory_bytes, total_memory_bytes


def cgroup_limit() -> int | None:
    try:
        raw = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        return None
    return None if raw == "max" else int(raw)


def test_available_memory_is_measured_and_below_total():
    available, total = available_memory_bytes(), total_memory_bytes()
    assert available and total and 0 < available <= total
    assert GIB == 1024**3


def test_total_is_physical_memory_capped_by_the_cgroup():
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    total = total_memory_bytes()
    # MemTotal is physical memory minus what the kernel reserves: within a few percent of it, never above
    limit = cgroup_limit()
    expected_cap = min(physical, limit) if limit else physical
    assert total <= expected_cap
    if limit is None or limit >= physical:
        assert total > 0.8 * physical


def test_available_respects_a_cgroup_limit():
    limit = cgroup_limit()
    available = available_memory_bytes()
    if limit is not None:
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        assert available <= max(0, limit - used) + 64 * 1024**2  # usage moves a little between the reads
    assert available <= total_memory_bytes()
