"""RAM this process may still take, for the sizing decisions that depend on it (the head bootstrap's feature cache,
the daemon's learning-memory warning).

The kernel's MemAvailable counts the page cache it would give back (free pages alone read far lower on a machine
that has read model files). Inside a cgroup v2 memory limit (a container's, or a systemd unit's MemoryMax) what is
left of the limit is the real bound; the cgroup's usage counts page cache too, so its inactive file pages (what
reclaim takes first) count as available there as well.
"""

from __future__ import annotations

from pathlib import Path

MEMINFO = Path("/proc/meminfo")
CGROUP_ROOT = Path("/sys/fs/cgroup")
SELF_CGROUP = Path("/proc/self/cgroup")


def available_ram_bytes(
    meminfo: Path = MEMINFO, cgroup_root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP
) -> int | None:
    """min(MemAvailable, the process's cgroup v2 memory.max - memory.current + inactive_file); None when neither
    can be read."""
    figures = [
        figure for figure in (_mem_available(meminfo), _cgroup_room(cgroup_root, self_cgroup)) if figure is not None
    ]
    return min(figures) if figures else None


def _mem_available(meminfo: Path) -> int | None:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _cgroup_room(root: Path, self_cgroup: Path) -> int | None:
    """What is left of the process's cgroup v2 memory limit; None without a limit (or cgroup v2)."""
    try:  # cgroup v2: one line "0::/path" (inside a container usually "0::/", its own root)
        relative = next(line[3:] for line in self_cgroup.read_text().splitlines() if line.startswith("0::"))
    except (OSError, StopIteration):
        relative = "/"
    group = root / relative.strip().lstrip("/")
    try:
        limit = (group / "memory.max").read_text().strip()
        if limit == "max":
            return None
        room = int(limit) - int((group / "memory.current").read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        stat = dict(line.split()[:2] for line in (group / "memory.stat").read_text().splitlines() if line.strip())
        room += int(stat.get("inactive_file", 0))
    except (OSError, ValueError):
        pass
    return max(room, 0)
