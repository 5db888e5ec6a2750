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

Row-parallel biases are ``ROW_BIAS`` in the table and resolve to SUM or REPLICATED by option/config.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from neoxconv.checkpoint import LayerKind, SourceLayer
from neoxconv.config import NeoXConfig
from neoxconv.dtypes import FLOAT_DTYPES, from_f32, tensor_nbytes, to_f32
from neoxconv.errors import CheckpointError, MergeError
from neoxconv.ptfile import NUMPY_DTYPES, TensorRef
from neoxconv.storage import CHUNK_BYTES, SourceReader


class Rule(str, enum.Enum):
    CONCAT_ROWS = "concat_dim0"
    CONCAT_COLS = "concat_dim1"
    SUM = "sum"
    REPLICATED = "replicated"
    DROP = "drop"
    ROW_BIAS = "row_bias"  # resolved to SUM or REPLICATED


@dataclass(frozen=True)
class RuleSpec:
    rule: Rule
    hf_name: str | None  # "{i}" is the transformer block number; None for dropped keys
    shape: str  # merged shape in config terms: V vocab, H hidden, F ffn


_BLOCK = "gpt_neox.layers.{i}."
RULES: dict[LayerKind, dict[str, RuleSpec]] = {
    LayerKind.EMBEDDING: {
        "word_embeddings.weight": RuleSpec(Rule.CONCAT_ROWS, "gpt_neox.embed_in.weight", "V,H"),
    },
    LayerKind.BLOCK: {
        "input_layernorm.weight": RuleSpec(Rule.REPLICATED, _BLOCK + "input_layernorm.weight", "H"),
        "input_layernorm.bias": RuleSpec(Rule.REPLICATED, _BLOCK + "input_layernorm.bias", "H"),
        "attention.query_key_value.weight": RuleSpec(Rule.CONCAT_ROWS, _BLOCK + "attention.query_key_value.weight", "3H,H"),
        "attention.query_key_value.bias": RuleSpec(Rule.CONCAT_ROWS, _BLOCK + "attention.query_key_value.bias", "3H"),
        "attention.dense.weight": RuleSpec(Rule.CONCAT_COLS, _BLOCK + "attention.dense.weight", "H,H"),
        "attention.dense.bias": RuleSpec(Rule.ROW_BIAS, _BLOCK + "attention.dense.bias", "H"),
        "post_attention_layernorm.weight": RuleSpec(Rule.REPLICATED, _BLOCK + "post_attention_layernorm.weight", "H"),
        "post_attention_layernorm.bias": RuleSpec(Rule.REPLICATED, _BLOCK + "post_attention_layernorm.bias", "H"),
        "mlp.dense_h_to_4h.weight": RuleSpec(Rule.CONCAT_ROWS, _BLOCK + "mlp.dense_h_to_4h.weight", "F,H"),
        "mlp.dense_h_to_4h.bias": RuleSpec(Rule.CONCAT_ROWS, _BLOCK + "mlp.dense_h_to_4h.bias", "F"),
        "mlp.dense_4h_to_h.weight": RuleSpec(Rule.CONCAT_COLS, _BLOCK + "mlp.dense_4h_to_h.weight", "H,F"),
        "mlp.dense_4h_to_h.bias": RuleSpec(Rule.ROW_BIAS, _BLOCK + "mlp.dense_4h_to_h.bias", "H"),
        # derived buffers, deliberately not written
        "attention.rotary_emb.inv_freq": RuleSpec(Rule.DROP, None, "R"),
        "attention.bias": RuleSpec(Rule.DROP, None, "mask"),  # causal mask [1, 1, P, P]
        "attention.masked_bias": RuleSpec(Rule.DROP, None, "scalar"),
    },
    LayerKind.FINAL_NORM: {
        "norm.weight": RuleSpec(Rule.REPLICATED, "gpt_neox.final_layer_norm.weight", "H"),
        "norm.bias": RuleSpec(Rule.REPLICATED, "gpt_neox.final_layer_norm.bias", "H"),
    },
    LayerKind.READOUT: {
        "final_linear.weight": RuleSpec(Rule.CONCAT_ROWS, "embed_out.weight", "V,H"),
    },
}
OPTIONAL_KEYS = {"attention.rotary_emb.inv_freq", "attention.bias", "attention.masked_bias"}

# Key generations: one rule table, several spellings. gpt-neox renamed the GELU MLP's projections in
# 2024-09 (same math, same Hugging Face names). Each generation maps the rule table's key to the key its
# files hold (keys not listed are spelled the same); the generation is detected from each file's keys.
KEY_GENERATIONS: dict[str, dict[str, str]] = {
    "dense_h_to_4h/dense_4h_to_h": {},  # gpt-neox before 2024-09, the 20B release
    "linear1/linear2": {  # gpt-neox since 2024-09: linear1 column-parallel, linear2 row-parallel
        "mlp.dense_h_to_4h.weight": "mlp.linear1.weight",
        "mlp.dense_h_to_4h.bias": "mlp.linear1.bias",
        "mlp.dense_4h_to_h.weight": "mlp.linear2.weight",
        "mlp.dense_4h_to_h.bias": "mlp.linear2.bias",
    },
}
_RENAMED = {k for aliases in KEY_GENERATIONS.values() for k in aliases}


