"""What `--resume` must prove before it keeps a merged layer: the source it came from is the same.

Names and sizes are not enough (a layer file replaced by another of the same size kept its stale output).
Each merged layer records the fingerprint of exactly what it read:

* every tensor it used: file, dtype, shape, stride, storage offset, and the CRC-32 and size that the
  archive's zip directory records for the storage (read with the description, so they cost nothing);
* every source file it read: size and modification time (nanoseconds).

A resumed merge redoes every layer whose fingerprint differs and keeps the rest. The CRCs catch changed
data even where the mtime was preserved (``cp -p``, ``rsync -t``); the mtime catches the (unlikely) file
with different bytes but the same CRCs. Each tensor's bytes are checked against that CRC when read.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from neoxconv.checkpoint import Checkpoint
from neoxconv.errors import CheckpointError
from neoxconv.merge import LayerPlan


def source_identity(ckpt: Checkpoint) -> dict[str, Any]:
    """Which checkpoint this is (step folder, layout, TP degree, file names): what a resume must share."""
    return {
        "step_dir": str(ckpt.step_dir.resolve()),
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
        files[name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return {"files": files, "tensors_sha256": digest}
