"""Build random GPT-NeoX checkpoints in the exact 20B release layout, by inverting the merge rule table.

Used by the demo, the tests and the benchmarks. ``write_checkpoint`` returns the *reference* state dict
(Hugging Face names) that a correct merge must reproduce: concat rules are split evenly, row-parallel
biases are split into random parts whose fp32 sum (cast to the storage dtype) is the reference bias,
replicated tensors are copied (optionally with a little per-rank noise).
"""

from __future__ import annotations

import argparse
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from neoxconv.config import GELU_TANH, NeoXConfig
from neoxconv.dtypes import as_torch_dtype
from neoxconv.merge import Rule, hf_name, key_table
from neoxconv.source.checkpoint import LayerKind, SourceLayer, model_layers, pipeline_file_name, sequential_file_name


@dataclass(frozen=True)
class SyntheticSpec:
    config: NeoXConfig
    tp_degree: int = 2
    layout: str = "pipeline"  # or "sequential"
    dtype: str = "float16"
    seed: int = 0
    step: int = 150000
    replica_noise: float = 0.0  # per-rank noise on replicated tensors
    full_row_bias_on_every_rank: bool = False  # what older HF->NeoX converters wrote
    with_inv_freq: bool = True
    tokenizer: Path | None = None


# head widths of the released models, for ``synth --hidden H`` without --heads: Pythia 70M-410M use 64 (hidden
# 512-1024), Pythia 1.4B-12B 128 (hidden 2048-5120), GPT-NeoX-20B 96 (hidden 6144, 64 heads)
_RELEASED_HEAD_DIM = {6144: 96}


