"""neoxconv's layers against transformers' GPT-NeoX modules on the same weights."""

import pytest
import torch

from neoxconv.layers import NeoXForCausalLM, RotaryTables, apply_partial_rotary
from neoxconv.model.generation import Sampling, full_forward_logits, generate
from neoxconv.model.kv_cache import KVCache
from neoxconv.tools.synthetic import random_state_dict, tiny_config

from hf_reference import hf_model

transformers = pytest.importorskip("transformers")
from transformers.models.gpt_neox import modeling_gpt_neox as hf_neox  # noqa: E402

IDS = [12092, 1533, 13, 50, 7000, 3, 50431, 0, 17, 42]


def _ours(config, sd):
    model = NeoXForCausalLM(config).eval()
    missing, unexpected = model.load_state_dict(sd, strict=False)
    allowed = ("rotary",) + (("embed_out.weight",) if config.tie_word_embeddings else ())
    assert not unexpected and all(any(a in m for a in allowed) for m in missing), (missing, unexpected)
    return model


@pytest.fixture(scope="module", params=[
    {},  # 20B-like: parallel residual, tanh GELU, rotary 25%
    {"parallel_residual": False, "activation": "gelu", "rotary_pct": 1.0},
    {"tie_word_embeddings": True, "num_heads": 8, "rotary_pct": 0.5},
], ids=["parallel-gelu_fast", "sequential-gelu-fullrope", "tied-8heads"])
def pair(request):
    config = tiny_config(vocab_size=512, max_position_embeddings=64, **request.param)
    sd = random_state_dict(config, seed=3)
    return config, _ours(config, sd), hf_model(config, sd)


def test_rotary_matches_hf_at_an_offset(pair):
    config, ours, hf = pair
    positions = torch.arange(7, 13)
    cos_hf, sin_hf = hf.gpt_neox.rotary_emb(torch.zeros(1), positions[None])
    q, k = torch.randn(2, 1, config.num_heads, 6, config.head_dim).unbind(0)
    q_hf, k_hf = hf_neox.apply_rotary_pos_emb(q, k, cos_hf, sin_hf)
    cos, sin = RotaryTables(config.rotary_dims, config.rotary_emb_base, 64)(positions)
    torch.testing.assert_close(apply_partial_rotary(q, cos, sin), q_hf)
    torch.testing.assert_close(apply_partial_rotary(k, cos, sin), k_hf)


def test_mlp_matches_hf(pair):
    config, ours, hf = pair
    x = torch.randn(2, 5, config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(ours.gpt_neox.layers[0].mlp(x), hf.gpt_neox.layers[0].mlp(x))


def test_attention_with_rope_at_a_nonzero_offset_matches_hf(pair):
    """Prefill 7 tokens into the cache, then 3 queries at positions 7..9 vs HF over all 10 with a causal mask."""
    config, ours, hf = pair
    S, start = 10, 7
    x = torch.randn(1, S, config.hidden_size)
    positions = torch.arange(S)[None]
    pos_emb = hf.gpt_neox.rotary_emb(x, positions)
    mask = torch.full((S, S), torch.finfo(torch.float32).min).triu(1)[None, None]
    attn_ours = ours.gpt_neox.layers[0].attention
    with torch.no_grad():
        want, _ = hf.gpt_neox.layers[0].attention(x, attention_mask=mask, position_embeddings=pos_emb)
        cache = KVCache(config, batch=1, max_len=S, device="cpu", dtype=torch.float32)
        cos, sin = ours.rotary(torch.arange(start))
        attn_ours(x[:, :start], cos, sin, 0, cache.layers[0])
        cos, sin = ours.rotary(torch.arange(start, S))
        got = attn_ours(x[:, start:], cos, sin, start, cache.layers[0])
    torch.testing.assert_close(got, want[:, start:], rtol=1e-5, atol=1e-5)


def test_every_layer_output_matches_hf_hidden_states(pair):
    config, ours, hf = pair
    ids = torch.tensor([IDS[:8]]) % config.vocab_size
    with torch.no_grad():
        hidden = hf(ids, output_hidden_states=True).hidden_states  # embeddings, then after each layer
        x = ours.gpt_neox.embed_in(ids)
        torch.testing.assert_close(x, hidden[0])
        cos, sin = ours.rotary(torch.arange(ids.shape[1]))
        for i, layer in enumerate(ours.gpt_neox.layers[:-1]):
            x = layer(x, cos, sin, 0)
            torch.testing.assert_close(x, hidden[i + 1], rtol=1e-5, atol=1e-5)


def test_whole_model_logits_match_hf(pair):
    config, ours, hf = pair
    ids = [i % config.vocab_size for i in IDS]
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(full_forward_logits(ours, ids), want, rtol=1e-5, atol=1e-5)


def test_greedy_ids_equal_transformers_generate(pair):
    config, ours, hf = pair
    prompt = [i % config.vocab_size for i in IDS[:5]]
    with torch.no_grad():
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, len(prompt):].tolist()
    got = generate(ours, prompt, max_new_tokens=20, eos_id=None)
    assert got.generated_ids == want


