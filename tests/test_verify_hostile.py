"""`verify` and `split` driven the way a hostile or careless user drives them, through the CLI.

Each case was an internal error (exit 1 with "please report it") or a silent acceptance before: every bad
input must be a usage error (exit 2), an input error (exit 4) or a failed check (exit 7) naming what is wrong.
"""

from __future__ import annotations

import json
import shutil
import struct

import pytest

from neoxconv.output.hf_merge import MergeOptions, merge_checkpoint

from conftest import cli


@pytest.fixture(scope="module")
def merged(tmp_path_factory, make_checkpoint):
    root, _, _ = make_checkpoint(2, "pipeline", "float32")
    out = tmp_path_factory.mktemp("hostile") / "out"
    merge_checkpoint(root, out, MergeOptions(quiet=True))
    return root, out


def _no_internal_error(result):
    assert "internal error" not in result.output and not isinstance(result.exception, (RuntimeError, ValueError,
                                                                                      AttributeError)), result.output


@pytest.mark.parametrize("args, message", [
    (["--max-new-tokens", "-3"], "--max-new-tokens"),
    (["--temperature", "nan"], "finite temperature"),
    (["--temperature", "inf"], "finite temperature"),
    (["--int8-threshold", "-1"], "--int8-threshold"),
    (["--int8-threshold", "nan"], "--int8-threshold"),
])
def test_bad_generation_options_are_usage_errors(merged, args, message):
    _, out = merged
    result = cli("verify", out, "--ids", "1,2", "--device", "cpu", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    _no_internal_error(result)


def test_prompt_longer_than_the_model_is_a_usage_error_before_loading(merged):
    _, out = merged
    n = json.loads((out / "config.json").read_text())["max_position_embeddings"]
    result = cli("verify", out, "--ids", ",".join(["1"] * n), "--device", "cpu", "--max-new-tokens", "0")
    assert result.exit_code == 2, result.output
    assert f"the prompt has {n} tokens" in result.output and "max_position_embeddings" in result.output
    assert "load:" not in result.output  # refused before any weight is read


def test_max_new_tokens_zero_and_huge_run_resident(merged):
    """A huge --max-new-tokens stops at max_position_embeddings, and the memory verify plans for is that of the
    tokens it can generate: a tiny model stays resident (it was streamed from disk, the KV cache and logits of
    a million tokens taken as not fitting)."""
    _, out = merged
    cap = json.loads((out / "config.json").read_text())["max_position_embeddings"]
    for n in ("0", "1000000"):
        result = cli("verify", out, "--ids", "1,2", "--device", "cpu", "--max-new-tokens", n, "--json", "-q")
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert len(report["generated_ids"]) <= (0 if n == "0" else cap - 2)
        assert report["offloaded_bytes"] == 0 and report["device_map"] is None, report["notes"]


def test_cuda_on_a_machine_without_cuda_is_a_usage_error(merged):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    _, out = merged
    result = cli("verify", out, "--ids", "1,2", "--device", "cuda")
    assert result.exit_code == 2 and "no CUDA device" in result.output, result.output


def _rewrite_header(path, text: bytes):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


def _header(path) -> dict:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n])


def _dup_first_entry(h: dict) -> bytes:
    """The same tensor named twice, the second copy pointing at other bytes (readers keep different ones)."""
    name = next(k for k in h if k != "__metadata__")
    other = dict(h[name], data_offsets=[0, h[name]["data_offsets"][1] - h[name]["data_offsets"][0]])
    return (json.dumps(h)[:-1] + ", " + json.dumps({name: other})[1:]).encode()


@pytest.mark.parametrize("tamper, message", [
    (lambda h: json.dumps({**h, "__metadata__": {"format": 5}}).encode(), "__metadata__ is not a table of strings"),
    (lambda h: json.dumps({**h, "__metadata__": [1]}).encode(), "__metadata__ is not a table of strings"),
    (lambda h: json.dumps({**h, "__metadata__": {"x": float("nan")}}).encode(), "NaN, which is not JSON"),
    (_dup_first_entry, "twice"),
    (lambda h: b" " + json.dumps(h).encode(), "does not start with"),
])
def test_header_safetensors_would_refuse_fails_integrity_not_the_loader(merged, tmp_path, tamper, message):
    """--no-manifest checks only the headers: a header that safetensors refuses (or reads differently) must
    fail the integrity check by name, not crash the loader afterwards."""
    _, out = merged
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "neoxconv.json").unlink()
    victim = sorted(copy.glob("model-*.safetensors"))[0]
    _rewrite_header(victim, tamper(_header(victim)))
    result = cli("verify", copy, "--ids", "1,2", "--device", "cpu", "--no-manifest", "--max-new-tokens", "1")
    assert result.exit_code == 7, result.output
    assert victim.name in result.output and message in result.output
    _no_internal_error(result)


