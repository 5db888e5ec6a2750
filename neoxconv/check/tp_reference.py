"""A simulated tensor-parallel forward over the *unmerged* rank shards: the independent check of a merge.

Each rank computes what GPT-NeoX computes on it, from its own shard files, and the collectives are
simulated: vocab-parallel embedding lookups are summed (all-reduce), each rank runs attention on its own
heads and the MLP on its own columns, row-parallel outputs are summed (all-reduce) with each rank's bias
part added before the sum (parallel residual) or the full bias once after it, and the vocab-parallel
readout's slices are gathered. Layer norms are each rank's own copy. No merge rule is used, so a merged
model that disagrees with this forward was merged wrongly. A reward model's readout (``rm_linear``, a
RowParallelLinear(hidden -> 1) with ``input_is_parallel=False``) gives each rank its block of the hidden
features and sums the partial scores; a sliding window (``sliding_window_width``) masks keys as gpt-neox's
``get_attn_mask`` does.

Memory: one layer's rank shards in fp32 at a time (read through the CRC-checked source reader), the
embedding's rows for the prompt only, and the vocab-sized readout ``READ_BLOCK_BYTES`` at a time; so the
cross-check of a 20B merge needs about one layer of memory on top of what ``verify --max-memory`` keeps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from neoxconv.check.integrity import MANIFEST
from neoxconv.config import GELU_TANH, LLAMA, NeoXConfig
from neoxconv.errors import ConfigError, VerificationError
from neoxconv.layers import RotaryTables, apply_partial_rotary, causal_attention
from neoxconv.merge import Rule, Split, key_table
from neoxconv.plan.plan import PlanOptions, SourcePlan, plan_source
from neoxconv.smallfile import read_json_object
from neoxconv.source.checkpoint import Checkpoint, LayerKind, SourceLayer
from neoxconv.source.ptfile import TensorRef
from neoxconv.source.storage import Reads, SourceReader

READ_BLOCK_BYTES = 64 << 20  # fp32 bytes of weight rows in memory at a time for the vocab-sized tensors


def _tensor(src: Reads, ref: TensorRef, rows: slice | np.ndarray | None = None) -> torch.Tensor:
    """An fp32 copy of the tensor (or of some of its rows), read through the layer's CRC-checked reads."""
    if rows is None:
        a = src.read(ref)
    elif isinstance(rows, slice):
        start = rows.start or 0
        a = src.rows(ref, start, min(rows.stop, ref.shape[0]) - start)
    else:
        a = np.stack([src.rows(ref, int(i), 1)[0] for i in rows]) if len(rows) else src.rows(ref, 0, 0)
    if ref.dtype == "bfloat16":  # numpy has no bfloat16: the bits, then widen
        return torch.from_numpy(a).view(torch.bfloat16).float()
    return torch.from_numpy(a.astype(np.float32, copy=False))


class _Shard:
    """One rank's tensors of one layer: ``shard[key]`` is an fp32 copy read through the layer's reads."""

    def __init__(self, src: Reads, refs: dict[str, TensorRef]) -> None:
        self.src, self.refs = src, refs

    def __getitem__(self, key: str) -> torch.Tensor:
        return _tensor(self.src, self.refs[key])

    def __contains__(self, key: str) -> bool:
        return key in self.refs

    def get(self, key: str) -> torch.Tensor | None:
        return self[key] if key in self.refs else None

    def rows(self, key: str, rows: slice | np.ndarray) -> torch.Tensor:
        return _tensor(self.src, self.refs[key], rows)


def _linear_by_rows(x: torch.Tensor, shard: _Shard, key: str) -> torch.Tensor:
    """x @ W.T for a (rows, H) weight read a block of rows at a time: a 50k-row readout is never whole in fp32."""
    rows, width = shard.refs[key].shape
    block = max(1, READ_BLOCK_BYTES // (4 * width))
    return torch.cat([F.linear(x, shard.rows(key, slice(i, i + block))) for i in range(0, rows, block)], dim=-1)


def _rm_scores(finals: list[torch.Tensor], shards: list[_Shard]) -> torch.Tensor:
    """gpt-neox's rm_linear: RowParallelLinear(hidden -> 1, input_is_parallel=False, parallel_output=False).
    Rank r scatters its own copy of the final norm's output to its block of hidden features, multiplies it by
    its [1, H/T] weight, and the all-reduce sums the partial scores: (n, 1)."""
    parts = []
    for r, shard in enumerate(shards):
        w = shard["rm_linear.weight"]  # (1, H/T)
        width = w.shape[1]
        parts.append(F.linear(finals[r][:, r * width:(r + 1) * width], w))
    return sum(parts)


def _ln(x: torch.Tensor, shard: _Shard, prefix: str, eps: float) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], shard[prefix + ".weight"], shard[prefix + ".bias"], eps)


