"""The merge rules as one table, pure functions that merge N shards, and per-layer validation.

How T tensor-parallel shards become one tensor (see DESIGN.md section 2):

    CONCAT_ROWS  column- and vocab-parallel: every rank holds a block of output rows -> concat dim 0
                 (fused QKV is laid out [heads, 3, head_dim], so each rank holds whole heads, in order)
    CONCAT_COLS  row-parallel weights: every rank holds a block of input columns -> concat dim 1
    SUM          row-parallel biases with parallel residual: each rank adds its part before the
                 all-reduce, so the effective bias is the sum (computed in fp32, then cast)
    REPLICATED   identical on every rank: check agreement within a tolerance; bit-identical ranks give
                 rank 0's bytes (a mean of 3 equal fp32 values can move by 1 ulp), else the fp32 mean
    DROP         derived buffers (rotary inv_freq, causal-mask buffers): check identical, not written

    SPLIT_ROWS   one column-parallel tensor that holds several Hugging Face tensors: each rank's rows divide
                 by a named `Split` (GQA [Q|K|V] blocks, per-head QKV, gated [up|gate] halves), each part is
                 taken per rank, then the ranks' parts are concatenated (never concat-then-split: wrong for TP > 1)

Row-parallel biases are ``ROW_BIAS`` in the table and resolve to SUM or REPLICATED by option/config; the QKV
split of Llama-style models is ``Split.QKV`` in the table and resolves by config and ``--qkv-layout``.

One key table per architecture: GPT-NeoX (``RULES``, 20B-style) and Llama-style (``LLAMA_RULES``: RMSNorm
``scale``, gated MLP as ``mlp.linear1/linear2`` since gpt-neox 2024-09 or ``mlp.w1/w2/w3`` before, optional
biases). Each row carries its key generations (aliases, or the generations that have it), whether it is
optional and the config flag it needs; `key_table` gives a layer kind's rows in a source's own spelling, and
every command that reads or writes NeoX keys goes through it.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, replace

import numpy as np

from neoxconv.config import GPT_NEOX, LLAMA, NeoXConfig
from neoxconv.dtypes import FLOAT_DTYPES, FLOAT_EPS, from_f32, to_f32
from neoxconv.errors import CheckpointError, ConfigError, MergeError
from neoxconv.source.checkpoint import LayerKind, SourceLayer


class Rule(str, enum.Enum):
    CONCAT_ROWS = "concat_dim0"
    CONCAT_COLS = "concat_dim1"
    SUM = "sum"
    REPLICATED = "replicated"
    DROP = "drop"
    ROW_BIAS = "row_bias"  # resolved to SUM or REPLICATED
    SPLIT_ROWS = "split_rows"  # per-rank parts by a `Split`, then concat over ranks
    EXTRA_STATE = "extra_state"  # Transformer Engine's `_extra_state` (fp8 scaling state): opaque, not written


class Split(str, enum.Enum):
    """How each rank's rows of one column-parallel NeoX tensor divide into Hugging Face tensors (gpt-neox
    megatron/model/transformer.py). Every rank holds a contiguous block of output rows, laid out so:"""

    QKV = "qkv"  # placeholder in the table, resolved by `resolve_qkv_split`
    QKV_PER_HEAD = "qkv_per_head"  # no GQA: [local heads, 3, head_dim] (the 20B interleave) -> q, k, v
    QKV_BLOCKS = "qkv_gqa_blocks"  # GQA since 2024-11: [Q local heads | K local kv heads | V local kv heads]
    QKV_INTERLEAVED = "qkv_gqa_interleaved"  # GQA 2024-02..2024-11: per local query head [Q | K/g | V/g]
    GATED_HALVES = "gated_halves"  # gated linear1: [first half: up (x) | second half: gate (through SiLU)]


@dataclass(frozen=True)
class RuleSpec:
    """One row of an architecture's key table (as mergekit's ``WeightInfo``): how the tensor merges, what it
    is called in Hugging Face, its merged shape, and under which key it appears in which key generation."""

    rule: Rule
    hf_name: str | None  # "{i}" is the transformer block number; None for dropped and split keys
    shape: str  # merged shape in config terms: V vocab, H hidden, F ffn, KV kv heads x head_dim, 1 one row
    split: Split | None = None  # SPLIT_ROWS: how each rank's rows divide
    parts: tuple[tuple[str, str], ...] = ()  # SPLIT_ROWS: (hf_name, shape) of each part, in the split's order
    aliases: tuple[tuple[str, str], ...] = ()  # (key generation, key): where a generation spells it otherwise
    generations: tuple[str, ...] = ()  # the key generations that have this tensor (empty: every one)
    optional: bool = False  # may be absent (buffers only some writers save)
    when: str | None = None  # a NeoXConfig flag that must be true for the key to exist (e.g. "mlp_bias")
    key: str = ""  # the row's own key in the table (filled in by `key_table`)

    def spelled(self, key: str, generation: str) -> str | None:
        """This row's key (``key`` in the table) as ``generation`` spells it; None: that generation has none."""
        if self.generations and generation not in self.generations:
            return None
        return dict(self.aliases).get(generation, key)


