"""Checkpoints written the way DeepSpeed and gpt-neox really write them (test helper; no neoxconv rule table).

What is reproduced, from the writers' source (DeepSpeed runtime/engine.py ``_save_checkpoint`` and
``_common_checkpoint_state``, runtime/pipe/module.py ``save_state_dict``, gpt-neox megatron/checkpointing.py):

* each rank is a real ``nn.Module`` with gpt-neox's module names (``word_embeddings``, ``attention.
  query_key_value``, ``attention.rotary_emb.inv_freq`` as a persistent buffer, ``mlp.dense_h_to_4h`` or
  ``mlp.linear1``, ``norm``, ``final_linear``), holding that rank's tensor-parallel slice;
* ZeRO stage 1/2: every parameter becomes a view of one flat fp16 buffer of the rank, in a shuffled order,
  with padding between them (``p.data = flat[off:off + n].view_as(p)``), and ``state_dict()`` is saved
  without cloning, so one storage backs every parameter (``_metadata`` rides along via BUILD);
* ``torch.save`` under a ``cuda:N`` location tag (a test-registered package tags the storages);
* sequential layout (pipe-parallel-size 0): ``mp_rank_XX_model_states.pt`` = the engine's state dict with
  ``module = model.state_dict()`` (``sequential.{idx}.*`` keys) and DeepSpeed/gpt-neox bookkeeping;
* pipeline layout: ``layer_XX-model_YY-model_states.pt`` = ``torch.save(layer.state_dict())`` (DeepSpeed
  before Aug 2021: views of the flat buffer, so every layer file carries the whole buffer) or
  ``type(sd)({k: v.clone()})`` (Aug 2021 - Jul 2023) or CPU copies (since Jul 2023); ``mp_rank_XX`` files
  hold the bookkeeping with ``module=None``.

The reference is the full model in Hugging Face names; the rank slices are cut from it here, by the
tensor-parallel layout of gpt-neox's Column/RowParallelLinear, not by neoxconv's tables.
"""

from __future__ import annotations

import argparse
import contextlib
import random
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from neoxconv.tools.synthetic import SyntheticSpec, neox_yaml, random_state_dict, tiny_config


class NeoXArgs:
    """Stands in for gpt-neox's NeoXArgs: a class that exists only where the model was trained."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


# ---- a tiny gpt-neox, one rank's slice, with gpt-neox's module names ----
class Linear(nn.Module):
    def __init__(self, out_f: int, in_f: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_f, in_f))
        self.bias = nn.Parameter(torch.empty(out_f)) if bias else None


class RotaryEmbedding(nn.Module):
    def __init__(self, dims: int, base: float):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (base ** (torch.arange(0, dims, 2).float() / dims)))


class Attention(nn.Module):
    def __init__(self, H: int, T: int, rotary_dims: int, base: float):
        super().__init__()
        self.query_key_value = Linear(3 * H // T, H)
        self.rotary_emb = RotaryEmbedding(rotary_dims, base)
        self.dense = Linear(H, H // T)


class MLP(nn.Module):
    def __init__(self, H: int, F: int, T: int, linear12: bool):
        super().__init__()
        self.names = ("linear1", "linear2") if linear12 else ("dense_h_to_4h", "dense_4h_to_h")
        setattr(self, self.names[0], Linear(F // T, H))
        setattr(self, self.names[1], Linear(H, F // T))


class TransformerLayer(nn.Module):
    def __init__(self, H, F, T, rotary_dims, base, linear12):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(H)
        self.attention = Attention(H, T, rotary_dims, base)
        self.post_attention_layernorm = nn.LayerNorm(H)
        self.mlp = MLP(H, F, T, linear12)


class EmbeddingPipe(nn.Module):
    def __init__(self, V, H, T):
        super().__init__()
        self.word_embeddings = nn.Embedding(V // T, H)


class NormPipe(nn.Module):
    def __init__(self, H):
        super().__init__()
        self.norm = nn.LayerNorm(H)


class ParallelLinearPipe(nn.Module):
    def __init__(self, V, H, T):
        super().__init__()
        self.final_linear = Linear(V // T, H, bias=False)


class SequentialWrapper(nn.Module):
    """gpt-neox's model with pipe-parallel-size 0: ``self.sequential`` holds every pipeline layer, the
    parameter-free ones included, so the indices match the pipeline layout's layer numbers."""

    def __init__(self, layers):
        super().__init__()
        self.sequential = nn.Sequential(*layers)


