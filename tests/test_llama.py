"""Llama-style models trained with gpt-neox (RMSNorm, SwiGLU, GQA) merged into a LlamaForCausalLM folder.

The checkpoints come from random transformers LlamaForCausalLMs split into gpt-neox's layout by
`tests/llama_checkpoints.py`, which follows gpt-neox's model code, not neoxconv's rules.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from neoxconv import config as config_mod
from neoxconv import merge as merge_mod
from neoxconv.cli import main
from neoxconv.config import NeoXConfig, gated_intermediate_size, llama_mlp_intermediate_size
from neoxconv.errors import ConfigError, MergeError
from neoxconv.merge import QkvLayout, Rule, Split, merge_split, split_segments
from neoxconv.output import hf_merge as convert
from neoxconv.output.hf_merge import MergeOptions, merge_checkpoint
from neoxconv.plan import plan as plan_mod
from neoxconv.source.checkpoint import LayerKind
from neoxconv.verify import VerifyOptions, verify_model

from conftest import cli, one_line_error
from llama_checkpoints import LlamaSpec, write_llama_checkpoint

transformers = pytest.importorskip("transformers")

PROMPT = [1, 5, 9, 100, 3, 7, 42, 200]
GQA_TP2 = LlamaSpec(tp=2, heads=8, kv_heads=2)  # fp32, no biases (the Llama recipe)
# num_kv_heads declared equal to the head count: multi-head attention to gpt-neox (no GQA split)
MHA_TP4 = LlamaSpec(tp=4, heads=8, kv_heads=8, declare_kv_heads=True, dtype=torch.float16, bias=True)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@torch.no_grad()
def _hf_logits(model, ids=PROMPT) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0].float()


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """``build(spec)`` -> (src root, transformers model); one checkpoint per spec."""
    cache = {}

    def make(spec: LlamaSpec):
        if spec not in cache:
            root = tmp_path_factory.mktemp("llama") / "src"
            cache[spec] = (root, write_llama_checkpoint(root, spec))
        return cache[spec]

    return make


def _merged(build, tmp_path, spec, **options):
    root, hf = build(spec)
    out = tmp_path / "out"
    merge_checkpoint(root, out, MergeOptions(quiet=True, **options))
    return root, hf, out


def _load(out, dtype=torch.float32):
    model, info = transformers.LlamaForCausalLM.from_pretrained(out, dtype=dtype, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


# ----- the proof: whole models ------------------------------------------------------------------------
def test_gqa_tp2_fp32_equals_transformers_logits_and_greedy_ids(build, tmp_path):
    root, hf, out = _merged(build, tmp_path, GQA_TP2)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_key_value_heads"] == 2 and config["intermediate_size"] == 96
    assert config["rms_norm_eps"] == 1e-8 and config["rope_theta"] == 1e6
    assert config["rope_parameters"]["rope_theta"] == 1e6
    assert config["attention_bias"] is False and config["tie_word_embeddings"] is False
    merged = _load(out)
    assert merged.config.num_key_value_heads == 2 and merged.config.rms_norm_eps == 1e-8
    assert _rel(_hf_logits(merged), _hf_logits(hf)) <= 1e-5
    # greedy ids: neoxconv's own layers (KV cache holding 2 kv heads) == transformers' generate
    # the layout stated to verify (the generator wrote blocked rows): the merge only assumed it, and
    # verify --against does not pass on an assumption
    report = verify_model(out, VerifyOptions(ids=tuple(PROMPT), max_new_tokens=10, device="cpu", against=root,
                                             reference="hf", qkv_layout="blocked"))
    assert report.ok, [c for c in report.checks if not c.passed]
    want = hf.generate(torch.tensor([PROMPT]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                       pad_token_id=0)[0, len(PROMPT):].tolist()
    assert report.generated_ids == want
    checks = {c.name: c for c in report.checks}
    assert checks["against"].value < 1e-5 and checks["reference_hf"].value < 1e-5
    manifest = json.loads((out / "neoxconv.json").read_text())
    rules = {n: m["rule"] for e in manifest["layers"].values() for n, m in e["tensors"].items()}
    assert rules["model.layers.0.self_attn.k_proj.weight"] == "split_rows:qkv_gqa_blocks[1]"
    assert rules["model.layers.0.mlp.gate_proj.weight"] == "split_rows:gated_halves[1]"
    assert manifest["qkv_layout"]["assumed"] is True  # linear1 + GQA: the 2024-09..11 window cannot be told


def test_mha_tp4_fp16_tensors_bit_exact_and_logits_equal(build, tmp_path):
    root, hf, out = _merged(build, tmp_path, MHA_TP4)
    from safetensors.torch import load_file

    merged = {}
    for f in out.glob("*.safetensors"):
        merged.update(load_file(f))
    want = hf.state_dict()
    assert set(merged) == set(want)
    for name, t in want.items():
        assert merged[name].dtype == torch.float16 and torch.equal(merged[name], t), name
    # the same fp16 weights, computed in fp32 by transformers on both sides
    assert _rel(_hf_logits(_load(out)), _hf_logits(hf.float())) <= 1e-5
    hf.half()
    report = verify_model(out, VerifyOptions(ids=tuple(PROMPT), max_new_tokens=8, device="cpu", against=root,
                                             reference="hf"))
    assert report.ok, [c for c in report.checks if not c.passed]
    want_ids = hf.float().generate(torch.tensor([PROMPT]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                                   pad_token_id=0)[0, len(PROMPT):].tolist()
    assert report.generated_ids == want_ids


def test_older_w1_w2_w3_gqa_checkpoint_is_read_as_interleaved(build, tmp_path):
    spec = LlamaSpec(tp=2, heads=8, kv_heads=2, qkv="interleaved", mlp_keys="w1w2w3")
    root, hf, out = _merged(build, tmp_path, spec)
    assert _rel(_hf_logits(_load(out)), _hf_logits(hf)) <= 1e-5
    manifest = json.loads((out / "neoxconv.json").read_text())
    assert manifest["qkv_layout"] == {"split": "qkv_gqa_interleaved", "assumed": False,
                                      "reason": manifest["qkv_layout"]["reason"]}
    report = verify_model(out, VerifyOptions(ids=tuple(PROMPT), max_new_tokens=4, device="cpu", against=root))
    assert report.ok


def test_interleaved_linear1_checkpoint_needs_the_option_and_verify_tells(build, tmp_path):
    """gpt-neox 2024-09..2024-11: linear1 names, interleaved GQA rows; the files cannot tell."""
    spec = LlamaSpec(tp=2, heads=8, kv_heads=2, qkv="interleaved")
    root, hf = build(spec)
    merge_checkpoint(root, tmp_path / "right", MergeOptions(quiet=True, qkv_layout="interleaved"))
    assert _rel(_hf_logits(_load(tmp_path / "right")), _hf_logits(hf)) <= 1e-5
    merge_checkpoint(root, tmp_path / "assumed", MergeOptions(quiet=True))  # auto assumes blocks
    assert _rel(_hf_logits(_load(tmp_path / "assumed")), _hf_logits(hf)) > 1e-2
    # verify --against with the layout the user knows shows the assumed merge is wrong
    report = verify_model(tmp_path / "assumed", VerifyOptions(ids=tuple(PROMPT), max_new_tokens=2, device="cpu",
                                                              against=root, qkv_layout="interleaved"))
    assert not {c.name: c for c in report.checks}["against"].passed


def test_sequential_layout_tied_embeddings_and_biases(build, tmp_path):
    spec = LlamaSpec(tp=2, heads=4, kv_heads=2, tied=True, bias=True, layout="sequential")
    root, hf, out = _merged(build, tmp_path, spec, qkv_layout="blocked")  # stated, as above
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["attention_bias"] and config["mlp_bias"]
    assert _rel(_hf_logits(_load(out)), _hf_logits(hf)) <= 1e-5
    report = verify_model(out, VerifyOptions(ids=tuple(PROMPT), max_new_tokens=4, device="cpu", against=root,
                                             reference="hf"))
    assert report.ok, [c for c in report.checks if not c.passed]


def test_verify_int8_and_sdpa_on_a_llama_model(build, tmp_path):
    pytest.importorskip("bitsandbytes")
    _, _, out = _merged(build, tmp_path, GQA_TP2)
    report = verify_model(out, VerifyOptions(ids=tuple(PROMPT), max_new_tokens=8, device="cpu", int8=True))
    checks = {c.name: c for c in report.checks}
    assert checks["int8_memory"].passed and checks["int8_top1_agreement"].passed, report.int8
    sdpa = verify_model(out, VerifyOptions(ids=tuple(PROMPT), max_new_tokens=8, device="cpu", attention="sdpa"))
    eager = verify_model(out, VerifyOptions(ids=tuple(PROMPT), max_new_tokens=8, device="cpu"))
    assert sdpa.ok and sdpa.generated_ids == eager.generated_ids


def test_inspect_reports_architecture_and_qkv_layout(build):
    root, _ = build(GQA_TP2)
    result = CliRunner().invoke(main, ["inspect", str(root), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["architecture"] == "llama" and info["num_kv_heads"] == 2 and info["norm"] == "rmsnorm"
    assert info["qkv_layout"]["split"] == "qkv_gqa_blocks" and info["qkv_layout"]["assumed"] is True
    assert info["key_generation"] == "linear1/linear2"
    assert info["parameters"] == sum(p.numel() for p in build(GQA_TP2)[1].parameters())


def test_merge_cli_qkv_layout_option(build, tmp_path):
    root, _ = build(MHA_TP4)
    result = CliRunner().invoke(main, ["merge", str(root), str(tmp_path / "o"), "--qkv-layout", "blocked", "--quiet"])
    assert result.exit_code == 3 and "grouped-query attention only" in result.output


# ----- each wrong rule is caught ------------------------------------------------------------------------
def _cat_then_split(key_prefix: str, spec: LlamaSpec):
    """A wrong merge, as gpt-neox's own converter does it: concatenate the ranks, then split once."""
    real = convert.iter_merged_chunks

    def chunks(plan, **kw):
        if plan.rule is not Rule.SPLIT_ROWS or not plan.key.startswith(key_prefix):
            yield from real(plan, **kw)
            return
        list(real(plan, **kw))  # the real reads (and CRC bookkeeping); their result is replaced
        full = np.concatenate([np.array(r.array()) for r in plan.shards])
        segs = split_segments(plan.split, plan.part, full.shape[0], heads=spec.heads, kv_heads=spec.kv_heads,
                              head_dim=spec.hidden // spec.heads)
        yield np.concatenate([full[s:s + c] for s, c in segs])

    return chunks


def _swap_gate_up(monkeypatch):
    spec = merge_mod.LLAMA_RULES[LayerKind.BLOCK]["mlp.linear1.weight"]
    swapped = dataclasses.replace(spec, parts=spec.parts[::-1])
    monkeypatch.setitem(merge_mod.LLAMA_RULES[LayerKind.BLOCK], "mlp.linear1.weight", swapped)


def _gqa_split_on_mha(monkeypatch):
    monkeypatch.setattr(plan_mod, "resolve_qkv_split",
                        lambda *a: QkvLayout(Split.QKV_BLOCKS, False, "the GQA split applied to MHA"))


WRONG_RULES = {
    "gate/up halves swapped": (GQA_TP2, lambda mp: _swap_gate_up(mp)),
    "cat-then-split of linear1": (GQA_TP2, lambda mp: mp.setattr(
        convert, "iter_merged_chunks", _cat_then_split("mlp.linear1", GQA_TP2))),
    "cat-then-split of GQA QKV": (GQA_TP2, lambda mp: mp.setattr(
        convert, "iter_merged_chunks", _cat_then_split("attention.query_key_value", GQA_TP2))),
    "GQA split applied to MHA": (MHA_TP4, _gqa_split_on_mha),
}


@pytest.mark.parametrize("wrong", list(WRONG_RULES))
def test_a_wrong_rule_is_caught_by_transformers_and_by_verify_against(wrong, build, tmp_path, monkeypatch):
    spec, patch = WRONG_RULES[wrong]
    root, hf = build(spec)
    with monkeypatch.context() as mp:
        patch(mp)
        merge_checkpoint(root, tmp_path / "out", MergeOptions(quiet=True))
    error = _rel(_hf_logits(_load(tmp_path / "out")), _hf_logits(hf.float()))
    assert error > 1e-3, f"{wrong}: relative logit error only {error:.2g}"  # 100x the proof's tolerance
    report = verify_model(tmp_path / "out", VerifyOptions(ids=tuple(PROMPT), max_new_tokens=2, device="cpu",
                                                          against=root))
    assert not {c.name: c for c in report.checks}["against"].passed, wrong


def test_a_1e6_rms_epsilon_is_caught(build, tmp_path, monkeypatch):
    """gpt-neox's rms_norm_epsilon defaults to 1e-8; its converter's 1e-6 changes the logits measurably."""
    root, hf = build(GQA_TP2)
    assert "rms_norm_epsilon" not in (root / "configs" / "model.yml").read_text()  # the default applies
    monkeypatch.setattr(config_mod, "NEOX_RMSNORM_EPS", 1e-6)
    merge_checkpoint(root, tmp_path / "out", MergeOptions(quiet=True))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["rms_norm_eps"] == 1e-6
    assert _rel(_hf_logits(_load(tmp_path / "out")), _hf_logits(hf)) > 1e-5


def test_shards_that_do_not_fit_the_split_are_refused(build, tmp_path):
    root, _ = build(GQA_TP2)
    bad = tmp_path / "bad.yml"  # the config claims MHA, the files hold GQA rows
    bad.write_text((root / "configs" / "model.yml").read_text().replace('"num_kv_heads": 2,', ""))
    with pytest.raises(MergeError, match="query_key_value.weight.*does not fit split qkv_per_head"):
        merge_checkpoint(root, tmp_path / "out", MergeOptions(quiet=True, config_path=bad))


@pytest.mark.parametrize("key,offset", [("attention.query_key_value.weight", 5),  # a byte of Q (part 0)
                                        ("mlp.linear1.weight", -3)])  # a byte of gate (the last part)
def test_a_flipped_byte_in_a_split_tensor_is_caught_by_crc(key, offset, build, tmp_path):
    import shutil

    from neoxconv.errors import NeoXConvError
    from neoxconv.source.ptfile import read_pt

    root, _ = build(GQA_TP2)
    shutil.copytree(root, tmp_path / "src")
    victim = tmp_path / "src" / "global_step10" / "layer_03-model_01-model_states.pt"
    ref = read_pt(victim).tensors()[key]
    data = bytearray(victim.read_bytes())
    data[ref.byte_offset + (offset if offset >= 0 else ref.nbytes + offset)] ^= 0x10
    victim.write_bytes(bytes(data))
    with pytest.raises(NeoXConvError, match=f"layer_03-model_01.*{key}.*CRC"):
        merge_checkpoint(tmp_path / "src", tmp_path / "out", MergeOptions(quiet=True))


# ----- named splits on small tensors ---------------------------------------------------------------------
def _rows(n, offset=0):
    return np.arange(offset, offset + n, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)


def test_gated_halves_are_taken_per_rank_first_half_up():
    # two ranks of linear1: rank r rows = [up_r (2 rows) | gate_r (2 rows)]
    up, gate = _rows(4), _rows(4, 100)
    shards = [np.concatenate([up[0:2], gate[0:2]]), np.concatenate([up[2:4], gate[2:4]])]
    got_up = merge_split(Split.GATED_HALVES, 0, shards, heads=2, kv_heads=2, head_dim=1)
    got_gate = merge_split(Split.GATED_HALVES, 1, shards, heads=2, kv_heads=2, head_dim=1)
    assert np.array_equal(got_up, up) and np.array_equal(got_gate, gate)
    cat_then_split = np.split(np.concatenate(shards), 2)[0]
    assert not np.array_equal(cat_then_split, up)  # why per rank matters at TP > 1


def test_gqa_blocks_per_rank():
    # 4 heads, 2 kv heads, head_dim 2, TP 2: rank rows = [Q 2 heads (4) | K 1 head (2) | V 1 head (2)]
    q, k, v = _rows(8), _rows(4, 100), _rows(4, 200)
    shards = [np.concatenate([q[:4], k[:2], v[:2]]), np.concatenate([q[4:], k[2:], v[2:]])]
    for part, want in enumerate((q, k, v)):
        assert np.array_equal(merge_split(Split.QKV_BLOCKS, part, shards, heads=4, kv_heads=2, head_dim=2), want)
    assert split_segments(Split.QKV_BLOCKS, 1, 8, heads=2, kv_heads=1, head_dim=2) == [(4, 2)]


def test_gqa_interleaved_per_query_head():
    # one rank, 2 heads, 1 kv head, head_dim 2: per query head [Q (2) | K share (1) | V share (1)]
    q, k, v = _rows(4), _rows(2, 100), _rows(2, 200)
    shard = np.concatenate([q[0:2], k[0:1], v[0:1], q[2:4], k[1:2], v[1:2]])
    for part, want in enumerate((q, k, v)):
        assert np.array_equal(merge_split(Split.QKV_INTERLEAVED, part, [shard], heads=2, kv_heads=1, head_dim=2), want)
    with pytest.raises(ValueError, match="not divisible"):
        split_segments(Split.QKV_INTERLEAVED, 0, (3 + 2) * 2, heads=3, kv_heads=1, head_dim=2)


def test_mha_per_head_split_differs_from_the_gqa_split():
    # 2 heads, head_dim 1, one rank: rows [q0 k0 v0 q1 k1 v1]
    shard = np.array([[0], [10], [20], [1], [11], [21]], np.float32)
    assert merge_split(Split.QKV_PER_HEAD, 1, [shard], heads=2, kv_heads=2, head_dim=1).ravel().tolist() == [10, 11]
    assert merge_split(Split.QKV_BLOCKS, 1, [shard], heads=2, kv_heads=2, head_dim=1).ravel().tolist() == [20, 1]


def test_shapes_that_do_not_fit_a_split_raise():
    with pytest.raises(ValueError, match="two halves"):
        split_segments(Split.GATED_HALVES, 0, 5, heads=1, kv_heads=1, head_dim=1)
    with pytest.raises(ValueError, match="expected"):
        split_segments(Split.QKV_BLOCKS, 0, 7, heads=2, kv_heads=1, head_dim=2)


# ----- config ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hidden,intermediate,want", [(4096, 32768, 11008), (5120, 40960, 13824), (8192, 86016, 28672)])
def test_gpt_neox_ffn_sizing_of_the_llama_configs(hidden, intermediate, want):
    """configs/llama/7B.yml, 13B.yml and configs/llama2/70B.yml (mlp_multiple_of 256)."""
    assert gated_intermediate_size(hidden, intermediate_size=intermediate, multiple_of=256) == want


def test_older_llama_mlp_sizing_and_defaults():
    assert llama_mlp_intermediate_size(4096) == 11008  # int(2 * 4 * 4096 / 3) rounded up to 256
    assert llama_mlp_intermediate_size(4096, 14336) == 14336
    assert gated_intermediate_size(64) == 85  # 4h -> int(256 * 2/3) = 170 rows of linear1, 85 inputs of linear2
    with pytest.raises(ConfigError, match="not two halves"):
        gated_intermediate_size(64, intermediate_size=5)  # int(5 * 2/3) = 3 rows cannot halve


def test_neox_yaml_of_a_llama_model():
    cfg = NeoXConfig.from_neox_dict({
        "num-layers": 32, "hidden-size": 4096, "num-attention-heads": 32, "num_kv_heads": 8, "norm": "rmsnorm",
        "activation": "swiglu", "intermediate_size": 32768, "mlp_multiple_of": 256, "rotary_pct": 1,
        "rotary_emb_base": 1000000, "gpt_j_residual": False, "no_weight_tying": True,
        "use_bias_in_attn_linear": False, "use_bias_in_mlp": False})
    assert cfg.architecture == "llama" and cfg.gqa and cfg.kv_heads == 8 and cfg.ffn_size == 11008
    assert cfg.layernorm_eps == 1e-8 and not cfg.attention_bias and not cfg.mlp_bias
    old = NeoXConfig.from_neox_dict({"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "norm": "rmsnorm",
                                     "activation": "silu", "mlp_type": "llama", "gpt_j_residual": False})
    assert old.activation == "swiglu" and old.ffn_size == 256 and not old.mlp_bias


@pytest.mark.parametrize("raw,words", [
    ({"norm": "rmsnorm", "activation": "swiglu", "rotary_pct": 0.25}, "rotary_pct 1"),
    ({"norm": "rmsnorm", "activation": "swiglu", "gpt_j_residual": True}, "sequential residual"),
    ({"norm": "rmsnorm", "activation": "gelu"}, "'swiglu'"),
    ({"norm": "layernorm", "activation": "swiglu"}, "rmsnorm' only"),
    ({"norm": "scalenorm"}, "scalenorm"),
    ({"norm": "rmsnorm", "activation": "swiglu", "num_kv_heads": 3}, "num_kv_heads 3"),
])
def test_unsupported_llama_style_combinations_are_named(raw, words):
    base = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4}
    with pytest.raises(ConfigError, match=words):
        NeoXConfig.from_neox_dict({**base, **raw})