@dataclass(frozen=True)
class KeyTable:
    """One architecture: its rows per layer kind, keyed by the table's own key, and its key generations."""

    architecture: str
    generations: tuple[str, ...]  # every key generation; the first is `key_table`'s default
    layers: dict[LayerKind, dict[str, RuleSpec]]


# GPT-NeoX key generations: gpt-neox renamed the GELU MLP's projections in 2024-09 (same math, same Hugging
# Face names): mlp.dense_h_to_4h/dense_4h_to_h (the 20B release) became mlp.linear1/linear2. Since 2024-12
# (gpt-neox 8900d05c, "TransformerEngine Integration") Transformer Engine modules can replace the attention
# (te_mha: TEMultiheadAttention) and the post-attention norm + MLP (te_layernorm_mlp: TELayerNormMLP), each on
# its own: three more generations, spelled as TE's modules name their parameters (checked at gpt-neox ea7aefd8,
# megatron/model/transformer.py and transformer_engine.py; TE v1.12 and d0067d0d, pytorch/attention.py
# MultiheadAttention with input_layernorm=False, fuse_qkv_params=True; pytorch/module/layernorm_mlp.py):
#   attention.query_key_value.* -> attention.qkv.*   (TE Linear, parameters_split None: "weight", "bias"; no GQA
#                                  for GPT-NeoX, so qkv_weight_interleaved rows are [groups = heads, 3, head_dim]:
#                                  the 20B layout, column-parallel: concat dim 0)
#   attention.dense.*           -> attention.proj.*  (TE Linear, parallel_mode "row")
#   attention.rotary_emb        -> attention.rotary_embeddings (gpt-neox's TEMultiheadAttention names it so)
#   post_attention_layernorm.*  -> mlp.layer_norm_{weight,bias} (fused into LayerNormMLP; no other norm key)
#   mlp.linear1/linear2.*       -> mlp.fc1_{weight,bias} / mlp.fc2_{weight,bias}
# Every TE module saves an `_extra_state` entry (fp8 scaling state, `Rule.EXTRA_STATE`); te_columnparallel /
# te_rowparallel swap in TE Linears under the linear1/linear2 names, which then carry `_extra_state` too.
# TE's row-parallel Linears hold the full bias on every rank and add it once, after their own all-reduce
# (module/linear.py: bias of out_features, "bias has to be added after TP collectives"): with gpt_j_residual
# at TP > 1 gpt-neox all-reduces their output a second time, which `plan` refuses.
NEOX_20B_KEYS, NEOX_LINEAR_KEYS = "dense_h_to_4h/dense_4h_to_h", "linear1/linear2"
NEOX_TE_KEYS = "te_mha+te_layernorm_mlp"  # what gpt-neox's converter calls "transformer_engine"
NEOX_TE_MHA_KEYS, NEOX_TE_MLP_KEYS = "te_mha", "te_layernorm_mlp"
TE_GENERATIONS = (NEOX_TE_KEYS, NEOX_TE_MHA_KEYS, NEOX_TE_MLP_KEYS)
_TE_ATTENTION, _TE_MLP = (NEOX_TE_KEYS, NEOX_TE_MHA_KEYS), (NEOX_TE_KEYS, NEOX_TE_MLP_KEYS)
_BLOCK = "gpt_neox.layers.{i}."
_LINEAR12 = {"dense_h_to_4h": "linear1", "dense_4h_to_h": "linear2"}
_TE_FC = {"dense_h_to_4h": "fc1", "dense_4h_to_h": "fc2"}


def _renamed(key: str) -> tuple[tuple[str, str], ...]:
    """The later spellings of a 20B MLP key: ``linear1/linear2`` (also under te_mha) and TE LayerNormMLP's."""
    module, _, param = key.removeprefix("mlp.").partition(".")
    linear = f"mlp.{_LINEAR12[module]}.{param}"
    return ((NEOX_LINEAR_KEYS, linear), (NEOX_TE_MHA_KEYS, linear),
            *((g, f"mlp.{_TE_FC[module]}_{param}") for g in _TE_MLP))


def _te_attention(key: str) -> tuple[tuple[str, str], ...]:
    """TE MultiheadAttention's spelling of an attention key (``attention.qkv``/``attention.proj``)."""
    te = key.replace("query_key_value", "qkv").replace("attention.dense", "attention.proj")
    return tuple((g, te) for g in _TE_ATTENTION)


def _extra_state(generations: tuple[str, ...]) -> RuleSpec:
    """A TE module's ``_extra_state`` entry (optional: written by TE modules only, dropped by the merge)."""
    return RuleSpec(Rule.EXTRA_STATE, None, "extra_state", generations=generations, optional=True)


