"""Whole-model equivalence: Hugging Face loads what merge writes, and it computes the reference's logits."""

import json

import pytest
import torch
from safetensors import safe_open

from hf_reference import hf_logits, hf_model
from neoxconv.output.hf_merge import MergeOptions, merge_checkpoint
from neoxconv.errors import MergeError, OutputError

transformers = pytest.importorskip("transformers")
IDS = [12092, 1533, 13, 50, 7000, 3, 50431, 0]


def _merged_logits(out, dtype=torch.float32):
    model = transformers.GPTNeoXForCausalLM.from_pretrained(out, dtype=dtype).eval()
    return hf_logits(model, IDS)


def _reference_logits(spec, reference):
    return hf_logits(hf_model(spec.config, reference), IDS)


@pytest.mark.parametrize("layout", ["pipeline", "sequential"])
@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_from_pretrained_matches_the_reference_model(make_checkpoint, tmp_path, tp, layout, dtype):
    root, reference, spec = make_checkpoint(tp, layout, dtype)
    report = merge_checkpoint(root, tmp_path / "out", MergeOptions(quiet=True))
    assert (report.tp_degree, report.layout) == (tp, layout)
    got, want = _merged_logits(tmp_path / "out"), _reference_logits(spec, reference)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(reference)
    for name, file in index["weight_map"].items():  # bit-exact, dtype kept
        with safe_open(tmp_path / "out" / file, framework="pt") as f:
            assert torch.equal(f.get_tensor(name), reference[name]), name


def test_bf16_checkpoint(make_checkpoint, tmp_path):
    root, reference, spec = make_checkpoint(2, "pipeline", "bfloat16")
    merge_checkpoint(root, tmp_path / "out", MergeOptions(quiet=True))
    torch.testing.assert_close(_merged_logits(tmp_path / "out"), _reference_logits(spec, reference))
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16"


def test_a_wrong_row_bias_rule_is_caught_by_the_equivalence_check(make_checkpoint, tmp_path):
    """Averaging the row-parallel bias parts (a rule real converters shipped) gives different logits."""
    root, reference, spec = make_checkpoint(2, "pipeline", "float32")
    merge_checkpoint(root, tmp_path / "wrong", MergeOptions(quiet=True, row_bias="replicated", replica_tolerance=1e9))
    got, want = _merged_logits(tmp_path / "wrong"), _reference_logits(spec, reference)
    assert not torch.allclose(got, want, rtol=1e-3, atol=1e-3)
    # and without the raised tolerance the replica check refuses it outright
    with pytest.raises(MergeError, match="attention.dense.bias"):
        merge_checkpoint(root, tmp_path / "refused", MergeOptions(quiet=True, row_bias="replicated"))


def test_a_wrong_concat_axis_is_caught(make_checkpoint, tmp_path, monkeypatch):
    """QKV concatenated on dim 1 instead of dim 0 cannot produce the config's shape: refused."""
    from neoxconv import merge as merge_mod
    from neoxconv.source.checkpoint import LayerKind

    root, _, _ = make_checkpoint(2, "pipeline", "float32")
    table = {k: dict(v) for k, v in merge_mod.RULES.items()}
    spec = table[LayerKind.BLOCK]["attention.query_key_value.weight"]
    table[LayerKind.BLOCK]["attention.query_key_value.weight"] = merge_mod.RuleSpec(
        merge_mod.Rule.CONCAT_COLS, spec.hf_name, spec.shape)
    monkeypatch.setattr(merge_mod, "RULES", table)
    with pytest.raises(MergeError, match="query_key_value.weight"):
        merge_checkpoint(root, tmp_path / "out", MergeOptions(quiet=True))


def test_full_bias_on_every_rank_needs_row_bias_replicated(make_checkpoint, tmp_path):
    """Checkpoints from older HF->NeoX tools hold the full bias on each rank: summing would double it."""
    root, reference, spec = make_checkpoint(2, "pipeline", "float32", full_row_bias_on_every_rank=True)
    want = _reference_logits(spec, reference)
    merge_checkpoint(root, tmp_path / "summed", MergeOptions(quiet=True))
    assert not torch.allclose(_merged_logits(tmp_path / "summed"), want, rtol=1e-3, atol=1e-3)
    merge_checkpoint(root, tmp_path / "right", MergeOptions(quiet=True, row_bias="replicated"))
    torch.testing.assert_close(_merged_logits(tmp_path / "right"), want)


def test_sequential_residual_model_keeps_one_row_bias(make_checkpoint, tmp_path):
    root, reference, spec = make_checkpoint(2, "pipeline", "float32",
                                            config_overrides={"parallel_residual": False, "activation": "gelu"})
    merge_checkpoint(root, tmp_path / "out", MergeOptions(quiet=True))
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["use_parallel_residual"] is False and cfg["hidden_act"] == "gelu"
    torch.testing.assert_close(_merged_logits(tmp_path / "out"), _reference_logits(spec, reference))


