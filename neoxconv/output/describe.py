"""`inspect_checkpoint`: what a source checkpoint holds and what a merge of it will write, from tensor
descriptions only (no tensor data is read)."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any

from neoxconv.errors import OutputError
from neoxconv.output.folder import check_out_path
from neoxconv.output.hf_merge import output_names
from neoxconv.plan.plan import PlanOptions, plan_source
from neoxconv.progress import format_bytes, terminal_text

_LISTED = 20


def free_bytes(path: Path) -> tuple[Path, int]:
    """Free bytes on the filesystem that holds ``path`` (or its nearest existing parent, if it does not exist)."""
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe, shutil.disk_usage(probe).free


def out_problem(out: Path) -> str | None:
    """Why a merge could not create or write OUT (what it would refuse with exit 6), or None. Creates nothing."""
    try:
        check_out_path(out)
    except OutputError as e:
        return str(e)
    path = Path(out).absolute()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return f"{out}: OUT cannot be created: {probe} is a file, not a folder; choose another OUT"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{out}: OUT cannot be {'written' if probe == path else 'created'}: {probe} is not writable"
    return None


def inspect_checkpoint(src: Path, *, config_path: Path | None = None, out: Path | None = None,
                       dtype: str = "auto", row_bias: str = "auto", qkv_layout: str = "auto") -> dict[str, Any]:
    """TP degree, layout, architecture, shapes, dtype, parameter count, files found / missing, the QKV layout
    assumed (Llama-style), and the merge plan.

    The plan (``tensors``: name, shape, dtype, rule, source key and output file of every merged tensor;
    ``output_bytes``, the index's ``total_size`` after a merge with the same ``dtype`` and ``row_bias``) needs
    every rank file; with files missing it is left out (``files_missing`` says which). With ``out``, the free
    disk space there is reported too.
    """
    plan = plan_source(src, PlanOptions(dtype=dtype, row_bias=row_bias, qkv_layout=qkv_layout, config_path=config_path,
                                        strict=False))
    ckpt, config = plan.checkpoint, plan.checkpoint.config
    found = [p.name for p in ckpt.source_files() if p.is_file()]
    result: dict[str, Any] = {
        "step_dir": str(ckpt.step_dir),
        "layout": ckpt.layout,
        "tp_degree": ckpt.tp_degree,
        "architecture": config.architecture,
        "num_layers": config.num_layers,
        "hidden_size": config.hidden_size,
        "num_heads": config.num_heads,
        "num_kv_heads": config.kv_heads,
        "norm": config.norm,
        "norm_eps": config.layernorm_eps,
        "intermediate_size": config.ffn_size,
        "vocab_size": config.vocab_size,
        "rotary_pct": config.rotary_pct,
        "parallel_residual": config.parallel_residual,
        "activation": config.activation,
        "config_source": ckpt.config_source,
        "tokenizer": str(ckpt.tokenizer.path) if ckpt.tokenizer else None,
        "files_found": found,
        "files_missing": list(ckpt.missing_files[:_LISTED]),  # the first few; the count says how many
        "files_missing_count": len(ckpt.missing_files),
        "qkv_layout": None,
        "dtype": None,
        "parameters": None,
        "key_generation": None,
        "fp8_state": None,
        "row_bias": None,
        "output_dtype": None,
        "output_bytes": None,
        "plan_summary": [],
        "tensors": [],
    }
    if out is not None:
        where, free = free_bytes(out)
        result["out"] = str(out)
        result["out_free_bytes"] = free
        result["out_free_bytes_at"] = str(where)
        result["out_problem"] = out_problem(out)  # a merge into OUT would fail (exit 6): out_fits is false
    if not plan.complete:
        return result
    qkv, config, plans = plan.qkv, plan.config, plan.layers
    if qkv is not None:
        result["qkv_layout"] = {"split": qkv.split.value, "assumed": qkv.assumed, "reason": qkv.reason}
    else:
        result["qkv_layout"] = {"split": "fused [heads, 3, head_dim] (kept as query_key_value)", "assumed": False}
    tensors = plan.tensors
    dtypes = {t.src_dtype for t in tensors}
    out_dtypes = {t.out_dtype for t in tensors}
    result["vocab_size"] = config.vocab_size
    result["parameters"] = sum(math.prod(t.shape) for t in tensors)
    result["dtype"] = dtypes.pop() if len(dtypes) == 1 else sorted(dtypes)
    result["key_generation"] = plan.key_generation
    result["fp8_state"] = plan.fp8_state  # Transformer Engine's _extra_state, when it holds fp8 state
    result["row_bias"] = plan.row_bias.value
    result["output_dtype"] = out_dtypes.pop() if len(out_dtypes) == 1 else sorted(out_dtypes)
    result["output_bytes"] = plan.nbytes
    result["tensors"] = [
        {"name": t.hf_name, "shape": list(t.shape), "dtype": t.out_dtype, "rule": t.rule_label,
         "source": t.key, "file": file}
        for file, layer in zip(output_names(len(plans)), plans) for t in layer.tensors
    ]
    result["plan_summary"] = plan_summary(plans)
    if out is not None:
        result["out_fits"] = result["out_problem"] is None and result["out_free_bytes"] >= result["output_bytes"]
    return result


def plan_summary(plans) -> list[dict[str, Any]]:
    """The plan by layer kind, in file order: ``{kind, layers, files, tensors, bytes, rules: {rule: count}}`` per
    kind (embedding, block, final_norm, readout): what `inspect --summary` prints, one line each."""
    kinds: dict[str, dict[str, Any]] = {}
    for layer in plans:
        row = kinds.setdefault(layer.layer.kind.value, {"kind": layer.layer.kind.value, "layers": 0, "files": 0,
                                                        "tensors": 0, "bytes": 0, "rules": {}})
        row["layers"] += 1
        row["files"] += 1  # one output file per source layer
        row["tensors"] += len(layer.tensors)
        row["bytes"] += layer.nbytes
        for t in layer.tensors:
            row["rules"][t.rule_label] = row["rules"].get(t.rule_label, 0) + 1
    return list(kinds.values())


def format_inspect(info: dict[str, Any], *, summary: bool = False) -> str:
    """The human-readable form of `inspect_checkpoint`'s result: the model, then the plan, tensor by tensor or,
    with ``summary``, one line per layer kind. Every line is escaped (`terminal_text`): names read from the
    source (the step folder ``latest`` names, the config's path, keys) can neither start a line nor send a
    terminal escape sequence."""
    unknown = "unknown (rank files missing)"

    def show(value: Any) -> str:
        if value is None:
            return unknown
        if isinstance(value, bool):
            return str(value).lower()
        if isinstance(value, int):
            return f"{value:,}"
        return str(value)

    rows = [
        ("step folder", info["step_dir"]), ("layout", info["layout"]), ("TP degree", info["tp_degree"]),
        ("architecture", info["architecture"]), ("norm", f"{info['norm']} (eps {info['norm_eps']:g})"),
        ("layers", info["num_layers"]), ("hidden size", info["hidden_size"]), ("heads", info["num_heads"]),
        ("kv heads", info["num_kv_heads"]),
        ("ffn size", info["intermediate_size"]), ("vocab size", info["vocab_size"]),
        ("rotary pct", info["rotary_pct"]), ("parallel residual", info["parallel_residual"]),
        ("activation", info["activation"]), ("config", info["config_source"]),
        ("tokenizer", info["tokenizer"] or "none found (merge --tokenizer FILE)"),
        ("dtype", info["dtype"]), ("parameters", info["parameters"]),
        ("key names", info["key_generation"]),
        ("files found", f"{len(info['files_found'])} file(s)"),
        ("files missing", (", ".join(info["files_missing"]) or "none") + (
            f" and {info['files_missing_count'] - len(info['files_missing'])} more"
            if info["files_missing_count"] > len(info["files_missing"]) else "")),
    ]
    if info["qkv_layout"] is not None:
        qkv = info["qkv_layout"]
        # the reason is the warning logged when the plan was made: said once, referred to here
        rows.append(("QKV layout", qkv["split"] + (" (ASSUMED: the warning above says why; --qkv-layout "
                                                   "blocked|interleaved states it)" if qkv["assumed"] else "")))
    if info.get("fp8_state"):
        rows.append(("fp8 state", info["fp8_state"]))
    if info["output_bytes"] is not None:
        rows += [("row-parallel bias", info["row_bias"]), ("output dtype", info["output_dtype"]),
                 ("output bytes", f"{info['output_bytes']:,} ({format_bytes(info['output_bytes'])})")]
    if "out_free_bytes" in info:
        free = (f"{info['out_free_bytes']:,} bytes ({format_bytes(info['out_free_bytes'])}) "
                f"at {info['out_free_bytes_at']}")
        if info.get("out_fits") is False and not info.get("out_problem"):
            free += "; NOT ENOUGH for the merge"
        rows.append(("free at OUT", free))
        if info.get("out_problem"):
            rows.append(("OUT", "UNUSABLE, a merge would fail: " + info["out_problem"]))
    lines = [f"{k:>18}: {show(v)}" for k, v in rows]
    if summary and info["plan_summary"]:
        kinds = info["plan_summary"]
        tensors, files = sum(k["tensors"] for k in kinds), sum(k["files"] for k in kinds)
        lines += ["", f"plan: {tensors} tensors in {files} files, {format_bytes(sum(k['bytes'] for k in kinds))} "
                      "(by layer kind; without --summary: every tensor)"]
        for k in kinds:
            rules = ", ".join(f"{rule} x{n}" for rule, n in k["rules"].items())
            lines.append(f"  {k['kind']:<10}  {k['layers']:>4} layer(s)  {k['tensors']:>5} tensors  "
                         f"{format_bytes(k['bytes']):>9}  {rules}")
    elif info["tensors"]:
        lines += ["", f"plan: {len(info['tensors'])} tensors (rule, dtype, shape, name <- source key, file)"]
        w = max(len(t["rule"]) for t in info["tensors"])
        for t in info["tensors"]:
            shape = "x".join(map(str, t["shape"]))
            lines.append(f"  {t['rule']:<{w}}  {t['dtype']:<8}  {shape:<14}  {t['name']} <- {t['source']}  {t['file']}")
    return "\n".join(terminal_text(line) for line in lines)