# Keys that tell which TE modules a layer has (`plan` checks what each implies)
TE_ROW_PARALLEL_KEYS = frozenset({"attention.proj.weight", "mlp.fc2_weight", "attention.dense._extra_state",
                                  "mlp.linear2._extra_state"})  # TE Linears in parallel_mode "row"
TE_LAYERNORM_MLP_KEY = "mlp.fc1_weight"  # TE LayerNormMLP: tanh gelu (common/util/math.h), its norm's eps fixed
TE_LAYERNORM_MLP_EPS = 1e-5  # gpt-neox TELayerNormMLP: self.eps = 1.0e-5 for (te_)layernorm, whatever the config

_NOT_TE_ATTENTION = (NEOX_LINEAR_KEYS, NEOX_TE_MLP_KEYS)  # query_key_value/dense (TE Linears with te_*parallel)
_NOT_TE_MLP = (NEOX_LINEAR_KEYS, NEOX_TE_MHA_KEYS)  # linear1/linear2 (TE Linears with te_*parallel)

RULES: dict[LayerKind, dict[str, RuleSpec]] = {
    LayerKind.EMBEDDING: {
        "word_embeddings.weight": RuleSpec(Rule.CONCAT_ROWS, "gpt_neox.embed_in.weight", "V,H"),
    },
    LayerKind.BLOCK: {
        "input_layernorm.weight": RuleSpec(Rule.REPLICATED, _BLOCK + "input_layernorm.weight", "H"),
        "input_layernorm.bias": RuleSpec(Rule.REPLICATED, _BLOCK + "input_layernorm.bias", "H"),
        "attention.query_key_value.weight": RuleSpec(Rule.CONCAT_ROWS, _BLOCK + "attention.query_key_value.weight",
                                                     "3H,H", aliases=_te_attention("attention.query_key_value.weight")),
        "attention.query_key_value.bias": RuleSpec(Rule.CONCAT_ROWS, _BLOCK + "attention.query_key_value.bias", "3H",
                                                   aliases=_te_attention("attention.query_key_value.bias")),
        "attention.dense.weight": RuleSpec(Rule.CONCAT_COLS, _BLOCK + "attention.dense.weight", "H,H",
                                           aliases=_te_attention("attention.dense.weight")),
        "attention.dense.bias": RuleSpec(Rule.ROW_BIAS, _BLOCK + "attention.dense.bias", "H",
                                         aliases=_te_attention("attention.dense.bias")),
        "post_attention_layernorm.weight": RuleSpec(Rule.REPLICATED, _BLOCK + "post_attention_layernorm.weight", "H",
                                                    aliases=tuple((g, "mlp.layer_norm_weight") for g in _TE_MLP)),
        "post_attention_layernorm.bias": RuleSpec(Rule.REPLICATED, _BLOCK + "post_attention_layernorm.bias", "H",
                                                  aliases=tuple((g, "mlp.layer_norm_bias") for g in _TE_MLP)),
        "mlp.dense_h_to_4h.weight": RuleSpec(Rule.CONCAT_ROWS, _BLOCK + "mlp.dense_h_to_4h.weight", "F,H",
                                             aliases=_renamed("mlp.dense_h_to_4h.weight")),
        "mlp.dense_h_to_4h.bias": RuleSpec(Rule.CONCAT_ROWS, _BLOCK + "mlp.dense_h_to_4h.bias", "F",
                                           aliases=_renamed("mlp.dense_h_to_4h.bias")),
        "mlp.dense_4h_to_h.weight": RuleSpec(Rule.CONCAT_COLS, _BLOCK + "mlp.dense_4h_to_h.weight", "H,F",
                                             aliases=_renamed("mlp.dense_4h_to_h.weight")),
        "mlp.dense_4h_to_h.bias": RuleSpec(Rule.ROW_BIAS, _BLOCK + "mlp.dense_4h_to_h.bias", "H",
                                           aliases=_renamed("mlp.dense_4h_to_h.bias")),
        # derived buffers, deliberately not written; saved by some writers only
        "attention.rotary_emb.inv_freq": RuleSpec(Rule.DROP, None, "R", optional=True,
                                                  aliases=_te_attention("attention.rotary_embeddings.inv_freq")),
        "attention.bias": RuleSpec(Rule.DROP, None, "mask", optional=True),  # causal mask [1, 1, P, P]
        "attention.masked_bias": RuleSpec(Rule.DROP, None, "scalar", optional=True),
        # Transformer Engine's per-module fp8 state (`Rule.EXTRA_STATE`): never weights
        "attention.qkv._extra_state": _extra_state(_TE_ATTENTION),
        "attention.core_attention._extra_state": _extra_state(_TE_ATTENTION),
        "attention.proj._extra_state": _extra_state(_TE_ATTENTION),
        "mlp._extra_state": _extra_state(_TE_MLP),
        "attention.query_key_value._extra_state": _extra_state(_NOT_TE_ATTENTION),
        "attention.dense._extra_state": _extra_state(_NOT_TE_ATTENTION),
        "mlp.linear1._extra_state": _extra_state(_NOT_TE_MLP),
        "mlp.linear2._extra_state": _extra_state(_NOT_TE_MLP),
    },
    LayerKind.FINAL_NORM: {
        "norm.weight": RuleSpec(Rule.REPLICATED, "gpt_neox.final_layer_norm.weight", "H"),
        "norm.bias": RuleSpec(Rule.REPLICATED, "gpt_neox.final_layer_norm.bias", "H"),
    },
    LayerKind.READOUT: {
        "final_linear.weight": RuleSpec(Rule.CONCAT_ROWS, "embed_out.weight", "V,H", when="causal_lm"),
        # reward models (train_impl: rm): ParallelLinear's rm_linear is a RowParallelLinear(hidden -> 1,
        # input_is_parallel=False, parallel_output=False): each rank holds a block of input columns
        "rm_linear.weight": RuleSpec(Rule.CONCAT_COLS, "score.weight", "1,H", when="reward_model"),
    },
}