def default_heads(hidden: int) -> int:
    """The head count ``synth`` picks for a width: the released models' head width (`_RELEASED_HEAD_DIM`: 96 at
    6144, as GPT-NeoX-20B), else 64 below hidden 2048 and 128 from 2048 on (Pythia); 64 when that does not
    divide ``hidden``; one head for a width under 64."""
    head_dim = _RELEASED_HEAD_DIM.get(hidden, 64 if hidden < 2048 else 128)
    for width in (head_dim, 64):
        if hidden % width == 0:
            return hidden // width
    return max(1, hidden // 64)


@dataclass(frozen=True)
class SynthResult:
    """What ``synth`` wrote (``synth --json``)."""

    out: str
    step_dir: str
    parameters: int
    bytes: int
    files: int
    tp_degree: int
    layout: str
    dtype: str
    num_layers: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    vocab_size: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def tiny_config(**overrides) -> NeoXConfig:
    """A 20B-shaped model at a tiny width (vocab stays 50432 so the real tokenizer fits)."""
    base = dict(num_layers=2, hidden_size=64, num_heads=4, vocab_size=50432, max_position_embeddings=256,
                rotary_pct=0.25, parallel_residual=True, activation=GELU_TANH)
    base.update(overrides)
    return NeoXConfig(**base)


def random_layer(config: NeoXConfig, layer: SourceLayer, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Random fp32 weights of one source layer, in Hugging Face names, scaled so activations stay O(1)."""
    H, F, V = config.hidden_size, config.ffn_size, config.vocab_size

    def n(*shape, std=1.0):
        return torch.randn(*shape, generator=g) * std

    if layer.kind is LayerKind.EMBEDDING:
        return {"gpt_neox.embed_in.weight": n(V, H)}
    if layer.kind is LayerKind.FINAL_NORM:
        return {"gpt_neox.final_layer_norm.weight": 1 + n(H, std=0.1), "gpt_neox.final_layer_norm.bias": n(H, std=0.1)}
    if layer.kind is LayerKind.READOUT:
        return {"embed_out.weight": n(V, H, std=H ** -0.5)}
    p = f"gpt_neox.layers.{layer.block}."
    return {
        p + "input_layernorm.weight": 1 + n(H, std=0.1), p + "input_layernorm.bias": n(H, std=0.1),
        p + "attention.query_key_value.weight": n(3 * H, H, std=H ** -0.5),
        p + "attention.query_key_value.bias": n(3 * H, std=0.1),
        p + "attention.dense.weight": n(H, H, std=H ** -0.5), p + "attention.dense.bias": n(H, std=0.1),
        p + "post_attention_layernorm.weight": 1 + n(H, std=0.1),
        p + "post_attention_layernorm.bias": n(H, std=0.1),
        p + "mlp.dense_h_to_4h.weight": n(F, H, std=H ** -0.5), p + "mlp.dense_h_to_4h.bias": n(F, std=0.1),
        p + "mlp.dense_4h_to_h.weight": n(H, F, std=F ** -0.5), p + "mlp.dense_4h_to_h.bias": n(H, std=0.1),
    }


def random_state_dict(config: NeoXConfig, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """A whole random GPT-NeoX in Hugging Face names, fp32."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for layer in model_layers(config, with_readout=not config.tie_word_embeddings):
        sd.update(random_layer(config, layer, g))
    return sd


def inv_freq(config: NeoXConfig) -> torch.Tensor:
    d = config.rotary_dims
    return 1.0 / (config.rotary_emb_base ** (torch.arange(0, d, 2, dtype=torch.float32) / d))


def split_layer(
    layer: SourceLayer, reference: dict[str, torch.Tensor], spec: SyntheticSpec, g: torch.Generator
) -> list[dict[str, torch.Tensor]]:
    """The T rank shards of one source layer; updates ``reference`` row biases to the parts' true sum."""
    T, dtype = spec.tp_degree, as_torch_dtype(spec.dtype)
    row_bias = Rule.SUM if spec.config.parallel_residual and not spec.full_row_bias_on_every_rank else Rule.REPLICATED
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(T)]
    for key, rs in key_table(spec.config, layer.kind).items():  # the rows this config has
        rule = row_bias if rs.rule is Rule.ROW_BIAS else rs.rule
        if rs.hf_name is None:
            if key == "attention.rotary_emb.inv_freq" and spec.with_inv_freq:
                for s in shards:
                    s[key] = inv_freq(spec.config)
            continue
        name = hf_name(rs, layer)
        full = reference[name].to(dtype)
        if rule is Rule.CONCAT_ROWS:
            parts = list(full.chunk(T, dim=0))
        elif rule is Rule.CONCAT_COLS:
            parts = list(full.chunk(T, dim=1))
        elif rule is Rule.SUM:
            target = reference[name].float()
            parts32 = [torch.randn(target.shape, generator=g) * 0.1 for _ in range(T - 1)]
            parts32.append(target - sum(parts32, torch.zeros_like(target)))
            parts = [p.to(dtype) for p in parts32]
            full = sum((p.float() for p in parts), torch.zeros_like(target)).to(dtype)
        else:  # REPLICATED
            parts = [full.clone() for _ in range(T)]
            if spec.replica_noise:
                parts = [p + (torch.randn(p.shape, generator=g) * spec.replica_noise).to(dtype) if r else p
                         for r, p in enumerate(parts)]
                full = torch.stack([p.float() for p in parts]).mean(0).to(dtype)
        reference[name] = full
        for s, p in zip(shards, parts):
            s[key] = p.contiguous().clone()
    return shards


def neox_yaml(config: NeoXConfig, spec: SyntheticSpec) -> str:
    """A NeoX-style YAML config (braces, comments, hyphenated keys), as the 20B release ships."""
    b = lambda v: "true" if v else "false"  # noqa: E731
    # the release's own spelling (relative to the folder gpt-neox ran in); named only when the file is written
    vocab_file = '\n  "vocab-file": "./20B_checkpoints/20B_tokenizer.json",' if spec.tokenizer is not None else ""
    return f"""# synthetic GPT-NeoX config written by neoxconv (same shape of file as configs/20B.yml)
{{
  # parallelism settings
  "pipe-parallel-size": {1 if spec.layout == 'pipeline' else 0},
  "model-parallel-size": {spec.tp_degree},

  # model settings
  "num-layers": {config.num_layers},
  "hidden-size": {config.hidden_size},
  "num-attention-heads": {config.num_heads},
  "seq-length": {config.max_position_embeddings},
  "max-position-embeddings": {config.max_position_embeddings},
  "norm": "layernorm",
  "pos-emb": "rotary",
  "rotary_pct": {config.rotary_pct},
  "rotary_emb_base": {int(config.rotary_emb_base)},
  "no-weight-tying": {b(not config.tie_word_embeddings)},
  "gpt_j_residual": {b(config.parallel_residual)},
  "output_layer_parallelism": "column",
  "bias-gelu-fusion": {b(config.activation == GELU_TANH)},
  "layernorm-epsilon": {config.layernorm_eps},
  {f'"intermediate_size": {config.intermediate_size},' if config.intermediate_size else ''}

  "optimizer": {{
    "type": "Adam",
    "params": {{ "lr": 0.97e-4, "betas": [0.9, 0.95], "eps": 1.0e-8, }}
    }},
  "zero_optimization": {{ "stage": 1, "allgather_partitions": True, "overlap_comm": True, }},
  "fp16": {{ "fp16": {b(spec.dtype == 'float16')}, "enabled": {b(spec.dtype == 'float16')}, "loss_scale": 0 }},
  "tokenizer_type": "HFTokenizer",{vocab_file}
}}
"""


def write_root(root: Path, spec: SyntheticSpec) -> Path:
    """What a checkpoint root holds besides the weights, as the 20B release lays it out: ``latest``, the
    ``global_step*`` folder (returned), ``configs/model.yml`` and the tokenizer (when ``spec`` names one)."""
    step = root / f"global_step{spec.step}"
    step.mkdir(parents=True, exist_ok=True)
    (root / "configs").mkdir(exist_ok=True)
    (root / "latest").write_text(step.name)
    (root / "configs" / "model.yml").write_text(neox_yaml(spec.config, spec))
    if spec.tokenizer is not None:
        shutil.copyfile(spec.tokenizer, root / "20B_tokenizer.json")
    return step


def write_checkpoint(root: Path, spec: SyntheticSpec, *, keep_reference: bool = True) -> dict[str, torch.Tensor]:
    """Write a checkpoint under ``root`` (latest, configs/, global_step*/); return the reference weights.

    One layer is generated at a time; ``keep_reference=False`` returns {} (for benchmark-sized models).
    """
    config = spec.config
    if config.vocab_size is None:
        raise ValueError("a synthetic checkpoint needs a vocab_size")
    root = Path(root)
    step = write_root(root, spec)

    reference: dict[str, torch.Tensor] = {}
    g_weights = torch.Generator().manual_seed(spec.seed)
    g_split = torch.Generator().manual_seed(spec.seed + 1)
    module: list[dict[str, torch.Tensor]] = [{} for _ in range(spec.tp_degree)]
    for layer in model_layers(config, with_readout=not config.tie_word_embeddings):  # one layer in memory
        weights = {k: v.to(as_torch_dtype(spec.dtype)) for k, v in random_layer(config, layer, g_weights).items()}
        shards = split_layer(layer, weights, spec, g_split)
        for rank, shard in enumerate(shards):
            if spec.layout == "pipeline":
                torch.save(shard, step / pipeline_file_name(layer.index, rank))
            else:
                module[rank].update({f"sequential.{layer.index}.{k}": v for k, v in shard.items()})
        if keep_reference:
            reference.update(weights)
    args = argparse.Namespace(num_layers=config.num_layers, model_parallel_size=spec.tp_degree)
    for rank in range(spec.tp_degree):
        bookkeeping = {"module": module[rank] if spec.layout == "sequential" else None, "args": args,
                       "iteration": spec.step, "mp_world_size": spec.tp_degree, "dp_world_size": 1}
        torch.save(bookkeeping, step / sequential_file_name(rank))
    return reference


def parameter_count(config: NeoXConfig) -> int:
    """Parameters of a GPT-NeoX model of this config (embedding, blocks, final norm, untied readout)."""
    H, F, V = config.hidden_size, config.ffn_size, config.vocab_size or 0
    block = 4 * H + (3 * H * H + 3 * H) + (H * H + H) + (F * H + F) + (H * F + H)
    return V * H * (1 if config.tie_word_embeddings else 2) + config.num_layers * block + 2 * H


def check_split(spec: SyntheticSpec) -> None:
    """UsageError (exit 2) when ``spec``'s model cannot be split ``spec.tp_degree`` ways; before anything is written."""
    from neoxconv.errors import UsageError

    config, tp = spec.config, spec.tp_degree
    if tp < 1:
        problems = [f"--tp must be at least 1, got {tp}"]
    else:
        problems = [f"{what} {n} is not divisible by --tp {tp}"
                    for what, n in (("--heads", config.num_heads), ("--vocab", config.vocab_size or 0),
                                    ("--ffn", config.ffn_size)) if n % tp]
    if problems:
        raise UsageError("cannot split this model: " + "; ".join(problems))


def _check_resources(out: Path, spec: SyntheticSpec) -> None:
    """Refuse, before writing anything, a size this machine cannot hold: the files must fit on OUT's disk
    (OutputError, exit 6) and the largest layer, generated in fp32 and split (the whole model for the
    sequential layout, whose rank files are written at the end), in the available memory (UsageError, exit 2)."""
    from neoxconv.errors import OutputError, UsageError
    from neoxconv.output.describe import free_bytes
    from neoxconv.progress import format_bytes
    from neoxconv.runtime.placement import meminfo

    config = spec.config
    itemsize = 4 if spec.dtype == "float32" else 2
    need = parameter_count(config) * itemsize
    where, free = free_bytes(out)
    if need > free:
        raise OutputError(f"{out}: the checkpoint needs {format_bytes(need)} but {where} has {format_bytes(free)} "
                          "free; choose a smaller --layers/--hidden/--vocab or another OUT")
    H, F, V = config.hidden_size, config.ffn_size, config.vocab_size or 0
    largest = max(V * H, 4 * H * H + 2 * F * H + 9 * H + F)  # embedding or readout, or one block
    peak = largest * (4 + 2 * itemsize) + (need if spec.layout == "sequential" else 0)
    avail = meminfo("MemAvailable")
    if avail is not None and peak > avail:
        raise UsageError(f"this size needs about {format_bytes(peak)} of memory while writing, but "
                         f"{format_bytes(avail)} is available; choose a smaller --hidden/--vocab/--ffn"
                         + (" or --layout pipeline" if spec.layout == "sequential" else ""))


def synthesize(out: Path, spec: SyntheticSpec) -> SynthResult:
    """``neoxconv synth``: write a random checkpoint of ``spec``'s size to a new or empty folder ``out``.

    Raises UsageError (exit 2) for a size the tensor-parallel split cannot hold, OutputError (6) when ``out``
    is a file or a non-empty folder. Returns what was written (parameters, bytes, files).
    """
    from neoxconv.errors import OutputError
    from neoxconv.output.folder import check_out_path

    check_split(spec)
    config = spec.config
    out = Path(out)
    check_out_path(out)  # a dangling symlink or a file: one-line OutputError, nothing created
    if out.is_symlink():
        raise OutputError(f"{out}: is a symlink (to {os.readlink(out)}); synth writes only into a new or empty "
                          "folder, never through a link")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputError(f"{out}: exists and is {'a file' if not out.is_dir() else 'not empty'}; "
                          "synth writes only into a new or empty folder")
    _check_resources(out, spec)
    write_checkpoint(out, spec, keep_reference=False)
    files = [p for p in out.rglob("*") if p.is_file()]
    return SynthResult(out=str(out), step_dir=str(out / f"global_step{spec.step}"), parameters=parameter_count(config),
                       bytes=sum(p.stat().st_size for p in files), files=len(files), tp_degree=spec.tp_degree,
                       layout=spec.layout, dtype=spec.dtype, num_layers=config.num_layers,
                       hidden_size=config.hidden_size, num_heads=config.num_heads,
                       intermediate_size=config.ffn_size, vocab_size=config.vocab_size or 0)