def _split(src, out):
    return cli("split", src, out, "--tp", "2", "-q")


@pytest.mark.parametrize("entry, message", [
    ([1, 2], "malformed header entry"),
    ({"dtype": "F32", "shape": ["a", 1], "data_offsets": [0, 4]}, "malformed data_offsets/shape/dtype"),
])
def test_split_names_a_malformed_hf_header(merged, tmp_path, entry, message):
    _, out = merged
    hf = tmp_path / "hf"
    shutil.copytree(out, hf)
    victim = sorted(hf.glob("model-*.safetensors"))[0]
    h = _header(victim)
    name = next(k for k in h if k != "__metadata__")
    _rewrite_header(victim, json.dumps({**h, name: entry}).encode())
    result = _split(hf, tmp_path / "neox")
    assert result.exit_code == 4, result.output
    assert victim.name in result.output and message in result.output
    _no_internal_error(result)


def test_split_refuses_a_deeply_nested_header(merged, tmp_path):
    _, out = merged
    hf = tmp_path / "hf"
    shutil.copytree(out, hf)
    victim = sorted(hf.glob("model-*.safetensors"))[0]
    _rewrite_header(victim, b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    result = _split(hf, tmp_path / "neox")
    assert result.exit_code == 4 and "nested too deeply" in result.output, result.output


def test_split_refuses_a_tensor_held_by_two_shards(merged, tmp_path):
    """Two shards holding one name with different values: which one a loader takes depends on the loader."""
    from safetensors.torch import load_file, save_file

    _, out = merged
    hf = tmp_path / "hf"
    shutil.copytree(out, hf)
    first, second = sorted(hf.glob("model-*.safetensors"))[:2]
    a, b = load_file(first), load_file(second)
    name = next(iter(a))
    b[name] = a[name] * 2
    save_file(b, second, metadata={"format": "pt"})
    result = _split(hf, tmp_path / "neox")
    assert result.exit_code == 4, result.output
    assert name in result.output and first.name in result.output and second.name in result.output
    assert not (tmp_path / "neox" / "latest").exists()


def test_against_a_source_that_does_not_fit_its_config_names_the_tensor(merged, tmp_path):
    """--against-config describing another model (here: half the hidden size) than the shards hold: the
    shards are checked against it as merge checks them, not fed to a matmul that fails with a shape error."""
    root, out = merged
    (yml,) = (root / "configs").glob("*.yml")
    text = yml.read_text()
    hidden = json.loads((out / "config.json").read_text())["hidden_size"]
    assert f'"hidden-size": {hidden},' in text
    other = tmp_path / "other.yml"
    other.write_text(text.replace(f'"hidden-size": {hidden},', f'"hidden-size": {hidden // 2},'))
    result = cli("verify", out, "--ids", "1,2", "--device", "cpu", "--max-new-tokens", "1",
                  "--against", root, "--against-config", other)
    assert result.exit_code == 5, result.output
    assert "word_embeddings.weight" in result.output and "config expects" in result.output
    _no_internal_error(result)


def test_against_with_qkv_layout_on_a_gpt_neox_model_is_refused_as_in_merge(merged):
    root, out = merged
    result = cli("verify", out, "--ids", "1,2", "--device", "cpu", "--max-new-tokens", "1",
                  "--against", root, "--qkv-layout", "blocked")
    assert result.exit_code == 3 and "--qkv-layout applies to Llama-style" in result.output, result.output


def test_tokenizer_that_does_not_match_the_model(merged, tmp_path):
    """A tokenizer copied in after the merge: named as unchecked by integrity; a prompt it encodes outside the
    vocabulary blames the tokenizer (not --ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    _, out = merged
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    vocab = json.loads((copy / "config.json").read_text())["vocab_size"]
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": vocab + 7}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(copy / "tokenizer.json"))
    result = cli("verify", copy, "--prompt", "hello", "--device", "cpu")
    assert result.exit_code == 2, result.output
    assert "--prompt: the tokenizer" in result.output and "does not match the model" in result.output
    assert f"[{vocab + 7}]" in result.output
    result = cli("verify", copy, "--ids", "1,2", "--device", "cpu", "--max-new-tokens", "1")
    assert result.exit_code == 0, result.output
    assert "NOT proven: tokenizer.json: not in the manifest" in result.output


def test_unreadable_tokenizer_is_an_input_error(merged, tmp_path):
    _, out = merged
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "tokenizer.json").write_text("[1")
    result = cli("verify", copy, "--ids", "1,2", "--device", "cpu", "--max-new-tokens", "1")
    assert result.exit_code == 4 and "cannot load the tokenizer" in result.output, result.output


def test_manifest_that_does_not_list_config_json_fails_integrity(merged, tmp_path):
    """Every merge records config.json's hash: a manifest without it leaves the config unchecked."""
    _, out = merged
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    manifest = json.loads((copy / "neoxconv.json").read_text())
    del manifest["files"]["config.json"]
    (copy / "neoxconv.json").write_text(json.dumps(manifest))
    result = cli("verify", copy, "--ids", "1,2", "--device", "cpu", "--max-new-tokens", "1")
    assert result.exit_code == 7 and "neoxconv.json: does not list config.json" in result.output, result.output


def test_index_naming_a_tensor_no_file_holds_fails_integrity(merged, tmp_path):
    """--no-manifest still checks that the index and the headers agree, in both directions."""
    _, out = merged
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "neoxconv.json").unlink()
    index = json.loads((copy / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"]["gpt_neox.layers.0.attention.extra.weight"] = first
    (copy / "model.safetensors.index.json").write_text(json.dumps(index))
    result = cli("verify", copy, "--ids", "1,2", "--device", "cpu", "--no-manifest", "--max-new-tokens", "1")
    assert result.exit_code == 7, result.output
    assert "places tensors in files that do not hold them" in result.output and "attention.extra" in result.output


@pytest.mark.parametrize("change, message", [
    ({"rope_scaling": {"type": "linear", "factor": 4.0}}, "uses RoPE scaling (rope_scaling: 'linear')"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "uses RoPE scaling (rope_scaling: 'dynamic')"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}, "rotary base as rotary_emb_base"),
    ({"rope_theta": 1000.0}, "rotary base as rotary_emb_base"),
    ({"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 1.0}}, "rotary share as rotary_pct"),
])
def test_rope_settings_neoxconv_would_ignore_are_refused(merged, tmp_path, change, message):
    """GPT-NeoX config.json with RoPE scaling (transformers' GPTNeoX implements it; neoxconv's layers and gpt-neox
    checkpoints do not), or two spellings of one RoPE setting that disagree (transformers 4 reads the legacy
    key, 5 rope_parameters): verify and split refuse it (exit 3) instead of silently using one reading."""
    _, out = merged
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    cfg = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**cfg, **change}))
    for result in (cli("verify", copy, "--ids", "1,2", "--device", "cpu", "--no-check-hashes"),
                   _split(copy, tmp_path / "neox")):
        assert result.exit_code == 3, result.output
        assert message in result.output