# Llama-style key generations of the gated MLP. gpt-neox since 2024-09 (ParallelMLP, gated): linear1 =
# [up | gate] per rank, linear2 row-parallel. 2023-05 .. 2024-09 (mlp_type: llama, LLaMAParallelMLP, no
# biases): silu(w1(x)) * w3(x) -> w2, so w1 is the gate, w3 the up projection. Different math, so different
# rows, each in its own generation.
LLAMA_GATED_KEYS, LLAMA_W123_KEYS = "linear1/linear2", "w1/w2/w3"
_L = "model.layers.{i}."


def _qkv(kind: str) -> RuleSpec:
    dim = ",H" if kind == "weight" else ""
    return RuleSpec(Rule.SPLIT_ROWS, None, "*", split=Split.QKV, when=None if kind == "weight" else "attention_bias",
                    parts=((_L + f"self_attn.q_proj.{kind}", "H" + dim), (_L + f"self_attn.k_proj.{kind}", "KV" + dim),
                           (_L + f"self_attn.v_proj.{kind}", "KV" + dim)))


def _gated(kind: str) -> RuleSpec:
    dim = ",H" if kind == "weight" else ""
    return RuleSpec(Rule.SPLIT_ROWS, None, "*", split=Split.GATED_HALVES, generations=(LLAMA_GATED_KEYS,),
                    when=None if kind == "weight" else "mlp_bias",
                    parts=((_L + f"mlp.up_proj.{kind}", "F" + dim), (_L + f"mlp.gate_proj.{kind}", "F" + dim)))


LLAMA_RULES: dict[LayerKind, dict[str, RuleSpec]] = {
    LayerKind.EMBEDDING: {"word_embeddings.weight": RuleSpec(Rule.CONCAT_ROWS, "model.embed_tokens.weight", "V,H")},
    LayerKind.BLOCK: {
        "input_layernorm.scale": RuleSpec(Rule.REPLICATED, _L + "input_layernorm.weight", "H"),
        "attention.query_key_value.weight": _qkv("weight"),
        "attention.query_key_value.bias": _qkv("bias"),
        "attention.dense.weight": RuleSpec(Rule.CONCAT_COLS, _L + "self_attn.o_proj.weight", "H,H"),
        "attention.dense.bias": RuleSpec(Rule.ROW_BIAS, _L + "self_attn.o_proj.bias", "H", when="attention_bias"),
        "post_attention_layernorm.scale": RuleSpec(Rule.REPLICATED, _L + "post_attention_layernorm.weight", "H"),
        # saved only with rotary_save_freqs_buffer
        "attention.rotary_emb.inv_freq": RuleSpec(Rule.DROP, None, "R", optional=True),
        "mlp.linear1.weight": _gated("weight"),
        "mlp.linear1.bias": _gated("bias"),
        "mlp.linear2.weight": RuleSpec(Rule.CONCAT_COLS, _L + "mlp.down_proj.weight", "H,F",
                                       generations=(LLAMA_GATED_KEYS,)),
        "mlp.linear2.bias": RuleSpec(Rule.ROW_BIAS, _L + "mlp.down_proj.bias", "H", generations=(LLAMA_GATED_KEYS,),
                                     when="mlp_bias"),
        "mlp.w1.weight": RuleSpec(Rule.CONCAT_ROWS, _L + "mlp.gate_proj.weight", "F,H", generations=(LLAMA_W123_KEYS,)),
        "mlp.w3.weight": RuleSpec(Rule.CONCAT_ROWS, _L + "mlp.up_proj.weight", "F,H", generations=(LLAMA_W123_KEYS,)),
        "mlp.w2.weight": RuleSpec(Rule.CONCAT_COLS, _L + "mlp.down_proj.weight", "H,F", generations=(LLAMA_W123_KEYS,)),
    },
    LayerKind.FINAL_NORM: {"norm.scale": RuleSpec(Rule.REPLICATED, "model.norm.weight", "H")},
    LayerKind.READOUT: {
        "final_linear.weight": RuleSpec(Rule.CONCAT_ROWS, "lm_head.weight", "V,H", when="causal_lm"),
        "rm_linear.weight": RuleSpec(Rule.CONCAT_COLS, "score.weight", "1,H", when="reward_model"),
    },
}