def test_tied_embeddings_have_no_readout(make_checkpoint, tmp_path):
    root, reference, spec = make_checkpoint(2, "pipeline", "float32", config_overrides={"tie_word_embeddings": True})
    merge_checkpoint(root, tmp_path / "out", MergeOptions(quiet=True))
    assert "embed_out.weight" not in json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    torch.testing.assert_close(_merged_logits(tmp_path / "out"), _reference_logits(spec, reference))


@pytest.mark.parametrize("target, torch_dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_dtype_conversion_matches_torch_casts(make_checkpoint, tmp_path, target, torch_dtype):
    root, reference, _ = make_checkpoint(2, "pipeline", "float16")
    merge_checkpoint(root, tmp_path / "out", MergeOptions(quiet=True, dtype=target))
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    for name, file in index["weight_map"].items():
        with safe_open(tmp_path / "out" / file, framework="pt") as f:
            got = f.get_tensor(name)
        assert got.dtype == torch_dtype, name
        if name.endswith(("attention.dense.bias", "dense_4h_to_h.bias")):
            # summed in fp32 and cast once to the target: finer than the fp16-rounded reference sum
            torch.testing.assert_close(got.float(), reference[name].float(), atol=1e-3, rtol=1e-3)
        else:
            assert torch.equal(got, reference[name].to(torch_dtype)), name


def test_tokenizer_and_config_are_written_for_auto_tokenizer(make_checkpoint, tmp_path, real_tokenizer):
    if real_tokenizer is None:
        pytest.skip("no real 20B tokenizer (set NEOXCONV_TOKENIZER, or put it in ../shared/data)")
    root, _, _ = make_checkpoint(2, "pipeline", "float16", tokenizer=real_tokenizer)
    merge_checkpoint(root, tmp_path / "out", MergeOptions(quiet=True))
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok("Hello world")["input_ids"] == [12092, 1533]
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["eos_token_id"] == 0 and cfg["bos_token_id"] == 0  # <|endoftext|>, not HF's default 2


def _all_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_two_merges_are_byte_identical(make_checkpoint, tmp_path):
    root, _, _ = make_checkpoint(2, "pipeline", "float16")
    merge_checkpoint(root, tmp_path / "a", MergeOptions(quiet=True))
    merge_checkpoint(root, tmp_path / "b", MergeOptions(quiet=True))
    assert _all_bytes(tmp_path / "a") == _all_bytes(tmp_path / "b")


def test_resume_keeps_good_layers_and_redoes_damaged_ones(make_checkpoint, tmp_path):
    root, _, _ = make_checkpoint(2, "pipeline", "float16")
    out = tmp_path / "out"
    merge_checkpoint(root, out, MergeOptions(quiet=True))
    want = _all_bytes(out)
    # simulate an interrupted run: manifest and index not yet written, one layer missing, one damaged
    files = sorted(out.glob("model-*.safetensors"))
    manifest = json.loads((out / "neoxconv.json").read_text())
    (out / ".neoxconv-journal.json").write_text(json.dumps(manifest))
    for name in ("neoxconv.json", "model.safetensors.index.json"):
        (out / name).unlink()
    files[1].unlink()
    files[2].write_bytes(files[2].read_bytes()[:-7] + b"garbage")
    (out / f".{files[3].name}.neoxconv-tmp").write_bytes(b"half-written")
    report = merge_checkpoint(root, out, MergeOptions(quiet=True))
    assert (report.files_written, report.files_reused) == (2, len(files) - 2)
    assert _all_bytes(out) == want


def test_rerun_over_a_complete_output_reuses_everything(make_checkpoint, tmp_path):
    root, _, _ = make_checkpoint(2, "pipeline", "float16")
    merge_checkpoint(root, tmp_path / "out", MergeOptions(quiet=True))
    report = merge_checkpoint(root, tmp_path / "out", MergeOptions(quiet=True))
    assert report.files_written == 0
    assert merge_checkpoint(root, tmp_path / "out", MergeOptions(quiet=True, resume=False)).files_reused == 0


def test_a_foreign_non_empty_output_folder_is_refused_unless_forced(make_checkpoint, tmp_path):
    root, _, _ = make_checkpoint(2, "pipeline", "float16")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not empty"):
        merge_checkpoint(root, out, MergeOptions(quiet=True))
    merge_checkpoint(root, out, MergeOptions(quiet=True, force=True))
    assert (out / "notes.txt").read_text() == "mine"  # never deletes what it did not write
    # a neoxconv output of a different source is refused too
    other_root, _, _ = make_checkpoint(1, "pipeline", "float16", config_overrides={"num_layers": 1})
    with pytest.raises(OutputError, match="different source"):
        merge_checkpoint(other_root, out, MergeOptions(quiet=True))
    # forced: the previous output's files go (they were ours), the user's file stays
    merge_checkpoint(other_root, out, MergeOptions(quiet=True, force=True))
    assert sorted(p.name for p in out.glob("model-*")) == [f"model-{i:05d}-of-00004.safetensors" for i in (1, 2, 3, 4)]
    assert (out / "notes.txt").read_text() == "mine"
