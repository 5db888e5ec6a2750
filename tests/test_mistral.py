"""Mistral-style models: Llama-style gpt-neox models with ``sliding_window_width`` -> MistralForCausalLM.

gpt-neox masks keys older than the window with ``get_attn_mask`` (megatron/utils.py): ``triu(tril(ones),
diagonal=-W)``, so a query at position p sees keys p-W .. p (W + 1 keys; flash-attn's ``window_size=(W, -1)``
agrees). transformers' ``sliding_window`` counts the keys a query sees, its own included (kv > q - window), so
the same model is ``sliding_window: W + 1`` there. The first test proves that with transformers alone (gpt-neox's
mask given to LlamaForCausalLM as a 4D mask); the others check neoxconv's merge, layers (KV cache included) and
simulated tensor-parallel forward against transformers' MistralForCausalLM, on prompts longer than the window.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from neoxconv.cli import main
from neoxconv.config import NeoXConfig
from neoxconv.errors import ConfigError
from neoxconv.model.generation import full_forward_logits, generate
from neoxconv.runtime.loading import load_model

from llama_checkpoints import LlamaSpec, hf_llama, neox_shards, neox_yaml

transformers = pytest.importorskip("transformers")

W = 3  # gpt-neox sliding_window_width
SPEC = LlamaSpec(tp=2, heads=8, kv_heads=2, readout_scale=4.0)
PROMPT = [1, 5, 9, 100, 3, 7, 42, 200, 11, 60, 8, 33]  # 12 tokens > W + 1


def _cli(*args):
    return CliRunner().invoke(main, [*map(str, args)])


def gpt_neox_mask(T: int, width: int) -> torch.Tensor:
    """gpt-neox's get_attn_mask(seq_length, device, sliding_window_width), as an additive 4D mask."""
    mask = torch.tril(torch.ones((1, T, T))).view(1, 1, T, T)
    mask = torch.triu(mask, diagonal=-width)
    return torch.zeros(1, 1, T, T).masked_fill(mask < 0.5, torch.finfo(torch.float32).min)


def hf_mistral(llama, hf_window: int):
    """transformers' MistralForCausalLM with ``llama``'s weights and ``sliding_window=hf_window``."""
    skip = ("model_type", "architectures", "transformers_version")
    d = {k: v for k, v in llama.config.to_dict().items() if k not in skip}
    cfg = transformers.MistralConfig(**{**d, "sliding_window": hf_window})
    cfg._attn_implementation = "eager"
    model = transformers.MistralForCausalLM(cfg).eval()
    model.load_state_dict(llama.state_dict())
    return model


def write_mistral_checkpoint(root: Path, spec: LlamaSpec, width: int):
    """gpt-neox files of a random Llama-style model trained with ``sliding_window_width: width``; returns the
    LlamaForCausalLM holding its weights."""
    model = hf_llama(spec)
    step = root / "global_step10"
    step.mkdir(parents=True)
    (root / "latest").write_text(step.name)
    (root / "configs").mkdir()
    yaml = neox_yaml(spec).replace("{\n", f'{{\n  "sliding_window_width": {width},\n', 1)
    (root / "configs" / "model.yml").write_text(yaml)
    for idx, ranks in neox_shards(model, spec).items():
        for r, d in enumerate(ranks):
            torch.save({k: v.clone().contiguous() for k, v in d.items()},
                       step / f"layer_{idx:02d}-model_{r:02d}-model_states.pt")
    return model


@torch.no_grad()
def _logits(model, ids=PROMPT, **kw) -> torch.Tensor:
    return model(torch.tensor([ids]), **kw).logits[0].float()


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    root = tmp_path_factory.mktemp("mistral") / "src"
    llama = write_mistral_checkpoint(root, SPEC, W)
    out = root.parent / "out"
    result = _cli("merge", root, out, "-q", "--qkv-layout", "blocked")
    assert result.exit_code == 0, result.output
    return root, out, llama


def test_transformers_sliding_window_is_gpt_neox_width_plus_one():
    llama = hf_llama(SPEC)
    neox = _logits(llama, attention_mask=gpt_neox_mask(len(PROMPT), W))
    assert torch.allclose(_logits(hf_mistral(llama, W + 1)), neox, rtol=0, atol=1e-5)
    for wrong in (W, W + 2):  # an off-by-one either way changes the logits
        assert (_logits(hf_mistral(llama, wrong)) - neox).abs().max() > 1e-2
    assert (_logits(llama) - neox).abs().max() > 1e-2  # the window is shorter than the prompt: it matters