def test_llama_rope_theta_spellings_that_disagree_are_refused():
    from neoxconv.config import RMSNORM, SWIGLU, NeoXConfig
    from neoxconv.errors import ConfigError

    llama = NeoXConfig(num_layers=1, hidden_size=64, num_heads=4, num_kv_heads=2, vocab_size=128, norm=RMSNORM,
                       activation=SWIGLU, rotary_pct=1.0, parallel_residual=False, rotary_emb_base=1e6,
                       layernorm_eps=1e-8, intermediate_size=96).to_hf_dict()
    assert llama["model_type"] == "llama" and NeoXConfig.from_hf_dict(llama).rotary_emb_base == 1e6
    with pytest.raises(ConfigError, match="rope_parameters.rope_theta = 1e\\+06, rope_theta = 500000"):
        NeoXConfig.from_hf_dict({**llama, "rope_theta": 5e5})


@pytest.mark.parametrize("tp", ["0", "-1", "3"])
def test_demo_with_a_tp_its_model_cannot_take_is_a_usage_error(tp, tmp_path):
    result = cli("demo", "--tp", tp, "--workdir", tmp_path / "w")
    assert result.exit_code == 2 and "cannot split this model" in result.output, result.output
    assert not (tmp_path / "w").exists()  # refused before anything is written
