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

Llama-style models trained with gpt-neox (`LlamaForCausalLM` below, Hugging Face Llama names) follow
gpt-neox's numerics too: RMSNorm in fp32 with the scale applied before the cast back (norms.py), gated
SiLU ``down(silu(gate(x)) * up(x))``, RoPE over the whole head, grouped-query attention whose KV cache holds
only the kv heads (query heads j*g .. j*g+g-1 share kv head j, as repeat_interleave / HF repeat_kv).
With gpt-neox's ``sliding_window_width`` W (Mistral-style) a query at position p sees keys p-W .. p, cached
decoding included (the cache keeps every position; the mask hides the old ones).

Reward models (gpt-neox ``train_impl: rm``) are the same bodies with a one-output ``score`` readout instead of
the vocabulary's (``*ForSequenceClassification``): ``forward`` gives a score per position, (B, T, 1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from neoxconv.config import GELU_TANH, LLAMA, NeoXConfig
from neoxconv.model.kv_cache import KVCache, LayerKVCache


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
def hidden_keys(T: int, S: int, *, q_start: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """(T, S) True where query i (position q_start+i) must not see key j: the future (j > q_start+i) and,
    with a sliding window W, keys older than W positions (j < q_start+i-W; gpt-neox get_attn_mask). None: none."""
    if T == 1 and (window is None or q_start <= window):
        return None
    ones = torch.ones(T, S, dtype=torch.bool, device=device)
    hidden = ones.triu(diagonal=q_start + 1)
    if window is not None:
        hidden |= ones.tril(diagonal=q_start - window - 1)
    return hidden


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, q_start: int,
                     use_sdpa: bool = False, row_period: int | None = None, window: int | None = None) -> torch.Tensor:
    """Softmax attention of T queries at positions q_start.. over S keys at positions 0..S-1.

    q: (B, nh, T, hd); k, v: (B, nh, S, hd) -> (B, nh, T, hd). Scores and softmax in fp32.
    With grouped-query attention k, v are (B, kvh, S, hd), kvh dividing nh: query heads j*g .. j*g+g-1
    (g = nh / kvh) attend with kv head j, without copying k and v. ``window``: a sliding window of W keys
    before the query (`hidden_keys`).
    """
    B, nh, T, hd = q.shape
    kvh, S = k.shape[1], k.shape[-2]
    if kvh != nh:
        g = nh // kvh
        if use_sdpa:
            hidden = hidden_keys(T, S, q_start=q_start, window=window, device=q.device)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=None if hidden is None else ~hidden,
                                                  enable_gqa=True)
        qg = q.reshape(B, kvh, g * T, hd)  # rows: (group member, position)
        out = causal_attention(qg, k, v, q_start=q_start, row_period=T, window=window)  # (B, kvh, g*T, hd)
        return out.view(B, nh, T, hd)
    if use_sdpa:
        hidden = hidden_keys(T, S, q_start=q_start, window=window, device=q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=None if hidden is None else ~hidden)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(hd)  # (B, nh, T, S)
    period = row_period or T  # query row r is at position q_start + r % period (grouped rows repeat)
    hidden = hidden_keys(period, S, q_start=q_start, window=window, device=q.device)
    if hidden is not None:
        scores = scores.masked_fill(hidden.repeat(T // period, 1), torch.finfo(scores.dtype).min)
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
        self._add_readout(config)
        self.tie_weights()
        self.rotary = RotaryTables(config.rotary_dims, config.rotary_emb_base, config.max_position_embeddings)

    LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
    # module names of the stages (placement's units) and of the rotary tables in transformers' model
    UNITS = {"embed": "gpt_neox.embed_in", "blocks": "gpt_neox.layers", "final_norm": "gpt_neox.final_layer_norm",
             "readout": "embed_out", "hf_rotary": "gpt_neox.rotary_emb"}

    def _add_readout(self, config: NeoXConfig) -> None:
        self.embed_out = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def readout(self) -> nn.Module:
        return self.embed_out

    @property
    def blocks(self) -> nn.ModuleList:
        return self.gpt_neox.layers

    @property
    def input_embeddings(self) -> nn.Module:
        return self.gpt_neox.embed_in

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.embed_out.weight = self.gpt_neox.embed_in.weight

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
        return self.readout(self.gpt_neox.final_layer_norm(x))  # (B, T, V); reward model (B, T, 1)


# ----- Llama-style models trained with gpt-neox --------------------------------------------------------------
class RMSNorm(nn.Module):
    """gpt-neox's RMSNorm (norms.py): x / sqrt(mean(x^2) + eps) * scale, in fp32, cast back. weight: (H,)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * normed).to(x.dtype)


class GroupedQueryAttention(nn.Module):
    """q_proj: (nh*hd, H), k_proj, v_proj: (kvh*hd, H), o_proj: (H, nh*hd); RoPE over whole heads.

    The cache holds kvh heads: (B, kvh, max_len, hd).
    """

    def __init__(self, config: NeoXConfig) -> None:
        super().__init__()
        H, hd, bias = config.hidden_size, config.head_dim, config.attention_bias
        self.num_heads, self.kv_heads, self.head_dim = config.num_heads, config.kv_heads, hd
        self.q_proj = nn.Linear(H, self.num_heads * hd, bias=bias)
        self.k_proj = nn.Linear(H, self.kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(H, self.kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * hd, H, bias=bias)
        self.window = config.sliding_window
        self.use_sdpa = False

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int,
                cache: LayerKVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, kvh, T, hd)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, kvh, T, hd)
        q, k = apply_partial_rotary(q, cos, sin), apply_partial_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.write(start, k, v)  # (B, kvh, start+T, hd)
        out = causal_attention(q, k, v, q_start=start, use_sdpa=self.use_sdpa, window=self.window)  # (B, nh, T, hd)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    """down_proj(silu(gate_proj(x)) * up_proj(x)); gate_proj, up_proj: (F, H), down_proj: (H, F)."""

    def __init__(self, config: NeoXConfig) -> None:
        super().__init__()
        H, Fs, bias = config.hidden_size, config.ffn_size, config.mlp_bias
        self.gate_proj = nn.Linear(H, Fs, bias=bias)
        self.up_proj = nn.Linear(H, Fs, bias=bias)
        self.down_proj = nn.Linear(Fs, H, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaLayer(nn.Module):
    """One block, sequential residual: y = x + attn(norm1(x)); y + mlp(norm2(y))."""

    def __init__(self, config: NeoXConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.layernorm_eps)
        self.self_attn = GroupedQueryAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.layernorm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int,
                cache: LayerKVCache | None = None) -> torch.Tensor:
        y = x + self.self_attn(self.input_layernorm(x), cos, sin, start, cache)
        return y + self.mlp(self.post_attention_layernorm(y))


class LlamaBody(nn.Module):
    """embed_tokens -> layers -> norm (named as Hugging Face's ``model``)."""

    def __init__(self, config: NeoXConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.layernorm_eps)


class LlamaForCausalLM(nn.Module):
    """A Llama-style model in Hugging Face Llama names. ``forward(ids, start, cache)`` -> logits (B, T, V)."""

    LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    UNITS = {"embed": "model.embed_tokens", "blocks": "model.layers", "final_norm": "model.norm",
             "readout": "lm_head", "hf_rotary": "model.rotary_emb"}

    def __init__(self, config: NeoXConfig) -> None:
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("LlamaForCausalLM needs config.vocab_size")
        self.config = config
        self.model = LlamaBody(config)
        self._add_readout(config)
        self.tie_weights()
        self.rotary = RotaryTables(config.rotary_dims, config.rotary_emb_base, config.max_position_embeddings)

    def _add_readout(self, config: NeoXConfig) -> None:
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def readout(self) -> nn.Module:
        return self.lm_head

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.layers

    @property
    def input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def set_attention(self, kind: str) -> None:
        """'eager' (fp32 scores, the reference) or 'sdpa' (torch's fused kernel)."""
        if kind not in ("eager", "sdpa"):
            raise ValueError(f"attention must be 'eager' or 'sdpa', got {kind!r}")
        for layer in self.model.layers:
            layer.self_attn.use_sdpa = kind == "sdpa"

    def forward(self, ids: torch.Tensor, start: int = 0, cache: KVCache | None = None) -> torch.Tensor:
        B, T = ids.shape
        if start + T > self.config.max_position_embeddings:
            raise ValueError(f"positions up to {start + T} exceed max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        cos, sin = self.rotary(torch.arange(start, start + T, device=ids.device))  # (T, hd) each
        x = self.model.embed_tokens(ids)  # (B, T, H)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, start, None if cache is None else cache.layers[i])
        if cache is not None:
            cache.length = start + T
        return self.readout(self.model.norm(x))  # (B, T, V); reward model (B, T, 1)


# ----- reward models (gpt-neox train_impl: rm) ------------------------------------------------------------------
class _ScoreHead:
    """A reward model's readout: score (1, H), no bias (gpt-neox's rm_linear; transformers' ``score``)."""

    def _add_readout(self, config: NeoXConfig) -> None:
        self.score = nn.Linear(config.hidden_size, 1, bias=False)

    @property
    def readout(self) -> nn.Module:
        return self.score

    def tie_weights(self) -> None:  # a reward model's readout is never the embedding
        return None


class NeoXForSequenceClassification(_ScoreHead, NeoXForCausalLM):
    """A GPT-NeoX reward model: ``forward`` -> scores (B, T, 1); the sequence's score is that of its last
    non-pad token (transformers' GPTNeoXForSequenceClassification pools the same way)."""

    UNITS = {**NeoXForCausalLM.UNITS, "readout": "score"}


class LlamaForSequenceClassification(_ScoreHead, LlamaForCausalLM):
    """A Llama-style (or Mistral-style) reward model: ``forward`` -> scores (B, T, 1)."""

    UNITS = {**LlamaForCausalLM.UNITS, "readout": "score"}


def build_model(config: NeoXConfig) -> nn.Module:
    """The reference model of the config's architecture and head (parameter names = what ``merge`` writes)."""
    if config.reward_model:
        return LlamaForSequenceClassification(config) if config.architecture == LLAMA \
            else NeoXForSequenceClassification(config)
    return LlamaForCausalLM(config) if config.architecture == LLAMA else NeoXForCausalLM(config)


def last_non_pad(ids: list[int], pad_token_id: int | None) -> int:
    """Index of the token whose score is the sequence's: the last one that is not ``pad_token_id`` (0 when
    every token is; the last token without a pad id), as transformers' sequence classifiers pick it."""
    if pad_token_id is None:
        return len(ids) - 1
    return max((i for i, t in enumerate(ids) if t != pad_token_id), default=0)


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by parameters and buffers that are weights (tied tensors counted once; offloaded ones,
    on the meta device between uses, not at all)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + [b for n, b in model.named_buffers() if "rotary" not in n]:
        if t.is_meta or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
