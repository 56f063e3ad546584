"""The case's clock: when this process started, and the deadline a time budget sets from there.

Grand-challenge counts a case from the container's start (imports and model loading included), so the budget is
counted from the process's own start time as the kernel recorded it (/proc/self/stat), not from when the pipeline
begins. Standard library only: process.py imports it before anything heavy.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

IMPORTED_S = time.monotonic()  # the fallback where /proc is not readable


def process_start_s() -> float:
    """This process's start on the time.monotonic() clock (the kernel's start time; this module's import time
    where /proc/self/stat cannot be read)."""
    try:
        with open("/proc/self/stat") as file:
            stat = file.read()
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, counted after the command name
        age_s = time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return IMPORTED_S
    return time.monotonic() - max(age_s, 0.0)


@dataclass(frozen=True)
class Deadline:
    """`budget_s` seconds from `start_s` on `clock` (time.monotonic unless a test injects its own)."""

    budget_s: float
    start_s: float
    clock: Callable[[], float] = field(default=time.monotonic, compare=False)
    label: str = "predict call"  # where `start_s` is, for the report: "process start" or "predict call"

    @classmethod
    def from_budget(cls, budget_s: float | None, *, start_s: float | None = None,
                    clock: Callable[[], float] = time.monotonic, label: str | None = None) -> "Deadline | None":
        """None for no budget (None or 0); else a deadline from `start_s` (default: now)."""
        if not budget_s:
            return None
        if start_s is None:
            return cls(float(budget_s), clock(), clock, label or "predict call")
        return cls(float(budget_s), start_s, clock, label or "given start")

    def elapsed_s(self) -> float:
        return self.clock() - self.start_s

    def left_s(self) -> float:
        return self.budget_s - self.elapsed_s()
