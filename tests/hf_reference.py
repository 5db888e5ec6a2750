"""The independent reference: Hugging Face transformers' GPTNeoXForCausalLM on given weights."""

from __future__ import annotations

import torch

from neoxconv.config import NeoXConfig


def hf_config(config: NeoXConfig):
    """A transformers GPTNeoXConfig from our config's *fields* (not from neoxconv's config.json)."""
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, intermediate_size=config.ffn_size,
        max_position_embeddings=config.max_position_embeddings, rotary_pct=config.rotary_pct,
        rotary_emb_base=config.rotary_emb_base, layer_norm_eps=config.layernorm_eps,
        use_parallel_residual=config.parallel_residual, tie_word_embeddings=config.tie_word_embeddings,
        hidden_act=config.activation, bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
        attn_implementation="eager",
    )


def hf_model(config: NeoXConfig, state_dict: dict[str, torch.Tensor], dtype=torch.float32):
    """A GPTNeoXForCausalLM built from our config's *fields* (not our config.json) and the given weights."""
    from transformers import GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM(hf_config(config)).to(dtype).eval()
    own = model.state_dict()
    sd = {}
    for k, v in state_dict.items():
        if k not in own and k == "embed_out.weight":  # transformers 5 calls it lm_head
            k = "lm_head.weight"
        sd[k] = v.to(dtype)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not m.endswith("rotary_emb.inv_freq") and not m.endswith("masked_bias")
               and not m.endswith("attention.bias")
               and not (config.tie_word_embeddings and m in ("lm_head.weight", "embed_out.weight"))]
    if missing or unexpected:
        raise AssertionError(f"reference model: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()
