"""`reshard_checkpoint`: a GPT-NeoX checkpoint at TP T becomes one at TP M, one source layer at a time.

Each layer is merged by the merge rules block by block (read with neoxconv's own safe .pt reader, CRC-checked,
replicas checked against the tolerance) and split again as it streams (`neoxconv.output.split.stream_shards`). So
``merge(reshard(SRC, M)) == merge(SRC)`` bit for bit: concatenations are exact, a row-parallel bias is written
as its merged value on rank 0 and zeros elsewhere, and replicated tensors are written as their merged value.
"""

from __future__ import annotations

import bisect
import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from neoxconv.config import NeoXConfig
from neoxconv.dtypes import TORCH_FLOAT_DTYPES, from_f32, tensor_nbytes, to_f32
from neoxconv.errors import ConfigError, OutputError
from neoxconv.interrupt import deferred_sigint
from neoxconv.merge import (
    TE_GENERATIONS,
    Rule,
    check_derived,
    check_replicas,
    key_table,
    merge_tensor,
    resolve_row_bias,
)
from neoxconv.output.folder import check_out_path
from neoxconv.output.hashing import DEFAULT_HASH
from neoxconv.output.neox import (
    Emit,
    LayerStream,
    NeoXOutputPlan,
    NeoXTarget,
    ShardTensor,
    WriteReport,
    check_target,
    output_layout,
    plan_neox_output,
    write_neox_checkpoint,
)
from neoxconv.output.split import DERIVED, Buffer, planned_bytes, shard_tensors, stream_shards, tokenizer_size
from neoxconv.plan.fingerprint import config_digest, layer_fingerprint, source_identity
from neoxconv.plan.plan import LayerPlan, PlanOptions, TensorPlan, plan_source
from neoxconv.source.checkpoint import SourceLayer
from neoxconv.source.ptfile import TensorRef
from neoxconv.source.storage import Reads, SourceReader

_STEP = re.compile(r"^global_step(\d+)$")


@dataclass(frozen=True)
class ReshardOptions:
    tp: int
    layout: str | None = None  # None: keep the source's (a reward model: sequential, `output_layout`)
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
    dry_run: bool = False  # plan only: the files, their bytes and the free disk (`NeoXOutputPlan`), nothing written


def merged_tensor(t: TensorPlan, *, tolerance: float, where: str, reader: Reads) -> np.ndarray:
    """The merged value of a small planned tensor (sums, replicas, dropped buffers), in ``t.out_dtype``."""
    arrays = [reader.read(r, key=t.key) for r in t.shards]
    if t.rule in (Rule.REPLICATED, Rule.DROP):
        check_replicas(arrays, dtype=t.src_dtype, tolerance=tolerance, key=t.key, ranks=[r.path.name for r in t.shards],
                       where=where, row_bias=t.row_bias, derived=t.rule is Rule.DROP)
    return merge_tensor(t.rule, arrays, dtype=t.src_dtype, out_dtype=t.out_dtype)


def _small(t: TensorPlan) -> bool:
    return t.rule in (Rule.SUM, Rule.REPLICATED, Rule.DROP)


def table_key(config: NeoXConfig, plan: LayerPlan, t: TensorPlan) -> str:
    """The key table's own key of a planned source tensor (the same in every key generation)."""
    return key_table(config, plan.layer.kind, plan.key_generation)[t.key].key


def _kept(saved: dict[str, TensorPlan], weights_dtype: set[str], dtype: str) -> dict[str, Buffer]:
    """The saved derived buffers written as the source holds them, by table key (values not read yet: the
    dtypes, for the plan). Each keeps its own dtype unless it had the weights' dtype and ``--dtype`` changes
    that: then it is computed in the new dtype, as gpt-neox computes it for a model of that dtype."""
    return {k: Buffer(t.src_dtype, np.empty(0)) for k, t in saved.items()
            if t.src_dtype not in weights_dtype or t.src_dtype == dtype}