def test_llama_config_json_round_trip_and_both_rope_keys():
    cfg = NeoXConfig(num_layers=2, hidden_size=64, num_heads=8, num_kv_heads=2, vocab_size=256, intermediate_size=96,
                     rotary_pct=1.0, rotary_emb_base=1e6, layernorm_eps=1e-8, parallel_residual=False,
                     activation="swiglu", norm="rmsnorm", attention_bias=False, mlp_bias=False)
    d = cfg.to_hf_dict(torch_dtype="float32")
    assert d["rope_theta"] == 1e6 and d["rope_parameters"] == {"rope_type": "default", "rope_theta": 1e6}
    assert NeoXConfig.from_hf_dict(d) == cfg.with_(bos_token_id=0, eos_token_id=0)
    hc = transformers.LlamaConfig(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")})
    assert hc.num_key_value_heads == 2 and hc.rms_norm_eps == 1e-8 and hc.head_dim == 8


# ----- the Llama layers themselves -----------------------------------------------------------------------
def test_grouped_attention_equals_repeated_kv_heads_and_the_cache_holds_only_kv_heads():
    from neoxconv.layers import LlamaForCausalLM, causal_attention
    from neoxconv.model.generation import full_forward_logits, generate
    from neoxconv.model.kv_cache import KVCache

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 5, 4, generator=g) for h in (6, 2, 2))
    for start in (0, 3):
        want = causal_attention(q, k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1), q_start=start)
        assert torch.allclose(causal_attention(q, k, v, q_start=start), want, atol=1e-6)
        assert torch.allclose(causal_attention(q, k, v, q_start=start, use_sdpa=True), want, atol=1e-5)
    cfg = NeoXConfig(num_layers=2, hidden_size=48, num_heads=6, num_kv_heads=2, vocab_size=64, intermediate_size=40,
                     rotary_pct=1.0, layernorm_eps=1e-8, parallel_residual=False, activation="swiglu", norm="rmsnorm",
                     attention_bias=False, mlp_bias=False, max_position_embeddings=32)
    assert KVCache(cfg, batch=1, max_len=8, device="cpu", dtype=torch.float32).layers[0].k.shape == (1, 2, 8, 8)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    gen = generate(model, [1, 2, 3], max_new_tokens=6)
    full = full_forward_logits(model, gen.prompt_ids + gen.generated_ids[:-1])
    assert torch.allclose(torch.cat([gen.prompt_logits, gen.step_logits[1:]]), full, atol=1e-5)