def tensor_parallel_logits(src: Path, ids: list[int], *, row_bias: str = "auto",
                           config_path: Path | None = None,
                           qkv_layout: str = "auto") -> tuple[torch.Tensor, NeoXConfig]:
    """Logits (T, V) fp32 of the tensor-parallel model at ``src`` on ``ids``, one layer in memory at a time.

    ``qkv_layout``: for Llama-style GQA checkpoints, 'blocked' or 'interleaved' (gpt-neox 2024-02..2024-11),
    'auto' as `merge` decides it.

    ``row_bias``: 'sum' (each rank adds its part before the all-reduce: NeoX with gpt_j_residual),
    'replicated' (full bias added once after the all-reduce), or 'auto' (follow the config).
    """
    # the checks merge makes (keys, dtypes, every shard's shape against the config), so that a source that
    # does not fit its config is named here instead of failing inside a matmul
    plan = plan_source(src, PlanOptions(row_bias=row_bias, qkv_layout=qkv_layout, config_path=config_path))
    return _simulate(plan, ids), plan.config


@torch.inference_mode()
def _simulate(plan: SourcePlan, ids: list[int]) -> torch.Tensor:
    """`tensor_parallel_logits` of a planned source."""
    ckpt, layout = plan.checkpoint, plan.qkv
    row_bias = "sum" if plan.row_bias is Rule.SUM else "replicated"
    generations = {p.layer.index: p.key_generation for p in plan.layers}

    def rank_tensors(layer: SourceLayer) -> list[dict[str, TensorRef]]:
        """Each rank's tensors under the key table's own names, whichever key generation the files spell."""
        table = key_table(ckpt.config, layer.kind, generations[layer.index])
        return [{table[k].key: ref for k, ref in ckpt.tensors(layer, r).items() if k in table}
                for r in range(ckpt.tp_degree)]

    # what each layer reads, in order (and the embedding again as a tied readout): a storage several layers share
    # (a ZeRO flat buffer) is CRC-checked once, with the last of them
    reads_plan = [[r for t in [*p.tensors, *p.dropped] for r in t.shards] for p in plan.layers]
    if ckpt.config.tie_word_embeddings:
        reads_plan.append(reads_plan[0])
    with SourceReader(plan=reads_plan) as reader:
        if ckpt.config.architecture == LLAMA:
            return _llama_tensor_parallel_logits(ckpt, ids, layout=layout, rank_tensors=rank_tensors, reader=reader)
        return _neox_tensor_parallel_logits(ckpt, ids, row_bias=row_bias, rank_tensors=rank_tensors, reader=reader)


