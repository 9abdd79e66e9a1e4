"""The CPU thread count: measured unless OMP_NUM_THREADS or the config sets it."""

import torch

from weitiao import cpu
from weitiao.config import config_from_dict
from weitiao.train.settings import Machine, resolve_settings


def fake_clock(monkeypatch, cost: dict[int, float]) -> None:
    """time.perf_counter as the probe reads it (start, end, start, end, ...): each timed product takes
    cost[thread count] seconds."""
    ticks = {"now": 0.0, "start": True}

    def perf_counter():
        ticks["now"] += 0 if ticks["start"] else cost[torch.get_num_threads()]
        ticks["start"] = not ticks["start"]
        return ticks["now"]

    monkeypatch.setattr(cpu.time, "perf_counter", perf_counter)


def test_the_fastest_count_wins_and_the_setting_is_restored(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpu, "available_cores", lambda: 4)
    fake_clock(monkeypatch, {1: 3.0, 2: 1.0, 4: 2.0})  # a loaded machine: half the cores is fastest
    before = torch.get_num_threads()
    count, why = cpu.pick_cpu_threads(rows=4, width=8)
    assert count == 2 and why == "measured on 4 available cores (1: 3000.0 ms, 2: 1000.0 ms, 4: 2000.0 ms)"
    assert torch.get_num_threads() == before


def test_within_ten_percent_fewer_threads_win(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpu, "available_cores", lambda: 2)
    cost = {1: 1.05, 2: 1.0}  # two threads only 5% faster
    fake_clock(monkeypatch, cost)
    assert cpu.pick_cpu_threads(rows=4, width=8)[0] == 1
    cost[1] = 2.0  # now one thread is twice as slow
    assert cpu.pick_cpu_threads(rows=4, width=8)[0] == 2


def test_omp_num_threads_and_one_core_are_respected(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpu.pick_cpu_threads() == (torch.get_num_threads(), "OMP_NUM_THREADS")
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(cpu, "available_cores", lambda: 2)
    assert cpu.pick_cpu_threads(processes=2) == (1, "one core available per process (2 processes)")


def test_settings_record_the_count_and_the_config_wins(monkeypatch, tiny_model_dir):
    from weitiao.models import load_model_config

    config = config_from_dict({"model": {"name_or_path": tiny_model_dir}, "train": {"cpu_threads": 1}})
    machine = Machine.detect(config.train.cpu_threads)
    settings = resolve_settings(config, machine, load_model_config(config.model))
    if machine.cuda:
        assert settings.cpu_threads is None
    else:
        assert (settings.cpu_threads, settings.cpu_threads_chosen_by) == (1, "train.cpu_threads")
        measured = resolve_settings(config, Machine.detect(), load_model_config(config.model))
        assert measured.cpu_threads >= 1 and measured.cpu_threads_chosen_by
