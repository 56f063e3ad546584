"""One line naming the CPU a benchmark ran on: the sessions here get different machines (an AMD EPYC Zen 4, an Intel
Xeon with AMX), and the ratios differ between them (docs/benchmarks.md)."""

from __future__ import annotations

import os

FEATURES = ("avx512f", "avx512_bf16", "amx_bf16")  # what decides OpenVINO's kernels and its default precision


def describe() -> str:
    fields = {}
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        return "machine: unknown (no /proc/cpuinfo)"
    flags = set(fields.get("flags", "").split())
    present = [f for f in FEATURES if f in flags]
    return (f"machine: {fields.get('vendor_id', '?')} {fields.get('model name', '?')}, "
            f"{len(os.sched_getaffinity(0))} CPUs, {', '.join(present) or 'no AVX-512'}")


if __name__ == "__main__":
    print(describe())