def test_cached_decoding_matches_one_uncached_forward(pair):
    config, ours, _ = pair
    prompt = [i % config.vocab_size for i in IDS[:4]]
    gen = generate(ours, prompt, max_new_tokens=12, eos_id=None)
    full = full_forward_logits(ours, prompt + gen.generated_ids[:-1])
    cached = torch.cat([gen.prompt_logits, gen.step_logits[1:]])
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)


def test_sdpa_path_matches_eager(pair):
    config, ours, _ = pair
    ids = [i % config.vocab_size for i in IDS]
    eager = full_forward_logits(ours, ids)
    try:
        ours.set_attention("sdpa")
        torch.testing.assert_close(full_forward_logits(ours, ids), eager, rtol=1e-4, atol=1e-4)
        assert generate(ours, ids[:3], max_new_tokens=8, eos_id=None).generated_ids == \
            generate_eager(ours, ids[:3])
    finally:
        ours.set_attention("eager")


def generate_eager(model, prompt):
    model.set_attention("eager")
    try:
        return generate(model, prompt, max_new_tokens=8, eos_id=None).generated_ids
    finally:
        model.set_attention("sdpa")


def test_kv_cache_is_preallocated_and_written_in_place(pair):
    config, ours, _ = pair
    cache = KVCache(config, batch=1, max_len=16, device="cpu", dtype=torch.float32)
    pointers = [(c.k.data_ptr(), c.v.data_ptr()) for c in cache.layers]
    with torch.no_grad():
        ours(torch.tensor([[1, 2, 3]]), 0, cache)
        for pos in range(3, 8):
            ours(torch.tensor([[pos]]), pos, cache)
    assert [(c.k.data_ptr(), c.v.data_ptr()) for c in cache.layers] == pointers
    assert cache.length == 8
    assert cache.layers[0].k[:, :, 8:].abs().sum() == 0 and cache.layers[0].k[:, :, :8].abs().sum() > 0


def test_eos_stops_generation_and_sampling_is_seeded(pair):
    config, ours, _ = pair
    prompt = [1, 2, 3]
    greedy = generate(ours, prompt, max_new_tokens=6, eos_id=None).generated_ids
    stopped = generate(ours, prompt, max_new_tokens=6, eos_id=greedy[2])
    assert stopped.generated_ids == greedy[: greedy.index(greedy[2]) + 1] and stopped.stopped_at_eos
    s = Sampling(temperature=0.8, top_k=20, top_p=0.9, seed=7)
    a = generate(ours, prompt, max_new_tokens=6, eos_id=None, sampling=s).generated_ids
    assert a == generate(ours, prompt, max_new_tokens=6, eos_id=None, sampling=s).generated_ids
    assert generate(ours, prompt, max_new_tokens=6, eos_id=None,
                    sampling=Sampling(temperature=1.0, top_k=1)).generated_ids == greedy


def test_fp16_forward_is_finite_and_close_to_fp32(pair):
    config, ours, _ = pair
    ids = [i % config.vocab_size for i in IDS]
    fp32 = full_forward_logits(ours, ids)
    half = NeoXForCausalLM(config).eval()
    half.load_state_dict(ours.state_dict(), strict=False)
    half = half.half()
    got = full_forward_logits(half, ids)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, fp32, rtol=0.05, atol=0.05 * float(fp32.abs().max()))