def test_rms_norm_is_gpt_neox_s():
    from neoxconv.layers import RMSNorm

    x = torch.randn(3, 16, dtype=torch.float16)
    norm = RMSNorm(16, 1e-8).half()
    with torch.no_grad():
        norm.weight.normal_(1, 0.1)
    # gpt-neox norms.RMSNorm: fp32, scale applied before the cast back
    x32 = x.float()
    want = (norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-8))).to(torch.float16)
    assert torch.equal(norm(x), want)


def test_an_intermediate_size_that_disagrees_with_the_shards_names_the_settings(build, tmp_path):
    root, _ = build(GQA_TP2)
    bad = tmp_path / "bad.yml"
    bad.write_text((root / "configs" / "model.yml").read_text().replace('"mlp_multiple_of": 32',
                                                                        '"mlp_multiple_of": 256'))
    with pytest.raises(MergeError, match="mlp.linear1.weight.*config expects \\[256, 64\\].*mlp_multiple_of"):
        merge_checkpoint(root, tmp_path / "out", MergeOptions(quiet=True, config_path=bad))


@pytest.mark.parametrize("spec", [GQA_TP2, MHA_TP4, LlamaSpec(tp=2, heads=8, kv_heads=2, qkv="interleaved")],
                         ids=["gqa-blocks", "mha", "gqa-interleaved"])
