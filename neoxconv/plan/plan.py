"""Planning: what a source holds and how every tensor of it merges, checked before a byte is read or written.

`plan_source` is the one entry point for a NeoX checkpoint: it locates the checkpoint and its config, resolves
the row-parallel bias rule and the QKV layout, and checks every layer's shards against the key table
(`neoxconv.merge.key_table`, in the files' own key generation) and the config. `merge`, `inspect`, `reshard`
and `verify --against` all plan through it. `plan_hf_folder` plans a Hugging Face folder for `split` through
the same table. Only tensor descriptions are read here, never tensor data.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from neoxconv.config import GELU_TANH, LLAMA, NeoXConfig
from neoxconv.dtypes import FLOAT_DTYPES, canonical_dtype, tensor_nbytes
from neoxconv.errors import CheckpointError, ConfigError, MergeError, few
from neoxconv.merge import (
    TE_LAYERNORM_MLP_EPS,
    TE_LAYERNORM_MLP_KEY,
    TE_ROW_PARALLEL_KEYS,
    QkvLayout,
    Rule,
    RuleSpec,
    Split,
    detect_generations,
    expected_shape,
    hf_name,
    key_table,
    layer_generation,
    output_names,
    resolve_qkv_split,
    resolve_row_bias,
    shape_of,
    split_segments,
    te_key_names,
)
from neoxconv.source.checkpoint import Checkpoint, LayerKind, SourceLayer, model_layers, open_checkpoint
from neoxconv.source.hf_folder import HFModel
from neoxconv.source.ptfile import ExtraState, TensorRef
from neoxconv.source.storage import SourceReader

log = logging.getLogger(__name__)


# ----- one layer ---------------------------------------------------------------------------------------
@dataclass
class TensorPlan:
    """How one output tensor is made: its rule, its shards, its output name, dtype and shape."""

    key: str
    hf_name: str
    rule: Rule
    shards: list[TensorRef]
    src_dtype: str
    out_dtype: str
    shape: tuple[int, ...]
    row_bias: bool = False  # a row-parallel bias (its rule came from --row-bias / the config)
    segments: tuple[tuple[int, int], ...] = ()  # SPLIT_ROWS: (start, count) rows taken from every rank, in order
    split: Split | None = None  # SPLIT_ROWS: the resolved split and which part of it this tensor is
    part: int = 0

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.out_dtype, self.shape)

    @property
    def rule_label(self) -> str:
        """The rule as the manifest records it."""
        if self.split is None:
            return self.rule.value
        return f"{self.rule.value}:{self.split.value}[{self.part}]"


@dataclass
class LayerPlan:
    layer: SourceLayer
    files: list[str]
    tensors: list[TensorPlan] = field(default_factory=list)
    dropped: list[TensorPlan] = field(default_factory=list)
    key_generation: str | None = None  # the key generation the files spell (None: no generation's own keys)
    extra_states: list[ExtraState] = field(default_factory=list)  # Transformer Engine's, every rank's: not written

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def _merged_shape(rule: Rule, shapes: list[tuple[int, ...]]) -> tuple[int, ...] | None:
    first = shapes[0]
    if rule is Rule.CONCAT_ROWS:
        if any(len(s) != len(first) or s[1:] != first[1:] for s in shapes) or not first:
            return None
        return (sum(s[0] for s in shapes), *first[1:])
    if rule is Rule.CONCAT_COLS:
        if any(len(s) != 2 for s in shapes) or any(s[0] != first[0] for s in shapes):
            return None
        return (first[0], sum(s[1] for s in shapes))
    return first if all(s == first for s in shapes) else None


def plan_layer(
    layer: SourceLayer,
    shards: list[dict[str, TensorRef]],
    *,
    files: list[str],
    config: NeoXConfig,
    row_bias: Rule,
    out_dtype: str | None,
    qkv_split: Split | None = None,
) -> LayerPlan:
    """Check a layer's shards against the rule table and config (metadata only); every problem at once.

    ``out_dtype=None`` keeps each tensor's source dtype. ``qkv_split`` resolves `Split.QKV` (Llama-style).
    """
    problems: list[str] = []
    bad_keys = False  # unknown/missing keys are a checkpoint problem; the rest are merge problems
    plan = LayerPlan(layer=layer, files=files)
    tp = len(shards)
    plan.key_generation = layer_generation(config, layer, shards, files)
    table = key_table(config, layer.kind, plan.key_generation)  # in the files' own spelling
    te_problem = _transformer_engine_problem(config, set(shards[0]) if shards else set(), tp, layer.kind)
    if te_problem:
        raise (CheckpointError if config.architecture == LLAMA else ConfigError)(
            f"{layer.label}, {files[0]}{' ...' if tp > 1 else ''}: {te_problem}")
    for rank, shard in enumerate(shards):
        unknown = sorted(set(shard) - set(table))
        if unknown:
            bad_keys = True
            more = f" (+{len(unknown) - 8} more)" if len(unknown) > 8 else ""
            problems.append(f"{files[rank]}: unknown key(s) {', '.join(map(repr, unknown[:8]))}{more} "
                            f"in a {layer.kind.value} layer")
        missing = sorted(k for k, spec in table.items() if not spec.optional and k not in shard)
        if missing:
            bad_keys = True
            problems.append(f"{files[rank]}: missing key(s) {', '.join(map(repr, missing))}")
    for key, spec in table.items():
        present = [rank for rank, shard in enumerate(shards) if key in shard]
        if not present or len(present) != tp:
            if present and spec.optional:
                problems.append(f"{key!r}: present on ranks {present} only, of {tp}")
            continue
        if spec.rule is Rule.EXTRA_STATE:  # fp8 scaling state, opaque (`ExtraState`): reported, not written
            plan.extra_states.extend(shards[r][key] for r in range(tp))
            continue
        refs = [shards[r][key] for r in range(tp)]
        rule = row_bias if spec.rule is Rule.ROW_BIAS else spec.rule
        dtypes = {r.dtype for r in refs}
        if len(dtypes) > 1:
            per_rank = ", ".join(f"rank {i}: {r.dtype}" for i, r in enumerate(refs))
            problems.append(f"{key!r}: dtype differs between ranks ({per_rank})")
            continue
        src_dtype = refs[0].dtype
        if spec.rule is not Rule.DROP and src_dtype not in FLOAT_DTYPES:
            problems.append(f"{key!r} in {files[0]}: dtype {src_dtype} is not a floating-point type")
            continue
        shapes = [r.shape for r in refs]
        if any(s != shapes[0] for s in shapes):  # NeoX splits evenly: every rank's shard has one shape
            per_rank = ", ".join(f"rank {i}: {list(s)}" for i, s in enumerate(shapes))
            problems.append(f"{key!r}: shape differs between ranks ({per_rank})")
            continue
        if rule is Rule.SPLIT_ROWS:
            split = qkv_split if spec.split is Split.QKV else spec.split
            if split is None or split is Split.QKV:
                raise ValueError("plan_layer needs qkv_split for a Llama-style QKV split")
            try:
                parts = _split_plans(key, spec, split, refs, layer, config, src_dtype, out_dtype or src_dtype)
            except ValueError as e:
                per_rank = ", ".join(f"rank {i}: {list(s)}" for i, s in enumerate(shapes))
                problems.append(f"{key!r}: does not fit split {split.value} ({per_rank}): {e}")
                continue
            plan.tensors.extend(parts)
            continue
        merged = _merged_shape(rule, shapes)
        if merged is None:
            per_rank = ", ".join(f"rank {i}: {list(s)}" for i, s in enumerate(shapes))
            problems.append(f"{key!r}: shapes do not fit rule {rule.value} ({per_rank})")
            continue
        if spec.shape == "mask" and not (len(merged) == 4 and merged[:2] == (1, 1) and merged[2] == merged[3]):
            problems.append(f"{key!r}: shape {list(merged)}, expected a causal mask [1, 1, P, P]")
            continue
        if spec.shape == "scalar" and math.prod(merged) != 1:
            problems.append(f"{key!r}: shape {list(merged)}, expected a single value")
            continue
        want = expected_shape(spec, config)
        if spec.shape == "R" and merged != (config.rotary_dims // 2,):
            problems.append(f"{key!r}: shape {list(merged)}, expected [{config.rotary_dims // 2}] (rotary dims / 2)")
            continue
        if want is not None and merged != want:
            problems.append(
                f"{key!r}: merged shape {list(merged)} (rule {rule.value} over {tp} ranks), config expects {list(want)}"
            )
            continue
        tp_plan = TensorPlan(
            key=key, hf_name=hf_name(spec, layer) or key, rule=rule, shards=refs,
            src_dtype=src_dtype, out_dtype=out_dtype or src_dtype, shape=merged, row_bias=spec.rule is Rule.ROW_BIAS,
        )
        (plan.dropped if rule is Rule.DROP else plan.tensors).append(tp_plan)
    if problems:
        error = CheckpointError if bad_keys else MergeError
        raise error(f"{layer.label}, {files[0]}{' ...' if tp > 1 else ''}: " + "; ".join(problems))
    return plan


def _transformer_engine_problem(config: NeoXConfig, keys: set[str], tp: int, kind: LayerKind) -> str | None:
    """Why a layer with Transformer Engine modules (told by its keys) cannot be converted as its config says;
    None when it can (or has none)."""
    if kind is LayerKind.BLOCK and config.te_layernorm_mlp and TE_LAYERNORM_MLP_KEY not in keys:
        return (f"the config sets te_layernorm_mlp (Transformer Engine's LayerNormMLP: tanh gelu, ffn size as given) "
                f"but the block holds no {TE_LAYERNORM_MLP_KEY!r}: the config is not this checkpoint's (remove "
                "te_layernorm_mlp, or pass the config it was trained with)")
    te = keys & te_key_names()
    if config.architecture == LLAMA and (te or any(k.endswith("_extra_state") for k in keys)):
        shown = ", ".join(map(repr, sorted(te or {k for k in keys if k.endswith("_extra_state")})[:4]))
        return (f"Transformer Engine keys ({shown}) in a Llama-style (rmsnorm) checkpoint are not supported: TE's "
                "fused QKV with grouped-query attention is laid out per kv group ([groups, heads/groups + 2, "
                "head_dim]) and gpt-neox's own converter maps TE names for GPT-NeoX models only")
    if config.parallel_residual and tp > 1 and keys & TE_ROW_PARALLEL_KEYS:
        shown = ", ".join(map(repr, sorted(keys & TE_ROW_PARALLEL_KEYS)))
        return (f"Transformer Engine row-parallel modules ({shown}) with gpt_j_residual at TP {tp}: TE's row-parallel "
                "Linear all-reduces its output itself and gpt-neox's parallel residual all-reduces it again, so the "
                f"trained function scales those outputs by {tp} and no Hugging Face model computes it; convert a "
                "TP 1 checkpoint of it, or one trained with gpt_j_residual false")
    if TE_LAYERNORM_MLP_KEY in keys:
        if config.activation != GELU_TANH:
            return (f"{TE_LAYERNORM_MLP_KEY!r} is TE LayerNormMLP, whose gelu is the tanh form, but the config gives "
                    f"{config.activation!r}: set te_layernorm_mlp: true (or bias-gelu-fusion: true) in the config")
        if config.layernorm_eps != TE_LAYERNORM_MLP_EPS:
            return (f"{TE_LAYERNORM_MLP_KEY!r} is TE LayerNormMLP, whose fused norm gpt-neox builds with eps "
                    f"{TE_LAYERNORM_MLP_EPS:g} while the other norms use layernorm-epsilon {config.layernorm_eps:g}; "
                    "a Hugging Face GPT-NeoX model has one epsilon")
    return None


def _split_plans(key: str, spec: RuleSpec, split: Split, refs: list[TensorRef], layer: SourceLayer,
                 config: NeoXConfig, src_dtype: str, out_dtype: str) -> list[TensorPlan]:
    """One plan per part of a SPLIT_ROWS key; raises ValueError when the shards do not fit the split."""
    tp, shape = len(refs), refs[0].shape
    if not shape:
        raise ValueError("a scalar cannot be split by rows")
    plans = []
    for part, (name, part_shape) in enumerate(spec.parts):
        segments = split_segments(split, part, shape[0], heads=config.num_heads // tp,
                                  kv_heads=config.kv_heads // tp, head_dim=config.head_dim)
        merged = (tp * sum(c for _, c in segments), *shape[1:])
        want = shape_of(part_shape, config)
        if want is not None and merged != want:
            hint = (" (gpt-neox sizes it from intermediate_size or expansion_factor and mlp_multiple_of, which "
                    "was 256 before 2024-09-10: check those settings)") if part_shape.startswith("F") else ""
            raise ValueError(f"part {part} ({name.format(i=layer.block)}) would be {list(merged)}, "
                             f"config expects {list(want)}{hint}")
        plans.append(TensorPlan(
            key=key, hf_name=name.format(i=layer.block), rule=Rule.SPLIT_ROWS, shards=refs, src_dtype=src_dtype,
            out_dtype=out_dtype, shape=merged, segments=tuple(segments), split=split, part=part))
    return plans


# ----- a NeoX checkpoint --------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlanOptions:
    """The options that decide how a source is read and merged (each command passes its own)."""

    dtype: str = "auto"  # auto (each tensor's own) | fp16 | bf16 | fp32
    row_bias: str = "auto"  # auto | sum | replicated
    qkv_layout: str = "auto"  # auto | blocked | interleaved (grouped-query attention of Llama-style models)
    config_path: Path | None = None
    tokenizer_path: Path | None = None
    strict: bool = True  # False: missing rank files are recorded (for inspect) and no layer is planned


@dataclass
class SourcePlan:
    """A checkpoint and how every tensor of it merges."""

    checkpoint: Checkpoint
    config: NeoXConfig  # vocab_size from the embedding's rows when the config did not say it
    row_bias: Rule  # SUM or REPLICATED: how row-parallel biases merge
    qkv: QkvLayout | None  # Llama-style: how the fused QKV rows lie (None for GPT-NeoX, kept fused)
    layers: list[LayerPlan]  # empty when rank files are missing (``strict=False``)

    @property
    def complete(self) -> bool:
        """Every rank file is there and every layer is planned."""
        return not self.checkpoint.missing_files

    @property
    def tensors(self) -> list[TensorPlan]:
        return [t for p in self.layers for t in p.tensors]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.layers)

    @property
    def fp8_state(self) -> str | None:
        """What `merge` and `inspect` say when Transformer Engine modules saved fp8 scaling state (None: none)."""
        held = [e for p in self.layers for e in p.extra_states if not e.empty]
        if not held:
            return None
        first = held[0]
        return (f"{len(held)} Transformer Engine _extra_state entr{'y holds' if len(held) == 1 else 'ies hold'} fp8 "
                f"scaling state (e.g. {first.path.name}: {first.name!r}, {first.nbytes} bytes as {first.form}): scales "
                "and amax histories, not weights (gpt-neox keeps the weights in params_dtype); not converted")

    @property
    def key_generation(self) -> str | list[str] | None:
        """The key generation the files spell (a list when layers differ; None when no layer tells)."""
        found = sorted({p.key_generation for p in self.layers if p.key_generation})
        return found[0] if len(found) == 1 else (found or None)


def plan_source(src: Path | Checkpoint, options: PlanOptions | None = None) -> SourcePlan:
    """THE planner of a NeoX checkpoint (``src``: its folder, or one already opened with `open_checkpoint`).

    Checks every layer against the key table and the config (tensor descriptions only) and raises, naming
    file, layer and key, for anything a merge would fail on.
    """
    options = options or PlanOptions()
    ckpt = src if isinstance(src, Checkpoint) else open_checkpoint(
        src, config_path=options.config_path, tokenizer_path=options.tokenizer_path, strict=options.strict)
    out_dtype = None if options.dtype == "auto" else canonical_dtype(options.dtype)
    row_bias = resolve_row_bias(options.row_bias, ckpt.config)
    if ckpt.missing_files:
        return SourcePlan(ckpt, ckpt.config, row_bias, None, [])
    ckpt = _without_tied_readout(ckpt)
    qkv = checkpoint_qkv_layout(ckpt, options.qkv_layout)
    config, layers = plan_checkpoint(ckpt, row_bias=row_bias, out_dtype=out_dtype, qkv=qkv)
    return SourcePlan(ckpt, config, row_bias, qkv, layers)


def _without_tied_readout(ckpt: Checkpoint) -> Checkpoint:
    """A tied config (``no-weight-tying: false``) with readout layer files present: the checkpoint without them
    when every rank's readout equals its embedding shard bit for bit (as split drops a tied readout), else a
    CheckpointError naming the files and the setting (transformers 5 would load a different readout untied,
    4.x would tie it to the embedding: the folder is ambiguous, never resolved silently)."""
    readouts = [layer for layer in ckpt.layers if layer.kind is LayerKind.READOUT]
    if not ckpt.config.tie_word_embeddings or not readouts:
        return ckpt
    files = [p.name for layer in readouts for p in ckpt.layer_files(layer)]
    embedding = next(layer for layer in ckpt.layers if layer.kind is LayerKind.EMBEDDING)
    same = True
    with SourceReader() as reader, reader.scope() as reads:  # the storages read are CRC-checked as it closes
        for rank in range(ckpt.tp_degree):
            emb = ckpt.tensors(embedding, rank).get("word_embeddings.weight")
            out = {k: r for layer in readouts for k, r in ckpt.tensors(layer, rank).items()}
            readout = out.get("final_linear.weight")
            if emb is None or readout is None or set(out) != {"final_linear.weight"} \
                    or not reads.same([emb, readout], key="final_linear.weight"):
                same = False
                break
    for layer in readouts:
        ckpt.release(layer)
    if not same:
        raise CheckpointError(
            f"{ckpt.config_source}: no-weight-tying is false (the readout is the embedding), but readout layer files "
            f"{few(files)} are present and differ from 'word_embeddings.weight' (transformers 5 would use them untied, "
            "4.x ties them to the embedding); set no-weight-tying: true to keep them as the readout, or remove them "
            "to tie it")
    log.info("%s: the readout equals the embedding (no-weight-tying: false): %s not written", ckpt.step_dir,
             few(files))
    return dataclasses.replace(ckpt, layers=[layer for layer in ckpt.layers if layer.kind is not LayerKind.READOUT])


def checkpoint_qkv_layout(ckpt: Checkpoint, choice: str = "auto") -> QkvLayout | None:
    """How a Llama-style checkpoint's fused QKV rows are laid out (None for GPT-NeoX, which keeps them fused).

    Decided by the config (GQA or not), the first block's key generation and ``--qkv-layout``.
    """
    if ckpt.config.architecture != LLAMA:
        if choice != "auto":
            raise ConfigError(f"{ckpt.config_source}: --qkv-layout applies to Llama-style (rmsnorm) models only; "
                              "GPT-NeoX models keep query_key_value fused")
        return None
    blocks = [layer for layer in ckpt.layers if layer.block is not None]
    found = detect_generations(ckpt.config, LayerKind.BLOCK, set(ckpt.tensors(blocks[0], 0)) if blocks else set())
    layout = resolve_qkv_split(choice, ckpt.config, ckpt.tp_degree, found[0] if len(found) == 1 else None)
    if layout.assumed:
        log.warning("assumed QKV layout %s: %s", layout.split.value, layout.reason)
    return layout


def plan_checkpoint(ckpt: Checkpoint, *, row_bias: Rule, out_dtype: str | None,
                    qkv: QkvLayout | None = None) -> tuple[NeoXConfig, list[LayerPlan]]:
    """Every layer's plan, checked against the key table and the config (tensor descriptions only).

    Returns the config with vocab_size taken from the embedding's rows when the config did not say it.
    ``qkv``: the resolved QKV layout of a Llama-style checkpoint (`checkpoint_qkv_layout`).
    """
    emb = ckpt.tensors(ckpt.layers[0], 0).get("word_embeddings.weight")
    if emb is None or not emb.shape:
        raise CheckpointError(f"{ckpt.layer_files(ckpt.layers[0])[0]}: no 'word_embeddings.weight' in the "
                              "embedding layer")
    config = ckpt.config
    if config.vocab_size is None:
        config = config.with_(vocab_size=emb.shape[0] * ckpt.tp_degree)
    plans = []
    for layer in ckpt.layers:
        files = [p.name for p in ckpt.layer_files(layer)]
        shards = [ckpt.tensors(layer, r) for r in range(ckpt.tp_degree)]
        plans.append(plan_layer(layer, shards, files=files, config=config, row_bias=row_bias, out_dtype=out_dtype,
                                qkv_split=None if qkv is None else qkv.split))
        ckpt.release(layer)  # the plan keeps the tensor references it needs
        first = next(p for p in plans if p.layer.block is not None) if layer.block is not None else None
        if config.architecture == LLAMA and first is not None and plans[-1].key_generation != first.key_generation:
            # the QKV layout was decided from the first block's generation: it cannot hold for this one
            raise CheckpointError(
                f"{files[0]}: {layer.label} has MLP keys {plans[-1].key_generation} but {first.files[0]} "
                f"({first.layer.label}) has {first.key_generation}: blocks of different gpt-neox versions "
                "(files mixed from different checkpoints?)")
    return config, plans


# ----- a Hugging Face folder (for split) ----------------------------------------------------------------
# Buffers that some transformers versions saved and that follow from the config: not weights, not written.
# rotary inv_freq: GPT-NeoX (gpt_neox.layers.{i}.attention.rotary_emb) and Llama before transformers 4.31
# (model.layers.{i}.self_attn.rotary_emb), checked against the config by `split`; causal-mask buffers.
_HF_ROTARY_SUFFIX = ".rotary_emb.inv_freq"
_HF_DERIVED_SUFFIXES = (_HF_ROTARY_SUFFIX, ".attention.bias", ".attention.masked_bias")
_HF_READOUTS = ("embed_out.weight", "lm_head.weight")  # the readout's names (transformers 4 and 5 GPT-NeoX, Llama)


@dataclass
class FolderPlan:
    """What `split` reads from a Hugging Face folder: per source layer, {NeoX key: Hugging Face name}."""

    config: NeoXConfig  # vocab_size from the embedding's rows
    names: dict[SourceLayer, dict[str, str]]  # SPLIT_ROWS parts are read as ``key#part`` (`part_key`)
    dtype: str  # the weights' dtype, or "mixed"
    embedding: str = ""  # the embedding's Hugging Face name
    rotary_buffers: tuple[str, ...] = ()  # saved inv_freq buffers: dropped once they match the config
    tied_readouts: tuple[str, ...] = ()  # readouts present although tie_word_embeddings is true: dropped only
    # when they equal the embedding (transformers 5 keeps a different one untied, transformers 4 ties it)


def part_key(key: str, part: int) -> str:
    """The name a SPLIT_ROWS key's part goes by in a layer's full tensors (``key#part``)."""
    return f"{key}#{part}"


def plan_hf_folder(hf: HFModel) -> FolderPlan:
    """Check every expected tensor of ``hf`` (names, shapes, dtypes) against the key table, all at once."""
    config = hf.config
    emb_name = key_table(config, LayerKind.EMBEDDING)["word_embeddings.weight"].hf_name or ""
    emb = hf.tensors.get(emb_name)
    if emb is not None and len(emb.shape) == 2 and emb.shape[0] != config.vocab_size:
        log.info("embedding has %d rows, config.json says vocab_size %s; using the rows", emb.shape[0],
                 config.vocab_size)
        config = config.with_(vocab_size=emb.shape[0])
    layers = model_layers(config, with_readout=not config.tie_word_embeddings)
    names: dict[SourceLayer, dict[str, str]] = {}
    problems: list[str] = []
    expected: set[str] = set()
    for layer in layers:
        names[layer] = {}
        for key, spec in key_table(config, layer.kind).items():
            outputs = output_names(spec)  # SPLIT_ROWS: one HF tensor per part, read as key#part
            for part, (template, shape) in enumerate(outputs):
                name = template.format(i=layer.block)
                expected.add(name)
                names[layer][part_key(key, part) if spec.rule is Rule.SPLIT_ROWS else key] = name
                t = hf.tensors.get(name)
                if t is None:
                    problems.append(f"missing {name!r}")
                    continue
                want = shape_of(shape, config)
                if want is not None and t.shape != want:
                    problems.append(f"{name!r} has shape {list(t.shape)}, config.json implies {list(want)}")
                if t.dtype not in FLOAT_DTYPES:
                    problems.append(f"{name!r} has dtype {t.dtype}, not a floating-point type")
    tied_readouts = tuple(n for n in _HF_READOUTS if n in hf.tensors) if config.tie_word_embeddings else ()
    # a *ForSequenceClassification score with a bias (transformers writes none): named apart, not a stray tensor
    score = key_table(config, LayerKind.READOUT).get("rm_linear.weight")
    score_bias = (score.hf_name or "").removesuffix("weight") + "bias" if score is not None else None
    if score_bias in hf.tensors:
        problems.append(f"{score_bias!r}: the score head has a bias, which gpt-neox's reward head rm_linear "
                        "(RowParallelLinear, bias=False) cannot hold; a reward model with a biased score is not a "
                        "gpt-neox model")
    unknown = sorted(n for n in hf.tensors if n not in expected and n not in tied_readouts
                     and n != score_bias and not n.endswith(_HF_DERIVED_SUFFIXES))
    if unknown:
        shown = ", ".join(map(repr, unknown[:8])) + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else "")
        problems.append(f"unknown tensor(s) {shown} (is this a GPT-NeoX model?)")
    if problems:
        raise CheckpointError(f"{hf.folder}: " + "; ".join(problems))
    dtypes = {hf.tensors[n].dtype for n in expected}
    rotary = tuple(sorted(n for n in hf.tensors if n.endswith(_HF_ROTARY_SUFFIX)))
    return FolderPlan(config, names, dtypes.pop() if len(dtypes) == 1 else "mixed", embedding=emb_name,
                      rotary_buffers=rotary, tied_readouts=tied_readouts)