def _neox_tensor_parallel_logits(ckpt: Checkpoint, ids: list[int], *, row_bias: str, reader: SourceReader,
                                 rank_tensors: Callable[[SourceLayer], list[dict[str, TensorRef]]]) -> torch.Tensor:
    """What GPT-NeoX computes on each rank (parallel or sequential residual), collectives simulated."""
    config = ckpt.config
    hd, eps = config.head_dim, config.layernorm_eps
    approximate = "tanh" if config.activation == GELU_TANH else "none"
    tokens = torch.tensor(ids)
    n = len(ids)
    rotary = RotaryTables(config.rotary_dims, config.rotary_emb_base, max(n, 1))
    cos, sin = rotary(torch.arange(n))

    def row_parallel(partials: list[torch.Tensor], biases: list[torch.Tensor]) -> torch.Tensor:
        if row_bias == "sum":
            return sum(p + b for p, b in zip(partials, biases))
        return sum(partials) + biases[0]

    def rank_attention(h: torch.Tensor, shard: _Shard) -> torch.Tensor:
        """One rank's attention over its heads; its partial dense output (n, H), bias not added."""
        qkv = F.linear(h, shard["attention.query_key_value.weight"],
                       shard["attention.query_key_value.bias"])  # (n, 3 H/T), [heads, 3, hd]
        heads = qkv.shape[-1] // (3 * hd)
        q, k, v = qkv.view(n, heads, 3 * hd).transpose(0, 1).unsqueeze(0).chunk(3, dim=-1)  # (1, heads, n, hd)
        q, k = apply_partial_rotary(q, cos, sin), apply_partial_rotary(k, cos, sin)
        ctx = causal_attention(q, k, v, q_start=0)[0].transpose(0, 1).reshape(n, heads * hd)
        return F.linear(ctx, shard["attention.dense.weight"])

    def rank_mlp(h: torch.Tensor, shard: _Shard) -> torch.Tensor:
        """One rank's MLP columns; its partial output (n, H), bias not added."""
        up = F.linear(h, shard["mlp.dense_h_to_4h.weight"], shard["mlp.dense_h_to_4h.bias"])
        return F.linear(F.gelu(up, approximate=approximate), shard["mlp.dense_4h_to_h.weight"])

    x = None
    logits_parts: list[torch.Tensor] = []
    for layer in ckpt.layers:
        with reader.scope() as reads:
            shards = [_Shard(reads, refs) for refs in rank_tensors(layer)]
            if layer.kind is LayerKind.EMBEDDING:
                x = torch.zeros(n, config.hidden_size)
                start = 0
                for shard in shards:  # VocabParallelEmbedding: each rank looks up its own rows, then all-reduce
                    rows = shard.refs["word_embeddings.weight"].shape[0]
                    local = tokens - start
                    inside = (local >= 0) & (local < rows)
                    # only the prompt's rows
                    x += shard.rows("word_embeddings.weight", local.clamp(0, rows - 1).numpy()) * inside[:, None]
                    start += rows
            elif layer.kind is LayerKind.BLOCK:
                # attention: each rank on its own heads; partial outputs (+ bias parts) summed by the all-reduce
                attn = row_parallel([rank_attention(_ln(x, s, "input_layernorm", eps), s) for s in shards],
                                    [s["attention.dense.bias"] for s in shards])
                mlp_input = x if config.parallel_residual else x + attn
                # MLP: each rank on its own columns of the 4h projection, then the all-reduce
                mlp = row_parallel([rank_mlp(_ln(mlp_input, s, "post_attention_layernorm", eps), s) for s in shards],
                                   [s["mlp.dense_4h_to_h.bias"] for s in shards])
                x = x + attn + mlp if config.parallel_residual else mlp_input + mlp
            elif layer.kind is LayerKind.FINAL_NORM:
                x = [_ln(x, shard, "norm", eps) for shard in shards]  # each rank normalises its own copy
            elif layer.kind is LayerKind.READOUT:
                if config.reward_model:
                    logits_parts = [_rm_scores(x, shards)]
                else:
                    logits_parts = [_linear_by_rows(x[r], shard, "final_linear.weight")
                                    for r, shard in enumerate(shards)]
            ckpt.release(layer)
    if config.tie_word_embeddings:  # readout is the embedding, vocab-parallel
        with reader.scope() as reads:
            logits_parts = [_linear_by_rows(x[r], _Shard(reads, refs), "word_embeddings.weight")
                            for r, refs in enumerate(rank_tensors(ckpt.layers[0]))]
    return torch.cat(logits_parts, dim=-1)


# ----- which QKV layout the comparison rests on ---------------------------------------------------------
_LAYOUT_CHOICE = {Split.QKV_BLOCKS.value: "blocked", Split.QKV_INTERLEAVED.value: "interleaved"}
EVIDENCE_NATS = 0.5  # a layout "fits" the source when the prompt costs this much less per token under it


@dataclass(frozen=True)
class AgainstReference:
    """The simulated forward that `verify --against` compares with, and what its QKV layout rests on."""

    logits: torch.Tensor  # (T, V) fp32, under ``layout``
    layout: str | None  # 'blocked' | 'interleaved' for Llama-style GQA, else None
    trusted: bool  # False: the layout is an assumption the source does not confirm (never a plain pass)
    note: str = ""  # what the layout rests on, for the check's detail


def recorded_qkv_layout(out: Path) -> dict | None:
    """The QKV layout the merge of ``out`` recorded in its manifest ({split, assumed, reason}), or None."""
    try:
        recorded = read_json_object(Path(out) / MANIFEST, VerificationError, what="manifest").get("qkv_layout")
    except VerificationError:
        return None
    return recorded if isinstance(recorded, dict) and isinstance(recorded.get("split"), str) else None


def prompt_nats(logits: torch.Tensor, ids: list[int]) -> float | None:
    """Mean next-token cross-entropy (nats per token) of the prompt under ``logits`` (None: under 2 tokens, or a
    reward model's scores, which predict no token)."""
    if len(ids) < 2 or logits.shape[-1] == 1:
        return None
    return float(F.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:])))


