"""What machine a benchmark ran on: the line each benchmark prints, so every figure in docs/ names its machine."""

from __future__ import annotations

import os
import platform


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def describe() -> str:
    return f"{platform.platform()} | {cpu_name()} | os.cpu_count()={os.cpu_count()}"