def architecture_table(config: NeoXConfig) -> KeyTable:
    """The key table of this config's architecture (GPT-NeoX or Llama-style)."""
    if config.architecture == LLAMA:
        return KeyTable(LLAMA, (LLAMA_GATED_KEYS, LLAMA_W123_KEYS), LLAMA_RULES)
    return KeyTable(GPT_NEOX, (NEOX_20B_KEYS, NEOX_LINEAR_KEYS, *TE_GENERATIONS), RULES)


def key_table(config: NeoXConfig, kind: LayerKind, generation: str | None = None) -> dict[str, RuleSpec]:
    """THE table: the rows of one layer kind as ``generation`` spells their keys (None: the architecture's first
    generation; `split --key-names` chooses its own), leaving out rows that generation or this config does not have.

    Keyed by the source's own key; each row's ``key`` is the table's key for it (the same across generations).
    """
    arch = architecture_table(config)
    generation = generation or arch.generations[0]
    if generation not in arch.generations:
        raise ValueError(f"{arch.architecture} has no key generation {generation!r} (it has {arch.generations})")
    out: dict[str, RuleSpec] = {}
    for key, spec in arch.layers[kind].items():
        spelled = spec.spelled(key, generation)
        if spelled is not None and (spec.when is None or getattr(config, spec.when)):
            out[spelled] = replace(spec, key=key)
    return out


def te_key_names() -> set[str]:
    """Every block key only Transformer Engine modules write (TE spellings and every ``_extra_state``)."""
    te = {spec.spelled(k, g) for k, spec in RULES[LayerKind.BLOCK].items() for g in TE_GENERATIONS}
    plain = {spec.spelled(k, g) for k, spec in RULES[LayerKind.BLOCK].items() for g in (NEOX_20B_KEYS,
                                                                                          NEOX_LINEAR_KEYS)}
    return {k for k in te - plain if k} | {k for k in plain if k and k.endswith("_extra_state")}


def detect_generations(config: NeoXConfig, kind: LayerKind, keys: set[str]) -> list[str]:
    """The key generations that spell ``keys``: the one generation that knows every key and that others do not
    (one for a consistent layer); none for layers whose keys every generation spells alike (or that several
    generations spell entirely); when none knows them all, those that leave the fewest unknown (several: a layer
    of mixed generations, one: a layer of that generation with keys it does not know)."""
    arch = architecture_table(config)
    known = {g: {spec.spelled(k, g) for k, spec in arch.layers[kind].items()} - {None} for g in arch.generations}
    unknown = {g: len(keys - spelled) for g, spelled in known.items()}
    fewest = min(unknown.values())
    best = [g for g in arch.generations if unknown[g] == fewest]
    if len(best) == 1:
        return best
    return [] if fewest == 0 else best


def layer_generation(config: NeoXConfig, layer: SourceLayer, shards: list[dict], files: list[str]) -> str | None:
    """The key generation every rank of ``layer`` spells (None: the keys belong to no generation alone).

    Ranks or keys of different generations in one layer are a CheckpointError naming each file's.
    """
    found = [detect_generations(config, layer.kind, set(shard)) for shard in shards]
    if any(len(g) > 1 for g in found) or len({tuple(g) for g in found}) > 1:
        per_rank = ", ".join(f"{files[r]}: {' + '.join(g) or 'none'}" for r, g in enumerate(found))
        raise CheckpointError(f"{layer.label}: key names of different gpt-neox generations mixed ({per_rank})")
    return found[0][0] if found and found[0] else None


def output_names(spec: RuleSpec) -> list[tuple[str, str]]:
    """(hf_name template, shape) of every tensor a rule writes (none for dropped keys)."""
    if spec.rule is Rule.SPLIT_ROWS:
        return list(spec.parts)
    return [] if spec.hf_name is None else [(spec.hf_name, spec.shape)]


def output_shapes(config: NeoXConfig, layer: SourceLayer) -> dict[str, tuple[int, ...] | None]:
    """Hugging Face name -> merged shape of every tensor written for ``layer``."""
    out: dict[str, tuple[int, ...] | None] = {}
    for spec in key_table(config, layer.kind).values():
        for name, shape in output_names(spec):
            out[name.format(i=layer.block)] = shape_of(shape, config)
    return out


# ----- QKV layouts and named splits ---------------------------------------------------------------------
QKV_LAYOUT_CHOICES = ("auto", "blocked", "interleaved")


@dataclass(frozen=True)
class QkvLayout:
    split: Split
    assumed: bool  # True: the checkpoint could not tell; --qkv-layout decides
    reason: str


