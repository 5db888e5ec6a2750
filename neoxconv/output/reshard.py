"""`reshard_checkpoint`: a GPT-NeoX checkpoint at TP T becomes one at TP M, one source layer at a time.

Each layer is merged in memory by the merge rules (read with neoxconv's own safe .pt reader, CRC-checked,
replicas checked against the tolerance) and split again by `neoxconv.output.split.shard_layer`. So
``merge(reshard(SRC, M)) == merge(SRC)`` bit for bit: concatenations are exact, a row-parallel bias is written
as its merged value on rank 0 and zeros elsewhere, and replicated tensors are written as their merged value.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neoxconv.source.checkpoint import SourceLayer
from neoxconv.dtypes import TORCH_FLOAT_DTYPES, as_torch_dtype
from neoxconv.errors import ConfigError, OutputError
from neoxconv.plan.fingerprint import config_digest, layer_fingerprint, source_identity
from neoxconv.interrupt import deferred_sigint
from neoxconv.output.folder import check_out_path
from neoxconv.output.hashing import DEFAULT_HASH
from neoxconv.merge import Rule, check_replicas, merge_tensor, resolve_row_bias
from neoxconv.plan.plan import LayerPlan, PlanOptions, TensorPlan, part_key, plan_source
from neoxconv.output.neox import NeoXTarget, Shard, WriteReport, check_target, write_neox_checkpoint
from neoxconv.output.streaming import iter_merged_chunks
from neoxconv.source.storage import Reads, SourceReader
from neoxconv.output.split import planned_bytes, shard_layer, tokenizer_size

_STEP = re.compile(r"^global_step(\d+)$")


@dataclass(frozen=True)
class ReshardOptions:
    tp: int
    layout: str | None = None  # None: keep the source's
    dtype: str = "auto"
    step: int | None = None  # None: keep the source's (from its global_step folder name), else 0
    row_bias: str = "auto"  # how the source's row-parallel biases merge (as `merge --row-bias`)
    qkv_layout: str = "auto"  # Llama-style GQA sources: how their QKV rows lie (as `merge --qkv-layout`)
    replica_tolerance: float = 1e-2
    config_path: Path | None = None
    tokenizer_path: Path | None = None
    allow_nonfinite: bool = False  # write inf/nan (with a warning) instead of failing
    resume: bool = True
    force: bool = False
    quiet: bool = False
    hash: str = DEFAULT_HASH  # the digest the manifest records for every file


def _to_torch(a: np.ndarray, dtype: str) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def merged_tensor(t: TensorPlan, *, tolerance: float, where: str, reader: Reads) -> np.ndarray:
    """The merged value of one planned tensor (the whole tensor, in ``t.out_dtype``)."""
    if t.rule in (Rule.CONCAT_ROWS, Rule.CONCAT_COLS, Rule.SPLIT_ROWS):
        full = np.empty(t.shape, dtype=np.uint16 if t.out_dtype == "bfloat16" else np.dtype(t.out_dtype))
        row = 0
        for chunk in iter_merged_chunks(t, reader=reader):
            full[row:row + chunk.shape[0]] = chunk
            row += chunk.shape[0]
        return full
    arrays = [reader.read(r, key=t.key) for r in t.shards]
    if t.rule in (Rule.REPLICATED, Rule.DROP):
        check_replicas(arrays, dtype=t.src_dtype, tolerance=tolerance, key=t.key, ranks=[r.path.name for r in t.shards],
                       where=where, row_bias=t.row_bias, derived=t.rule is Rule.DROP)
    return merge_tensor(t.rule, arrays, dtype=t.src_dtype, out_dtype=t.out_dtype)


def reshard_checkpoint(src: Path, out: Path, options: ReshardOptions) -> WriteReport:
    """Reshard the NeoX checkpoint ``src`` to TP ``options.tp`` in ``out`` (checked fully before writing)."""
    check_out_path(Path(out))
    source_plan = plan_source(src, PlanOptions(
        dtype=options.dtype, row_bias=options.row_bias, qkv_layout=options.qkv_layout,  # as `merge` reads it
        config_path=options.config_path, tokenizer_path=options.tokenizer_path))
    ckpt, config, plans = source_plan.checkpoint, source_plan.config, source_plan.layers
    # a gpt-neox checkpoint carries a tokenizer.json; another kind is carried by merge only (one given with
    # --tokenizer is checked as a tokenizer.json, and refused)
    tok = ckpt.tokenizer
    tokenizer_json = None if tok is None else tok.json or (tok.path if tok.given else None)
    src_row_bias, qkv = source_plan.row_bias, source_plan.qkv  # qkv: how a Llama-style source's QKV rows lie
    dtypes = {t.out_dtype for p in plans for t in p.tensors}
    if len(dtypes) != 1:
        raise ConfigError(f"{ckpt.step_dir}: the weights have mixed dtypes ({', '.join(sorted(dtypes))}); "
                          "choose one with --dtype fp16|bf16|fp32")
    dtype = dtypes.pop()
    if dtype not in TORCH_FLOAT_DTYPES:
        raise ConfigError(f"{ckpt.step_dir}: weights are {dtype}; choose --dtype fp16, bf16 or fp32")
    m = _STEP.match(ckpt.step_dir.name)
    step = options.step if options.step is not None else (int(m.group(1)) if m else 0)
    layout = options.layout or ckpt.layout
    target = NeoXTarget(config=config, tp_degree=options.tp, layout=layout, dtype=dtype, step=step,
                        tokenizer_size=tokenizer_size(tokenizer_json, config.vocab_size))
    check_target(target, where=ckpt.config_source)
    row_bias = resolve_row_bias("auto", config)  # how the output's row-parallel biases are split
    by_index: dict[int, LayerPlan] = {p.layer.index: p for p in plans}
    torch_dtype = as_torch_dtype(dtype)
    if Path(out).resolve() in (ckpt.root.resolve(), ckpt.step_dir.resolve()):
        raise OutputError(f"{out}: OUT is the source checkpoint; choose another folder")
    # A storage that several tensors read (a ZeRO flat buffer, the HF converter's full tensors) is CRC-checked
    # once, whole, before anything is written, its tensors' spans remembered; every layer's reads are checked
    # (against those spans, or the storage's own CRC-32) before the layer is written.
    reader = SourceReader()
    reads = Counter((r.path, r.data_offset) for p in plans for t in [*p.tensors, *p.dropped] for r in t.shards)
    try:
        reader.check(r for p in plans for t in [*p.tensors, *p.dropped] for r in t.shards
                     if reads[(r.path, r.data_offset)] > 1)
        for plan in plans:  # the small tensors (norms, buffers) are checked across ranks before anything is written
            where = f"{plan.layer.label} [{', '.join(plan.files)}]"
            with reader.scope() as reads:
                for t in plan.dropped:
                    merged_tensor(t, tolerance=0.0, where=where, reader=reads)
                for t in plan.tensors:
                    if t.rule is Rule.REPLICATED:
                        merged_tensor(t, tolerance=options.replica_tolerance, where=where, reader=reads)
    except BaseException:
        reader.close()
        raise

    def rank_shards(layer: SourceLayer, ranks: list[int]) -> Iterator[Shard]:
        plan = by_index[layer.index]
        where = f"{layer.label} [{', '.join(plan.files)}]"
        with reader.scope() as reads:  # the layer's reads are checked as it closes, before anything is written
            full = {t.key if t.split is None else part_key(t.key, t.part):
                    _to_torch(merged_tensor(t, tolerance=options.replica_tolerance, where=where, reader=reads),
                              t.out_dtype)
                    for t in plan.tensors}
        yield from shard_layer(layer, full, config=config, tp=options.tp, ranks=ranks, row_bias=row_bias,
                               dtype=torch_dtype, generation=plan.key_generation,
                               qkv_split=None if qkv is None else qkv.split)  # the source's layout and key names

    config_sha = config_digest(config)
    layer_fps: dict[int, dict[str, Any]] = {}

    def fingerprint(layers: list[SourceLayer]) -> dict[str, Any]:
        """The proof of what ``layers`` read (`layer_fingerprint`: CRC-32s, sizes, mtimes) and the config."""
        for layer in layers:
            if layer.index not in layer_fps:
                layer_fps[layer.index] = layer_fingerprint(by_index[layer.index], ckpt.step_dir)
        return {"config": config_sha, "layers": [layer_fps[layer.index] for layer in layers]}

    recorded = {"command": "reshard", "tp": options.tp, "layout": layout, "dtype": dtype, "step": step,
                "row_bias": src_row_bias.value, "replica_tolerance": options.replica_tolerance}
    if qkv is not None:  # the merged QKV rows depend on it, as for `merge` (a resume must match it)
        recorded["qkv_layout"] = qkv.split.value
    with reader, deferred_sigint() as guard:
        return write_neox_checkpoint(
            Path(out), target, rank_shards, source=source_identity(ckpt, out), recorded=recorded, fingerprint=fingerprint,
            planned_bytes=planned_bytes(config, options.tp, dtype, row_bias), tokenizer=tokenizer_json,
            guard=guard, resume=options.resume, force=options.force, quiet=options.quiet,
            allow_nonfinite=options.allow_nonfinite, hash_algo=options.hash, desc="reshard")
