"""`split_model`: a Hugging Face GPT-NeoX (or Llama) folder becomes a gpt-neox checkpoint at tensor-parallel degree T.

The split runs the merge key table (`neoxconv.merge.key_table`, NeoX key -> rule and Hugging Face name) backwards;
the inverse of each rule is declared once, next to the rule (`neoxconv.merge.split_tensor`, `join_split`), and
buffers gpt-neox derives from the config are declared in `DERIVED`. A new architecture is a new key table.

    CONCAT_ROWS  -> rank r gets rows [r*n, (r+1)*n) (column- and vocab-parallel; the fused QKV is laid out
                    [heads, 3, head_dim], so a block of rows is a block of whole heads)
    CONCAT_COLS  -> rank r gets columns [r*n, (r+1)*n) (row-parallel weights)
    REPLICATED   -> every rank gets the tensor (layer norms; row-parallel biases without parallel residual)
    SUM          -> row-parallel biases with parallel residual (gpt_j_residual): each rank adds its part
                    before the all-reduce, so the parts must sum to the bias. Rank 0 gets the whole bias and
                    the other ranks zeros: b + 0 + ... + 0 == b exactly in any dtype and any summation order,
                    for every T (dividing by T is exact only for powers of two, and not for fp16 subnormals).
                    Training then updates every rank's part by the same gradient, which is what gpt-neox does.
    DROP         -> not written, except the buffers in DERIVED (attention.rotary_emb.inv_freq, computed as
                    gpt-neox computes it and stored in the checkpoint's dtype, as module.half() leaves it)
    SPLIT_ROWS   -> (Llama-style) each rank's rows of the fused tensor from its block of every part
                    (`merge.join_split`): QKV as today's gpt-neox lays it out ([heads, 3, head_dim] without GQA,
                    [Q|K|V] blocks with it; reshard keeps the source's layout), linear1 as [up | gate]

Only safetensors are read (never a pickle), in row blocks: memory is flat in the layer count and width.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from neoxconv.config import GPT_NEOX, LLAMA, NeoXConfig, ungated_intermediate_size
from neoxconv.dtypes import (
    NUMPY_DTYPES,
    TORCH_FLOAT_DTYPES,
    canonical_dtype,
    tensor_nbytes,
)
from neoxconv.errors import CheckpointError, ConfigError
from neoxconv.interrupt import deferred_sigint
from neoxconv.merge import (
    LLAMA_GATED_KEYS,
    LLAMA_W123_KEYS,
    NEOX_20B_KEYS,
    NEOX_LINEAR_KEYS,
    Rule,
    RuleSpec,
    Split,
    expected_shape,
    key_table,
    resolve_qkv_split,
    resolve_row_bias,
    rotary_inv_freq_close,
    shape_of,
    split_segments,
    split_tensor,
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
from neoxconv.plan.fingerprint import config_digest, file_fingerprint, public_place
from neoxconv.plan.plan import FolderPlan, plan_hf_folder
from neoxconv.source.checkpoint import SourceLayer, model_layers
from neoxconv.source.hf_folder import HFModel, HFRows
from neoxconv.source.tokenizer import checked_token_count

log = logging.getLogger(__name__)


# ----- the inverse rules (declared once, in neoxconv.merge: `split_tensor`, `join_split`), streamed -----------
def rotary_inv_freq(config: NeoXConfig, dtype: str) -> np.ndarray:
    """gpt-neox's RotaryEmbedding buffer, 1 / base^(2i/d) in fp32, then ``dtype``, as numpy bits (bfloat16 as uint16).

    Computed by torch, as gpt-neox computes it (torch's vectorised fp32 ``pow`` is not numpy's, and the bytes
    must be gpt-neox's). Needed only where no source carries the buffer: a split for a gpt-neox older than
    2024-03 (``--key-names 20b``), or a reshard that changes the dtype; everywhere else no torch is imported."""
    import torch

    d = config.rotary_dims
    t = (1.0 / (config.rotary_emb_base ** (torch.arange(0, d, 2).float() / d))).to(getattr(torch, dtype))
    return t.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else t.numpy()


# Rows are streamed ~1 MB at a time: each block is counted for inf/nan, CRC'd and hashed while in the CPU cache.
BLOCK_BYTES = 1 << 20

# Buffers gpt-neox derives from the config and saves in the block files only with ``rotary_save_freqs_buffer``
# (always before 2024-03, e109bf5e: persistent by default until then). Written when the target asks for them
# (`NeoXTarget.rotary_buffers`): a reshard copies the source's own checked bytes, a split computes them.
DERIVED: dict[str, Callable[[NeoXConfig, str], np.ndarray]] = {
    "attention.rotary_emb.inv_freq": rotary_inv_freq,
}


@dataclass(frozen=True)
class Buffer:
    """A derived buffer as a source holds it (checked identical on every rank): written as it is."""

    dtype: str
    value: np.ndarray  # numpy bits (bfloat16 as uint16)


class FullTensors(Protocol):
    """A layer's full (Hugging Face, or merged) tensors, read in row blocks in the output dtype (numpy bits).

    Keyed by their Hugging Face names (`_hf`): the same in every key generation of the NeoX files."""

    def shape(self, key: str) -> tuple[int, ...]: ...

    def rows(self, key: str, start: int, count: int) -> np.ndarray: ...

    def filler(self, key: str, start: int, count: int) -> Callable[[memoryview], None] | None:
        """A reader of rows ``start .. start + count`` straight into the caller's consecutive views (each a
        multiple of the element size), for `Emit.fill`; None when the rows need a cast or a gather."""


def _hf(spec: RuleSpec, layer: SourceLayer, part: int | None = None) -> str:
    """The Hugging Face name of a row's tensor (``part`` of a SPLIT_ROWS row)."""
    template = spec.hf_name if part is None else spec.parts[part][0]
    return (template or "").format(i=layer.block)