def test_join_split_builds_the_ranks_gpt_neox_s_model_code_expects(spec):
    """The inverse of the merge splits (for split/reshard) equals the generator written from gpt-neox's code."""
    from neoxconv.merge import join_split

    from llama_checkpoints import hf_llama, neox_shards

    model = hf_llama(spec)
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    want = neox_shards(model, spec)[2]  # block 0
    qkv = {"blocked": Split.QKV_BLOCKS, "interleaved": Split.QKV_INTERLEAVED}[spec.qkv] \
        if spec.kv_heads != spec.heads else Split.QKV_PER_HEAD
    kw = dict(heads=spec.heads, kv_heads=spec.kv_heads, head_dim=spec.hidden // spec.heads)
    p = "model.layers.0."
    got_qkv = join_split(qkv, [sd[p + f"self_attn.{n}_proj.weight"] for n in "qkv"], spec.tp, **kw)
    got_l1 = join_split(Split.GATED_HALVES, [sd[p + "mlp.up_proj.weight"], sd[p + "mlp.gate_proj.weight"]],
                        spec.tp, **kw)
    for r in range(spec.tp):
        assert np.array_equal(got_qkv[r], want[r]["attention.query_key_value.weight"].float().numpy())
        assert np.array_equal(got_l1[r], want[r]["mlp.linear1.weight"].float().numpy())
    for part, n in enumerate("qkv"):
        assert np.array_equal(merge_split(qkv, part, got_qkv, **kw), sd[p + f"self_attn.{n}_proj.weight"])


def test_verify_cli_on_a_llama_folder(build, tmp_path):
    root, hf, out = _merged(build, tmp_path, GQA_TP2)
    result = CliRunner().invoke(main, ["verify", str(out), "--ids", ",".join(map(str, PROMPT)), "--max-new-tokens",
                                       "6", "--device", "cpu", "--against", str(root), "--qkv-layout", "blocked",
                                       "--reference", "hf", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] and {"against", "reference_hf", "kv_cache"} <= set(report["checks"])
    assert "LlamaForCausalLM" in report["checks"]["reference_hf"]["detail"]


def _safetensors(folder):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("spec,tp,layout", [(GQA_TP2, 2, "pipeline"), (GQA_TP2, 1, "sequential"),
                                            (MHA_TP4, 2, "pipeline"), (MHA_TP4, 4, "sequential")],
                         ids=["gqa-tp2", "gqa-tp1-seq", "mha-fp16-bias-tp2", "mha-fp16-bias-tp4-seq"])
def test_split_of_a_llama_folder_is_gpt_neox_s_layout_and_merges_back_bit_for_bit(spec, tp, layout, build, tmp_path):
    """split HF Llama -> NeoX at TP n: each rank file equals the generator written from gpt-neox's model code
    (today's layout), and merge(split) == the HF folder bit for bit."""
    import dataclasses

    from neoxconv.output.split import SplitOptions, split_model

    from llama_checkpoints import neox_shards

    root, hf, out = _merged(build, tmp_path, spec)
    split_model(out, tmp_path / "neox", SplitOptions(tp=tp, layout=layout, quiet=True))
    want = neox_shards(hf, dataclasses.replace(spec, tp=tp))
    step = tmp_path / "neox" / "global_step0"
    for idx, shards in want.items():
        for r, w in enumerate(shards):
            if layout == "pipeline":
                got = torch.load(step / f"layer_{idx:02d}-model_{r:02d}-model_states.pt", weights_only=True)
            else:
                module = torch.load(step / f"mp_rank_{r:02d}_model_states.pt", weights_only=False)["module"]
                got = {k.split(".", 2)[2]: v for k, v in module.items() if k.startswith(f"sequential.{idx}.")}
            assert set(got) == set(w), (idx, r)
            for key in w:
                assert torch.equal(got[key], w[key]), (idx, r, key)
    stated = {"qkv_layout": "blocked"} if spec.kv_heads != spec.heads else {}  # split writes blocked GQA rows
    merge_checkpoint(tmp_path / "neox", tmp_path / "back", MergeOptions(quiet=True, **stated))
    a, b = _safetensors(out), _safetensors(tmp_path / "back")
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) and a[n].dtype == b[n].dtype for n in a)
    report = verify_model(tmp_path / "back", VerifyOptions(ids=tuple(PROMPT), max_new_tokens=2, device="cpu",
                                                           against=tmp_path / "neox"))
    assert report.ok, [c for c in report.checks if not c.passed]


