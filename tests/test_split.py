"""`neoxconv split` (Hugging Face -> NeoX at TP N): round trips, an independent split, the files gpt-neox reads."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from neoxconv.cli import main
from neoxconv.config import NeoXConfig, padded_vocab_size
from neoxconv.output.hf_merge import MergeOptions, merge_checkpoint
from neoxconv.output.neox import vocab_divisor
from neoxconv.output.split import SplitOptions, split_model

from conftest import (
    cli,
    hf_tensors,
    no_internal_error,
    one_line_error,
    rewrite_safetensors_header,
    safetensors_header,
    split_tp2,
    tensor_bits,
)
from neox_tp_split import tp_split


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("layout", ["pipeline", "sequential"])
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_merge_of_split_is_the_hf_model_bit_for_bit(hf_dir, tmp_path, tp, layout, dtype):
    src = hf_dir(dtype)
    report = split_model(src, tmp_path / "neox", SplitOptions(tp=tp, layout=layout, quiet=True))
    assert (report.tp_degree, report.layout) == (tp, layout)
    merge_checkpoint(tmp_path / "neox", tmp_path / "merged", MergeOptions(quiet=True))
    want, got = hf_tensors(src), hf_tensors(tmp_path / "merged")
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, name
        assert tensor_bits(got[name]) == tensor_bits(want[name]), name


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("parallel_residual", [True, False])
def test_split_equals_an_independent_tp_split(hf_dir, tmp_path, tp, parallel_residual):
    src = hf_dir(torch.float16, use_parallel_residual=parallel_residual, intermediate_size=256)  # 4h: the 20B MLP
    split_model(src, tmp_path / "neox", SplitOptions(tp=tp, quiet=True, key_names="20b"))
    sd = hf_tensors(src)
    expected, row_bias_sums = tp_split(sd, layers=2, heads=8, rotary_dims=2, base=10000.0, tp=tp,
                                       parallel_residual=parallel_residual)
    step = tmp_path / "neox" / "global_step0"
    assert sorted(p.name for p in step.glob("layer_*")) == sorted(
        f"layer_{i:02d}-model_{r:02d}-model_states.pt" for i in expected for r in range(tp))
    for idx, shards in expected.items():
        ranks = [torch.load(step / f"layer_{idx:02d}-model_{r:02d}-model_states.pt", weights_only=True)
                 for r in range(tp)]
        for r, (want, got) in enumerate(zip(shards, ranks)):
            assert set(got) == set(want) | {k for (i, k) in row_bias_sums if i == idx}, (idx, r)
            for key, w in want.items():
                assert got[key].dtype == w.dtype and got[key].shape == w.shape, (idx, r, key)
                assert tensor_bits(got[key]) == tensor_bits(w), (idx, r, key)
        for (i, key), full in row_bias_sums.items():  # the parts must sum to the bias exactly
            if i == idx:
                total = sum(rk[key].float() for rk in ranks).to(full.dtype)
                assert tensor_bits(total) == tensor_bits(full), (idx, key)


def test_every_file_loads_with_weights_only_and_holds_what_deepspeed_reads(hf_dir, tmp_path):
    split_model(hf_dir(torch.float16), tmp_path / "p", SplitOptions(tp=2, step=7, quiet=True))
    split_model(hf_dir(torch.float16, intermediate_size=256), tmp_path / "s",
                SplitOptions(tp=2, layout="sequential", quiet=True, key_names="20b"))  # 4h: the 20B MLP
    assert (tmp_path / "p" / "latest").read_text() == "global_step7"
    for pt in [*tmp_path.glob("*/global_step*/*.pt")]:
        torch.load(pt, weights_only=True)
    for r in range(2):
        book = torch.load(tmp_path / "p" / "global_step7" / f"mp_rank_{r:02d}_model_states.pt", weights_only=True)
        assert book["module"] is None
        assert (book["global_steps"], book["iteration"], book["skipped_steps"]) == (7, 7, 0)
        assert (book["mp_world_size"], book["dp_world_size"]) == (2, 1)
        seq = torch.load(tmp_path / "s" / "global_step0" / f"mp_rank_{r:02d}_model_states.pt", weights_only=True)
        assert "sequential.0.word_embeddings.weight" in seq["module"] and seq["mp_world_size"] == 2
        assert "sequential.2.attention.rotary_emb.inv_freq" in seq["module"]  # 20b: the buffer gpt-neox saved
        assert seq["module"]["sequential.2.attention.rotary_emb.inv_freq"].dtype == torch.float16  # the model's dtype
    # the current key names: no inv_freq (gpt-neox saves it only with rotary_save_freqs_buffer since 2024-03)
    for block in (tmp_path / "p" / "global_step7").glob("layer_0[23]-*"):
        assert not any("inv_freq" in k for k in torch.load(block, weights_only=True)), block
    from neoxconv.config import read_neox_yaml

    assert read_neox_yaml(tmp_path / "p" / "configs" / "neox.yml")["rotary_save_freqs_buffer"] is False
    assert read_neox_yaml(tmp_path / "s" / "configs" / "neox.yml")["rotary_save_freqs_buffer"] is True


def test_written_config_reads_back_and_pads_the_vocab_onto_the_embedding(hf_dir, tmp_path):
    src = hf_dir(torch.float16)
    split_model(src, tmp_path / "seq", SplitOptions(tp=4, layout="sequential", quiet=True))
    split_model(src, tmp_path / "pipe", SplitOptions(tp=4, quiet=True))
    from neoxconv.config import read_neox_yaml

    for name, pipe in (("seq", 0), ("pipe", 1)):
        raw = read_neox_yaml(tmp_path / name / "configs" / "neox.yml")
        assert raw["pipe-parallel-size"] == pipe and raw["model-parallel-size"] == 4
        assert raw["finetune"] is True and raw["rotary_save_freqs_buffer"] is False
        assert isinstance(raw["layernorm-epsilon"], float) and isinstance(raw["rotary_pct"], float)  # 1e-05 is a str
        back = NeoXConfig.from_neox_dict(raw)
        hf = NeoXConfig.from_hf_json(src / "config.json")
        assert back.with_(vocab_size=hf.vocab_size, bos_token_id=hf.bos_token_id, eos_token_id=hf.eos_token_id,
                          make_vocab_size_divisible_by=128) == hf
        # gpt-neox pads any tokenizer of up to 512 entries to the embedding's 512 rows with this divisor
        for tokens in (1, 300, 512):
            assert padded_vocab_size(tokens, divisible_by=raw["make_vocab_size_divisible_by"], tp_degree=4) == 512


def test_yaml_floats_read_back_as_floats():
    import yaml

    from neoxconv.output.neox import _yaml_float

    for x in (1e-5, 1e-12, 0.25, 1.0, 2.5e-7, 1e20, 10000.5):
        assert yaml.safe_load(_yaml_float(x)) == x and isinstance(yaml.safe_load(_yaml_float(x)), float)


def test_vocab_divisor_keeps_128_when_it_fits_and_otherwise_lands_on_the_rows():
    for tp in (1, 2, 4, 8):
        d = vocab_divisor(50432, tp, 50277)
        assert padded_vocab_size(50277, divisible_by=d, tp_degree=tp) == 50432
    assert vocab_divisor(50432, 2, 50277) == 128  # the 20B release: 50277 -> 50432 at TP 2
    assert vocab_divisor(50432, 4, 50277) == 12608  # 128 would give 50688
    assert vocab_divisor(50432, 4, None) == 12608


def test_both_hf_config_forms_give_the_same_checkpoint(hf_dir, tmp_path):
    new = hf_dir(torch.float32, seed=3, rotary_emb_base=5000.0, rotary_pct=0.5, intermediate_size=256)
    old = hf_dir(torch.float32, seed=3, rotary_emb_base=5000.0, rotary_pct=0.5, intermediate_size=256,
                 legacy_config=True)  # 4h: the 20B MLP, so --key-names 20b writes inv_freq
    assert "rope_parameters" in json.loads((new / "config.json").read_text())
    assert "rotary_pct" in json.loads((old / "config.json").read_text())
    for name, src in (("new", new), ("old", old)):
        split_model(src, tmp_path / name, SplitOptions(tp=2, quiet=True, key_names="20b"))
    a = NeoXConfig.from_neox_yaml(tmp_path / "new" / "configs" / "neox.yml")
    b = NeoXConfig.from_neox_yaml(tmp_path / "old" / "configs" / "neox.yml")
    assert a == b and (a.rotary_pct, a.rotary_emb_base) == (0.5, 5000.0)
    f = "global_step0/layer_02-model_01-model_states.pt"
    x, y = torch.load(tmp_path / "new" / f, weights_only=True), torch.load(tmp_path / "old" / f, weights_only=True)
    assert set(x) == set(y) and all(tensor_bits(x[k]) == tensor_bits(y[k]) for k in x)
    # head_dim 8 x 0.5 = 4 dims
    assert x["attention.rotary_emb.inv_freq"].dtype == torch.float32 and x["attention.rotary_emb.inv_freq"].numel() == 2


def test_split_dtype_option_and_tanh_gelu(hf_dir, tmp_path):
    src = hf_dir(torch.float32, hidden_act="gelu_fast")
    split_model(src, tmp_path / "n", SplitOptions(tp=2, dtype="bf16", quiet=True))
    text = (tmp_path / "n" / "configs" / "neox.yml").read_text()
    assert '"bias-gelu-fusion": true' in text and '"precision": "bfloat16"' in text
    shard = torch.load(tmp_path / "n" / "global_step0" / "layer_00-model_01-model_states.pt", weights_only=True)
    want = hf_tensors(src)["gpt_neox.embed_in.weight"][256:].to(torch.bfloat16)
    assert tensor_bits(shard["word_embeddings.weight"]) == tensor_bits(want)


def test_simulated_tp_forward_of_the_split_agrees_with_transformers(hf_dir, tmp_path):
    from transformers import GPTNeoXForCausalLM

    from neoxconv.check.tp_reference import tensor_parallel_logits

    src = hf_dir(torch.float32)
    split_model(src, tmp_path / "n", SplitOptions(tp=4, quiet=True))
    ids = [3, 141, 59, 265, 35, 89, 79, 323]
    tp_logits, _ = tensor_parallel_logits(tmp_path / "n", ids)
    model = GPTNeoXForCausalLM.from_pretrained(src, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].float()
    assert (tp_logits - ref).abs().max().item() < 1e-4


def test_verify_against_the_split_output(hf_dir, tmp_path):
    """verify needs a neoxconv output folder: the HF model as merged from a TP-4 split (bit-exact, tested above)."""
    src = hf_dir(torch.float32)
    split_model(src, tmp_path / "n", SplitOptions(tp=2, quiet=True))
    split_model(src, tmp_path / "n4", SplitOptions(tp=4, layout="sequential", quiet=True))
    merge_checkpoint(tmp_path / "n4", tmp_path / "hf", MergeOptions(quiet=True))
    result = CliRunner().invoke(main, ["verify", str(tmp_path / "hf"), "--ids", "3,141,59,26", "--max-new-tokens", "2",
                                       "--device", "cpu", "--against", str(tmp_path / "n"), "--json", "-q"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert report["ok"] and report["checks"]["against"]["passed"], report["checks"]
    against = report["checks"]["against"]
    assert against["value"] < 1e-5 and "top-1 agreement 100%" in against["detail"]


def test_not_divisible_is_exit_3_naming_the_dimension_before_writing(hf_dir, tmp_path):
    out = tmp_path / "never"
    result = CliRunner().invoke(main, ["split", str(hf_dir(torch.float16)), str(out), "--tp", "3"])
    assert result.exit_code == 3
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "num_heads 8 is not divisible by the TP degree 3" in lines[0]
    assert not out.exists()


def test_missing_and_unknown_tensors_in_one_line(hf_dir, tmp_path):
    from safetensors.torch import save_file

    src = hf_dir(torch.float16)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((src / "config.json").read_text())
    sd = hf_tensors(src)
    del sd["gpt_neox.layers.1.mlp.dense_4h_to_h.bias"]
    sd["gpt_neox.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(1)  # derived buffers are fine
    sd["gpt_neox.layers.0.mlp.gate.weight"] = torch.ones(2)
    save_file(sd, str(bad / "model.safetensors"))
    result = CliRunner().invoke(main, ["split", str(bad), str(tmp_path / "o"), "--tp", "2"])
    assert result.exit_code == 4
    assert "missing 'gpt_neox.layers.1.mlp.dense_4h_to_h.bias'" in result.output
    assert "'gpt_neox.layers.0.mlp.gate.weight'" in result.output and "inv_freq" not in result.output
    assert not (tmp_path / "o").exists()


def test_archives_are_named_as_torch_save_names_them_and_nothing_is_left_over(hf_dir, tmp_path):
    import zipfile

    split_model(hf_dir(torch.float16), tmp_path / "n", SplitOptions(tp=2, quiet=True))
    step = tmp_path / "n" / "global_step0"
    for pt in step.glob("*.pt"):
        names = zipfile.ZipFile(pt).namelist()
        assert all(n.startswith(pt.stem + "/") for n in names), (pt.name, names[:2])
    assert sorted(p.name for p in tmp_path.joinpath("n").iterdir()) == [
        "configs", "global_step0", "latest", "neoxconv.json"]
    assert not [p for p in step.iterdir() if not p.name.endswith("model_states.pt")]


def test_sharded_hf_folder(hf_dir, tmp_path):
    src = hf_dir(torch.float16, seed=9, max_shard_size="100KB")
    assert (src / "model.safetensors.index.json").is_file() and len(list(src.glob("*.safetensors"))) > 3
    split_model(src, tmp_path / "n", SplitOptions(tp=2, layout="sequential", quiet=True))
    merge_checkpoint(tmp_path / "n", tmp_path / "m", MergeOptions(quiet=True))
    want, got = hf_tensors(src), hf_tensors(tmp_path / "m")
    assert set(got) == set(want) and all(tensor_bits(got[k]) == tensor_bits(want[k]) for k in want)


@pytest.mark.parametrize("file, code", [("config.json", 3), ("model.safetensors.index.json", 4)])
def test_a_deeply_nested_json_in_the_split_source_is_named_not_an_internal_error(tmp_path, file, code):
    # Before: split's JSON reader let RecursionError escape -> "internal error" (the other readers caught it).
    from conftest import make_hf_folder

    hf = tmp_path / "hf"
    make_hf_folder(hf)
    (hf / file).write_text("[" * 100_000)
    r = cli("split", "-q", "--tp", "1", hf, tmp_path / "out")
    one_line_error(r, code, file, "not readable")


@pytest.mark.parametrize("entry, message", [
    ([1, 2], "malformed header entry"),
    ({"dtype": "F32", "shape": ["a", 1], "data_offsets": [0, 4]}, "malformed data_offsets/shape/dtype"),
])
def test_split_names_a_malformed_hf_header(merged_fp32, tmp_path, entry, message):
    _, out = merged_fp32
    hf = tmp_path / "hf"
    shutil.copytree(out, hf)
    victim = sorted(hf.glob("model-*.safetensors"))[0]
    h = safetensors_header(victim)
    name = next(k for k in h if k != "__metadata__")
    rewrite_safetensors_header(victim, json.dumps({**h, name: entry}).encode())
    result = split_tp2(hf, tmp_path / "neox")
    assert result.exit_code == 4, result.output
    assert victim.name in result.output and message in result.output
    no_internal_error(result)


def test_split_refuses_a_deeply_nested_header(merged_fp32, tmp_path):
    _, out = merged_fp32
    hf = tmp_path / "hf"
    shutil.copytree(out, hf)
    victim = sorted(hf.glob("model-*.safetensors"))[0]
    rewrite_safetensors_header(victim, b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    result = split_tp2(hf, tmp_path / "neox")
    assert result.exit_code == 4 and "nested too deeply" in result.output, result.output


def test_split_refuses_a_tensor_held_by_two_shards(merged_fp32, tmp_path):
    """Two shards holding one name with different values: which one a loader takes depends on the loader."""
    from safetensors.torch import load_file, save_file

    _, out = merged_fp32
    hf = tmp_path / "hf"
    shutil.copytree(out, hf)
    first, second = sorted(hf.glob("model-*.safetensors"))[:2]
    a, b = load_file(first), load_file(second)
    name = next(iter(a))
    b[name] = a[name] * 2
    save_file(b, second, metadata={"format": "pt"})
    result = split_tp2(hf, tmp_path / "neox")
    assert result.exit_code == 4, result.output
    assert name in result.output and first.name in result.output and second.name in result.output
    assert not (tmp_path / "neox" / "latest").exists()
