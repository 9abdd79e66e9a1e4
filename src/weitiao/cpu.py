"""How many threads PyTorch uses on a CPU: measured, because the best count depends on what else the machine runs.

On a 2-core machine that other programs share, training with PyTorch's default (one thread per core) ran 4-7x
slower per step than with one thread: every matrix product waits for the thread that lost its core. On an idle
machine the default is faster. So the count is chosen by timing a matrix product of the workload's shape with each
candidate count, unless OMP_NUM_THREADS (or the config) sets it.
"""

from __future__ import annotations

import os
import time

import torch

PROBE_ROUNDS = 3
PROBE_REPEATS = 5


def available_cores() -> int:
    """Cores this process may run on (its affinity, which containers and taskset restrict), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def pick_cpu_threads(rows: int = 512, width: int = 576, processes: int = 1) -> tuple[int, str]:
    """(thread count, why): OMP_NUM_THREADS when set, else the count among 1, half and all of this process's share
    of the available cores (`processes` share them) whose (rows x width) @ (width x 4*width) product is fastest
    (median of PROBE_REPEATS, best of PROBE_ROUNDS rounds that alternate the counts, so a passing burst of load
    does not decide; within 10%, the fewest). Sets nothing."""
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads(), "OMP_NUM_THREADS"
    cores = max(1, available_cores() // processes)
    if cores == 1:
        return 1, "one core available" + (f" per process ({processes} processes)" if processes > 1 else "")
    before = torch.get_num_threads()
    left, right = torch.randn(rows, width), torch.randn(width, 4 * width)
    candidates = sorted({1, cores // 2, cores})
    best = dict.fromkeys(candidates, float("inf"))
    try:
        for _ in range(PROBE_ROUNDS):
            for count in candidates:
                torch.set_num_threads(count)
                left @ right  # the thread pool starts at the new size
                times = []
                for _ in range(PROBE_REPEATS):
                    started = time.perf_counter()
                    left @ right
                    times.append(time.perf_counter() - started)
                best[count] = min(best[count], sorted(times)[PROBE_REPEATS // 2])
    finally:
        torch.set_num_threads(before)
    # Within 10% of the fastest, fewer threads win: they lose less when the load rises later.
    chosen = next(count for count in candidates if best[count] <= 1.1 * min(best.values()))
    timings = ", ".join(f"{count}: {best[count] * 1000:.1f} ms" for count in candidates)
    return chosen, f"measured on {cores} available cores ({timings})"
