"""Random tiny transformers `LlamaForCausalLM`s split into gpt-neox's tensor-parallel checkpoint layout.

Written from gpt-neox's model code (megatron/model/transformer.py, norms.py, mpu/layers.py), not from
neoxconv's rule table, so a wrong rule cannot hide in both directions:

* ColumnParallelLinear keeps a contiguous block of output rows per rank, and each rank's forward reads its
  *local* rows: ParallelSelfAttention views them [np, 3, hn] without GQA, splits them [np*hn | kvp*hn | kvp*hn]
  with GQA (since 2024-11), or, from 2024-02 to 2024-11, views them [np, hn*(1 + 2*kvp/np)] and splits each
  query head's group [hn | hn*kvp/np | hn*kvp/np]. So rank r's rows are written in that local order.
* ParallelMLP (gated): the local linear1 output is chunked ``x, gate`` and ``act(gate) * x`` is computed, so
  rank r's linear1 rows are [its block of up_proj | its block of gate_proj]. LLaMAParallelMLP (2023-05 ..
  2024-09): ``w2(silu(w1(x)) * w3(x))``, each a plain column/row-parallel block.
* RowParallelLinear keeps a block of input columns; with a sequential residual its bias is added once after
  the all-reduce, so every rank holds the full bias. RMSNorm has one parameter, ``scale``, on every rank.
* VocabParallelEmbedding and the readout keep a block of vocabulary rows.

Files: ``layer_{idx:02d}-model_{rank:02d}-model_states.pt`` (a dict of fresh tensors per rank, as DeeperSpeed
saves them) plus ``configs/model.yml`` as a gpt-neox YAML.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class LlamaSpec:
    tp: int = 2
    hidden: int = 64
    heads: int = 8
    kv_heads: int = 2  # == heads: multi-head attention
    declare_kv_heads: bool = False  # write num_kv_heads to the YAML even when it equals the head count
    layers: int = 2
    intermediate: int = 96  # Hugging Face intermediate_size (gpt-neox ffn_dim_in)
    vocab: int = 256
    max_positions: int = 128
    rope_theta: float = 1e6
    rms_eps: float = 1e-8  # gpt-neox's default; the YAML leaves it out when it is the default
    bias: bool = False  # use_bias_in_attn_linear and use_bias_in_mlp
    dtype: torch.dtype = torch.float32
    qkv: str = "blocked"  # GQA rows per rank: "blocked" (since 2024-11) or "interleaved" (2024-02..2024-11)
    mlp_keys: str = "linear1"  # or "w1w2w3" (mlp_type: llama, 2023-05..2024-09)
    tied: bool = False  # weight tying: no final_linear, the readout is the vocab-parallel embedding
    layout: str = "pipeline"  # or "sequential" (mp_rank_XX_model_states.pt, pipe-parallel-size 0)
    seed: int = 0
    readout_scale: float = 1.0  # > 1: sharp next-token predictions, as a trained model makes (its own greedy
    # continuations are then cheap under the right QKV layout and expensive under a wrong one)


def hf_llama(spec: LlamaSpec):
    """A random LlamaForCausalLM (transformers' own init, std 0.02), norms and biases randomised too."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(spec.seed)
    cfg = LlamaConfig(
        vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
        max_position_embeddings=spec.max_positions, rms_norm_eps=spec.rms_eps, rope_theta=spec.rope_theta,
        tie_word_embeddings=spec.tied, attention_bias=spec.bias, mlp_bias=spec.bias, bos_token_id=0, eos_token_id=0,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.02 * torch.randn_like(p))
        model.lm_head.weight.mul_(spec.readout_scale)
    return model.to(spec.dtype)


def _rows(t: torch.Tensor, r: int, parts: int) -> torch.Tensor:
    return t.chunk(parts, dim=0)[r]


def _local_qkv(sd: dict, i: int, r: int, spec: LlamaSpec, kind: str) -> torch.Tensor:
    """Rank r's query_key_value rows, in the order its forward reads them."""
    T, hd = spec.tp, spec.hidden // spec.heads
    pre = f"model.layers.{i}.self_attn."
    q = sd[pre + f"q_proj.{kind}"].unflatten(0, (spec.heads, hd))  # (heads, hd, ...)
    k = sd[pre + f"k_proj.{kind}"].unflatten(0, (spec.kv_heads, hd))
    v = sd[pre + f"v_proj.{kind}"].unflatten(0, (spec.kv_heads, hd))
    np_, kvp = spec.heads // T, spec.kv_heads // T
    q, k, v = q[r * np_:(r + 1) * np_], k[r * kvp:(r + 1) * kvp], v[r * kvp:(r + 1) * kvp]
    if spec.kv_heads == spec.heads:  # no GQA: [np, 3, hn]
        return torch.stack((q, k, v), dim=1).flatten(0, 2)
    if spec.qkv == "blocked":  # [np*hn | kvp*hn | kvp*hn]
        return torch.cat((q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)))
    # interleaved: [np, hn + 2*hn*kvp/np]; K (and V) flat = the query heads' shares in order
    share = hd * kvp // np_
    k_parts, v_parts = k.flatten(0, 1).split(share), v.flatten(0, 1).split(share)
    return torch.cat([torch.cat((q[h], k_parts[h], v_parts[h])) for h in range(np_)])