@dataclass(frozen=True)
class WriterSpec:
    tp: int = 2
    layout: str = "sequential"  # or "pipeline"
    zero_views: bool = True  # ZeRO 1/2 flat-buffer views, saved without cloning
    clone: str = "none"  # pipeline files: "none" (before Aug 2021), "gpu" (type(sd)({k: v.clone()})), "cpu"
    linear12: bool = False  # gpt-neox since 2024-09 MLP names
    hf_converter: bool = False  # sequential files as gpt-neox's tools/ckpts/convert_hf_to_sequential.py writes them
    cuda_tag: bool = True
    num_layers: int = 2
    hidden_size: int = 64
    vocab_size: int = 512
    seed: int = 0
    step: int = 1000


def model_layers(cfg, T: int, linear12: bool) -> list[nn.Module]:
    """Pipeline layers in gpt-neox order: embedding, a parameter-free stage, blocks, a parameter-free
    stage, final norm, readout."""
    H, F, V = cfg.hidden_size, cfg.ffn_size, cfg.vocab_size
    blocks = [TransformerLayer(H, F, T, cfg.rotary_dims, cfg.rotary_emb_base, linear12) for _ in range(cfg.num_layers)]
    return [EmbeddingPipe(V, H, T), nn.Identity(), *blocks, nn.Identity(), NormPipe(H), ParallelLinearPipe(V, H, T)]


def fill_rank(layers: list[nn.Module], ref: dict[str, torch.Tensor], cfg, rank: int, T: int, linear12: bool) -> None:
    """Copy rank ``rank``'s slice of the reference weights into the modules (gpt-neox's TP layout)."""
    def rows(t):
        n = t.shape[0] // T
        return t[rank * n:(rank + 1) * n]

    def cols(t):
        n = t.shape[1] // T
        return t[:, rank * n:(rank + 1) * n]

    with torch.no_grad():
        layers[0].word_embeddings.weight.copy_(rows(ref["gpt_neox.embed_in.weight"]))
        for b in range(cfg.num_layers):
            m, p = layers[2 + b], f"gpt_neox.layers.{b}."
            for ln in ("input_layernorm", "post_attention_layernorm"):
                getattr(m, ln).weight.copy_(ref[p + ln + ".weight"])
                getattr(m, ln).bias.copy_(ref[p + ln + ".bias"])
            m.attention.query_key_value.weight.copy_(rows(ref[p + "attention.query_key_value.weight"]))
            m.attention.query_key_value.bias.copy_(rows(ref[p + "attention.query_key_value.bias"]))
            m.attention.dense.weight.copy_(cols(ref[p + "attention.dense.weight"]))
            m.attention.dense.bias.copy_(ref[p + "attention.dense.bias"] / T)  # each rank adds its part
            up, down = (getattr(m.mlp, n) for n in m.mlp.names)
            up.weight.copy_(rows(ref[p + "mlp.dense_h_to_4h.weight"]))
            up.bias.copy_(rows(ref[p + "mlp.dense_h_to_4h.bias"]))
            down.weight.copy_(cols(ref[p + "mlp.dense_4h_to_h.weight"]))
            down.bias.copy_(ref[p + "mlp.dense_4h_to_h.bias"] / T)
        layers[-2].norm.weight.copy_(ref["gpt_neox.final_layer_norm.weight"])
        layers[-2].norm.bias.copy_(ref["gpt_neox.final_layer_norm.bias"])
        layers[-1].final_linear.weight.copy_(rows(ref["embed_out.weight"]))


