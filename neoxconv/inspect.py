"""`inspect_checkpoint`: what a source checkpoint holds, from its tensor descriptions only."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from neoxconv.checkpoint import open_checkpoint
from neoxconv.convert import plan_checkpoint
from neoxconv.merge import resolve_row_bias


_LISTED = 20


def inspect_checkpoint(src: Path, *, config_path: Path | None = None) -> dict[str, Any]:
    """TP degree, layout, shape, dtype, parameter count and the files found / missing. Reads no tensor data."""
    ckpt = open_checkpoint(src, config_path=config_path, strict=False)
    config = ckpt.config
    found = [p.name for p in ckpt.source_files() if p.is_file()]
    result: dict[str, Any] = {
        "step_dir": str(ckpt.step_dir),
        "layout": ckpt.layout,
        "tp_degree": ckpt.tp_degree,
        "num_layers": config.num_layers,
        "hidden_size": config.hidden_size,
        "num_heads": config.num_heads,
        "intermediate_size": config.ffn_size,
        "vocab_size": config.vocab_size,
        "rotary_pct": config.rotary_pct,
        "parallel_residual": config.parallel_residual,
        "activation": config.activation,
        "config_source": ckpt.config_source,
        "tokenizer": str(ckpt.tokenizer) if ckpt.tokenizer else None,
        "files_found": found,
        "files_missing": list(ckpt.missing_files[:_LISTED]),  # the first few; the count says how many
        "files_missing_count": len(ckpt.missing_files),
        "dtype": None,
        "parameters": None,
    }
    if ckpt.missing_files:
        return result
    config, plans = plan_checkpoint(ckpt, row_bias=resolve_row_bias("auto", config), out_dtype=None)
    tensors = [t for plan in plans for t in plan.tensors]
    dtypes = {t.src_dtype for t in tensors}
    result["vocab_size"] = config.vocab_size
    result["parameters"] = sum(math.prod(t.shape) for t in tensors)
    result["dtype"] = dtypes.pop() if len(dtypes) == 1 else sorted(dtypes)
    return result
