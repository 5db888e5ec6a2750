"""Progress bars that the library owns and a ``quiet`` switch turns off."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from tqdm import tqdm


@contextlib.contextmanager
def progress_bar(*, total: int, desc: str, unit: str = "it", quiet: bool = False) -> Iterator[tqdm]:
    bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", unit_divisor=1024 if unit == "B" else 1000,
               disable=quiet, dynamic_ncols=True, leave=False)
    try:
        yield bar
    finally:
        bar.close()