def _written(config: NeoXConfig, layer: SourceLayer, generation: str | None,
             buffers: bool) -> list[tuple[str, RuleSpec]]:
    """(key as written, row) of every tensor a rank file of ``layer`` holds, in the key table's order
    (``buffers``: with the derived buffers of `DERIVED`)."""
    return [(key, spec) for key, spec in key_table(config, layer.kind, generation).items()
            if spec.rule not in (Rule.DROP, Rule.EXTRA_STATE) or (buffers and spec.key in DERIVED)]


def shard_tensors(layer: SourceLayer, full: FullTensors, *, config: NeoXConfig, tp: int, row_bias: Rule, dtype: str,
                  generation: str | None = None, buffers: bool = False,
                  given: Mapping[str, Buffer] | None = None) -> list[ShardTensor]:
    """What each rank's file of ``layer`` holds (key, dtype, each rank's shape), in file order (metadata only);
    ``buffers``: with the derived buffers (`DERIVED`), ``given`` ones in their own dtype (`stream_shards`)."""
    out = []
    for key, spec in _written(config, layer, generation, buffers):
        rule = row_bias if spec.rule is Rule.ROW_BIAS else spec.rule
        if rule is Rule.DROP:
            shape: tuple[int, ...] = (config.rotary_dims // 2,)
            if given and spec.key in given:
                out.append(ShardTensor(key, given[spec.key].dtype, shape))
                continue
        elif rule is Rule.SPLIT_ROWS:
            parts = [full.shape(_hf(spec, layer, i)) for i in range(len(spec.parts))]
            shape = (sum(p[0] for p in parts) // tp, *parts[0][1:])
        else:
            shape = full.shape(_hf(spec, layer))
            if rule is Rule.CONCAT_ROWS:
                shape = (shape[0] // tp, *shape[1:])
            elif rule is Rule.CONCAT_COLS:
                shape = (shape[0], shape[1] // tp)
        out.append(ShardTensor(key, dtype, shape))
    return out


def _step(shape: tuple[int, ...], itemsize: int, block_bytes: int) -> int:
    """Rows per block of a tensor of ``shape``."""
    return max(1, block_bytes // max(1, itemsize * math.prod(shape[1:])))


def stream_shards(layer: SourceLayer, full: FullTensors, emit: Emit, *, config: NeoXConfig, tp: int, row_bias: Rule,
                  dtype: str, generation: str | None = None, qkv_split: Split | None = None, buffers: bool = False,
                  given: Mapping[str, Buffer] | None = None, block_bytes: int = BLOCK_BYTES) -> None:
    """Every rank's shard of ``layer``, streamed to ``emit(rank, index, block)`` in row blocks, each source
    row read once (the inverse of each merge rule, `neoxconv.merge.split_tensor` / `join_split`, block by block).

    ``generation``: how the written keys are spelled (`merge.key_table`; None: the architecture's first).
    ``qkv_split``: the Llama-style QKV layout to write (default: today's gpt-neox layout, `current_split`).
    Row-parallel biases under SUM: rank 0 the whole bias, the others zeros (`split_tensor`).
    ``buffers``: write the derived buffers (`DERIVED`): ``given`` ones (by table key: a source's own, checked
    across its ranks) as they are, in their own dtype; the others computed in ``dtype``.
    """
    itemsize = NUMPY_DTYPES[dtype].itemsize
    for index, (_, spec) in enumerate(_written(config, layer, generation, buffers)):
        rule = row_bias if spec.rule is Rule.ROW_BIAS else spec.rule
        if rule is Rule.DROP:  # a buffer gpt-neox derives from the config, saved with rotary_save_freqs_buffer
            value = given[spec.key].value if given and spec.key in given else DERIVED[spec.key](config, dtype)
            for r in range(tp):
                emit(r, index, value)
        elif rule is Rule.SPLIT_ROWS:  # rank r's rows: block r of every part, where the split places it
            split = (qkv_split or current_split(config)) if spec.split is Split.QKV else spec.split
            names = [_hf(spec, layer, i) for i in range(len(spec.parts))]
            part_rows = [full.shape(n)[0] // tp for n in names]
            pieces = []  # (start in the rank's rows, count, part, offset in the part's block)
            for part in range(len(spec.parts)):
                done = 0
                for start, count in split_segments(split, part, sum(part_rows), heads=config.num_heads // tp,
                                                   kv_heads=config.kv_heads // tp, head_dim=config.head_dim):
                    pieces.append((start, count, part, done))
                    done += count
            for r in range(tp):
                for _, count, part, offset in sorted(pieces):
                    _emit_rows(emit, r, index, full, names[part], r * part_rows[part] + offset, count,
                               itemsize=itemsize, block_bytes=block_bytes)
        elif rule is Rule.CONCAT_ROWS:  # rank r: its block of rows
            k = _hf(spec, layer)
            n = full.shape(k)[0] // tp
            for r in range(tp):
                _emit_rows(emit, r, index, full, k, r * n, n, itemsize=itemsize, block_bytes=block_bytes)
        elif rule is Rule.CONCAT_COLS:  # every row block, cut into the ranks' columns
            k = _hf(spec, layer)
            rows, cols = full.shape(k)
            w, step = cols // tp, _step((rows, cols), itemsize, block_bytes)
            for i in range(0, rows, step):
                block = full.rows(k, i, min(step, rows - i))
                for r in range(tp):
                    emit(r, index, block[:, r * w:(r + 1) * w])
        else:  # REPLICATED / SUM: small vectors, whole
            k = _hf(spec, layer)
            value = full.rows(k, 0, full.shape(k)[0])
            for r, part in enumerate(split_tensor(rule, value, tp)):
                emit(r, index, part)


def _emit_rows(emit: Emit, rank: int, index: int, full: FullTensors, key: str, first: int, count: int, *,
               itemsize: int, block_bytes: int) -> None:
    """Rows ``first .. first + count`` of ``key`` to ``rank``: read straight into its file's staging buffer
    when they need no cast (`FullTensors.filler`), else in row blocks."""
    shape = full.shape(key)
    filler = full.filler(key, first, count)
    if filler is not None:
        emit.fill(rank, index, count * math.prod(shape[1:]) * itemsize, filler, itemsize)
        return
    step = _step(shape, itemsize, block_bytes)
    for i in range(0, count, step):
        emit(rank, index, full.rows(key, first + i, min(step, count - i)))


def current_split(config: NeoXConfig) -> Split:
    """The QKV layout today's gpt-neox expects: per head without GQA, [Q|K|V] blocks per rank with it."""
    return Split.QKV_BLOCKS if config.gqa else Split.QKV_PER_HEAD


def planned_bytes(config: NeoXConfig, tp: int, dtype: str, row_bias: Rule, buffers: bool = False) -> int:
    """Bytes of weights the split writes (replicated tensors count once per rank; ``buffers``: derived ones too)."""
    total = 0
    for layer in model_layers(config, with_readout=not config.tie_word_embeddings):
        for spec in key_table(config, layer.kind).values():
            rule = row_bias if spec.rule is Rule.ROW_BIAS else spec.rule
            if rule is Rule.DROP:
                derived = buffers and spec.key in DERIVED
                total += tp * tensor_nbytes(dtype, (config.rotary_dims // 2,)) if derived else 0
                continue
            if rule is Rule.SPLIT_ROWS:
                total += sum(tensor_nbytes(dtype, shape_of(s, config) or ()) for _, s in spec.parts)
                continue
            shape = expected_shape(spec, config) or ()
            total += tensor_nbytes(dtype, shape) * (1 if rule in (Rule.CONCAT_ROWS, Rule.CONCAT_COLS) else tp)
    return total


def tokenizer_size(path: Path | None, rows: int | None) -> int | None:
    """Entries of a tokenizer.json (largest id + 1 over the vocabulary and added tokens); None if unknown or no
    tokenizer. Checked as merge checks it (`checked_token_count`): a broken one is a CheckpointError naming it,
    never copied into OUT."""
    return None if path is None else checked_token_count(path, rows)


def check_dropped_tensors(hf: HFModel, planned: FolderPlan) -> None:
    """What split drops must be what the config derives: saved rotary buffers must hold the config's
    frequencies, and a readout present beside tie_word_embeddings must equal the embedding (never dropped
    silently: transformers 5 keeps a different one untied, transformers 4 ties it, so the folder is ambiguous)."""
    config, where = planned.config, hf.folder / "config.json"
    with hf.open_rows() as rows:
        for name in planned.rotary_buffers:
            t = hf.tensors[name]
            if not rotary_inv_freq_close(config, rows.rows(name, 0, t.shape[0] if t.shape else 1, t.dtype), t.dtype):
                raise ConfigError(
                    f"{where}: {name!r} holds rotary frequencies {list(t.shape)} that the config does not give "
                    f"(head_dim {config.head_dim}, rotary dims {config.rotary_dims}, base {config.rotary_emb_base:g}: "
                    f"{config.rotary_dims // 2} values 1/base^(2i/d)); check rope_theta / rotary_pct in config.json")
        rows.check_unchanged()
    for name in planned.tied_readouts:
        if not hf.same_values(planned.embedding, name):
            raise CheckpointError(
                f"{where}: tie_word_embeddings is true, but {name!r} differs from {planned.embedding!r} "
                f"(transformers 5 then uses {name!r} untied, transformers 4 ties it to {planned.embedding!r}); "
                f"set tie_word_embeddings "
                f"to false in config.json to keep {name!r} as the readout, or remove it from the folder to tie them")


# ----- which gpt-neox reads it ----------------------------------------------------------------------------------
KEY_NAMES = ("current", "20b")
# --key-names -> the key table's generation (`merge.key_table`) per architecture. gpt-neox renamed the MLP in
# 2024-09 (0d4bdb96, with mlp_multiple_of defaulting to 1 since adbf5d6f): ParallelMLP.linear1/linear2, gated
# for Llama-style models. Before: ParallelMLP.dense_h_to_4h/dense_4h_to_h (4 x hidden, with biases) and, with
# mlp_type llama (2023-05 .. 2024-09), LLaMAParallelMLP.w1 (gate) / w3 (up) / w2 (down), without biases.
_GENERATION = {("current", GPT_NEOX): NEOX_LINEAR_KEYS, ("20b", GPT_NEOX): NEOX_20B_KEYS,
               ("current", LLAMA): LLAMA_GATED_KEYS, ("20b", LLAMA): LLAMA_W123_KEYS}


def key_generation(config: NeoXConfig, key_names: str, *, tp: int, where: str) -> tuple[str, Split | None]:
    """(the key generation ``--key-names`` writes, the QKV layout that gpt-neox version expects); a ConfigError
    when that gpt-neox version cannot hold the model."""
    if key_names not in KEY_NAMES:
        raise ConfigError(f"--key-names must be one of {', '.join(KEY_NAMES)}, got {key_names!r}")
    generation = _GENERATION[key_names, config.architecture]
    if generation == NEOX_20B_KEYS and config.ffn_size != 4 * config.hidden_size:
        raise ConfigError(f"{where}: intermediate_size {config.ffn_size} is not 4 x hidden_size; gpt-neox before "
                          "2024-09 (mlp.dense_h_to_4h) cannot size its MLP so: use --key-names current")
    if generation == NEOX_LINEAR_KEYS:  # today's ParallelMLP rounds linear1's rows to an even count
        try:
            ungated_intermediate_size(config.hidden_size, intermediate_size=config.ffn_size)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
    if generation == LLAMA_W123_KEYS and config.mlp_bias:
        raise ConfigError(f"{where}: the MLP has biases, which gpt-neox's LLaMAParallelMLP (mlp_type llama, "
                          "mlp.w1/w2/w3) does not: use --key-names current")
    if generation == LLAMA_W123_KEYS and config.gqa:  # gpt-neox 2024-02 .. 2024-09: rows interleaved per query head
        return generation, resolve_qkv_split("interleaved", config, tp, generation).split
    return generation, None


# ----- the job ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SplitOptions:
    tp: int
    layout: str | None = None  # pipeline | sequential; None: pipeline, sequential for a reward model (`output_layout`)
    dtype: str = "auto"  # auto (the weights' own) | fp16 | bf16 | fp32
    step: int = 0
    tokenizer_path: Path | None = None
    allow_nonfinite: bool = False  # write inf/nan (with a warning) instead of failing
    resume: bool = True
    force: bool = False
    quiet: bool = False
    hash: str = DEFAULT_HASH  # the digest the manifest records for every file
    key_names: str = "current"  # current: mlp.linear1/linear2 (gpt-neox since 2024-09); 20b: the names before
    dry_run: bool = False  # plan only: the files, their bytes and the free disk (`NeoXOutputPlan`), nothing written


def _source_identity(hf: HFModel, out: Path) -> dict[str, Any]:
    """Which source this is (folder, by `public_place`, and weight files); what each file holds is proven per
    output file."""
    return {"hf_dir": public_place(hf.folder, out), "files": sorted({t.file.name for t in hf.tensors.values()})}


def split_model(hf_dir: Path, out: Path, options: SplitOptions) -> WriteReport | NeoXOutputPlan:
    """Split the Hugging Face GPT-NeoX model at ``hf_dir`` into a NeoX checkpoint at TP ``options.tp`` in ``out``.

    Everything is checked (config, names, shapes, dtypes, divisibility) before the first byte is written; then
    every rank file of a layer is written side by side while the safetensors rows stream through (each read
    once, in row blocks: memory flat in the layer count and width). ``options.dry_run``: the `NeoXOutputPlan`
    of what it would write, after the same checks; no tensor data read, nothing written.
    """
    if not options.dry_run:  # (a dry run reports it)
        check_out_path(Path(out))
    hf = HFModel(hf_dir, tokenizer_path=options.tokenizer_path)
    planned = plan_hf_folder(hf)
    config, names, src_dtype = planned.config, planned.names, planned.dtype
    check_dropped_tensors(hf, planned)
    if options.dtype == "auto":
        if src_dtype == "mixed":
            raise ConfigError(f"{hf_dir}: the weights have mixed dtypes; choose one with --dtype fp16|bf16|fp32")
        dtype = src_dtype
    else:
        dtype = canonical_dtype(options.dtype)
    if dtype not in TORCH_FLOAT_DTYPES:
        raise ConfigError(f"{hf_dir}: weights are {dtype}; choose --dtype fp16, bf16 or fp32")
    generation, qkv_split = key_generation(config, options.key_names, tp=options.tp,
                                           where=str(Path(hf_dir) / "config.json"))
    # gpt-neox saves the rotary buffers only with rotary_save_freqs_buffer since 2024-03 (e109bf5e), always
    # before: the 20B-era gpt-neox that reads `--key-names 20b` files needs them, a current one does not
    buffers = generation == NEOX_20B_KEYS
    layout = output_layout(config, options.layout)
    target = NeoXTarget(config=config, tp_degree=options.tp, layout=layout, dtype=dtype, step=options.step,
                        tokenizer_size=tokenizer_size(hf.tokenizer, config.vocab_size), generation=generation,
                        rotary_buffers=buffers)
    check_target(target, where=str(Path(hf_dir) / "config.json"))
    row_bias = resolve_row_bias("auto", config)
    rows = hf.open_rows()

    full = _HFLayer(rows, dtype)

    def tensors(layer: SourceLayer) -> list[ShardTensor]:
        return shard_tensors(layer, full, config=config, tp=options.tp, row_bias=row_bias, dtype=dtype,
                             generation=generation, buffers=buffers)

    def stream(layer: SourceLayer, emit: Emit) -> None:
        stream_shards(layer, full, emit, config=config, tp=options.tp, row_bias=row_bias, dtype=dtype,
                      generation=generation, qkv_split=qkv_split, buffers=buffers)
        rows.check_unchanged()  # what was written is what the checked headers describe

    if options.dry_run:
        rows.close()
        return plan_neox_output(Path(out), target, tensors, tokenizer=hf.tokenizer)
    config_sha = config_digest(config)
    file_fps: dict[Path, dict[str, Any]] = {}

    def fingerprint(layers: list[SourceLayer]) -> dict[str, Any]:
        """The proof of what ``layers`` read: the config and each safetensors file holding their tensors."""
        files = sorted({hf.tensors[n].file for layer in layers for n in names[layer].values()})
        for f in files:
            if f not in file_fps:
                file_fps[f] = file_fingerprint(f, safetensors_header=True)
        return {"config": config_sha, "files": {f.name: file_fps[f] for f in files}}

    recorded = {"command": "split", "tp": options.tp, "layout": layout, "dtype": dtype, "step": options.step,
                "key_names": options.key_names, "key_generation": generation}
    with rows, deferred_sigint() as guard:
        return write_neox_checkpoint(
            Path(out), target, LayerStream(tensors, stream), source=_source_identity(hf, Path(out)), recorded=recorded,
            fingerprint=fingerprint, planned_bytes=planned_bytes(config, options.tp, dtype, row_bias, buffers),
            tokenizer=hf.tokenizer, guard=guard, resume=options.resume, force=options.force, quiet=options.quiet,
            allow_nonfinite=options.allow_nonfinite, hash_algo=options.hash)


class _HFLayer:
    """The Hugging Face tensors as `FullTensors`: row blocks read from the safetensors files and cast."""

    def __init__(self, rows: HFRows, dtype: str) -> None:
        self._rows, self._dtype = rows, dtype

    def shape(self, name: str) -> tuple[int, ...]:
        return self._rows.model.tensors[name].shape

    def rows(self, name: str, start: int, count: int) -> np.ndarray:
        return self._rows.rows(name, start, count, self._dtype)

    def filler(self, name: str, start: int, count: int) -> Callable[[memoryview], None] | None:
        t = self._rows.model.tensors[name]
        if t.dtype != self._dtype or not t.shape:
            return None
        pos = [start * tensor_nbytes(t.dtype, t.shape[1:])]

        def fill(view: memoryview) -> None:
            self._rows.read_into(name, pos[0], view)
            pos[0] += len(view)

        return fill
