"""Process-wide settings, made once by an entry point (the ``mwm`` command, a benchmark
script, the test session), never by library functions.

* Denormal floats are flushed to zero: without it some CPU training runs crawled (first
  Mask R-CNN steps 29–62 s instead of 3.5 s; ``MACHINE-NOTES``).
* ``threads``: torch's intra-op threads, by default the cores this process may use
  (``os.sched_getaffinity``: a container or ``taskset`` limit, not the machine's count).
  On a machine shared with other jobs one thread per process can be several times faster
  than oversubscribed cores: on 2 cores a 2-thread SparK step (resnet18, 128 px, batch 16)
  took 0.81 s alone, 2.6 s beside one busy process, and 1.8 s with 1 thread.
  :func:`warn_if_busy` says so when the load average shows other work.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from .config import opt

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                 "MASTER_PORT", "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


#: The 1-minute load average, as a share of the usable cores, above which the cores count
#: as busy with other work (one busy process on 2 cores is a load of about 1).
BUSY_LOAD_SHARE = 0.4


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS and Windows have no affinity call
        return max(1, os.cpu_count() or 1)


@dataclass
class RunOptions:
    """Options of every command: how the process uses the machine, and whether it may write
    into an output folder the command's rules would refuse (see :mod:`mwm.runlog`)."""

    threads: int | None = opt(None, "torch threads (default: the cores this process may use; "
                              "give each of several concurrent jobs 1)", low=1)
    overwrite: bool = opt(False, "write into --out even if it holds files this command did not "
                          "write or a run it would not resume (nothing there is deleted)")


def configure_process(*, threads: int | None = None, flush_denormal: bool = True) -> int:
    """Set the threads and flush denormals; returns the thread count.

    Threads: ``threads``, else ``OMP_NUM_THREADS`` when the user set it, else
    :func:`usable_cores`. Torch is imported only when it has to be (denormals, or it is
    loaded already); otherwise ``OMP_NUM_THREADS`` tells it (and NumPy's BLAS) at import,
    so that commands which never touch torch do not pay for importing it.
    """
    from_env = os.environ.get("OMP_NUM_THREADS", "")
    if threads is None:
        threads = int(from_env) if from_env.isdigit() and int(from_env) > 0 else usable_cores()
    threads = max(1, int(threads))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if flush_denormal or "torch" in sys.modules:
        import torch

        torch.set_num_threads(threads)
        if flush_denormal:
            torch.set_flush_denormal(True)  # False (a no-op) where the CPU has no such mode
    return threads


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def warn_if_busy(what: str) -> bool:
    """Warn (stderr) when the load average says other work is using the cores."""
    load, cores = load_average(), usable_cores()
    if load is None or load < BUSY_LOAD_SHARE * cores:
        return False
    print(f"{what}: warning: the 1-minute load average is {load:.2f} on {cores} usable core(s): "
          "other processes are (or were, within the last minute) busy, and training steps "
          "can be several times slower beside them (on 2 cores a 2-thread step took 3x as "
          "long beside one busy process). Run alone for timings, or give each concurrent "
          "job --threads 1.", file=sys.stderr)
    return True


def detach_from_torchrun() -> None:
    """Forget torchrun's variables, so that what this process runs next trains as a single
    process (``mwm experiment`` runs one cell per rank, never one DDP job across them)."""
    for name in TORCHRUN_VARS:
        os.environ.pop(name, None)
