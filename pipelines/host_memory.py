"""RAM this process may still take, for the sizing decisions that depend on it (the head bootstrap's feature cache,
the daemon's learning-memory warning).

The kernel's MemAvailable counts the page cache it would give back (free pages alone read far lower on a machine
that has read model files), and inside a cgroup v2 memory limit (a container, a systemd unit with MemoryMax) what
is left of that limit is the real bound.
"""

from __future__ import annotations

from pathlib import Path

MEMINFO = Path("/proc/meminfo")
CGROUP = Path("/sys/fs/cgroup")


def available_ram_bytes(meminfo: Path = MEMINFO, cgroup: Path = CGROUP) -> int | None:
    """min(MemAvailable, cgroup memory.max - memory.current); None when neither can be read."""
    figures = []
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                figures.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError):
        pass
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            figures.append(max(int(limit) - int((cgroup / "memory.current").read_text().strip()), 0))
    except (OSError, ValueError):
        pass
    return min(figures) if figures else None
