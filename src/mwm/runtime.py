"""Process-wide settings, made once by an entry point (the ``mwm`` command, a benchmark
script, the test session), never by library functions.

* Denormal floats are flushed to zero: without it some CPU training runs crawled (first
  Mask R-CNN steps 29–62 s instead of 3.5 s; ``MACHINE-NOTES``).
* ``threads``: torch's intra-op threads. On a machine shared with other jobs one thread
  per process can be several times faster than oversubscribed cores.
"""

from __future__ import annotations

import os

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                 "MASTER_PORT", "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


def configure_process(*, threads: int | None = None) -> None:
    import torch

    torch.set_flush_denormal(True)  # False (a no-op) where the CPU has no such mode
    if threads is not None:
        torch.set_num_threads(max(1, int(threads)))


def detach_from_torchrun() -> None:
    """Forget torchrun's variables, so that what this process runs next trains as a single
    process (``mwm experiment`` runs one cell per rank, never one DDP job across them)."""
    for name in TORCHRUN_VARS:
        os.environ.pop(name, None)
