"""How many threads torch may use while training: the cores other processes leave free.

torch's OpenMP threads spin while they wait for each other. Alone on a machine that is the fastest way
to wait; beside another busy process, two threads on two shared cores spend their turns spinning, and
measured throughput fell to a quarter (docs/benchmarks.md, bench/train_profile.py). So the loop samples
how much CPU the rest of the machine uses (from /proc/stat, minus this process's own time from
/proc/self/stat) at the start and every `interval_s` after, and sets torch's thread count to the cores
left free (at least one). OMP_NUM_THREADS set by the user turns this off; so does a system without /proc.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _machine_jiffies() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot; steal counts as busy: those cycles are not ours."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])
    return total - idle, total


def _own_jiffies() -> int:
    """This process's user + system ticks, all its threads (spinning included)."""
    after_name = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return int(after_name[11]) + int(after_name[12])


class ThreadBudget:
    """Keeps torch's thread count at the cores that other processes leave free."""

    def __init__(self, interval_s: float = 10.0):
        self.interval_s = interval_s
        self.cores = _cores()
        self.enabled = "OMP_NUM_THREADS" not in os.environ and Path("/proc/stat").exists()
        self.online = os.cpu_count() or self.cores
        self._last: tuple[int, int, int] | None = None
        self._checked = 0.0
        if not self.enabled:
            return
        self._last = self._sample()
        time.sleep(0.2)  # a first reading before the first step, when only others run
        self.adjust(force=True)

    def _sample(self) -> tuple[int, int, int]:
        busy, total = _machine_jiffies()
        return busy, total, _own_jiffies()

    def others_cores(self) -> float:
        """Cores the rest of the machine kept busy since the last reading."""
        busy, total, own = self._sample()
        last_busy, last_total, last_own = self._last
        self._last = (busy, total, own)
        elapsed = total - last_total
        if elapsed <= 0:
            return 0.0
        others = max(0, (busy - last_busy) - (own - last_own))
        return others / elapsed * self.online

    def adjust(self, force: bool = False) -> int:
        """Re-read the machine (at most every `interval_s`) and set torch's thread count; returns it."""
        if not self.enabled:
            return torch.get_num_threads()
        now = time.monotonic()
        if not force and now - self._checked < self.interval_s:
            return torch.get_num_threads()
        self._checked = now
        free = self.cores - int(self.others_cores() + 0.5)
        threads = max(1, min(self.cores, free))
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        return threads