def against_reference(src: Path, ids: list[int], *, out: Path, row_bias: str = "auto",
                      config_path: Path | None = None, qkv_layout: str = "auto") -> AgainstReference:
    """The tensor-parallel forward to compare the merged ``out`` with, under the QKV layout the merge used.

    ``qkv_layout`` other than 'auto' is the user's statement and is used as given. Otherwise the layout the
    merge recorded in ``out``'s manifest is used (never a fresh guess that may differ from it). When that
    layout was itself an assumption (GQA with ``mlp.linear1`` keys: gpt-neox laid the rows out either way in
    2024), both layouts are simulated and the prompt's cross-entropy under each says which one the source
    fits; if it does not tell them apart, the comparison is not trusted: a pass would rest on the guess.
    """
    in_manifest = recorded_qkv_layout(out)
    recorded = in_manifest if qkv_layout == "auto" else None
    choice = _LAYOUT_CHOICE.get(recorded["split"], "auto") if recorded else qkv_layout
    try:
        plan = plan_source(src, PlanOptions(row_bias=row_bias, qkv_layout=choice, config_path=config_path))
    except ConfigError as e:
        if not recorded:
            raise
        # the merge recorded a layout this source cannot have: compare as merge decides it, and fail
        plan = plan_source(src, PlanOptions(row_bias=row_bias, config_path=config_path))
        layout = _LAYOUT_CHOICE.get(plan.qkv.split.value, plan.qkv.split.value) if plan.qkv else None
        return AgainstReference(_simulate(plan, ids), layout, False,
                                f"the merge recorded QKV layout {recorded['split']}, which this source cannot have "
                                f"({e}); compared with the source's own ({layout})")
    logits = _simulate(plan, ids)
    layout = _LAYOUT_CHOICE.get(plan.qkv.split.value) if plan.qkv is not None else None
    assumed = bool(recorded.get("assumed")) if recorded else (plan.qkv is not None and plan.qkv.assumed)
    if layout is None or not assumed:
        if qkv_layout != "auto":
            merged = _LAYOUT_CHOICE.get(in_manifest["split"]) if in_manifest else None
            source = "as --qkv-layout states" + (f" (the merge recorded {merged})" if merged and merged != layout
                                                 else "")
        else:
            source = "as the merge recorded it" if recorded else ""
        return AgainstReference(logits, layout, True, f"QKV layout {layout} {source}".rstrip() if layout else "")
    other = "interleaved" if layout == "blocked" else "blocked"
    other_logits = _simulate(plan_source(src, PlanOptions(row_bias=row_bias, qkv_layout=other,
                                                          config_path=config_path)), ids)
    nats = {layout: prompt_nats(logits, ids), other: prompt_nats(other_logits, ids)}
    shown = ", ".join(f"{k} {v:.3f}" for k, v in nats.items() if v is not None)
    if nats[layout] is not None and nats[other] is not None and abs(nats[layout] - nats[other]) >= EVIDENCE_NATS:
        fits = min(nats, key=nats.__getitem__)
        if fits == layout:
            return AgainstReference(logits, layout, True, f"QKV layout {layout} was assumed by the merge; the "
                                    f"source fits it (prompt nats/token: {shown})")
        return AgainstReference(logits, layout, False, f"the merge ASSUMED QKV layout {layout}, but the source fits "
                                f"{other} (prompt nats/token: {shown}): re-merge with --qkv-layout {other}")
    return AgainstReference(logits, layout, False, (
        f"the merge ASSUMED QKV layout {layout} and this prompt cannot tell {layout} from {other} "
        f"({'prompt nats/token: ' + shown if shown else 'a prompt of one token'}): not a pass; re-merge with "
        "--qkv-layout blocked|interleaved as the gpt-neox version that trained it says (interleaved 2024-02.."
        "2024-11), or verify with --qkv-layout to state it"))


