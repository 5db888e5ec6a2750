"""An independent tensor-parallel split of a Hugging Face GPT-NeoX state dict, for checking `neoxconv split`.

Written from how gpt-neox's parallel layers hold their weights, not from neoxconv's rule table: the
vocab-parallel embedding and readout hold blocks of vocabulary rows; the fused QKV projection is viewed as
[heads, 3 * head_dim, hidden] and each rank takes its heads; the MLP's first projection holds blocks of ffn
rows; the attention output and the MLP's second projection (row-parallel) hold blocks of input columns;
layer norms are on every rank; ``inv_freq`` is gpt-neox's formula. Row-parallel biases have no unique split
(the parts only have to sum to the bias), so this returns them whole under ``row_bias_sums``.
"""

from __future__ import annotations

import torch


def tp_split(
    sd: dict[str, torch.Tensor], *, layers: int, heads: int, rotary_dims: int, base: float, tp: int,
    parallel_residual: bool,
) -> tuple[dict[int, list[dict[str, torch.Tensor]]], dict[tuple[int, str], torch.Tensor]]:
    """({pipeline layer index: [shard per rank]}, {(layer index, key): full row bias}) with NeoX key names."""
    V, H = sd["gpt_neox.embed_in.weight"].shape
    out: dict[int, list[dict[str, torch.Tensor]]] = {}
    row_bias_sums: dict[tuple[int, str], torch.Tensor] = {}
    per_head = 3 * (H // heads)

    def vocab_rows(w: torch.Tensor, r: int) -> torch.Tensor:
        return w.reshape(tp, V // tp, H)[r]

    out[0] = [{"word_embeddings.weight": vocab_rows(sd["gpt_neox.embed_in.weight"], r)} for r in range(tp)]
    for i in range(layers):
        p = f"gpt_neox.layers.{i}."
        idx = i + 2
        qkv_w = sd[p + "attention.query_key_value.weight"].reshape(tp, heads // tp, per_head, H)
        qkv_b = sd[p + "attention.query_key_value.bias"].reshape(tp, heads // tp, per_head)
        dense = sd[p + "attention.dense.weight"].reshape(H, tp, H // tp)
        w1 = sd[p + "mlp.dense_h_to_4h.weight"]
        F = w1.shape[0]
        w1 = w1.reshape(tp, F // tp, H)
        b1 = sd[p + "mlp.dense_h_to_4h.bias"].reshape(tp, F // tp)
        w2 = sd[p + "mlp.dense_4h_to_h.weight"].reshape(H, tp, F // tp)
        inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dims, 2).float() / rotary_dims))
        shards = []
        for r in range(tp):
            s = {
                "input_layernorm.weight": sd[p + "input_layernorm.weight"],
                "input_layernorm.bias": sd[p + "input_layernorm.bias"],
                "attention.query_key_value.weight": qkv_w[r].reshape(-1, H),
                "attention.query_key_value.bias": qkv_b[r].reshape(-1),
                "attention.rotary_emb.inv_freq": inv_freq.to(sd[p + "input_layernorm.weight"].dtype),
                "attention.dense.weight": dense[:, r, :],
                "post_attention_layernorm.weight": sd[p + "post_attention_layernorm.weight"],
                "post_attention_layernorm.bias": sd[p + "post_attention_layernorm.bias"],
                "mlp.dense_h_to_4h.weight": w1[r],
                "mlp.dense_h_to_4h.bias": b1[r],
                "mlp.dense_4h_to_h.weight": w2[:, r, :],
            }
            if not parallel_residual:  # RowParallelLinear adds the full bias once, after the all-reduce
                s["attention.dense.bias"] = sd[p + "attention.dense.bias"]
                s["mlp.dense_4h_to_h.bias"] = sd[p + "mlp.dense_4h_to_h.bias"]
            shards.append(s)
        if parallel_residual:
            row_bias_sums[(idx, "attention.dense.bias")] = sd[p + "attention.dense.bias"]
            row_bias_sums[(idx, "mlp.dense_4h_to_h.bias")] = sd[p + "mlp.dense_4h_to_h.bias"]
        out[idx] = shards
    out[layers + 3] = [{"norm.weight": sd["gpt_neox.final_layer_norm.weight"],
                        "norm.bias": sd["gpt_neox.final_layer_norm.bias"]} for _ in range(tp)]
    if "embed_out.weight" in sd:  # tied embeddings have no readout stage
        out[layers + 4] = [{"final_linear.weight": vocab_rows(sd["embed_out.weight"], r)} for r in range(tp)]
    return out, row_bias_sums