def test_merge_writes_mistral_for_causal_lm_equal_to_transformers(merged):
    root, out, llama = merged
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["MistralForCausalLM"] and cfg["model_type"] == "mistral"
    assert cfg["sliding_window"] == W + 1
    assert "attention_bias" not in cfg and "mlp_bias" not in cfg
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True,
                                                                     attn_implementation="eager")
    assert type(loaded).__name__ == "MistralForCausalLM" and loaded.config.sliding_window == W + 1
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    truth = _logits(llama, attention_mask=gpt_neox_mask(len(PROMPT), W))  # what gpt-neox computes
    assert torch.allclose(_logits(loaded), truth, rtol=0, atol=1e-4)
    assert NeoXConfig.from_hf_json(out / "config.json").sliding_window == W  # read back as gpt-neox's width


def test_neoxconv_layers_honour_the_window_cached_and_uncached(merged):
    root, out, llama = merged
    loaded = load_model(out, device="cpu", dtype="fp32")
    truth = _logits(hf_mistral(llama, W + 1))
    ours = full_forward_logits(loaded.model, PROMPT, devices=loaded.devices)
    assert torch.allclose(ours, truth, rtol=0, atol=1e-4)
    # the KV cache path: greedy generation well past the window, step by step, equals transformers' generate
    gen = generate(loaded.model, PROMPT, max_new_tokens=10, devices=loaded.devices)
    with torch.no_grad():
        theirs = hf_mistral(llama, W + 1).generate(torch.tensor([PROMPT]), max_new_tokens=10, do_sample=False,
                                                  pad_token_id=0, eos_token_id=None)[0, len(PROMPT):].tolist()
    assert gen.generated_ids == theirs
    cached = torch.cat([gen.prompt_logits, gen.step_logits[1:]])
    assert torch.allclose(cached, full_forward_logits(loaded.model, PROMPT + gen.generated_ids[:-1],
                                                      devices=loaded.devices), rtol=0, atol=1e-4)
    loaded.model.set_attention("sdpa")
    assert torch.allclose(full_forward_logits(loaded.model, PROMPT, devices=loaded.devices), truth, atol=1e-4)
    for layer in loaded.model.blocks:  # a wrong window (one key too many) is visible
        layer.self_attn.window = W + 1
    assert (full_forward_logits(loaded.model, PROMPT, devices=loaded.devices) - truth).abs().max() > 1e-2


def test_verify_against_tp_forward_and_transformers(merged, tmp_path):
    root, out, _ = merged
    ids = ",".join(map(str, PROMPT))
    result = _cli("verify", out, "--ids", ids, "--max-new-tokens", 8, "--against", root, "--reference", "hf", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] and report["checks"]["reference_hf"]["detail"].endswith("MistralForCausalLM on the prompt")
    # the simulation honours the window: the same shards read as a model without one disagree with the merge
    plain = tmp_path / "plain"
    (plain / "configs").mkdir(parents=True)
    yml = (root / "configs" / "model.yml").read_text().replace(f'  "sliding_window_width": {W},\n', "")
    (plain / "configs" / "model.yml").write_text(yml)
    result = _cli("verify", out, "--ids", ids, "--max-new-tokens", 0, "--against", root / "global_step10",
                  "--against-config", plain / "configs" / "model.yml", "--json")
    assert result.exit_code == 7, result.output
    assert json.loads(result.stdout)["checks"]["against"]["passed"] is False


def test_sliding_window_settings_that_transformers_cannot_hold_are_refused():
    base = {"num-layers": 2, "hidden-size": 64, "num-attention-heads": 4, "sliding_window_width": 8}
    with pytest.raises(ConfigError, match="Llama-style"):
        NeoXConfig.from_neox_dict(base)  # GPT-NeoX (layernorm): transformers has no windowed GPT-NeoX
    llama = {**base, "norm": "rmsnorm", "activation": "swiglu", "rotary_pct": 1, "gpt_j_residual": False}
    with pytest.raises(ConfigError, match="MistralForCausalLM has no biases"):
        NeoXConfig.from_neox_dict(llama)  # gpt-neox's default use_bias_in_attn_linear is true
    ok = NeoXConfig.from_neox_dict({**llama, "use_bias_in_attn_linear": False, "use_bias_in_mlp": False})
    assert ok.sliding_window == 8 and ok.hf_architecture == "MistralForCausalLM"
    again = NeoXConfig.from_hf_dict(dataclasses.replace(ok, vocab_size=256).to_hf_dict())
    assert again.sliding_window == 8 and again.hf_architecture == "MistralForCausalLM"