# ----- Llama-style models (gpt-neox norm: rmsnorm, activation: swiglu, num_kv_heads) ------------------------
def _rms(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """gpt-neox norms.RMSNorm in fp32."""
    return scale * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _llama_tensor_parallel_logits(ckpt: Checkpoint, ids: list[int], *, layout,
                                  rank_tensors: Callable[[SourceLayer], list[dict[str, TensorRef]]],
                                  reader: SourceReader) -> torch.Tensor:
    """What gpt-neox's ParallelSelfAttention / ParallelMLP compute on each rank, collectives simulated.

    Per rank (megatron/model/transformer.py): the local QKV output is viewed [np, 3, hn] without GQA, split
    [np*hn | kvp*hn | kvp*hn] with GQA (or, 2024-02..2024-11, viewed [np, hn*(1+2*kvp/np)] and split per query
    head), kv heads repeat_interleave'd to the local query heads; RoPE on whole heads; the local linear1 output
    is chunked in two, ``x, gate``, and ``silu(gate) * x`` feeds the local linear2 columns (older checkpoints:
    ``silu(w1) * w3`` into w2). Row-parallel outputs are summed (all-reduce) and their bias added once after
    (sequential residual: parallel_output is False).
    """
    config, T = ckpt.config, ckpt.tp_degree
    split = layout.split if layout is not None else Split.QKV_PER_HEAD
    hd, eps = config.head_dim, config.layernorm_eps
    np_, kvp = config.num_heads // T, config.kv_heads // T
    tokens = torch.tensor(ids)
    n = len(ids)
    cos, sin = RotaryTables(config.rotary_dims, config.rotary_emb_base, max(n, 1))(torch.arange(n))

    def linear(h, shard, key):
        bias = shard.get(key[: -len("weight")] + "bias")
        return F.linear(h, shard[key], bias)

    def row_bias(shards, key):
        return shards[0][key] if key in shards[0] else 0.0  # every rank holds the full bias

    def rank_attention(h, shard):
        mixed = linear(h, shard, "attention.query_key_value.weight")  # (n, local rows)
        if split is Split.QKV_PER_HEAD:
            q, k, v = mixed.view(n, np_, 3 * hd).split(hd, dim=-1)  # each (n, np, hd)
        elif split is Split.QKV_BLOCKS:
            q, k, v = mixed.split((np_ * hd, kvp * hd, kvp * hd), dim=-1)
            q, k, v = q.reshape(n, np_, hd), k.reshape(n, kvp, hd), v.reshape(n, kvp, hd)
        else:  # interleaved: per query head [hn | hn*kvp/np | hn*kvp/np]
            part = hd * kvp // np_
            q, k, v = mixed.view(n, np_, hd + 2 * part).split((hd, part, part), dim=-1)
            k, v = k.reshape(n, kvp, hd), v.reshape(n, kvp, hd)
        k = torch.repeat_interleave(k, np_ // kvp, dim=1)
        v = torch.repeat_interleave(v, np_ // kvp, dim=1)
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # (1, np, n, hd)
        q, k = apply_partial_rotary(q, cos, sin), apply_partial_rotary(k, cos, sin)
        ctx = causal_attention(q, k, v, q_start=0, window=config.sliding_window)[0].transpose(0, 1).reshape(n, np_ * hd)
        return F.linear(ctx, shard["attention.dense.weight"])

    def rank_mlp(h, shard):
        if "mlp.linear1.weight" in shard:
            x, gate = linear(h, shard, "mlp.linear1.weight").chunk(2, dim=-1)  # Gated_Activation
            return F.linear(F.silu(gate) * x, shard["mlp.linear2.weight"])
        act = F.silu(linear(h, shard, "mlp.w1.weight")) * linear(h, shard, "mlp.w3.weight")  # LLaMAParallelMLP
        return F.linear(act, shard["mlp.w2.weight"])

    x = torch.zeros(n, config.hidden_size)
    finals: list[torch.Tensor] = []
    logits_parts: list[torch.Tensor] = []
    for layer in ckpt.layers:
        with reader.scope() as reads:
            shards = [_Shard(reads, refs) for refs in rank_tensors(layer)]
            if layer.kind is LayerKind.EMBEDDING:
                start = 0
                for shard in shards:  # VocabParallelEmbedding, then the all-reduce
                    w = shard["word_embeddings.weight"]
                    local = tokens - start
                    inside = (local >= 0) & (local < w.shape[0])
                    x += F.embedding(local.clamp(0, w.shape[0] - 1), w) * inside[:, None]
                    start += w.shape[0]
            elif layer.kind is LayerKind.BLOCK:
                attn = sum(rank_attention(_rms(x, s["input_layernorm.scale"], eps), s) for s in shards)
                x = x + attn + row_bias(shards, "attention.dense.bias")
                mlp = sum(rank_mlp(_rms(x, s["post_attention_layernorm.scale"], eps), s) for s in shards)
                x = x + mlp + row_bias(shards, "mlp.linear2.bias")
            elif layer.kind is LayerKind.FINAL_NORM:
                finals = [_rms(x, s["norm.scale"], eps) for s in shards]  # each rank's own copy
            elif layer.kind is LayerKind.READOUT:
                logits_parts = [_rm_scores(finals, shards)] if config.reward_model else \
                    [F.linear(finals[r], s["final_linear.weight"]) for r, s in enumerate(shards)]
            ckpt.release(layer)
    if config.tie_word_embeddings:
        with reader.scope() as reads:
            logits_parts = [F.linear(finals[r], _Shard(reads, refs)["word_embeddings.weight"])
                            for r, refs in enumerate(rank_tensors(ckpt.layers[0]))]
    return torch.cat(logits_parts, dim=-1)
