"""RAM available to the process: MemAvailable, bounded by what is left of a cgroup v2 memory limit."""

from __future__ import annotations

from pipelines.host_memory import available_ram_bytes

MEMINFO = "MemTotal:       24000000 kB\nMemFree:         1000000 kB\nMemAvailable:   12000000 kB\n"


def files(tmp_path, meminfo: str | None, limit: str | None = None, current: str = "0"):
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir(parents=True)
    if limit is not None:
        (cgroup / "memory.max").write_text(limit + "\n")
        (cgroup / "memory.current").write_text(current + "\n")
    path = tmp_path / "meminfo"
    if meminfo is not None:
        path.write_text(meminfo)
    return path, cgroup


def test_mem_available_counts_the_page_cache_the_kernel_would_give_back(tmp_path):
    assert available_ram_bytes(*files(tmp_path, MEMINFO)) == 12_000_000 * 1024  # not MemFree


def test_a_cgroup_limit_bounds_it_by_what_is_left_of_the_limit(tmp_path):
    gib = 2**30
    assert available_ram_bytes(*files(tmp_path, MEMINFO, str(8 * gib), str(3 * gib))) == 5 * gib
    assert available_ram_bytes(*files(tmp_path / "a", MEMINFO, "max")) == 12_000_000 * 1024  # no limit


def test_none_when_nothing_can_be_read(tmp_path):
    assert available_ram_bytes(*files(tmp_path, None)) is None
    gib = 2**30
    assert available_ram_bytes(*files(tmp_path / "b", None, str(gib), str(gib + 5))) == 0  # over its limit
