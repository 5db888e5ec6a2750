"""The main test checkpoint: a Hugging Face GPT-NeoX model written as gpt-neox + DeepSpeed write it.

No neoxconv rule table is used here (STYLE.md #11), so a wrong rule cannot hide in both directions:

* the truth is a real ``transformers.GPTNeoXForCausalLM`` whose every parameter is random (biases and layer
  norms included: a zero bias would hide a wrong bias rule);
* its state dict is split by ``neox_tp_split.tp_split`` (written from gpt-neox's parallel layers);
  row-parallel biases with parallel residual become T random parts (each rank adds its own part before the
  all-reduce), and the model's bias is then set to what the parts add up to (fp32 sum, cast), so the model's
  own ``state_dict()`` is what a correct merge must give, bit for bit;
* each rank's slice is loaded (``strict``) into gpt-neox-shaped modules (``real_writers``: ``word_embeddings``,
  ``attention.query_key_value``, ``attention.rotary_emb.inv_freq``, ``mlp.dense_h_to_4h``, ``norm``,
  ``final_linear``) and saved as DeepSpeed saves them: pipeline layout ``layer_XX-model_YY-model_states.pt`` =
  the layer's state dict as a plain dict (the DeeperSpeed of the 20B release) next to ``mp_rank_XX`` bookkeeping
  with ``module=None``; sequential layout ``mp_rank_XX_model_states.pt`` = ``{"module":
  model.state_dict(), ...}`` of the whole ``sequential`` model plus the engine's and gpt-neox's bookkeeping.

``write_neox_checkpoint(root, spec)`` takes the same ``SyntheticSpec`` as ``neoxconv synth`` (size, TP, layout,
dtype, seed, replica noise, full row biases on every rank, inv_freq, tokenizer) and returns the reference
weights in Hugging Face names (``embed_out.weight`` for the readout, as neoxconv writes it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from neoxconv.config import NeoXConfig
from neoxconv.tools.synthetic import SyntheticSpec, write_root

from hf_reference import hf_config
from neox_tp_split import tp_split
from real_writers import SequentialWrapper, WriterSpec, bookkeeping, model_layers

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
ROW_BIASES = ("attention.dense.bias", "mlp.dense_4h_to_h.bias")
REPLICATED = ("input_layernorm.weight", "input_layernorm.bias", "post_attention_layernorm.weight",
              "post_attention_layernorm.bias", "norm.weight", "norm.bias")


@dataclass(frozen=True)
class NeoXCheckpoint:
    root: Path
    model: torch.nn.Module  # GPTNeoXForCausalLM in the checkpoint's dtype; its state_dict is the truth
    reference: dict[str, torch.Tensor]  # that state_dict in the names neoxconv writes
    spec: SyntheticSpec


def random_hf_model(config: NeoXConfig, *, seed: int):
    """A GPTNeoXForCausalLM of ``config``'s shape (fp32) with every parameter drawn from ``seed``."""
    from transformers import GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM(hf_config(config)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "layernorm" in name or "layer_norm" in name:
                p.copy_(1 + 0.1 * noise if name.endswith("weight") else 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif "embed_in" in name:
                p.copy_(noise)
            else:  # a projection: unit-scale activations
                p.copy_(noise * p.shape[1] ** -0.5)
    return model


def neoxconv_names(state_dict: dict[str, torch.Tensor], *, tied: bool) -> dict[str, torch.Tensor]:
    """The parameters in the names neoxconv writes (transformers 5 calls the readout lm_head; a tied readout is
    the embedding, not a tensor of its own)."""
    out = {}
    for k, v in state_dict.items():
        if k.endswith(("rotary_emb.inv_freq", "masked_bias", "attention.bias")):
            continue  # buffers, not parameters
        if k in ("lm_head.weight", "embed_out.weight"):
            if tied:
                continue
            k = "embed_out.weight"
        out[k] = v
    return out


def _hf_name(idx: int, key: str, num_layers: int) -> str:
    """The Hugging Face name of a replicated or row-bias key of pipeline layer ``idx`` (for the truth update)."""
    if idx == num_layers + 3:
        return "gpt_neox.final_layer_norm." + key.split(".")[-1]
    return f"gpt_neox.layers.{idx - 2}.{key}"


def build_neox_checkpoint(root: Path, spec: SyntheticSpec) -> NeoXCheckpoint:
    """Write ``spec``'s checkpoint under ``root`` (latest, configs/, global_step*/); see the module docstring."""
    config, T, dtype = spec.config, spec.tp_degree, DTYPES[spec.dtype]
    model = random_hf_model(config, seed=spec.seed).to(dtype)
    hf_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}  # the shards must not alias the model
    shards, row_bias_sums = tp_split(neoxconv_names(hf_sd, tied=config.tie_word_embeddings), layers=config.num_layers,
                                     heads=config.num_heads, rotary_dims=config.rotary_dims,
                                     base=config.rotary_emb_base, tp=T, parallel_residual=config.parallel_residual)
    g = torch.Generator().manual_seed(spec.seed + 1)
    truth: dict[str, torch.Tensor] = {}  # Hugging Face name -> the value the ranks' parts stand for
    for (idx, key), bias in row_bias_sums.items():
        if spec.full_row_bias_on_every_rank:  # older HF->NeoX converters: the full bias on every rank
            parts = [bias.clone() for _ in range(T)]
        else:  # each rank adds its own part before the all-reduce; any parts that sum to the bias will do
            target = bias.float()
            parts32 = [torch.randn(target.shape, generator=g) * 0.1 for _ in range(T - 1)]
            parts32.append(target - sum(parts32, torch.zeros_like(target)))
            parts = [p.to(dtype) for p in parts32]
            truth[_hf_name(idx, key, config.num_layers)] = torch.stack([p.float() for p in parts]).sum(0).to(dtype)
        for shard, part in zip(shards[idx], parts):
            shard[key] = part
    split_biases = set() if spec.full_row_bias_on_every_rank else set(row_bias_sums)
    for idx, ranks in shards.items():
        for key in list(ranks[0]):
            if key.endswith("inv_freq") and not spec.with_inv_freq:
                for shard in ranks:
                    del shard[key]
            replicated = key in REPLICATED or (key in ROW_BIASES and (idx, key) not in split_biases)
            if spec.replica_noise and T > 1 and replicated:  # ranks that drifted apart (gpt-neox issue 615)
                for shard in ranks[1:]:
                    noise = torch.randn(shard[key].shape, generator=g) * spec.replica_noise
                    shard[key] = shard[key] + noise.to(dtype)
                mean = torch.stack([s[key].float() for s in ranks]).mean(0).to(dtype)
                truth[_hf_name(idx, key, config.num_layers)] = mean
    if truth:
        hf_truth = {("lm_head.weight" if k == "embed_out.weight" else k): v for k, v in truth.items()}
        model.load_state_dict({**hf_sd, **hf_truth})
    _write(Path(root), spec, shards)
    return NeoXCheckpoint(Path(root), model, neoxconv_names(model.state_dict(), tied=config.tie_word_embeddings), spec)


def write_neox_checkpoint(root: Path, spec: SyntheticSpec) -> dict[str, torch.Tensor]:
    """``build_neox_checkpoint`` returning only the reference (the signature of synthetic.write_checkpoint)."""
    return build_neox_checkpoint(root, spec).reference


def _rank_layers(config: NeoXConfig, T: int, dtype: torch.dtype) -> list[torch.nn.Module]:
    layers = model_layers(config, T, linear12=False)
    if config.tie_word_embeddings:  # no readout stage: the embedding is the readout
        layers = layers[:-1]
    return [layer.to(dtype) for layer in layers]


def _write(root: Path, spec: SyntheticSpec, shards: dict[int, list[dict[str, torch.Tensor]]]) -> None:
    config, T, dtype = spec.config, spec.tp_degree, DTYPES[spec.dtype]
    step = write_root(root, spec)  # latest, configs, tokenizer: the folder layout, no rule
    books = WriterSpec(tp=T, layout=spec.layout, step=spec.step, seed=spec.seed)
    for rank in range(T):
        layers = _rank_layers(config, T, dtype)
        for idx, layer in enumerate(layers):
            if idx not in shards:
                continue  # a parameter-free pipeline stage
            missing, unexpected = layer.load_state_dict(shards[idx][rank], strict=False)
            if unexpected or [m for m in missing if not m.endswith("inv_freq")]:
                raise ValueError(f"layer {idx}: missing {missing}, unexpected {unexpected}")
        model = SequentialWrapper(layers)
        if spec.layout == "sequential":
            module = model.state_dict()
            if not spec.with_inv_freq:
                for k in [k for k in module if k.endswith("inv_freq")]:
                    del module[k]
            torch.save(bookkeeping(books, config, module, model, rank), step / f"mp_rank_{rank:02d}_model_states.pt")
            continue
        for idx in shards:
            sd = {k: v.cpu() for k, v in layers[idx].state_dict().items()
                  if spec.with_inv_freq or not k.endswith("inv_freq")}
            torch.save(sd, step / f"layer_{idx:02d}-model_{rank:02d}-model_states.pt")
        torch.save(bookkeeping(books, config, None, model, rank), step / f"mp_rank_{rank:02d}_model_states.pt")
