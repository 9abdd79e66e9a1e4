"""Where the GPU waits for the host: the idle gaps between kernels of a torch profiler chrome trace, the longest
first, each with what the host thread was running when the gap opened and when the next kernel was launched.

  python bench/trace_gaps.py trace.json [--top 25] [--min-us 50]

train_speed.py's `prof` option writes such a trace (with Python stacks) and prints this table.
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
from collections import defaultdict
from pathlib import Path

GPU_WORK = ("kernel", "gpu_memcpy", "gpu_memset")
HOST_CALLS = ("cpu_op", "python_function", "cuda_runtime", "cuda_driver")


def _load(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as file:
        return json.load(file)["traceEvents"]


class HostStacks:
    """The host calls of each thread, to ask which ones were running at a given moment."""

    def __init__(self, events: list[dict]) -> None:
        calls = [event for event in events if event.get("ph") == "X" and event.get("cat") in HOST_CALLS]
        calls.sort(key=lambda event: event["ts"])
        self.calls = calls
        self.starts = [event["ts"] for event in calls]
        self.longest = max((event.get("dur", 0) for event in calls), default=0)

    def at(self, moment: float, thread: int | None = None) -> list[str]:
        """The calls running at `moment` (on `thread` if given; any thread if none was recorded there), outermost
        first."""
        first = bisect.bisect_left(self.starts, moment - self.longest)
        last = bisect.bisect_right(self.starts, moment)
        running = [call for call in self.calls[first:last]
                   if call["ts"] + call.get("dur", 0) >= moment and (thread is None or call.get("tid") == thread)]
        if not running and thread is not None:
            return self.at(moment, None)
        running.sort(key=lambda call: (call["ts"], -call.get("dur", 0)))  # enclosing calls start first
        return [_short(call["name"]) for call in running]


def _innermost(frames: list[str], depth: int) -> str:
    return " > ".join(frames[-depth:]) or "(nothing recorded)"


def _short(name: str) -> str:
    """A Python frame 'path/to/site-packages/pkg/mod.py(12): fn' as 'pkg/mod.py:12 fn'."""
    if ".py(" in name:
        where, _, function = name.partition("): ")
        path, _, line = where.rpartition("(")
        return f"{'/'.join(path.split('/')[-2:])}:{line} {function}"
    return name[:60]


def idle_gaps(path: Path, top: int = 25, min_us: float = 50.0) -> str:
    """A table of the GPU's idle gaps in the trace at `path`: total, count and the `top` longest with their causes."""
    events = _load(path)
    work = sorted((event for event in events if event.get("ph") == "X" and event.get("cat") in GPU_WORK),
                  key=lambda event: event["ts"])
    if not work:
        return "no GPU kernels in the trace\n"
    launches = {event["args"]["correlation"]: event for event in events
                if event.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in event.get("args", {})}
    stacks = HostStacks(events)
    gaps, busy, end = [], 0.0, work[0]["ts"]
    busy_from = work[0]["ts"]
    for event in work:
        if event["ts"] > end:
            busy += end - busy_from
            busy_from = event["ts"]
            if event["ts"] - end >= min_us:
                gaps.append((event["ts"] - end, end, event))
        end = max(end, event["ts"] + event.get("dur", 0))
    busy += end - busy_from
    span = end - work[0]["ts"]
    idle = sum(gap for gap, _, _ in gaps)
    lines = [f"GPU busy {busy / 1e3:.1f} ms of {span / 1e3:.1f} ms; {len(gaps)} gaps of >= {min_us:.0f} us "
             f"sum to {idle / 1e3:.1f} ms"]
    by_cause: dict[str, list[float]] = defaultdict(list)
    rows = []
    for gap, opened, kernel in gaps:
        launch = launches.get(kernel.get("args", {}).get("correlation"))
        thread = launch.get("tid") if launch else None
        waiting = stacks.at(opened + 1, thread)
        by_cause[_innermost(waiting, 4)].append(gap)
        launching = _innermost(stacks.at(launch["ts"], thread), 7) if launch else "?"
        rows.append((gap, _innermost(waiting, 7), launching, kernel["name"][:50]))
    lines.append("\nidle by what the launching thread ran when the gap opened (largest sums):")
    for cause, sizes in sorted(by_cause.items(), key=lambda item: -sum(item[1]))[:top]:
        lines.append(f"{sum(sizes) / 1e3:8.2f} ms {len(sizes):5d}x  {cause}")
    lines.append(f"\nthe {min(top, len(rows))} longest gaps:")
    for gap, waiting, launching, kernel in sorted(rows, key=lambda row: -row[0])[:top]:
        lines.append(f"{gap / 1e3:7.2f} ms  host at start: {waiting}\n            next kernel {kernel} launched in: "
                     f"{launching}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace", type=Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--min-us", type=float, default=50.0)
    args = parser.parse_args()
    print(idle_gaps(args.trace, args.top, args.min_us))


if __name__ == "__main__":
    main()
