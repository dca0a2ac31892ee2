"""The loop's thread budget: torch gets the cores other processes leave free, re-read as the load changes."""

from __future__ import annotations

import torch

from lmsmith.train import threads
from lmsmith.train.threads import ThreadBudget


def fake_machine(monkeypatch, others_per_reading: list[float], cores: int = 2, ticks: int = 100):
    """/proc readings where the rest of the machine keeps `others` cores busy between two readings."""
    state = {"busy": 0, "total": 0, "own": 0, "readings": iter(others_per_reading)}

    def machine():
        others = next(state["readings"], 0.0)
        state["total"] += ticks * cores
        state["busy"] += int(ticks * others) + ticks // 2  # this process's own ticks count as busy too
        state["own"] += ticks // 2
        return state["busy"], state["total"]

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "_cores", lambda: cores)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: cores)
    monkeypatch.setattr(threads, "_machine_jiffies", machine)
    monkeypatch.setattr(threads, "_own_jiffies", lambda: state["own"])


def test_a_busy_machine_leaves_fewer_threads_and_an_idle_one_all_of_them(monkeypatch):
    before = torch.get_num_threads()
    try:
        fake_machine(monkeypatch, [0.0, 1.0, 1.0, 0.0])  # the first is the baseline reading
        budget = ThreadBudget(interval_s=0.0)
        assert torch.get_num_threads() == 2  # idle at the start: every core
        assert budget.adjust() == 1  # another process keeps one core busy
        assert budget.adjust() == 1
        assert budget.adjust() == 2  # it finished
    finally:
        torch.set_num_threads(before)


def test_omp_num_threads_set_by_the_user_is_left_alone(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    budget = ThreadBudget(interval_s=0.0)
    assert not budget.enabled and budget.adjust() == before == torch.get_num_threads()


def test_a_reading_too_soon_to_tell_changes_nothing_and_keeps_its_baseline(monkeypatch):
    before = torch.get_num_threads()
    try:
        fake_machine(monkeypatch, [0.0, 2.0, 2.0, 2.0, 2.0], ticks=5)  # 5 ticks a CPU a reading
        budget = ThreadBudget(interval_s=0.0)
        assert budget.others_cores() is None  # 5 ticks a CPU since the baseline: under MIN_TICKS_PER_CPU
        assert budget.adjust() == 2 and budget.adjust() == 2  # 10, then 15: still nothing to go by
        assert budget.others_cores() == 2.0  # 20 ticks a CPU since the same baseline: now it counts
    finally:
        torch.set_num_threads(before)
