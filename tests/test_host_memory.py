"""RAM available to the process: MemAvailable, bounded by what is left of its cgroup v2 memory limit."""

from __future__ import annotations

from pathlib import Path

from pipelines.host_memory import available_ram_bytes

GIB = 2**30
MEMINFO = "MemTotal:       24000000 kB\nMemFree:         1000000 kB\nMemAvailable:   12000000 kB\n"


def machine(tmp_path: Path, meminfo: str | None, group: str = "/", **cgroup_files: str) -> tuple[Path, Path, Path]:
    """(meminfo, cgroup root, /proc/self/cgroup) files: the process in `group`, holding `cgroup_files`."""
    root = tmp_path / "cgroup"
    (root / group.lstrip("/")).mkdir(parents=True, exist_ok=True)
    for name, text in cgroup_files.items():
        (root / group.lstrip("/") / name.replace("_", ".", 1)).write_text(text + "\n")
    self_cgroup = tmp_path / "self-cgroup"
    self_cgroup.write_text(f"0::{group}\n")
    path = tmp_path / "meminfo"
    if meminfo is not None:
        path.write_text(meminfo)
    return path, root, self_cgroup


def test_mem_available_counts_the_page_cache_the_kernel_would_give_back(tmp_path):
    assert available_ram_bytes(*machine(tmp_path, MEMINFO)) == 12_000_000 * 1024  # not MemFree


def test_the_process_cgroup_limit_bounds_it_and_its_inactive_file_cache_counts_as_room(tmp_path):
    files = machine(
        tmp_path,
        MEMINFO,
        "/system.slice/onlinespec.service",  # a systemd unit's own group, not the root's
        memory_max=str(8 * GIB),
        memory_current=str(7 * GIB),
        memory_stat=f"anon {5 * GIB}\nfile {2 * GIB}\ninactive_file {2 * GIB}\nactive_file 0",
    )
    assert available_ram_bytes(*files) == 3 * GIB  # 8 - 7 + 2


def test_no_limit_or_no_cgroup_leaves_mem_available(tmp_path):
    assert available_ram_bytes(*machine(tmp_path / "a", MEMINFO, memory_max="max")) == 12_000_000 * 1024
    no_stat = machine(tmp_path / "b", MEMINFO, memory_max=str(8 * GIB), memory_current=str(3 * GIB))
    assert available_ram_bytes(*no_stat) == 5 * GIB  # no memory.stat: no cache added back


def test_none_when_nothing_can_be_read_and_zero_over_the_limit(tmp_path):
    assert available_ram_bytes(*machine(tmp_path / "a", None)) is None
    over = machine(tmp_path / "b", None, memory_max=str(GIB), memory_current=str(GIB + 5))
    assert available_ram_bytes(*over) == 0
