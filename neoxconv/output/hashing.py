"""The strong hash recorded for every output file: BLAKE3 by default, sha256 on request.

Every writer (merge, split, reshard) hashes each file while writing it (`neoxconv.output.writer`) and never
re-reads it for that. The manifest records the algorithm twice: once for the whole run (``"hash": "blake3"``)
and as the key of each file's digest (``{"blake3": "…", "size": N}``), so a manifest written before BLAKE3
(``"sha256"`` entries, as split/reshard wrote them) still verifies. BLAKE3 costs ~4x less CPU per byte than
sha256 on one core and spreads over all cores for large buffers (bench/checks_bench.py); sha256 stays
available (``merge --hash sha256``) for comparing against Hugging Face Hub LFS ids.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import blake3

HASH_ALGORITHMS = ("blake3", "sha256")
DEFAULT_HASH = "blake3"
_FILE_CHUNK = 16 << 20


def check_algorithm(algo: str) -> str:
    if algo not in HASH_ALGORITHMS:
        raise ValueError(f"unknown hash {algo!r}; use one of {', '.join(HASH_ALGORITHMS)}")
    return algo


class StreamHasher:
    """``update`` with consecutive buffers, then ``hexdigest``; large buffers release the GIL.

    ``threads`` > 1 lets BLAKE3 hash one large buffer on several cores (sha256 is sequential by nature).
    """

    def __init__(self, algo: str = DEFAULT_HASH, *, threads: int = 1) -> None:
        self.algo = check_algorithm(algo)
        if algo == "blake3":
            self._h = blake3.blake3(max_threads=blake3.blake3.AUTO if threads > 1 else 1)
        else:
            self._h = hashlib.sha256()

    def update(self, data) -> None:
        self._h.update(data)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def hash_file(path: Path | int, algo: str = DEFAULT_HASH) -> str:
    """Hex digest of a file's bytes, read through one reused buffer (memory stays flat in the file size;
    BLAKE3 hashes each buffer on all cores). ``path`` may be an open descriptor: read from where it stands, left
    open."""
    h = StreamHasher(algo, threads=os.cpu_count() or 1)
    buf = bytearray(_FILE_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0, closefd=not isinstance(path, int)) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def recorded_hash(entry: dict) -> tuple[str, str] | None:
    """``(algorithm, hexdigest)`` a manifest entry records, or None when it records none."""
    for algo in HASH_ALGORITHMS:
        value = entry.get(algo)
        if isinstance(value, str):
            return algo, value
    return None


def hash_bytes(data, algo: str = DEFAULT_HASH) -> str:
    """Hex digest of a buffer."""
    h = StreamHasher(algo)
    h.update(data)
    return h.hexdigest()