def neox_shards(model, spec: LlamaSpec) -> dict[int, list[dict[str, torch.Tensor]]]:
    """{pipeline layer index: [rank 0's dict, ...]} of the gpt-neox checkpoint of ``model``."""
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    T, L = spec.tp, spec.layers
    out: dict[int, list[dict[str, torch.Tensor]]] = {}
    out[0] = [{"word_embeddings.weight": _rows(sd["model.embed_tokens.weight"], r, T)} for r in range(T)]
    for i in range(L):
        pre = f"model.layers.{i}."
        ranks = []
        for r in range(T):
            d = {
                "input_layernorm.scale": sd[pre + "input_layernorm.weight"],
                "attention.query_key_value.weight": _local_qkv(sd, i, r, spec, "weight"),
                "attention.dense.weight": sd[pre + "self_attn.o_proj.weight"].chunk(T, dim=1)[r],
                "post_attention_layernorm.scale": sd[pre + "post_attention_layernorm.weight"],
            }
            up, gate, down = (sd[pre + f"mlp.{n}_proj.weight"] for n in ("up", "gate", "down"))
            if spec.mlp_keys == "linear1":
                d["mlp.linear1.weight"] = torch.cat((_rows(up, r, T), _rows(gate, r, T)))  # x, gate = chunk(2)
                d["mlp.linear2.weight"] = down.chunk(T, dim=1)[r]
            else:
                d["mlp.w1.weight"], d["mlp.w3.weight"] = _rows(gate, r, T), _rows(up, r, T)
                d["mlp.w2.weight"] = down.chunk(T, dim=1)[r]
            if spec.bias:
                d["attention.query_key_value.bias"] = _local_qkv(sd, i, r, spec, "bias")
                d["attention.dense.bias"] = sd[pre + "self_attn.o_proj.bias"]  # added once after the all-reduce
                upb, gateb = sd[pre + "mlp.up_proj.bias"], sd[pre + "mlp.gate_proj.bias"]
                d["mlp.linear1.bias"] = torch.cat((_rows(upb, r, T), _rows(gateb, r, T)))
                d["mlp.linear2.bias"] = sd[pre + "mlp.down_proj.bias"]
            ranks.append(d)
        out[i + 2] = ranks
    out[L + 3] = [{"norm.scale": sd["model.norm.weight"]} for _ in range(T)]
    if not spec.tied:
        out[L + 4] = [{"final_linear.weight": _rows(sd["lm_head.weight"], r, T)} for r in range(T)]
    return out


def neox_yaml(spec: LlamaSpec) -> str:
    """The gpt-neox config the model was 'trained' with (intermediate_size 3x the HF size: 2/3 of it is
    linear1's rows, half of those linear2's inputs; mlp_multiple_of 32 leaves them as they are)."""
    lines = [
        "{",
        f'  "num_layers": {spec.layers},',
        f'  "hidden_size": {spec.hidden},',
        f'  "num_attention_heads": {spec.heads},',
        f'  "num_kv_heads": {spec.kv_heads},' if spec.kv_heads != spec.heads or spec.declare_kv_heads else "",
        f'  "model_parallel_size": {spec.tp},',
        f'  "seq_length": {spec.max_positions},',
        f'  "max_position_embeddings": {spec.max_positions},',
        '  "pos_emb": "rotary",',
        '  "rotary_pct": 1,',
        f'  "rotary_emb_base": {int(spec.rope_theta)},',
        f'  "no_weight_tying": {str(not spec.tied).lower()},',
        '  "gpt_j_residual": false,',
        '  "norm": "rmsnorm",',
        f'  "rms_norm_epsilon": {spec.rms_eps},' if spec.rms_eps != 1e-8 else "",
        f'  "use_bias_in_attn_linear": {str(spec.bias).lower()},',
        f'  "use_bias_in_mlp": {str(spec.bias).lower()},',
        '  "use_bias_in_norms": false,',
        '  "bias_gelu_fusion": false,',
    ]
    if spec.mlp_keys == "linear1":
        lines += [f'  "intermediate_size": {3 * spec.intermediate},', '  "activation": "swiglu",',
                  '  "mlp_multiple_of": 32,']
    else:
        lines += [f'  "intermediate_size": {spec.intermediate},', '  "activation": "silu",', '  "mlp_type": "llama",']
    lines += ['  "make_vocab_size_divisible_by": 64,', "}"]
    return "\n".join(line for line in lines if line) + "\n"


def write_llama_checkpoint(root: Path, spec: LlamaSpec):
    """Write the checkpoint under ``root`` (``latest`` + ``global_step10/``); returns the HF model."""
    model = hf_llama(spec)
    step = Path(root) / "global_step10"
    step.mkdir(parents=True)
    (Path(root) / "latest").write_text("global_step10")
    (Path(root) / "configs").mkdir()
    (Path(root) / "configs" / "model.yml").write_text(neox_yaml(spec))
    shards = neox_shards(model, spec)
    if spec.layout == "pipeline":
        for idx, ranks in shards.items():
            for r, d in enumerate(ranks):
                torch.save({k: v.clone().contiguous() for k, v in d.items()},
                           step / f"layer_{idx:02d}-model_{r:02d}-model_states.pt")
        return model
    for r in range(spec.tp):  # DeepSpeed engine: {"module": module.state_dict(), ...bookkeeping}
        module = {f"sequential.{idx}.{k}": v.clone().contiguous() for idx, ranks in shards.items()
                  for k, v in ranks[r].items()}
        torch.save({"module": module, "iteration": 10, "mp_world_size": spec.tp},
                   step / f"mp_rank_{r:02d}_model_states.pt")
    return model