@pytest.mark.parametrize("spec,tp", [(GQA_TP2, 1), (GQA_TP2, 2),
                                     (LlamaSpec(tp=2, heads=8, kv_heads=2, qkv="interleaved", mlp_keys="w1w2w3"), 2),
                                     (MHA_TP4, 2)], ids=["gqa-2to1", "gqa-2to2", "interleaved-w1w2w3-2to2", "mha-4to2"])
def test_reshard_of_a_llama_checkpoint_merges_like_the_source(spec, tp, build, tmp_path):
    """The output keeps the source's QKV layout and key names (interleaved GQA with w1/w2/w3 stays so: the
    gpt-neox version that wrote it reads it back)."""
    from neoxconv.output.reshard import ReshardOptions, reshard_checkpoint

    root, _, out = _merged(build, tmp_path, spec)
    reshard_checkpoint(root, tmp_path / "re", ReshardOptions(tp=tp, quiet=True))
    merge_checkpoint(tmp_path / "re", tmp_path / "back", MergeOptions(quiet=True))
    a, b = _safetensors(out), _safetensors(tmp_path / "back")
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)


def test_int8_with_a_cap_on_a_llama_model(build, tmp_path):
    pytest.importorskip("bitsandbytes")
    _, _, out = _merged(build, tmp_path, GQA_TP2)
    full = verify_model(out, VerifyOptions(ids=tuple(PROMPT), max_new_tokens=6, device="cpu", int8=True))
    capped = verify_model(out, VerifyOptions(ids=tuple(PROMPT), max_new_tokens=6, device="cpu", int8=True,
                                             max_memory=1))
    assert full.ok and capped.ok, [c for c in capped.checks if not c.passed]
    assert capped.int8["top1_agreement"] == full.int8["top1_agreement"]
    assert capped.int8["memory_ratio"] == pytest.approx(full.int8["memory_ratio"], rel=0.05)


