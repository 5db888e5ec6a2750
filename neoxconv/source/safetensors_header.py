"""Reading a safetensors file's header as safetensors itself would: bounded, strict JSON, every tensor's
data offsets tiling the data exactly. Used to read Hugging Face folders (`split`) and to check outputs."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from neoxconv.dtypes import FROM_SAFETENSORS, tensor_nbytes

MAX_HEADER_BYTES = 100 << 20  # the largest safetensors header we read (a bound, not a format limit)


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


def read_header(path: Path) -> tuple[dict, int]:
    """(header, bytes of tensor data after it)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError("shorter than a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER_BYTES:
            raise ValueError(f"header length {n} is implausible")
        text = f.read(n)
        data_len = os.fstat(f.fileno()).st_size - 8 - n
    if len(text) != n:
        raise ValueError(f"header length {n} runs past the end of the file")
    if not text.startswith(b"{"):  # safetensors refuses anything else before the object
        raise ValueError("header does not start with '{'")
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError("header is nested too deeply") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise ValueError("__metadata__ is not a table of strings, which safetensors refuses to load")
    return header, data_len


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
