"""What `split` drops from a Hugging Face folder must be what the config derives (issue 18).

* ``rotary_emb.inv_freq`` buffers, as transformers < 4.31 saved them for Llama (and GPT-NeoX folders of that
  time): accepted and dropped when they hold the config's frequencies; refused when they do not (the folder's
  rotary base or head size is not what config.json says). Before: "unknown tensor(s) ... is this a GPT-NeoX
  model?" for Llama, though transformers loads the folder.
* a readout (``lm_head.weight`` / ``embed_out.weight``) beside ``tie_word_embeddings: true``: transformers 5.25
  keeps a readout that differs from the embedding untied (checked below), transformers 4 ties it; before, split
  dropped it silently. Equal to the embedding: dropped (every version computes the same); different: refused,
  naming both tensors.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import cli, one_line_error
from llama_checkpoints import LlamaSpec, hf_llama

transformers = pytest.importorskip("transformers")

SPEC = LlamaSpec(tp=2, heads=8, kv_heads=2, dtype=torch.float16)


def _folder(tmp_path: Path, name: str, model) -> Path:
    folder = tmp_path / name
    model.save_pretrained(folder)
    return folder


def _edit(folder: Path, change) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _split(folder: Path, out: Path):
    return cli("split", folder, out, "--tp", 2, "--quiet")


def _same_output(a: Path, b: Path) -> None:
    files = sorted(p.relative_to(a) for p in (a / "global_step0").iterdir())
    assert files == sorted(p.relative_to(b) for p in (b / "global_step0").iterdir())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def _inv_freq(spec: LlamaSpec, base: float, dtype=torch.float16, dims: int | None = None) -> torch.Tensor:
    d = dims or spec.hidden // spec.heads
    return (1.0 / (base ** (torch.arange(0, d, 2).float() / d))).to(dtype)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A Llama folder as transformers 5 saves it, and its split (the reference)."""
    base = tmp_path_factory.mktemp("llama")
    folder = _folder(base, "clean", hf_llama(SPEC))
    result = _split(folder, base / "split")
    assert result.exit_code == 0, result.output
    return folder, base / "split"


def _buffers(spec: LlamaSpec, value: torch.Tensor):
    def add(tensors):
        for i in range(spec.layers):
            tensors[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = value.clone()
    return add


def test_llama_rotary_buffers_that_match_the_config_are_dropped(llama, tmp_path):
    clean, reference = llama
    folder = tmp_path / "buffers"
    folder.mkdir()
    for f in clean.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    _edit(folder, _buffers(SPEC, _inv_freq(SPEC, SPEC.rope_theta)))
    loaded = transformers.LlamaForCausalLM.from_pretrained(folder)  # transformers reads this folder
    assert loaded is not None
    result = _split(folder, tmp_path / "out")
    assert result.exit_code == 0, result.output  # before: exit 4, "is this a GPT-NeoX model?"
    _same_output(reference, tmp_path / "out")


@pytest.mark.parametrize("what", ["rope base 1e4 (config says 1e6)", "head_dim 16 (config says 8)", "fp32 copy",
                                  "one value off"])
def test_llama_rotary_buffers_that_the_config_does_not_give_are_refused(llama, tmp_path, what):
    clean, reference = llama
    folder = tmp_path / "buffers"
    folder.mkdir()
    for f in clean.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    value = {"rope base 1e4 (config says 1e6)": _inv_freq(SPEC, 1e4),
             "head_dim 16 (config says 8)": _inv_freq(SPEC, SPEC.rope_theta, dims=16),
             "fp32 copy": _inv_freq(SPEC, SPEC.rope_theta, torch.float32),
             "one value off": _inv_freq(SPEC, SPEC.rope_theta) * torch.tensor([1, 1, 1.01, 1]).half()}[what]
    _edit(folder, _buffers(SPEC, value))
    result = _split(folder, tmp_path / "out")
    if what == "fp32 copy":  # the same frequencies in another dtype (DeepSpeed casts parameters only)
        assert result.exit_code == 0, result.output
        _same_output(reference, tmp_path / "out")
        return
    one_line_error(result, 3, "model.layers.0.self_attn.rotary_emb.inv_freq", "config.json")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.pt"))


def _tied(tmp_path: Path, arch: str) -> tuple[Path, str, str]:
    if arch == "llama":
        model = hf_llama(LlamaSpec(tp=2, heads=8, kv_heads=2, tied=True))
        return _folder(tmp_path, "tied", model), "model.embed_tokens.weight", "lm_head.weight"
    cfg = transformers.GPTNeoXConfig(vocab_size=256, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=128, tie_word_embeddings=True)
    torch.manual_seed(0)
    return _folder(tmp_path, "tied",
                   transformers.GPTNeoXForCausalLM(cfg)), "gpt_neox.embed_in.weight", "embed_out.weight"


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_a_tied_model_with_a_different_readout_is_refused_naming_both(tmp_path, arch):
    folder, emb, readout = _tied(tmp_path, arch)
    assert _split(folder, tmp_path / "plain").exit_code == 0
    _edit(folder, lambda t: t.__setitem__(readout, t[emb] + 0.01))
    # what transformers 5 computes for this folder: the readout, untied
    cls = transformers.LlamaForCausalLM if arch == "llama" else transformers.GPTNeoXForCausalLM
    model = cls.from_pretrained(folder)
    assert not torch.equal(model.get_output_embeddings().weight, model.get_input_embeddings().weight)
    one_line_error(_split(folder, tmp_path / "out"), 4, repr(readout), repr(emb), "tie_word_embeddings")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.pt"))
    # stated untied in config.json, the readout is split as final_linear
    cfg = folder / "config.json"
    cfg.write_text(cfg.read_text().replace('"tie_word_embeddings": true', '"tie_word_embeddings": false'))
    result = _split(folder, tmp_path / "untied")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "untied" / "global_step0" / f"layer_{2 + 2 + 2:02d}-model_01-model_states.pt").is_file()


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_a_tied_model_with_an_equal_readout_splits_as_tied(tmp_path, arch):
    folder, emb, readout = _tied(tmp_path, arch)
    assert _split(folder, tmp_path / "plain").exit_code == 0
    _edit(folder, lambda t: t.__setitem__(readout, t[emb].clone()))
    result = _split(folder, tmp_path / "out")
    assert result.exit_code == 0, result.output
    _same_output(tmp_path / "plain", tmp_path / "out")
