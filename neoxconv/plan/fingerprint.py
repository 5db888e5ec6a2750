"""What `--resume` must prove before it keeps a merged layer: the source it came from is the same.

Names and sizes are not enough (a layer file replaced by another of the same size kept its stale output).
Each merged layer records the fingerprint of exactly what it read:

* every tensor it used: file, dtype, shape, stride, storage offset, and the CRC-32 and size that the
  archive's zip directory records for the storage (read with the description, so they cost nothing);
* every source file it read: size, modification time and status-change time (ctime), in nanoseconds.

A resumed merge or reshard redoes every layer whose fingerprint differs and keeps the rest. The CRCs catch
changed data even where the mtime was preserved (``cp -p``, ``rsync -t``); the ctime catches a file with
different bytes but the same CRCs (a deliberate CRC-32 collision) even with its mtime restored: the kernel
sets it whenever a file is created, replaced or its metadata changed, and no tool can set it back. A
``chmod`` or a copy also counts as a change (a redo, never a stale output). Each tensor's bytes are checked
against its CRC when read. The writers add the digest of the model config (`config_digest`): a config fixed
after a first run changes how layers are written, not their source files.

`split` reads safetensors, which record no checksum: `file_fingerprint` records size, mtime, ctime and the
sha256 of the header (names, dtypes, shapes, offsets). Hashing the data itself would cost a full read of the
source.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from neoxconv.errors import CheckpointError
from neoxconv.plan.plan import LayerPlan
from neoxconv.source.checkpoint import Checkpoint
from neoxconv.source.safetensors import header_bytes


def public_place(path: Path, out: Path) -> str:
    """How an output records where its source is without an absolute local path (OUT is uploaded, private
    folder and user names must not travel with it): the path relative to OUT when the source is inside OUT,
    else only the folder's name. Resume proves the rest with the per-file fingerprints."""
    path, out = Path(path).resolve(), Path(out).resolve()
    try:
        return path.relative_to(out).as_posix() or "."
    except ValueError:
        return path.name


def source_identity(ckpt: Checkpoint, out: Path) -> dict[str, Any]:
    """Which checkpoint this is (step folder, layout, TP degree, file names): what a resume must share.

    The step folder is recorded by `public_place` (its name, or its path inside OUT), never absolute."""
    return {
        "step_dir": public_place(ckpt.step_dir, out),
        "layout": ckpt.layout,
        "tp_degree": ckpt.tp_degree,
        "files": [p.name for p in ckpt.source_files()],
    }


def layer_fingerprint(plan: LayerPlan, step_dir: Path) -> dict[str, Any]:
    """The recorded proof of one layer's inputs (see the module docstring)."""
    tensors = []
    for t in [*plan.tensors, *plan.dropped]:
        for r in t.shards:
            tensors.append([r.path.name, t.key, r.dtype, list(r.shape), list(r.stride), r.storage_offset,
                            r.storage_numel, r.storage_nbytes, r.storage_crc])
    digest = hashlib.sha256(json.dumps(tensors, separators=(",", ":")).encode()).hexdigest()
    files = {}
    for name in plan.files:
        try:
            st = (Path(step_dir) / name).stat()
        except OSError as e:
            raise CheckpointError(f"{Path(step_dir) / name}: cannot read: {e.strerror or e}") from None
        files[name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}
    return {"files": files, "tensors_sha256": digest}


def file_fingerprint(path: Path, *, safetensors_header: bool = False) -> dict[str, Any]:
    """Size, mtime and ctime (ns) of a source file and, for a safetensors file, the sha256 of its header."""
    path = Path(path)
    try:
        st = path.stat()
        fp: dict[str, Any] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}
        if safetensors_header:
            try:
                text, _ = header_bytes(path)
            except ValueError as e:
                raise CheckpointError(f"{path}: not a safetensors file ({e})") from None
            fp["header_sha256"] = hashlib.sha256(text).hexdigest()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    return fp


def config_digest(config: Any) -> str:
    """The sha256 of a model config (a dataclass): every output depends on it (fields marked
    ``metadata={"digest": False}`` only through other fields, so they are left out)."""
    skip = {f.name for f in dataclasses.fields(config) if f.metadata.get("digest") is False}
    values = {k: v for k, v in dataclasses.asdict(config).items() if k not in skip}
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()
