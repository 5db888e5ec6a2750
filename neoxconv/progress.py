"""Progress bars that the library owns and a ``quiet`` switch turns off, and the formatting of what neoxconv
prints: byte counts, and text from input files made safe for a terminal (`terminal_text`, `terminal_json`).

Byte counts use decimal units (kB, MB, GB = 1e9 bytes) everywhere neoxconv prints one: the bars, the
summaries, verify's memory figures and notes, and the error messages (`format_bytes`), so a figure in one
can be compared with another. Sizes *given* to neoxconv (``--max-memory 512MiB``) may use either.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Iterator
from typing import Any

from tqdm import tqdm

_BYTES_BAR = "{l_bar}{bar}| {n_fmt}B/{total_fmt}B [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


def format_bytes(n: float) -> str:
    """``116.5 kB``, ``41.12 GB``, ``1.07 GB`` for 1 GiB: decimal units, as the progress bars show them."""
    value, unit = float(n), "B"
    for larger in ("kB", "MB", "GB", "TB"):
        if abs(value) < 1000:
            break
        value, unit = value / 1000, larger
    return f"{value:.0f} B" if unit == "B" else f"{value:.{1 if abs(value) >= 100 else 2}f} {unit}"


def format_rate(value: float, unit: str) -> str:
    """``117.3 tokens/s``, or ``- tokens/s`` when there is no rate (nan: e.g. one generated token, so no decode
    step was timed; inf: nothing measurable)."""
    return f"{value:.1f} {unit}" if math.isfinite(value) else f"- {unit}"


# C0 controls (newline, carriage return, ESC, BEL, ...), DEL, C1 controls (CSI 0x9b, OSC 0x9d: terminals that
# take 8-bit controls act on them), the Unicode line and paragraph separators, and lone surrogates (a file name
# or JSON string that is not valid UTF-8: unprintable, and a crash when stdout is strict UTF-8)
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_UNSAFE_IN_JSON = re.compile("[\x7f-\x9f\u2028\u2029\ud800-\udfff]")  # json.dumps escapes the C0 controls
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(c: str) -> str:
    return _SHORT.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


def terminal_text(text: str) -> str:
    """``text`` on one line, safe for a terminal: every control character (C0 including newline and ESC, DEL,
    C1), line separator and lone surrogate is written as a Python-style escape (``\\n``, ``\\x1b``, ``\\x9b``,
    ``\\u2028``). Names read from input files go into messages: they can then neither start a line that looks
    like neoxconv's own nor a terminal escape sequence (ANSI CSI, OSC: a window title, a hyperlink)."""
    return _UNSAFE.sub(lambda m: _escape(m.group()), text)


def terminal_json(obj: Any) -> str:
    """``json.dumps(obj, ensure_ascii=False)`` with DEL, the C1 controls, the line separators and lone
    surrogates written as ``\\uXXXX`` escapes too: the same JSON value, on one line, safe for a terminal."""
    return _UNSAFE_IN_JSON.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(obj, ensure_ascii=False))


@contextlib.contextmanager
def recheck_bar(total: int, *, quiet: bool = False) -> Iterator[tqdm]:
    """The bar of a resumed run while it re-hashes the files it keeps (``resume: re-check``, ``total`` bytes),
    before the bar of what it writes, whose total is then only what is left to write. Hidden when there is
    nothing to re-check."""
    with progress_bar(total=total, desc="resume: re-check", unit="B", quiet=quiet or not total) as bar:
        yield bar


@contextlib.contextmanager
def progress_bar(*, total: int, desc: str, unit: str = "it", quiet: bool = False) -> Iterator[tqdm]:
    is_bytes = unit == "B"
    bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=is_bytes, unit_divisor=1000,
               bar_format=_BYTES_BAR if is_bytes else None, disable=quiet, dynamic_ncols=True, leave=False)
    try:
        yield bar
    finally:
        bar.close()
