"""How much memory data reading may take: a quarter of what this process may use, the machine's memory or a
smaller limit of its container (cgroup) or of its shell (ulimit -v), since decoding images holds about three copies
of what was read."""

from __future__ import annotations

from pathlib import Path


def cgroup_limit(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The smallest memory limit of this process's control group and the groups above it (cgroup v2's memory.max,
    v1's memory.limit_in_bytes), None where there is none. By hand: psutil reports the machine's memory only."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:  # not Linux
        return None
    files = []
    for line in lines:
        _, controllers, group = line.split(":", 2)
        if controllers == "":  # v2: one hierarchy; a container sees its own group as the root
            folder = root / group.lstrip("/")
            files += [d / "memory.max" for d in (folder, *folder.parents) if d.is_relative_to(root)]
        elif "memory" in controllers.split(","):
            folder = root / "memory" / group.lstrip("/")
            files += [d / "memory.limit_in_bytes" for d in (folder, *folder.parents)
                      if d.is_relative_to(root / "memory")]
    limits = []
    for file in files:
        try:
            text = file.read_text().strip()
        except OSError:
            continue
        if text.isdigit():  # "max": none
            limits.append(int(text))
    return min(limits, default=None)


def address_space_limit() -> int | None:
    """This process's ulimit -v (RLIMIT_AS) in bytes, None where there is none."""
    try:
        import resource
    except ImportError:  # not Unix
        return None
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def memory_limit() -> int:
    """The most bytes an archive may expand to, and a folder's file may hold."""
    import psutil

    total = psutil.virtual_memory().total
    return min(total, cgroup_limit() or total, address_space_limit() or total) // 4
