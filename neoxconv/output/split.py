"""`split_model`: a Hugging Face GPT-NeoX (or Llama) folder becomes a gpt-neox checkpoint at tensor-parallel degree T.

The split runs the merge rule table (`neoxconv.merge.RULES`, NeoX key -> rule and Hugging Face name) backwards;
the inverse of each rule is declared once, in `SPLITTERS`, and buffers gpt-neox derives from the config are
declared in `DERIVED`. A new architecture is a new rule table; these two tables stay as they are.

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

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from neoxconv.source.checkpoint import LayerKind, SourceLayer, model_layers
from neoxconv.config import GPT_NEOX, NeoXConfig
from neoxconv.dtypes import FLOAT_DTYPES, FROM_SAFETENSORS, canonical_dtype, tensor_nbytes
from neoxconv.errors import CheckpointError, ConfigError
from neoxconv.plan.fingerprint import config_digest, file_fingerprint
from neoxconv.check.integrity import checked_safetensors_header
from neoxconv.interrupt import deferred_sigint
from neoxconv.merge import (RULES, Rule, RuleSpec, Split, expected_shape, join_split, output_names, resolve_row_bias,
                            rule_table, shape_of)
from neoxconv.output.folder import check_out_path
from neoxconv.output.hashing import DEFAULT_HASH
from neoxconv.source.tokenizer import checked_token_count
from neoxconv.output.neox import TORCH_DTYPES, NeoXTarget, Shard, WriteReport, check_target, write_neox_checkpoint

log = logging.getLogger(__name__)


# ----- the inverse rules -------------------------------------------------------------------------------------
def _block(full: torch.Tensor, dim: int, tp: int, rank: int) -> torch.Tensor:
    n = full.shape[dim] // tp
    return full.narrow(dim, rank * n, n).clone(memory_format=torch.contiguous_format)


def _sum_part(full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    return full.clone() if rank == 0 else torch.zeros_like(full)


SPLITTERS: dict[Rule, Callable[[torch.Tensor, int, int], torch.Tensor]] = {
    Rule.CONCAT_ROWS: lambda full, tp, rank: _block(full, 0, tp, rank),
    Rule.CONCAT_COLS: lambda full, tp, rank: _block(full, 1, tp, rank),
    Rule.REPLICATED: lambda full, tp, rank: full.clone(),
    Rule.SUM: _sum_part,
}


def rotary_inv_freq(config: NeoXConfig, dtype: torch.dtype) -> torch.Tensor:
    """gpt-neox's RotaryEmbedding buffer: 1 / base^(2i/d) in fp32, then the model's dtype."""
    d = config.rotary_dims
    return (1.0 / (config.rotary_emb_base ** (torch.arange(0, d, 2).float() / d))).to(dtype)


DERIVED: dict[str, Callable[[NeoXConfig, torch.dtype], torch.Tensor]] = {
    "attention.rotary_emb.inv_freq": rotary_inv_freq,
}


def shard_layer(layer: SourceLayer, full: dict[str, torch.Tensor], *, config: NeoXConfig, tp: int,
                ranks: list[int], row_bias: Rule, dtype: torch.dtype,
                table: dict[str, RuleSpec] | None = None, qkv_split: Split | None = None) -> Iterator[Shard]:
    """Rank shards of one source layer from its full tensors (NeoX keys), in the rule table's key order.

    ``table`` is the layer's rule table (default: GPT-NeoX's, ``RULES[layer.kind]``); another architecture
    passes its own and reuses `SPLITTERS` / `DERIVED` unchanged. ``qkv_split``: the Llama-style QKV layout to
    write (default: today's gpt-neox layout, `current_split`).
    """
    table = RULES[layer.kind] if table is None else table
    joined: dict[str, list[torch.Tensor]] = {}
    for key, spec in table.items():  # SPLIT_ROWS: every rank's rows from the parts, in gpt-neox's current layout
        if spec.rule is Rule.SPLIT_ROWS:
            split = (qkv_split or current_split(config)) if spec.split is Split.QKV else spec.split
            parts = [full[part_key(key, i)] for i in range(len(spec.parts))]
            joined[key] = [torch.from_numpy(a) for a in join_split(
                split, [p.view(torch.int16).numpy() if p.dtype == torch.bfloat16 else p.numpy() for p in parts],
                tp, heads=config.num_heads, kv_heads=config.kv_heads, head_dim=config.head_dim)]
            if parts[0].dtype == torch.bfloat16:
                joined[key] = [t.view(torch.bfloat16) for t in joined[key]]
    for rank in ranks:
        shard: Shard = {}
        for key, spec in table.items():
            if spec.rule is Rule.DROP:
                if key in DERIVED and config.architecture == GPT_NEOX:  # Llama-style: not saved by gpt-neox
                    shard[key] = DERIVED[key](config, dtype)
                continue
            if spec.rule is Rule.SPLIT_ROWS:
                shard[key] = joined[key][rank]
                continue
            rule = row_bias if spec.rule is Rule.ROW_BIAS else spec.rule
            shard[key] = SPLITTERS[rule](full[key], tp, rank)
        yield shard


def part_key(key: str, part: int) -> str:
    """The name a SPLIT_ROWS key's part goes by in a layer's full tensors (``key#part``)."""
    return f"{key}#{part}"


def current_split(config: NeoXConfig) -> Split:
    """The QKV layout today's gpt-neox expects: per head without GQA, [Q|K|V] blocks per rank with it."""
    return Split.QKV_BLOCKS if config.gqa else Split.QKV_PER_HEAD


def planned_bytes(config: NeoXConfig, tp: int, dtype: str, row_bias: Rule) -> int:
    """Bytes of weights the split writes (replicated tensors count once per rank)."""
    total = 0
    for layer in model_layers(config, with_readout=not config.tie_word_embeddings):
        for key, spec in rule_table(config, layer.kind).items():
            rule = row_bias if spec.rule is Rule.ROW_BIAS else spec.rule
            if rule is Rule.DROP:
                derived = key in DERIVED and config.architecture == GPT_NEOX
                total += tp * tensor_nbytes(dtype, (config.rotary_dims // 2,)) if derived else 0
                continue
            if rule is Rule.SPLIT_ROWS:
                total += sum(tensor_nbytes(dtype, shape_of(s, config) or ()) for _, s in spec.parts)
                continue
            shape = expected_shape(spec, config) or ()
            total += tensor_nbytes(dtype, shape) * (1 if rule in (Rule.CONCAT_ROWS, Rule.CONCAT_COLS) else tp)
    return total


# ----- the Hugging Face side ---------------------------------------------------------------------------------
_HF_DERIVED_SUFFIXES = (".attention.rotary_emb.inv_freq", ".attention.bias", ".attention.masked_bias")


@dataclass
class HFTensor:
    file: Path
    dtype: str
    shape: tuple[int, ...]


class HFModel:
    """A Hugging Face GPT-NeoX folder: config.json and safetensors (one file or an index of shards)."""

    def __init__(self, folder: Path, *, tokenizer_path: Path | None = None) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"{self.folder}: expected a Hugging Face model folder")
        cfg = self.folder / "config.json"
        if not cfg.is_file():
            raise ConfigError(f"{self.folder}: no config.json (a Hugging Face GPT-NeoX folder has one)")
        raw = _read_json(cfg, ConfigError)
        if raw.get("model_type") not in (None, "gpt_neox", "llama"):
            raise ConfigError(f"{cfg}: model_type {raw.get('model_type')!r}: split writes GPT-NeoX and Llama models")
        if raw.get("model_type") in (None, "gpt_neox") and raw.get("attention_bias") is False:
            raise ConfigError(f"{cfg}: attention_bias is false; GPT-NeoX checkpoints have attention biases")
        self.config = NeoXConfig.from_hf_json(cfg)
        self.tensors = self._scan()
        self.tokenizer = self._find_tokenizer(tokenizer_path)

    def _scan(self) -> dict[str, HFTensor]:
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _read_json(index, CheckpointError).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no 'weight_map' object")
            files = sorted({self.folder / str(f) for f in weight_map.values()})
        else:
            files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            pickles = sorted(p.name for p in self.folder.glob("*.bin"))
            hint = (f" (found {', '.join(pickles)}: neoxconv never unpickles; save the model with "
                    "safe_serialization=True)") if pickles else ""
            raise CheckpointError(f"{self.folder}: no *.safetensors weights{hint}")
        tensors: dict[str, HFTensor] = {}
        for f in files:
            if not f.is_file() or f.parent.resolve() != self.folder.resolve():
                raise CheckpointError(f"{f}: listed in the index but not a file in {self.folder}")
            try:
                header = checked_safetensors_header(f)
            except (OSError, ValueError) as e:
                raise CheckpointError(f"{f}: not a readable safetensors file: {e}") from None
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if name in tensors:  # which copy a loader takes depends on the loader: refuse
                    raise CheckpointError(f"{f}: holds {name!r}, which {tensors[name].file.name} holds too")
                dtype = FROM_SAFETENSORS.get(str(info.get("dtype")))
                if dtype is None:
                    raise CheckpointError(f"{f}: {name!r} has dtype {info.get('dtype')!r}, which neoxconv does not read")
                tensors[name] = HFTensor(f, dtype, tuple(int(s) for s in info.get("shape", [])))
        return tensors

    def _find_tokenizer(self, explicit: Path | None) -> Path | None:
        if explicit is not None:
            if not Path(explicit).is_file():
                raise CheckpointError(f"{explicit}: no such tokenizer file")
            return Path(explicit)
        p = self.folder / "tokenizer.json"
        return p if p.is_file() else None

    def plan(self) -> tuple[NeoXConfig, dict[SourceLayer, dict[str, str]], str]:
        """Check every expected tensor (names, shapes, dtypes) at once; (config, {layer: {neox key: HF name}}, dtype)."""
        config = self.config
        emb = self.tensors.get(rule_table(config, LayerKind.EMBEDDING)["word_embeddings.weight"].hf_name or "")
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
            for key, spec in rule_table(config, layer.kind).items():
                outputs = output_names(spec)  # SPLIT_ROWS: one HF tensor per part, read as key#part
                for part, (template, shape) in enumerate(outputs):
                    name = template.format(i=layer.block)
                    expected.add(name)
                    names[layer][part_key(key, part) if spec.rule is Rule.SPLIT_ROWS else key] = name
                    t = self.tensors.get(name)
                    if t is None:
                        problems.append(f"missing {name!r}")
                        continue
                    want = shape_of(shape, config)
                    if want is not None and t.shape != want:
                        problems.append(f"{name!r} has shape {list(t.shape)}, config.json implies {list(want)}")
                    if t.dtype not in FLOAT_DTYPES:
                        problems.append(f"{name!r} has dtype {t.dtype}, not a floating-point type")
        ignorable = {"embed_out.weight", "lm_head.weight"} if config.tie_word_embeddings else set()
        unknown = sorted(n for n in self.tensors if n not in expected and n not in ignorable
                         and not n.endswith(_HF_DERIVED_SUFFIXES))
        if unknown:
            shown = ", ".join(map(repr, unknown[:8])) + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else "")
            problems.append(f"unknown tensor(s) {shown} (is this a GPT-NeoX model?)")
        if problems:
            raise CheckpointError(f"{self.folder}: " + "; ".join(problems))
        dtypes = {self.tensors[n].dtype for n in expected}
        dtype = dtypes.pop() if len(dtypes) == 1 else "mixed"
        return config, names, dtype

    def read_layer(self, names: dict[str, str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """{NeoX key: tensor} for one layer's HF names, cast to ``dtype``.

        Each file is opened for this call only: a safetensors handle keeps its whole file mapped, and mapped
        pages that were read count as resident memory until the mapping goes (with the layer's tensors).
        """
        from safetensors import SafetensorError, safe_open

        by_file: dict[Path, list[tuple[str, str]]] = {}
        for key, name in names.items():
            by_file.setdefault(self.tensors[name].file, []).append((key, name))
        out: dict[str, torch.Tensor] = {}
        for file, items in by_file.items():
            try:
                with safe_open(str(file), framework="pt") as f:
                    for key, name in items:
                        out[key] = f.get_tensor(name).to(dtype)  # maps the file until the layer is dropped
            except (OSError, SafetensorError) as e:
                raise CheckpointError(f"{file}: cannot read the tensors of {', '.join(n for _, n in items)}: {e}") from None
        return out


def _read_json(path: Path, error: type) -> dict[str, Any]:
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise error(f"{path}: not readable JSON: {e}") from None
    if not isinstance(d, dict):
        raise error(f"{path}: expected a JSON object")
    return d


def tokenizer_size(path: Path | None, rows: int | None) -> int | None:
    """Entries of a tokenizer.json (largest id + 1 over the vocabulary and added tokens); None if unknown or no
    tokenizer. Checked as merge checks it (`checked_token_count`): a broken one is a CheckpointError naming it,
    never copied into OUT."""
    return None if path is None else checked_token_count(path, rows)


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


def _source_identity(hf: HFModel) -> dict[str, Any]:
    """Which source this is (folder and weight files); what each file holds is proven per output file."""
    return {"hf_dir": str(hf.folder.resolve()), "files": sorted({t.file.name for t in hf.tensors.values()})}


def split_model(hf_dir: Path, out: Path, options: SplitOptions) -> WriteReport:
    """Split the Hugging Face GPT-NeoX model at ``hf_dir`` into a NeoX checkpoint at TP ``options.tp`` in ``out``.

    Everything is checked (config, names, shapes, dtypes, divisibility) before the first byte is written.
    """
    check_out_path(Path(out))
    hf = HFModel(hf_dir, tokenizer_path=options.tokenizer_path)
    config, names, src_dtype = hf.plan()
    if options.dtype == "auto":
        if src_dtype == "mixed":
            raise ConfigError(f"{hf_dir}: the weights have mixed dtypes; choose one with --dtype fp16|bf16|fp32")
        dtype = src_dtype
    else:
        dtype = canonical_dtype(options.dtype)
    if dtype not in TORCH_DTYPES:
        raise ConfigError(f"{hf_dir}: weights are {dtype}; choose --dtype fp16, bf16 or fp32")
    target = NeoXTarget(config=config, tp_degree=options.tp, layout=options.layout, dtype=dtype, step=options.step,
                        tokenizer_size=tokenizer_size(hf.tokenizer, config.vocab_size))
    check_target(target, where=str(Path(hf_dir) / "config.json"))
    row_bias = resolve_row_bias("auto", config)
    torch_dtype = TORCH_DTYPES[dtype]

    def rank_shards(layer: SourceLayer, ranks: list[int]) -> Iterator[Shard]:
        full = hf.read_layer(names[layer], torch_dtype)  # one layer in memory
        yield from shard_layer(layer, full, config=config, tp=options.tp, ranks=ranks, row_bias=row_bias,
                               dtype=torch_dtype, table=rule_table(config, layer.kind))

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
            Path(out), target, rank_shards, source=_source_identity(hf), recorded=recorded, fingerprint=fingerprint,
            planned_bytes=planned_bytes(config, options.tp, dtype, row_bias), tokenizer=hf.tokenizer,
            guard=guard, resume=options.resume, force=options.force, quiet=options.quiet,
            allow_nonfinite=options.allow_nonfinite, hash_algo=options.hash)

