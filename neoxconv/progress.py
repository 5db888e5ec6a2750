"""Progress bars that the library owns and a ``quiet`` switch turns off.

Byte counts use decimal units (kB, MB, GB = 1e9 bytes) everywhere: the bars, the summaries and the error
messages (`format_bytes`), so a figure in one can be compared with another.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from tqdm import tqdm

_BYTES_BAR = "{l_bar}{bar}| {n_fmt}B/{total_fmt}B [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


def format_bytes(n: float) -> str:
    """``116.5 kB``, ``41.12 GB``: decimal units, as the progress bars show them."""
    value, unit = float(n), "B"
    for larger in ("kB", "MB", "GB", "TB"):
        if abs(value) < 1000:
            break
        value, unit = value / 1000, larger
    return f"{value:.0f} B" if unit == "B" else f"{value:.{1 if abs(value) >= 100 else 2}f} {unit}"


@contextlib.contextmanager
def progress_bar(*, total: int, desc: str, unit: str = "it", quiet: bool = False) -> Iterator[tqdm]:
    is_bytes = unit == "B"
    bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=is_bytes, unit_divisor=1000,
               bar_format=_BYTES_BAR if is_bytes else None, disable=quiet, dynamic_ncols=True, leave=False)
    try:
        yield bar
    finally:
        bar.close()