def resolve_qkv_split(choice: str, config: NeoXConfig, tp_degree: int, generation: str | None) -> QkvLayout:
    """How each rank's ``attention.query_key_value`` rows are laid out (Llama-style models).

    gpt-neox uses GQA only when num_kv_heads is set and differs from the head count; otherwise every rank's
    rows are [heads, 3, head_dim]. GQA rows were interleaved per query head from 2024-02 (mistral PR #1131)
    to 2024-11 (#1315) and are [Q | K | V] blocks since. The checkpoint records no gpt-neox version, but the
    ``mlp.w1/w2/w3`` key names (renamed 2024-09) date a GQA checkpoint to the interleaved era.
    """
    if choice not in QKV_LAYOUT_CHOICES:
        raise ValueError(f"qkv_layout must be one of {QKV_LAYOUT_CHOICES}, got {choice!r}")
    if not config.gqa:
        if choice != "auto":
            raise ConfigError(f"--qkv-layout {choice} applies to grouped-query attention only; this model has "
                              f"{config.num_heads} heads and as many kv heads (one layout: [heads, 3, head_dim])")
        return QkvLayout(Split.QKV_PER_HEAD, False, "no grouped-query attention: per-head [heads, 3, head_dim]")
    if choice == "blocked":
        return QkvLayout(Split.QKV_BLOCKS, False, "--qkv-layout blocked")
    if choice == "interleaved":
        if not _interleave_fits(config, tp_degree):
            raise ConfigError(f"--qkv-layout interleaved is impossible for {config.num_heads} heads, {config.kv_heads} "
                              f"kv heads, head_dim {config.head_dim} at TP {tp_degree} (gpt-neox could not run it)")
        return QkvLayout(Split.QKV_INTERLEAVED, False, "--qkv-layout interleaved")
    if generation == LLAMA_W123_KEYS:
        return QkvLayout(Split.QKV_INTERLEAVED, False,
                         "GQA with mlp.w1/w2/w3 keys: gpt-neox 2024-02..2024-09, rows interleaved per query head")
    if not _interleave_fits(config, tp_degree):
        return QkvLayout(Split.QKV_BLOCKS, False, "GQA; the 2024 interleaved layout cannot hold these head counts")
    return QkvLayout(Split.QKV_BLOCKS, True,
                     "GQA with mlp.linear1 keys: [Q|K|V] blocks per rank (gpt-neox since 2024-11); a checkpoint "
                     "trained between 2024-09 and 2024-11 needs --qkv-layout interleaved")


def _interleave_fits(config: NeoXConfig, tp_degree: int) -> bool:
    heads, kv = config.num_heads // tp_degree, config.kv_heads // tp_degree
    return (config.head_dim * kv) % heads == 0


def split_segments(split: Split, part: int, rows: int, *, heads: int, kv_heads: int,
                   head_dim: int) -> list[tuple[int, int]]:
    """(start, count) row ranges of one rank's ``rows`` that form ``part`` of ``split``, in output order.

    ``heads``/``kv_heads`` are the rank's local counts. Weights and biases split the same way (by rows).
    """
    hd = head_dim
    if split is Split.GATED_HALVES:
        if rows % 2:
            raise ValueError(f"a gated linear1 shard has {rows} rows, not two halves")
        half = rows // 2
        return [(part * half, half)]
    if split is Split.QKV_PER_HEAD:
        if rows != 3 * heads * hd:
            raise ValueError(f"{rows} rows, expected 3 x {heads} heads x {hd}")
        return [(h * 3 * hd + part * hd, hd) for h in range(heads)]
    if rows != (heads + 2 * kv_heads) * hd:
        raise ValueError(f"{rows} rows, expected ({heads} heads + 2 x {kv_heads} kv heads) x {hd}")
    if split is Split.QKV_BLOCKS:
        sizes = (heads * hd, kv_heads * hd, kv_heads * hd)
        return [(sum(sizes[:part]), sizes[part])]
    if split is Split.QKV_INTERLEAVED:
        if (hd * kv_heads) % heads:
            raise ValueError(f"head_dim {hd} x {kv_heads} kv heads is not divisible by {heads} heads")
        kv_part = hd * kv_heads // heads  # each query head's share of K (and of V)
        group = hd + 2 * kv_part
        offset, size = ((0, hd), (hd, kv_part), (hd + kv_part, kv_part))[part]
        return [(h * group + offset, size) for h in range(heads)]
    raise ValueError(f"{split} is a placeholder; resolve it first")


def merge_split(split: Split, part: int, shards: list[np.ndarray], *, heads: int, kv_heads: int,
                head_dim: int) -> np.ndarray:
    """``part`` of ``split`` taken from each rank's shard, concatenated over ranks (pure; for N shards).

    ``heads``/``kv_heads`` are the model's totals; each rank holds 1/N of them.
    """
    n = len(shards)
    pieces = []
    for shard in shards:
        for start, count in split_segments(split, part, shard.shape[0], heads=heads // n, kv_heads=kv_heads // n,
                                           head_dim=head_dim):
            pieces.append(shard[start:start + count])
    return np.concatenate(pieces, axis=0)