def detect_key_generations(keys: set[str]) -> list[str]:
    """The key generations whose distinctive keys appear in ``keys`` (none for layers without renamed keys)."""
    found = []
    for name, aliases in KEY_GENERATIONS.items():
        distinctive = set(aliases.values()) if aliases else _RENAMED
        if keys & distinctive:
            found.append(name)
    return found

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
    if spec.shape in ("*", "R", "mask", "scalar"):
        return None
    sizes = {"V": config.vocab_size, "H": config.hidden_size, "3H": 3 * config.hidden_size, "F": config.ffn_size}
    dims = tuple(sizes[d] for d in spec.shape.split(","))
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
    """The inverse of `merge_tensor` for the concat and replicated rules (used to build fixtures)."""
    if rule is Rule.CONCAT_ROWS:
        return list(np.split(full, parts, axis=0))
    if rule is Rule.CONCAT_COLS:
        return list(np.split(full, parts, axis=1))
    if rule in (Rule.REPLICATED, Rule.DROP):
        return [full.copy() for _ in range(parts)]
    raise ValueError(f"{rule} has no unique inverse (a sum can be split many ways)")


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


# ----- per-layer planning and validation --------------------------------------------------------------
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

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.out_dtype, self.shape)


@dataclass
class LayerPlan:
    layer: SourceLayer
    files: list[str]
    tensors: list[TensorPlan] = field(default_factory=list)
    dropped: list[TensorPlan] = field(default_factory=list)
    key_generation: str | None = None  # which KEY_GENERATIONS spelling the files use (None: no renamed keys)

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
) -> LayerPlan:
    """Check a layer's shards against the rule table and config (metadata only); every problem at once.

    ``out_dtype=None`` keeps each tensor's source dtype.
    """
    table = RULES[layer.kind]
    problems: list[str] = []
    bad_keys = False  # unknown/missing keys are a checkpoint problem; the rest are merge problems
    plan = LayerPlan(layer=layer, files=files)
    tp = len(shards)
    generations = [detect_key_generations(set(shard)) for shard in shards]
    if any(len(g) > 1 for g in generations) or len({tuple(g) for g in generations}) > 1:
        per_rank = ", ".join(f"{files[r]}: {' + '.join(g) or 'none'}" for r, g in enumerate(generations))
        raise CheckpointError(f"{layer.label}: MLP key names of different gpt-neox generations mixed ({per_rank})")
    plan.key_generation = generations[0][0] if generations and generations[0] else None
    aliases = KEY_GENERATIONS.get(plan.key_generation or "", {})
    inverse = {v: k for k, v in aliases.items()}
    shards = [{inverse.get(k, k): ref for k, ref in shard.items()} for shard in shards]  # rule-table keys
    for rank, shard in enumerate(shards):
        unknown = sorted(set(shard) - set(table))
        if unknown:
            bad_keys = True
            more = f" (+{len(unknown) - 8} more)" if len(unknown) > 8 else ""
            problems.append(f"{files[rank]}: unknown key(s) {', '.join(map(repr, unknown[:8]))}{more} "
                            f"in a {layer.kind.value} layer")
        missing = sorted(aliases.get(k, k) for k in set(table) - OPTIONAL_KEYS - set(shard))
        if missing:
            bad_keys = True
            problems.append(f"{files[rank]}: missing key(s) {', '.join(map(repr, missing))}")
    for table_key, spec in table.items():
        key = aliases.get(table_key, table_key)  # as the files spell it, for messages and the manifest
        present = [rank for rank, shard in enumerate(shards) if table_key in shard]
        if not present or len(present) != tp:
            if present and table_key in OPTIONAL_KEYS:
                problems.append(f"{key!r}: present on ranks {present} only, of {tp}")
            continue
        refs = [shards[r][table_key] for r in range(tp)]
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


# ----- streaming the merged bytes -----------------------------------------------------------------------
def read_checked(ref: TensorRef, key: str, reader: SourceReader | None = None) -> np.ndarray:
    """A whole (small) tensor, in memory; its storage's CRC-32 is checked once its last planned read is done.

    Without ``reader`` the tensor's storage is checked right away (read once).
    """
    if reader is None:
        with SourceReader() as own:
            return read_checked(ref, key, own)
    a = reader.read(ref)
    reader.done(ref, key)
    return a


def iter_merged_chunks(plan: TensorPlan, *, chunk_bytes: int = CHUNK_BYTES,
                       reader: SourceReader | None = None) -> Iterator[np.ndarray]:
    """The merged tensor of a concat rule, as consecutive row blocks (bounded memory), CRC-checked by storage."""
    if plan.rule not in (Rule.CONCAT_ROWS, Rule.CONCAT_COLS):
        raise ValueError(f"{plan.rule} is not streamed")
    if reader is None:
        with SourceReader(chunk_bytes=chunk_bytes) as own:
            yield from iter_merged_chunks(plan, chunk_bytes=chunk_bytes, reader=own)
        return

    def row_bytes(ref: TensorRef) -> int:
        return NUMPY_DTYPES[ref.dtype].itemsize * math.prod(ref.shape[1:])

    if plan.rule is Rule.CONCAT_ROWS:  # the ranks' bytes back to back
        for ref in plan.shards:
            rows = ref.shape[0] if ref.shape else 0
            step = max(1, chunk_bytes // max(1, row_bytes(ref)))
            for i in range(0, rows, step):
                yield _cast(reader.rows(ref, i, min(step, rows - i)), plan.src_dtype, plan.out_dtype)
            reader.done(ref, plan.key)
    else:  # row-parallel: interleave each output row from the ranks' column blocks
        rows = plan.shape[0]
        step = max(1, chunk_bytes // max(1, sum(row_bytes(r) for r in plan.shards)))
        for i in range(0, rows, step):
            n = min(step, rows - i)
            blocks = [reader.rows(ref, i, n) for ref in plan.shards]
            yield merge_tensor(Rule.CONCAT_COLS, blocks, dtype=plan.src_dtype, out_dtype=plan.out_dtype)
        for ref in plan.shards:
            reader.done(ref, plan.key)
