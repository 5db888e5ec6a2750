"""The one reader of small text files (configs, indexes, manifests, journals): size-capped before reading.

A config or index is kB to a few MB; a 2 GiB (possibly sparse) file under such a name is refused by name,
never read whole.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from neoxconv.errors import NeoXConvError

SMALL_FILE_LIMIT = 64_000_000  # bytes (64 MB); real configs, indexes and manifests are far smaller


def read_small_text(path: Path, error: type[NeoXConvError], limit: int = SMALL_FILE_LIMIT) -> str:
    """``path``'s UTF-8 text; ``error`` naming the file when it holds more than ``limit`` bytes.

    OSError and UnicodeDecodeError reach the caller as ``Path.read_text`` raises them."""
    return read_small_bytes(path, error, limit).decode("utf-8")


def read_small_bytes(path: Path, error: type[NeoXConvError], limit: int = SMALL_FILE_LIMIT) -> bytes:
    """``path``'s bytes; ``error`` naming the file when it holds more than ``limit`` bytes (a file that grows
    while it is read included). OSError reaches the caller."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        chunks: list[bytes] = []
        got = 0
        while size <= limit and got <= limit:  # read what is there (a file may grow), never a limit-sized buffer
            chunk = f.read(min(max(size - got, 0), limit) + 1 + (1 << 16))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        data = b"".join(chunks)
    if size > limit or len(data) > limit:
        raise error(f"{path}: {max(size, len(data))} bytes, more than the {limit / 1e6:g} MB such a file can "
                    "plausibly hold; refused unread (replace it with the real file)")
    return data


def read_json(path: Path, error: type[NeoXConvError], *, what: str = "JSON", limit: int = SMALL_FILE_LIMIT) -> Any:
    """``path``'s JSON value (size-capped as `read_small_text`); ``error`` naming the file and ``what`` it should
    be when it cannot be read, is not UTF-8 or not JSON."""
    try:
        return json.loads(read_small_text(Path(path), error, limit))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise error(f"{path}: not readable {what}: {str(e)[:200]}") from None


def read_json_object(path: Path, error: type[NeoXConvError], *, what: str = "JSON",
                     limit: int = SMALL_FILE_LIMIT) -> dict[str, Any]:
    """`read_json`, and the value must be a JSON object (``error`` naming the file otherwise)."""
    d = read_json(path, error, what=what, limit=limit)
    if not isinstance(d, dict):
        raise error(f"{path}: expected a JSON object ({what})")
    return d
