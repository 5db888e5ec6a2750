"""Progress bars that the library owns and a ``quiet`` switch turns off.

Byte counts use decimal units (kB, MB, GB = 1e9 bytes) everywhere: the bars, the summaries and the error
messages (`format_bytes`), so a figure in one can be compared with another; memory (verify's placement)
is given in binary units by the same function.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from tqdm import tqdm

_BYTES_BAR = "{l_bar}{bar}| {n_fmt}B/{total_fmt}B [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


def format_bytes(n: float, *, binary: bool = False) -> str:
    """``116.5 kB``, ``41.12 GB``: decimal units, as the progress bars show them; with ``binary``, powers of
    1024 (``64.00 MiB``, ``1.25 GiB``), as memory caps (``--max-memory``) are usually given."""
    base, units = (1024, ("KiB", "MiB", "GiB", "TiB")) if binary else (1000, ("kB", "MB", "GB", "TB"))
    value, unit = float(n), "B"
    for larger in units:
        if abs(value) < base:
            break
        value, unit = value / base, larger
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
