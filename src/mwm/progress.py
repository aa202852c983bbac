"""Progress bars with a rate, silenced by ``--quiet``.

Every long loop in MWM goes through :func:`progress` so that one flag controls them all.
"""

from __future__ import annotations

import sys
from typing import Iterable, Iterator, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(iterable: Iterable[T], *, total: int | None = None, desc: str = "",
             unit: str = "it", enabled: bool = True) -> Iterator[T]:
    """Wrap ``iterable`` in a tqdm bar showing count, rate and ETA (on stderr)."""
    if not enabled:
        yield from iterable
        return
    yield from tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr,
                    dynamic_ncols=True, mininterval=0.5, smoothing=0.1)