class _MergedLayer:
    """One source layer's merged tensors as `FullTensors`, read in row blocks through the layer's ``Reads``
    (the merge rules, block by block: `iter_merged_chunks`' reads, by row range); the small ones merged
    beforehand."""

    def __init__(self, plan: LayerPlan, small: dict[str, np.ndarray], reads: Reads | None) -> None:
        self._reads = reads
        self._plans: dict[str, TensorPlan] = {}
        self._small = small
        self._pieces: dict[str, tuple[list[int], list[tuple[TensorRef, int, int]]]] = {}
        for t in plan.tensors:
            key = t.hf_name
            self._plans[key] = t
            if t.rule in (Rule.CONCAT_ROWS, Rule.SPLIT_ROWS):  # the merged rows: each rank's rows (segments), in order
                pieces = [(ref, s, c) for ref in t.shards for s, c in (t.segments or [(0, ref.shape[0])])]
                starts = list(itertools.accumulate([0, *(c for _, _, c in pieces)]))[:-1]
                self._pieces[key] = (starts, pieces)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._plans[key].shape

    def rows(self, key: str, start: int, count: int) -> np.ndarray:
        t = self._plans[key]
        if key in self._small:
            return self._small[key][start:start + count]
        if t.rule is Rule.CONCAT_COLS:
            blocks = [self._reads.rows(ref, start, count, key=t.key) for ref in t.shards]
            return merge_tensor(Rule.CONCAT_COLS, blocks, dtype=t.src_dtype, out_dtype=t.out_dtype)
        starts, pieces = self._pieces[key]
        out = []
        i = bisect.bisect_right(starts, start) - 1
        while count:
            ref, first, n = pieces[i]
            skip = start - starts[i]
            take = min(count, n - skip)
            out.append(self._reads.rows(ref, first + skip, take, key=t.key))
            start, count, i = start + take, count - take, i + 1
        block = out[0] if len(out) == 1 else np.concatenate(out, axis=0)
        return block if t.src_dtype == t.out_dtype else from_f32(to_f32(block, t.src_dtype), t.out_dtype)

    def filler(self, key: str, start: int, count: int) -> Callable[[memoryview], None] | None:
        """Merged rows read straight into the caller's views, piece after piece (each a contiguous run of one
        rank's rows), when they need no cast."""
        t = self._plans[key]
        if key in self._small or key not in self._pieces or t.src_dtype != t.out_dtype:
            return None
        starts, pieces = self._pieces[key]
        row = tensor_nbytes(t.src_dtype, t.shape[1:])
        runs = []  # (ref, byte offset in it, bytes)
        i = bisect.bisect_right(starts, start) - 1
        while count:
            ref, first, n = pieces[i]
            if not ref.is_contiguous:
                return None
            skip = start - starts[i]
            take = min(count, n - skip)
            runs.append((ref, (first + skip) * row, take * row))
            start, count, i = start + take, count - take, i + 1
        at = [0, 0]  # the run being read, bytes of it done

        def fill(view: memoryview) -> None:
            done = 0
            while done < len(view):
                ref, offset, nbytes = runs[at[0]]
                take = min(nbytes - at[1], len(view) - done)
                self._reads.read_into(ref, offset + at[1], view[done:done + take], key=t.key)
                done += take
                at[1] += take
                if at[1] == nbytes:
                    at[0], at[1] = at[0] + 1, 0

        return fill