def join_split(split: Split, parts: list[np.ndarray], tp: int, *, heads: int, kv_heads: int,
               head_dim: int) -> list[np.ndarray]:
    """The inverse of `merge_split`: each rank's rows from the Hugging Face ``parts`` (for split/reshard).

    ``heads``/``kv_heads`` are the model's totals. Each part is cut into ``tp`` row blocks; rank r's rows
    place block r of every part where `split_segments` says it lives.
    """
    blocks = [np.split(p, tp, axis=0) for p in parts]
    shards = []
    for r in range(tp):
        rows = sum(b[r].shape[0] for b in blocks)
        shard = np.empty((rows, *parts[0].shape[1:]), dtype=parts[0].dtype)
        for part, b in enumerate(blocks):
            done = 0
            for start, count in split_segments(split, part, rows, heads=heads // tp, kv_heads=kv_heads // tp,
                                               head_dim=head_dim):
                shard[start:start + count] = b[r][done:done + count]
                done += count
        shards.append(shard)
    return shards


ROW_BIAS_CHOICES = ("auto", "sum", "replicated")


def resolve_row_bias(choice: str, config: NeoXConfig) -> Rule:
    """auto: SUM with parallel residual (NeoX's parallel_output=True), REPLICATED without."""
    if choice == "sum":
        return Rule.SUM
    if choice == "replicated":
        return Rule.REPLICATED
    if choice == "auto":
        return Rule.SUM if config.parallel_residual else Rule.REPLICATED
    raise ValueError(f"row_bias must be one of {ROW_BIAS_CHOICES}, got {choice!r}")


def hf_name(spec: RuleSpec, layer: SourceLayer) -> str | None:
    if spec.hf_name is None:
        return None
    return spec.hf_name.format(i=layer.block)


def expected_shape(spec: RuleSpec, config: NeoXConfig) -> tuple[int, ...] | None:
    """The merged tensor's shape from the config (None: not checked)."""
    return shape_of(spec.shape, config)


def shape_of(shape: str, config: NeoXConfig) -> tuple[int, ...] | None:
    """A shape in config terms ("V,H", "KV,H", ...) in numbers (None: not checked)."""
    if shape in ("*", "R", "mask", "scalar"):
        return None
    sizes = {"V": config.vocab_size, "H": config.hidden_size, "3H": 3 * config.hidden_size, "F": config.ffn_size,
             "KV": config.kv_heads * config.head_dim, "1": 1}
    dims = tuple(sizes[d] for d in shape.split(","))
    return None if any(d is None for d in dims) else dims  # type: ignore[return-value]


# ----- pure merge functions ------------------------------------------------------------------------
def merge_tensor(rule: Rule, shards: list[np.ndarray], *, dtype: str, out_dtype: str | None = None) -> np.ndarray:
    """Merge ``shards`` (numpy arrays holding ``dtype`` values) by ``rule``; result holds ``out_dtype``.

    Sums and means are computed in float32, then cast. REPLICATED shards that agree bit for bit give shard 0
    unchanged (only cast); the mean is taken only when they differ. DROP returns shard 0 (callers check identity).
    """
    out_dtype = out_dtype or dtype
    if not shards:
        raise ValueError("no shards to merge")
    if rule is Rule.CONCAT_ROWS:
        return _cast(np.concatenate(shards, axis=0), dtype, out_dtype)
    if rule is Rule.CONCAT_COLS:
        return _cast(np.concatenate(shards, axis=1), dtype, out_dtype)
    if rule is Rule.SUM:
        total = to_f32(shards[0], dtype).copy()
        for s in shards[1:]:
            total += to_f32(s, dtype)
        return from_f32(total, out_dtype)
    if rule is Rule.REPLICATED:
        if all(same_bits(shards[0], s) for s in shards[1:]):
            return _cast(np.asarray(shards[0]), dtype, out_dtype)  # bit for bit: no arithmetic at all
        total = to_f32(shards[0], dtype).copy()
        for s in shards[1:]:
            total += to_f32(s, dtype)
        return from_f32(total / np.float32(len(shards)), out_dtype)
    if rule is Rule.DROP:
        return np.asarray(shards[0])
    raise ValueError(f"rule {rule} must be resolved before merging")