def test_reshard_cli_of_a_2024_interleaved_linear1_checkpoint_with_the_option(build, tmp_path):
    spec = LlamaSpec(tp=2, heads=8, kv_heads=2, qkv="interleaved")
    root, hf = build(spec)
    result = CliRunner().invoke(main, ["reshard", str(root), str(tmp_path / "re"), "--tp", "1",
                                       "--qkv-layout", "interleaved", "--quiet"])
    assert result.exit_code == 0, result.output
    merge_checkpoint(tmp_path / "re", tmp_path / "back", MergeOptions(quiet=True, qkv_layout="interleaved"))
    assert _rel(_hf_logits(_load(tmp_path / "back")), _hf_logits(hf)) <= 1e-5


def test_llama_blocks_of_different_key_generations_are_refused(tmp_path):
    # The QKV layout of a GQA Llama-style checkpoint is decided from the first block's MLP key generation
    # (w1/w2/w3 -> interleaved rows). Before: a later block spelled linear1/linear2 (blocked rows, copied from
    # a newer run) was merged with the first block's layout: exit 0 and a silently wrong model.
    from llama_checkpoints import LlamaSpec, write_llama_checkpoint

    old = LlamaSpec(tp=2, heads=8, kv_heads=2, layers=2, qkv="interleaved", mlp_keys="w1w2w3")
    new = LlamaSpec(tp=2, heads=8, kv_heads=2, layers=2, qkv="blocked", mlp_keys="linear1")
    write_llama_checkpoint(tmp_path / "old", old)
    write_llama_checkpoint(tmp_path / "new", new)
    for r in range(2):
        name = f"layer_03-model_{r:02d}-model_states.pt"
        shutil.copyfile(tmp_path / "new" / "global_step10" / name, tmp_path / "old" / "global_step10" / name)
    for cmd in (("merge", "-q", tmp_path / "old", tmp_path / "out"), ("inspect", tmp_path / "old")):
        one_line_error(cli(*cmd), 4, "layer_03", "w1/w2/w3", "linear1/linear2")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.safetensors"))