def zero_flatten(module: nn.Module, g: random.Random) -> torch.Tensor:
    """ZeRO 1/2: one flat buffer for the rank's parameters (shuffled order, padding), params become views."""
    params = list(module.parameters())
    g.shuffle(params)
    pads = [g.choice([0, 3, 8, 61]) for _ in params]
    total = sum(p.numel() + pad for p, pad in zip(params, pads)) + 16
    flat = torch.zeros(total, dtype=params[0].dtype)
    off = 16  # the buffer need not start with a parameter
    for p, pad in zip(params, pads):
        n = p.numel()
        flat[off:off + n].copy_(p.data.reshape(-1))
        p.data = flat[off:off + n].view_as(p)
        off += n + pad
    return flat


_TAG: dict[str, str | None] = {"location": None}


def _tagger(obj):
    return _TAG["location"]


def _never(obj, location):  # deserializer for our tag: none (map_location="cpu" never asks)
    return None


_registered = False


@contextlib.contextmanager
def cuda_location(tag: str | None):
    """``torch.save`` inside this block records ``tag`` (e.g. ``cuda:1``) as every storage's location."""
    global _registered
    if not _registered:
        torch.serialization.register_package(1, _tagger, _never)
        _registered = True
    _TAG["location"] = tag
    try:
        yield
    finally:
        _TAG["location"] = None


def bookkeeping(spec: WriterSpec, cfg, module_sd, model: nn.Module | None, rank: int) -> dict:
    """The engine's checkpoint state (DeepSpeed ``_common_checkpoint_state`` + gpt-neox client state)."""
    np_rng = np.random.RandomState(spec.seed + rank)
    param_shapes = [OrderedDict((n, p.shape) for n, p in model.named_parameters())] if model is not None else None
    return dict(
        module=module_sd,
        buffer_names=[n for n, _ in model.named_buffers()] if model is not None else [],
        optimizer=None,  # ZeRO: optimizer states live in zero_pp_rank_* files
        param_shapes=param_shapes,  # OrderedDict of torch.Size
        frozen_param_shapes=None, shared_params={}, frozen_param_fragments=None,
        lr_scheduler={"last_batch_iteration": spec.step, "warmup_num_steps": 100},
        data_sampler=None, random_ltd=None, sparse_tensor_module_names=set(),
        skipped_steps=3, global_steps=spec.step, global_samples=spec.step * 8,
        dp_world_size=1, mp_world_size=spec.tp,
        ds_config={"train_batch_size": 8, "fp16": {"enabled": True}, "zero_optimization": {"stage": 1}},
        ds_version="0.3.15+eb7f5cf",
        # gpt-neox client state
        args=NeoXArgs(num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, precision="fp16"),
        namespace_args=argparse.Namespace(model_parallel_size=spec.tp, seq_length=cfg.max_position_embeddings),
        checkpoint_version=3.0, iteration=spec.step, data_loading=None,
        random_rng_state=random.Random(rank).getstate(),
        np_rng_state=np_rng.get_state(),
        torch_rng_state=torch.get_rng_state(),
        rng_tracker_states={"model-parallel-rng": torch.get_rng_state()},
        dtypes={"params": torch.float16, "grads": torch.float32},
        size=torch.Size([cfg.vocab_size, cfg.hidden_size]),
    )


