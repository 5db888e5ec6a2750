"""neoxconv's own GPT-NeoX reference layers, readable top to bottom.

The model is the same sequence of stages as the checkpoint's per-layer files: embedding, L transformer
layers, final layer norm, readout. Parameter names equal the Hugging Face names that ``merge`` writes, so
a merged folder loads without renaming. Shapes use B batch, T new tokens, S cached + new tokens,
nh heads, hd head_dim, H hidden, F ffn, V vocab.

Numerics follow what GPT-NeoX-20B was trained with:
* RoPE on the first ``rotary_dims`` features of each head (rotate-half form), cos/sin in fp32;
* attention scores and softmax in fp32 (fp16 scores overflow), mask fill = the dtype's minimum;
* tanh-approximated GELU when the config says so (NeoX's fused bias-GELU), exact GELU otherwise;
* parallel residual ``x + attn(ln1(x)) + mlp(ln2(x))`` or the sequential form.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from neoxconv.config import GELU_TANH, NeoXConfig
from neoxconv.kv_cache import KVCache, LayerKVCache


# ----- rotary position embedding -----------------------------------------------------------------------
class RotaryTables(nn.Module):
    """cos/sin tables in fp32 for the positions in use, grown on demand up to ``max_positions``.

    cos, sin: (P, rotary_dims), each frequency repeated twice (rotate-half layout), for P positions. P
    starts at what is asked for (at least 4096, at most ``max_positions``) and doubles when a later
    position needs it: a config claiming 2e8 positions costs nothing until those positions are used.
    """

    MIN_POSITIONS = 4096

    def __init__(self, rotary_dims: int, base: float, max_positions: int) -> None:
        super().__init__()
        self.rotary_dims, self.base, self.max_positions = rotary_dims, base, max_positions
        self.register_buffer("cos", torch.empty(0, rotary_dims), persistent=False)
        self.register_buffer("sin", torch.empty(0, rotary_dims), persistent=False)

    def ensure(self, positions: int) -> None:
        """Make the tables cover positions 0 .. positions-1."""
        if positions <= self.cos.shape[0]:
            return
        if positions > self.max_positions:
            raise ValueError(f"positions up to {positions} exceed max_position_embeddings {self.max_positions}")
        n = min(self.max_positions, max(positions, 2 * self.cos.shape[0], self.MIN_POSITIONS))
        rd, device = self.rotary_dims, self.cos.device
        with torch.inference_mode(False):  # plain tensors, usable later with autograd too
            inv_freq = 1.0 / (self.base ** (torch.arange(0, rd, 2, dtype=torch.float32, device=device) / rd))
            freqs = torch.outer(torch.arange(n, dtype=torch.float32, device=device), inv_freq)  # (P, rd/2)
            emb = torch.cat((freqs, freqs), dim=-1)  # (P, rd)
            self.cos, self.sin = emb.cos(), emb.sin()

    def forward(self, positions: torch.Tensor, end: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: (T,) -> cos, sin: (T, rd) fp32. ``end`` > every position, when the caller knows it
        (saves reading the positions back from the device)."""
        if end is None:
            end = int(positions.max()) + 1 if positions.numel() else 0
        self.ensure(end)
        return self.cos[positions], self.sin[positions]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_partial_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` features of each head; pass the rest through.

    x: (B, nh, T, hd); cos, sin: (T, rd) fp32. Computed in fp32, returned in x's dtype.
    """
    rd = cos.shape[-1]
    x_rot, x_pass = x[..., :rd].float(), x[..., rd:]
    x_rot = x_rot * cos + rotate_half(x_rot) * sin
    return torch.cat((x_rot.to(x.dtype), x_pass), dim=-1)


# ----- attention -----------------------------------------------------------------------------------------
def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, q_start: int,
                     use_sdpa: bool = False) -> torch.Tensor:
    """Softmax attention of T queries at positions q_start.. over S keys at positions 0..S-1.

    q: (B, nh, T, hd); k, v: (B, nh, S, hd) -> (B, nh, T, hd). Scores and softmax in fp32.
    """
    T, S, hd = q.shape[-2], k.shape[-2], q.shape[-1]
    if use_sdpa:
        mask = None
        if T > 1:  # query i (position q_start+i) sees keys 0..q_start+i
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=q_start)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(hd)  # (B, nh, T, S)
    if T > 1:
        future = torch.ones(T, S, dtype=torch.bool, device=q.device).triu(diagonal=q_start + 1)
        scores = scores.masked_fill(future, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v)


class Attention(nn.Module):
    """Fused per-head QKV projection, partial RoPE, causal attention, output projection.

    query_key_value: (3H, H), rows laid out [nh, 3, hd]; dense: (H, H).
    """

    def __init__(self, config: NeoXConfig) -> None:
        super().__init__()
        H = config.hidden_size
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.query_key_value = nn.Linear(H, 3 * H)
        self.dense = nn.Linear(H, H)
        self.use_sdpa = False

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int,
                cache: LayerKVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.query_key_value(x).view(B, T, self.num_heads, 3 * self.head_dim)  # (B, T, nh, 3hd)
        q, k, v = qkv.transpose(1, 2).chunk(3, dim=-1)  # each (B, nh, T, hd)
        q, k = apply_partial_rotary(q, cos, sin), apply_partial_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.write(start, k, v)  # (B, nh, start+T, hd), views of the preallocated cache
        out = causal_attention(q, k, v, q_start=start, use_sdpa=self.use_sdpa)  # (B, nh, T, hd)
        return self.dense(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """dense_h_to_4h: (F, H) -> activation -> dense_4h_to_h: (H, F)."""

    def __init__(self, config: NeoXConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.ffn_size)
        self.dense_4h_to_h = nn.Linear(config.ffn_size, config.hidden_size)
        self.approximate = "tanh" if config.activation == GELU_TANH else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate=self.approximate))


class TransformerLayer(nn.Module):
    """One block. Parallel: x + attn(ln1(x)) + mlp(ln2(x)); sequential: y = x + attn(ln1(x)); y + mlp(ln2(y))."""

    def __init__(self, config: NeoXConfig) -> None:
        super().__init__()
        H, eps = config.hidden_size, config.layernorm_eps
        self.parallel_residual = config.parallel_residual
        self.input_layernorm = nn.LayerNorm(H, eps=eps)
        self.post_attention_layernorm = nn.LayerNorm(H, eps=eps)
        self.attention = Attention(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int,
                cache: LayerKVCache | None = None) -> torch.Tensor:
        attn = self.attention(self.input_layernorm(x), cos, sin, start, cache)
        if self.parallel_residual:
            return x + attn + self.mlp(self.post_attention_layernorm(x))
        y = x + attn
        return y + self.mlp(self.post_attention_layernorm(y))


class NeoXBody(nn.Module):
    """embed_in -> layers -> final_layer_norm (named as Hugging Face's ``gpt_neox``)."""

    def __init__(self, config: NeoXConfig) -> None:
        super().__init__()
        self.embed_in = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(TransformerLayer(config) for _ in range(config.num_layers))
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_eps)


class NeoXForCausalLM(nn.Module):
    """The whole model. ``forward(ids, start, cache)`` -> logits (B, T, V).

    ``start`` is the position of ids[:, 0]; with a cache, keys/values of positions < start come from it.
    """

    def __init__(self, config: NeoXConfig) -> None:
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("NeoXForCausalLM needs config.vocab_size")
        self.config = config
        self.gpt_neox = NeoXBody(config)
        self.embed_out = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.embed_out.weight = self.gpt_neox.embed_in.weight
        self.rotary = RotaryTables(config.rotary_dims, config.rotary_emb_base, config.max_position_embeddings)

    def set_attention(self, kind: str) -> None:
        """'eager' (fp32 scores, the reference) or 'sdpa' (torch's fused kernel)."""
        if kind not in ("eager", "sdpa"):
            raise ValueError(f"attention must be 'eager' or 'sdpa', got {kind!r}")
        for layer in self.gpt_neox.layers:
            layer.attention.use_sdpa = kind == "sdpa"

    def forward(self, ids: torch.Tensor, start: int = 0, cache: KVCache | None = None) -> torch.Tensor:
        B, T = ids.shape
        if start + T > self.config.max_position_embeddings:
            raise ValueError(f"positions up to {start + T} exceed max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        positions = torch.arange(start, start + T, device=ids.device)
        cos, sin = self.rotary(positions, end=start + T)  # (T, rd) each
        x = self.gpt_neox.embed_in(ids)  # (B, T, H)
        for i, layer in enumerate(self.gpt_neox.layers):
            x = layer(x, cos, sin, start, None if cache is None else cache.layers[i])
        if cache is not None:
            cache.length = start + T
        return self.embed_out(self.gpt_neox.final_layer_norm(x))  # (B, T, V)