def split_tensor(rule: Rule, full: np.ndarray, parts: int) -> list[np.ndarray]:
    """The inverse of `merge_tensor`: each of ``parts`` ranks' shard of ``full`` (views: copy what you keep).

    CONCAT_ROWS / CONCAT_COLS: rank r gets its block of rows / columns. REPLICATED (and DROP): every rank the
    whole tensor. SUM: rank 0 the whole tensor and the others zeros: b + 0 + ... + 0 == b exactly in any dtype
    and summation order, for every T (dividing by T is exact only for powers of two, and not for fp16
    subnormals); training then updates every rank's part by the same gradient, as gpt-neox does.
    SPLIT_ROWS has its own inverse, `join_split`.
    """
    if rule is Rule.CONCAT_ROWS:
        return list(np.split(full, parts, axis=0))
    if rule is Rule.CONCAT_COLS:
        return list(np.split(full, parts, axis=1))
    if rule in (Rule.REPLICATED, Rule.DROP):
        return [full] * parts
    if rule is Rule.SUM:
        return [full] + [np.zeros_like(full)] * (parts - 1)
    raise ValueError(f"{rule} has no inverse here (resolve ROW_BIAS first; SPLIT_ROWS: join_split)")


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """True when ``a`` and ``b`` hold the same bytes (NaNs included; +0.0 and -0.0 differ)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return bool(np.array_equal(np.ascontiguousarray(a).view(np.uint8), np.ascontiguousarray(b).view(np.uint8)))


def _cast(a: np.ndarray, src: str, dst: str) -> np.ndarray:
    return a if src == dst else from_f32(to_f32(a, src), dst)


def max_divergence(shards: list[np.ndarray], dtype: str) -> float:
    """Largest |shard_k - shard_0| over all ranks and elements (0.0 for identical replicas)."""
    if dtype not in FLOAT_DTYPES:
        return 0.0 if all(np.array_equal(shards[0], s) for s in shards[1:]) else float("inf")
    base = to_f32(shards[0], dtype)
    worst = 0.0
    for s in shards[1:]:
        diff = np.abs(to_f32(s, dtype) - base)
        worst = max(worst, float(np.nanmax(diff)) if diff.size else 0.0)
        if np.isnan(diff).any():
            return float("nan")
    return worst


def rotary_inv_freq_close(config: NeoXConfig, value: np.ndarray, dtype: str) -> bool:
    """True when ``value`` (numpy bits of ``dtype``) holds the config's frequencies 1 / base^(2i/d) as gpt-neox's
    arithmetic gives them: computed in fp32 (the exponent 2i/d rounded, then pow: a relative error up to about
    (4 + ln base) fp32 ulps), then stored in ``dtype`` (half an ulp more, and fp16's subnormal spacing for the
    smallest frequencies of a large base). Another base or width is far outside that."""
    d = config.rotary_dims
    base = float(config.rotary_emb_base)
    want = 1.0 / (base ** (np.arange(0, d, 2, dtype=np.float64) / d))
    if value.shape != want.shape or dtype not in FLOAT_DTYPES:
        return False
    got = (to_f32(value, dtype) if dtype == "bfloat16" else np.asarray(value)).astype(np.float64)
    relative = 2 * FLOAT_EPS[dtype] + (4 + math.log(max(base, 1.0))) * FLOAT_EPS["float32"]
    floor = 2.0**-24 if dtype == "float16" else 0.0  # fp16's subnormal spacing
    return bool(np.all(np.abs(got - want) <= relative * np.abs(want) + floor))


def check_derived(key: str, value: np.ndarray, dtype: str, config: NeoXConfig, where: str) -> None:
    """A derived buffer a source saved (checked identical on every rank) must be what the config derives: a rotary
    ``inv_freq`` of another base or width than the config's means the config is not the files' (gpt-neox before
    2024-03 computed with the saved buffer). A ConfigError naming the key and where it is otherwise."""
    if key.endswith(".inv_freq") and not rotary_inv_freq_close(config, value, dtype):
        raise ConfigError(
            f"{where}: {key!r} holds rotary frequencies ({dtype}, {list(value.shape)}) that the config does not give "
            f"(head_dim {config.head_dim}, rotary dims {config.rotary_dims}, base {config.rotary_emb_base:g}: "
            f"{config.rotary_dims // 2} values 1/base^(2i/d)); check rotary_emb_base / rotary_pct in the config")


def check_replicas(shards: list[np.ndarray], *, dtype: str, tolerance: float, key: str, ranks: list[str],
                   where: str, row_bias: bool = False, derived: bool = False) -> float:
    """How far a replicated tensor's rank copies diverge (`max_divergence`); a MergeError naming the key and
    the rank files beyond ``tolerance``. ``derived`` buffers must be bit-identical; ``row_bias``: a row-parallel
    bias merged as replicated (the error suggests --row-bias sum)."""
    if derived:
        if not all(same_bits(shards[0], s) for s in shards[1:]):
            raise MergeError(f"{where}: derived buffer differs across ranks for {key!r} [{', '.join(ranks)}]")
        return 0.0
    divergence = max_divergence(shards, dtype)
    if not divergence <= tolerance:
        hint = (" (raise --replica-tolerance to accept it, or use --row-bias sum if this is a row-parallel bias)"
                if row_bias else " (raise --replica-tolerance to accept it)")
        raise MergeError(f"{where}: replicated tensor diverges across ranks for {key!r}: max |rank_k - rank_0| = "
                         f"{divergence:.3g} > tolerance {tolerance:g} [{', '.join(ranks)}]{hint}")
    return divergence
