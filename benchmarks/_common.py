"""Shared bits of the benchmark scripts: timing and writing results."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
#: The load when the benchmark started (its own work raises it by the end).
START_LOAD = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def median_seconds(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine_line() -> str:
    end = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
            f"1-min load average {START_LOAD:.2f} at the start, {end:.2f} at the end")


def portable(text: str) -> str:
    """``text`` with this machine's scratch paths replaced by ``WORK`` (results files name
    commands anyone can run, not folders of the machine that ran them)."""
    import tempfile

    return text.replace(tempfile.gettempdir().rstrip("/") + "/", "WORK/")


def write_result(name: str, title: str, body: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.md"
    command = "python " + " ".join([f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]])
    command, body = portable(command), portable(body)
    text = (f"# {title}\n\n- command: `{command}`\n- date: "
            f"{datetime.datetime.now().isoformat(timespec='seconds')}\n- machine: {machine_line()}\n\n{body}\n")
    path.write_text(text)
    print(f"wrote {path}")
    return path
