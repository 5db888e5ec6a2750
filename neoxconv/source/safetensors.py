"""The one reader of safetensors headers (merged folders for `verify`, Hugging Face folders for `split`).

A safetensors file is an 8-byte little-endian header length, a JSON header (tensor name -> dtype, shape,
data_offsets; an optional ``__metadata__`` table of strings), then the tensor data. Real headers are a few
kB to a few MB (~150 bytes per tensor); the length field can claim anything up to 2**64, and a hostile
100 MiB header once cost 19-40 s and 1.6 GB of memory per file (a MemoryError under a 1 GiB limit). So a
header longer than `MAX_HEADER_BYTES` is refused before it is read, and parsing is bounded by that size.

Everything here raises `ValueError` with the reason; callers add the file's name (or `CheckpointError`
where noted). `file_state` / `check_unchanged` let a reader prove that a file did not change between the
moment its header was checked and the moment its data was used (safetensors records no checksum).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from neoxconv.dtypes import FROM_SAFETENSORS, tensor_nbytes
from neoxconv.errors import CheckpointError

# The largest header neoxconv reads: 16 MB is ~100k tensors, far above any real model's file (a 405B
# model's shards hold a few hundred tensors each), and parses in well under a second.
MAX_HEADER_BYTES = 16_000_000  # 16 MB


def header_bytes(path: Path) -> tuple[bytes, int]:
    """(the raw JSON header, bytes of tensor data after it); ValueError when the length field is implausible."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError("shorter than a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        size = os.fstat(f.fileno()).st_size
        if n > MAX_HEADER_BYTES:
            raise ValueError(f"its header claims {n} bytes, more than neoxconv reads ({MAX_HEADER_BYTES / 1e6:g} MB; "
                             "real safetensors headers are kB to a few MB)")
        if n > size - 8:
            raise ValueError(f"header length {n} runs past the end of the file")
        text = f.read(n)
    if len(text) != n:
        raise ValueError(f"header length {n} runs past the end of the file")
    return text, size - 8 - n


def read_header(path: Path) -> tuple[dict, int]:
    """(header, bytes of tensor data after it), parsed strictly: one JSON object, no duplicate names, no
    NaN/Infinity constants, ``__metadata__`` a table of strings (what safetensors itself accepts)."""
    text, data_len = header_bytes(path)
    if not text.startswith(b"{"):  # safetensors refuses anything else before the object
        raise ValueError("header does not start with '{'")
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError("header is nested too deeply") from None
    except UnicodeDecodeError:
        raise ValueError("header is not UTF-8") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise ValueError("__metadata__ is not a table of strings, which safetensors refuses to load")
    return header, data_len


def read_safetensors_header(path: Path) -> dict:
    return read_header(path)[0]


def checked_safetensors_header(path: Path) -> dict:
    """The header of a safetensors file that safetensors itself would load: every entry well-formed, the
    data offsets tiling the data exactly (`ValueError` naming the first problem otherwise)."""
    header, data_len = read_header(path)
    problems = layout_problems(Path(path).name, header, data_len)
    if problems:
        raise ValueError(problems[0])
    return header


def layout_problems(file: str, header: dict, data_len: int) -> list[str]:
    """Each tensor's data_offsets must match its dtype and shape, and together tile the data exactly
    (no overlap, no gap, nothing past the end): what safetensors itself requires before loading."""
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            return [f"{file}: {name!r} has a malformed header entry"]
        offsets, shape, dtype = info.get("data_offsets"), info.get("shape"), FROM_SAFETENSORS.get(info.get("dtype"))
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)
                and isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape) and dtype):
            return [f"{file}: {name!r} has malformed data_offsets/shape/dtype in its header"]
        if offsets[1] - offsets[0] != tensor_nbytes(dtype, tuple(shape)):
            return [f"{file}: {name!r} spans {offsets[1] - offsets[0]} bytes, its shape and dtype need "
                    f"{tensor_nbytes(dtype, tuple(shape))}"]
        spans.append((offsets[0], offsets[1], name))
    end = 0
    for start, stop, name in sorted(spans):
        if start != end:
            what = "overlaps the previous tensor" if start < end else "leaves a gap before it"
            return [f"{file}: {name!r} {what} (data_offsets start {start}, expected {end})"]
        end = stop
    if end != data_len:
        return [f"{file}: the tensors cover {end} bytes of data, the file holds {data_len} (truncated or padded)"]
    return []


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    """JSON readers disagree on which of two same-named entries counts: refuse the header instead."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"header names {key!r:.80} twice")
        out[key] = value
    return out


def _no_constant(name: str) -> None:
    raise ValueError(f"header holds {name}, which is not JSON")


@dataclass(frozen=True)
class FileState:
    """What changes when a file is written: size, mtime, ctime (which no user can set back), inode."""

    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int


def file_state(path: Path) -> FileState:
    try:
        st = Path(path).stat()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    return FileState(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def check_unchanged(path: Path, before: FileState) -> None:
    """CheckpointError naming ``path`` when it changed since ``before`` was taken (its data read after its
    header was checked would not be the bytes that header describes)."""
    if file_state(path) != before:
        raise CheckpointError(f"{path}: changed while neoxconv read it (size, mtime or ctime differ from when its "
                              "header was checked); re-run once nothing writes to the file")
