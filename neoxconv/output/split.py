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

Only safetensors are read (never a pickle). One source layer is in memory at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neoxconv.config import GPT_NEOX, NeoXConfig
from neoxconv.dtypes import TORCH_FLOAT_DTYPES, as_torch_dtype, canonical_dtype, tensor_nbytes
from neoxconv.errors import CheckpointError, ConfigError
from neoxconv.interrupt import deferred_sigint
from neoxconv.merge import Rule, Split, expected_shape, join_split, key_table, resolve_row_bias, shape_of, split_tensor
from neoxconv.output.folder import check_out_path
from neoxconv.output.hashing import DEFAULT_HASH
from neoxconv.plan.fingerprint import config_digest, file_fingerprint, public_place
from neoxconv.plan.plan import FolderPlan, part_key, plan_hf_folder
from neoxconv.source.checkpoint import SourceLayer, model_layers
from neoxconv.source.hf_folder import HFModel
from neoxconv.source.tokenizer import checked_token_count
from neoxconv.output.neox import NeoXTarget, Shard, WriteReport, check_target, write_neox_checkpoint

log = logging.getLogger(__name__)


# ----- the inverse rules (declared once, in neoxconv.merge: `split_tensor`, `join_split`) ----------------------
def _numpy(t: torch.Tensor) -> np.ndarray:
    """The tensor's values as numpy (bfloat16 as its int16 bits: numpy has no bfloat16); no copy."""
    return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def _torch(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A rank's shard as a tensor that owns a fresh, contiguous storage (what torch.save writes whole)."""
    t = torch.from_numpy(np.array(a, order="C"))
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


def rotary_inv_freq(config: NeoXConfig, dtype: torch.dtype) -> torch.Tensor:
    """gpt-neox's RotaryEmbedding buffer: 1 / base^(2i/d) in fp32, then the model's dtype."""
    d = config.rotary_dims
    return (1.0 / (config.rotary_emb_base ** (torch.arange(0, d, 2).float() / d))).to(dtype)


DERIVED: dict[str, Callable[[NeoXConfig, torch.dtype], torch.Tensor]] = {
    "attention.rotary_emb.inv_freq": rotary_inv_freq,
}


def shard_layer(layer: SourceLayer, full: dict[str, torch.Tensor], *, config: NeoXConfig, tp: int,
                ranks: list[int], row_bias: Rule, dtype: torch.dtype,
                generation: str | None = None, qkv_split: Split | None = None) -> Iterator[Shard]:
    """Rank shards of one source layer from its full tensors, in the key table's order.

    ``full`` and the shards are keyed as ``generation`` spells the keys (`merge.key_table`; None: the
    architecture's first generation). ``qkv_split``: the Llama-style QKV layout to write (default: today's
    gpt-neox layout, `current_split`).
    """
    table = key_table(config, layer.kind, generation)
    per_rank: dict[str, list[np.ndarray]] = {}  # each key's rank shards (views of ``full`` where they can be)
    for key, spec in table.items():
        if spec.rule is Rule.DROP:
            continue
        if spec.rule is Rule.SPLIT_ROWS:  # every rank's rows from the parts, in gpt-neox's current layout
            split = (qkv_split or current_split(config)) if spec.split is Split.QKV else spec.split
            parts = [_numpy(full[part_key(key, i)]) for i in range(len(spec.parts))]
            per_rank[key] = join_split(split, parts, tp, heads=config.num_heads, kv_heads=config.kv_heads,
                                       head_dim=config.head_dim)
        else:
            per_rank[key] = split_tensor(row_bias if spec.rule is Rule.ROW_BIAS else spec.rule, _numpy(full[key]), tp)
    for rank in ranks:
        shard: Shard = {}
        for key, spec in table.items():
            if spec.rule is Rule.DROP:
                if spec.key in DERIVED and config.architecture == GPT_NEOX:  # Llama-style: not saved by gpt-neox
                    shard[key] = DERIVED[spec.key](config, dtype)
                continue
            src = full[part_key(key, 0) if spec.rule is Rule.SPLIT_ROWS else key]
            shard[key] = _torch(per_rank[key][rank], src.dtype)
        yield shard


def current_split(config: NeoXConfig) -> Split:
    """The QKV layout today's gpt-neox expects: per head without GQA, [Q|K|V] blocks per rank with it."""
    return Split.QKV_BLOCKS if config.gqa else Split.QKV_PER_HEAD


def planned_bytes(config: NeoXConfig, tp: int, dtype: str, row_bias: Rule) -> int:
    """Bytes of weights the split writes (replicated tensors count once per rank)."""
    total = 0
    for layer in model_layers(config, with_readout=not config.tie_word_embeddings):
        for spec in key_table(config, layer.kind).values():
            rule = row_bias if spec.rule is Rule.ROW_BIAS else spec.rule
            if rule is Rule.DROP:
                derived = spec.key in DERIVED and config.architecture == GPT_NEOX
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
    for name in planned.rotary_buffers:
        got = hf.read_tensor(name)
        want = rotary_inv_freq(config, got.dtype)
        close = got.shape == want.shape and bool(torch.allclose(
            got.float(), want.float(), rtol=2 * torch.finfo(got.dtype).eps if got.is_floating_point() else 0, atol=0))
        if not close:
            raise ConfigError(
                f"{where}: {name!r} holds rotary frequencies {list(got.shape)} that the config does not give "
                f"(head_dim {config.head_dim}, rotary dims {config.rotary_dims}, base {config.rotary_emb_base:g}: "
                f"{want.shape[0]} values 1/base^(2i/d)); check rope_theta / rotary_pct in config.json")
    for name in planned.tied_readouts:
        if not hf.same_values(planned.embedding, name):
            raise CheckpointError(
                f"{where}: tie_word_embeddings is true, but {name!r} differs from {planned.embedding!r} (transformers 5 "
                f"then uses {name!r} untied, transformers 4 ties it to {planned.embedding!r}); set tie_word_embeddings "
                f"to false in config.json to keep {name!r} as the readout, or remove it from the folder to tie them")


# ----- the job ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SplitOptions:
    tp: int
    layout: str = "pipeline"  # pipeline | sequential
    dtype: str = "auto"  # auto (the weights' own) | fp16 | bf16 | fp32
    step: int = 0
    tokenizer_path: Path | None = None
    allow_nonfinite: bool = False  # write inf/nan (with a warning) instead of failing
    resume: bool = True
    force: bool = False
    quiet: bool = False
    hash: str = DEFAULT_HASH  # the digest the manifest records for every file


def _source_identity(hf: HFModel, out: Path) -> dict[str, Any]:
    """Which source this is (folder, by `public_place`, and weight files); what each file holds is proven per
    output file."""
    return {"hf_dir": public_place(hf.folder, out), "files": sorted({t.file.name for t in hf.tensors.values()})}


def split_model(hf_dir: Path, out: Path, options: SplitOptions) -> WriteReport:
    """Split the Hugging Face GPT-NeoX model at ``hf_dir`` into a NeoX checkpoint at TP ``options.tp`` in ``out``.

    Everything is checked (config, names, shapes, dtypes, divisibility) before the first byte is written.
    """
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
    target = NeoXTarget(config=config, tp_degree=options.tp, layout=options.layout, dtype=dtype, step=options.step,
                        tokenizer_size=tokenizer_size(hf.tokenizer, config.vocab_size))
    check_target(target, where=str(Path(hf_dir) / "config.json"))
    row_bias = resolve_row_bias("auto", config)
    torch_dtype = as_torch_dtype(dtype)

    def rank_shards(layer: SourceLayer, ranks: list[int]) -> Iterator[Shard]:
        full = hf.read_layer(names[layer], torch_dtype)  # one layer in memory
        yield from shard_layer(layer, full, config=config, tp=options.tp, ranks=ranks, row_bias=row_bias,
                               dtype=torch_dtype)

    config_sha = config_digest(config)
    file_fps: dict[Path, dict[str, Any]] = {}

    def fingerprint(layers: list[SourceLayer]) -> dict[str, Any]:
        """The proof of what ``layers`` read: the config and each safetensors file holding their tensors."""
        files = sorted({hf.tensors[n].file for layer in layers for n in names[layer].values()})
        for f in files:
            if f not in file_fps:
                file_fps[f] = file_fingerprint(f, safetensors_header=True)
        return {"config": config_sha, "files": {f.name: file_fps[f] for f in files}}

    recorded = {"command": "split", "tp": options.tp, "layout": options.layout, "dtype": dtype, "step": options.step}
    with deferred_sigint() as guard:
        return write_neox_checkpoint(
            Path(out), target, rank_shards, source=_source_identity(hf, Path(out)), recorded=recorded,
            fingerprint=fingerprint,
            planned_bytes=planned_bytes(config, options.tp, dtype, row_bias), tokenizer=hf.tokenizer,
            guard=guard, resume=options.resume, force=options.force, quiet=options.quiet,
            allow_nonfinite=options.allow_nonfinite, hash_algo=options.hash)