def reshard_checkpoint(src: Path, out: Path, options: ReshardOptions) -> WriteReport | NeoXOutputPlan:
    """Reshard the NeoX checkpoint ``src`` to TP ``options.tp`` in ``out`` (checked fully before writing).

    Each source byte is read once: the small tensors (norms, biases, buffers) of every layer first, merged and
    checked across ranks before anything is written; then layer by layer the big ones in row blocks, each
    block split at once between the new ranks' files. A storage several layers share (a ZeRO flat buffer) is
    CRC-checked when the last of them has read it (`SourceReader`'s plan), and their files enter the journal
    only then: a failed check removes them. ``options.dry_run``: the `NeoXOutputPlan` of what it would write,
    after the checks that need no tensor data; nothing read beyond the archives' descriptions, nothing written.
    """
    if not options.dry_run:  # (a dry run reports it)
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
    layout = output_layout(config, options.layout, source_layout=ckpt.layout)
    generations = {p.key_generation for p in plans} - {None}  # the source's MLP key names, kept (one: planned)
    if generations & set(TE_GENERATIONS) or any(p.extra_states for p in plans):
        raise ConfigError(
            f"{ckpt.step_dir}: Transformer Engine checkpoint (key names {' + '.join(sorted(generations))}, with "
            "_extra_state entries): reshard does not write TE modules' extra state back; merge it and split the "
            "Hugging Face folder (gpt-neox's own module names: train on with the te_* settings off)")
    # the source's derived buffers (rotary inv_freq, saved with rotary_save_freqs_buffer) are kept: their own
    # bytes, once checked identical on every rank (`given`), so no torch is needed to compute them
    saved = {p.layer.index: {table_key(config, p, t): t for t in p.dropped if table_key(config, p, t) in DERIVED}
             for p in plans}
    target = NeoXTarget(config=config, tp_degree=options.tp, layout=layout, dtype=dtype, step=step,
                        tokenizer_size=tokenizer_size(tokenizer_json, config.vocab_size),
                        generation=generations.pop() if len(generations) == 1 else None,
                        rotary_buffers=any(saved.values()))
    check_target(target, where=ckpt.config_source)
    row_bias = resolve_row_bias("auto", config)  # how the output's row-parallel biases are split
    by_index: dict[int, LayerPlan] = {p.layer.index: p for p in plans}
    if Path(out).resolve() in (ckpt.root.resolve(), ckpt.step_dir.resolve()):
        raise OutputError(f"{out}: OUT is the source checkpoint; choose another folder")
    generation = {i: p.key_generation for i, p in by_index.items()}  # the source's key names, kept
    qkv_split = None if qkv is None else qkv.split  # and its QKV layout
    small: dict[int, dict[str, np.ndarray]] = {}
    weights_dtype = {t.src_dtype for p in plans for t in p.tensors}
    given: dict[int, dict[str, Buffer]] = {}  # the derived buffers written as the source holds them

    def tensors(layer: SourceLayer) -> list[ShardTensor]:
        full = _MergedLayer(by_index[layer.index], small.get(layer.index, {}), reads=None)
        return shard_tensors(layer, full, config=config, tp=options.tp, row_bias=row_bias, dtype=dtype,
                             generation=generation[layer.index], buffers=target.rotary_buffers,
                             given=_kept(saved[layer.index], weights_dtype, dtype))

    if options.dry_run:
        return plan_neox_output(Path(out), target, tensors, tokenizer=tokenizer_json)
    # scope 0 reads every layer's small tensors, then one scope per layer its big ones (in the order written)
    small_refs = [r for p in plans for t in [*p.tensors, *p.dropped] if _small(t) for r in t.shards]
    big_refs = {p.layer.index: [r for t in p.tensors if not _small(t) for r in t.shards] for p in plans}
    reader = SourceReader(plan=[small_refs, *(big_refs[layer.index] for layer in target.layers)])
    try:
        with reader.scope() as reads:  # checked across ranks (replicas within the tolerance) before writing
            for plan in plans:
                where = f"{plan.layer.label} [{', '.join(plan.files)}]"
                for t in plan.dropped:  # checked identical on every rank and against the config; kept as it is
                    value = merged_tensor(replace(t, out_dtype=t.src_dtype), tolerance=0.0, where=where, reader=reads)
                    check_derived(t.key, value, t.src_dtype, config, where)
                    key = table_key(config, plan, t)
                    if key in _kept(saved[plan.layer.index], weights_dtype, dtype):
                        given.setdefault(plan.layer.index, {})[key] = Buffer(t.src_dtype, value)
                small[plan.layer.index] = {
                    t.hf_name: merged_tensor(t, tolerance=options.replica_tolerance, where=where, reader=reads)
                    for t in plan.tensors if _small(t)}
    except BaseException:
        reader.close()
        raise

    def stream(layer: SourceLayer, emit: Emit) -> None:
        with reader.scope() as reads:  # the layer's reads are checked as it closes (or with a later layer)
            full = _MergedLayer(by_index[layer.index], small[layer.index], reads)
            stream_shards(layer, full, emit, config=config, tp=options.tp, row_bias=row_bias, dtype=dtype,
                          generation=generation[layer.index], qkv_split=qkv_split, buffers=target.rotary_buffers,
                          given=given.get(layer.index))

    def confirmed(layers: list[SourceLayer]) -> bool:
        return reader.verified(r for layer in layers for t in [*by_index[layer.index].tensors,
                                                               *by_index[layer.index].dropped] for r in t.shards)

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
            Path(out), target, LayerStream(tensors, stream, confirmed, reader.check_served),
            source=source_identity(ckpt, out), recorded=recorded, fingerprint=fingerprint,
            planned_bytes=planned_bytes(config, options.tp, dtype, row_bias, target.rotary_buffers),
            tokenizer=tokenizer_json,
            guard=guard, resume=options.resume, force=options.force, quiet=options.quiet,
            allow_nonfinite=options.allow_nonfinite, hash_algo=options.hash, desc="reshard")
