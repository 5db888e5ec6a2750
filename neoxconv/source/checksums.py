"""CRC-32 (the zip directory's checksum of every stored tensor) at hardware speed where available.

`crc32` is ISA-L's (``isal``) or zlib-ng's carry-less-multiply implementation when one of those packages
is installed, else the standard library's zlib: same polynomial, same values, ~4x less CPU per byte
(bench/checks_bench.py). Every CRC the reader checks goes through this one function.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable


def _pick() -> tuple[Callable[..., int], str]:
    try:
        from isal import isal_zlib

        return isal_zlib.crc32, "isal"
    except ImportError:
        pass
    try:
        from zlib_ng import zlib_ng

        return zlib_ng.crc32, "zlib-ng"
    except ImportError:
        pass
    return zlib.crc32, "zlib"


_CRC32, CRC32_IMPLEMENTATION = _pick()


def crc32(data, value: int = 0) -> int:
    """CRC-32 of ``data`` (any contiguous buffer), continuing from ``value``; equal to ``zlib.crc32``."""
    return _CRC32(data, value)
