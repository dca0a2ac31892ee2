"""How many threads torch may use while training: the cores other processes leave free.

torch's OpenMP threads spin while they wait for each other. Alone on a machine that is the fastest way
to wait; beside another busy process, two threads on two shared cores spend their turns spinning, and
measured throughput fell to a quarter (docs/benchmarks.md, bench/train_profile.py). So the loop samples
how much CPU the rest of the machine uses (from /proc/stat, minus this process's own time from
/proc/self/stat) from the first step on, once 0.2 s have passed since set-up (no waiting is added), and
every `interval_s` after, and sets torch's thread count to the cores left free (at least one).
OMP_NUM_THREADS set by the user turns this off; so does a system without /proc.
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


# Fewer clock ticks than this per CPU between two readings (0.2 s at the usual 100 Hz) say nothing yet.
MIN_TICKS_PER_CPU = 20


class ThreadBudget:
    """Keeps torch's thread count at the cores that other processes leave free."""

    def __init__(self, interval_s: float = 10.0):
        self.interval_s = interval_s
        self.cores = _cores()
        self.enabled = "OMP_NUM_THREADS" not in os.environ and Path("/proc/stat").exists()
        self.online = os.cpu_count() or self.cores
        self._last: tuple[int, int, int] | None = None
        self._checked = 0.0  # monotonic time of the last reading that counted; 0: none yet
        if not self.enabled:
            return
        # Every core to start with; the first reading that spans enough time (usually the first step's,
        # after the model and optimiser are set up) corrects it.
        torch.set_num_threads(self.cores)
        self._last = self._sample()

    def _sample(self) -> tuple[int, int, int]:
        busy, total = _machine_jiffies()
        return busy, total, _own_jiffies()

    def others_cores(self) -> float | None:
        """Cores the rest of the machine kept busy since the last reading; None while too little time has
        passed to tell (the last reading then stays the baseline)."""
        busy, total, own = self._sample()
        last_busy, last_total, last_own = self._last
        elapsed = total - last_total
        if elapsed < MIN_TICKS_PER_CPU * self.online:
            return None
        self._last = (busy, total, own)
        others = max(0, (busy - last_busy) - (own - last_own))
        return others / elapsed * self.online

    def adjust(self) -> int:
        """Re-read the machine (at most every `interval_s` once a reading succeeded) and set torch's thread
        count; returns it."""
        if not self.enabled:
            return torch.get_num_threads()
        now = time.monotonic()
        if self._checked and now - self._checked < self.interval_s:
            return torch.get_num_threads()
        others = self.others_cores()
        if others is None:
            return torch.get_num_threads()
        self._checked = now
        free = self.cores - int(others + 0.5)
        threads = max(1, min(self.cores, free))
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        return threads