def write_real_checkpoint(root: Path, spec: WriterSpec) -> tuple[dict[str, torch.Tensor], object]:
    """Write the checkpoint; return (reference fp16 weights in Hugging Face names, NeoXConfig)."""
    cfg = tiny_config(num_layers=spec.num_layers, hidden_size=spec.hidden_size, vocab_size=spec.vocab_size)
    root = Path(root)
    step = root / f"global_step{spec.step}"
    step.mkdir(parents=True)
    (root / "configs").mkdir()
    (root / "latest").write_text(step.name)
    layout_spec = SyntheticSpec(cfg, tp_degree=spec.tp, layout=spec.layout, dtype="float16")
    (root / "configs" / "model.yml").write_text(neox_yaml(cfg, layout_spec))
    ref = {k: v.half() for k, v in random_state_dict(cfg, seed=spec.seed).items()}
    g = random.Random(spec.seed)
    full = sequential_full(ref, cfg) if spec.hf_converter else {}
    hf_sharded: dict = {}
    for rank in range(spec.tp):
        layers = model_layers(cfg, spec.tp, spec.linear12)
        fill_rank(layers, {k: v.float() for k, v in ref.items()}, cfg, rank, spec.tp, spec.linear12)
        model = SequentialWrapper(layers).half()  # fp16 training: inv_freq is fp16 too
        if spec.zero_views:
            zero_flatten(model, g)
        tag = f"cuda:{rank}" if spec.cuda_tag else None
        with cuda_location(tag):
            if spec.layout == "sequential":
                module_sd = model.state_dict()
                if spec.hf_converter:
                    hf_sharded = hf_converter_shards(full, spec.tp) if rank == 0 else hf_sharded
                    for k in module_sd:  # replace_sharded_seq: same OrderedDict (_metadata kept), new values
                        module_sd[k] = hf_sharded[rank][k]
                state = bookkeeping(spec, cfg, module_sd, model, rank)
                torch.save(state, step / f"mp_rank_{rank:02d}_model_states.pt")
            else:
                for idx, layer in enumerate(layers):
                    sd = layer.state_dict()
                    if not sd:
                        continue  # parameter-free stages have no file
                    if spec.clone == "gpu":
                        sd = type(sd)({k: v.clone() for k, v in sd.items()})
                    elif spec.clone == "cpu":
                        sd = type(sd)({k: v.detach().cpu().clone() for k, v in sd.items()})
                    torch.save(sd, step / f"layer_{idx:02d}-model_{rank:02d}-model_states.pt")
                torch.save(bookkeeping(spec, cfg, None, model, rank), step / f"mp_rank_{rank:02d}_model_states.pt")
    # what a correct merge must give: row biases are the fp32 sum of the ranks' fp16 parts
    for name in list(ref):
        if name.endswith(("attention.dense.bias", "mlp.dense_4h_to_h.bias")):
            part = (ref[name].float() / spec.tp).half().float()
            ref[name] = (part * spec.tp).half()
    return ref, cfg


def sequential_full(ref: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """The TP=1 sequential state dict of the reference (``convert_hf_to_sequential``), fp16, fp16 inv_freq."""
    out = {"sequential.0.word_embeddings.weight": ref["gpt_neox.embed_in.weight"]}
    inv = RotaryEmbedding(cfg.rotary_dims, cfg.rotary_emb_base).inv_freq.half()
    for b in range(cfg.num_layers):
        p = f"gpt_neox.layers.{b}."
        for k, v in ref.items():
            if k.startswith(p):
                out[f"sequential.{b + 2}.{k[len(p):]}"] = v
        out[f"sequential.{b + 2}.attention.rotary_emb.inv_freq"] = inv
    out[f"sequential.{cfg.num_layers + 3}.norm.weight"] = ref["gpt_neox.final_layer_norm.weight"]
    out[f"sequential.{cfg.num_layers + 3}.norm.bias"] = ref["gpt_neox.final_layer_norm.bias"]
    out[f"sequential.{cfg.num_layers + 4}.final_linear.weight"] = ref["embed_out.weight"]
    return out


def hf_converter_shards(full: dict[str, torch.Tensor], T: int) -> list[dict[str, torch.Tensor]]:
    """``shard_sequential_mp``: row biases divided by T, replicated tensors shared, every other tensor a
    *view* of the full one (``v[a:b, :]`` or ``v[:, a:b]``), so each rank file carries the full storages.
    (Its padding to multiples of 128 per rank is not exercised: the fixture's sizes are multiples.)"""
    ranks: list[dict[str, torch.Tensor]] = [{} for _ in range(T)]
    for k, v in full.items():
        if k.endswith(("dense_4h_to_h.bias", "attention.dense.bias")):
            for r in range(T):
                ranks[r][k] = v / T
        elif any(x in k for x in ("layernorm", "rotary_emb", "norm.weight", "norm.bias")):
            for r in range(T):
                ranks[r][k] = v
        else:
            dim = 1 if k.endswith(("attention.dense.weight", "mlp.dense_4h_to_h.weight")) else 0
            n = v.shape[dim] // T
            if n % 128:
                raise ValueError(f"{k}: {n} per rank is not a multiple of 128 (the converter would pad it)")
            for r in range(T):
                ranks[r][k] = v[r * n:(r + 1) * n] if dim == 0 else v[:, r * n:(r + 1) * n]
    return ranks
