"""verify: the JSON contract, the checks, and --against catching corrupted merges."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from neoxconv import verify
from neoxconv.check.integrity import check_output
from neoxconv.cli import main
from neoxconv.config import load_out_config
from neoxconv.errors import VerificationError
from neoxconv.merge import Rule
from neoxconv.output import hf_merge as convert
from neoxconv.output.hf_merge import MergeOptions, merge_checkpoint
from neoxconv.verify import VerifyOptions, verify_model

from conftest import (
    COMMITTED_FIXTURE,
    VERIFY,
    cli,
    no_internal_error,
    one_line_error,
    rewrite_safetensors_header,
    safetensors_header,
    subprocess_env,
    verify_json,
)

transformers = pytest.importorskip("transformers")

PROMPT_IDS = (12092, 1533, 13, 50, 7000)


def test_json_contract_and_greedy_ids_equal_transformers(merged_fp32):
    transformers = pytest.importorskip("transformers")
    import torch

    root, out = merged_fp32
    result, report = verify_json(out, "--ids", ",".join(map(str, PROMPT_IDS)), "--max-new-tokens", 12,
                                  "--reference", "hf", "--against", root)
    assert result.exit_code == 0, result.output
    for key in ("prompt_ids", "generated_ids", "text", "kv_cache_max_abs_diff", "tokens_per_second", "device",
                "dtype", "checks", "ok"):
        assert key in report
    assert report["prompt_ids"] == list(PROMPT_IDS) and len(report["generated_ids"]) <= 12
    assert report["device"] == "cpu" and report["dtype"] == "float32"
    assert report["kv_cache_max_abs_diff"] < 1e-3
    assert {"integrity", "kv_cache", "sanity", "against", "reference_hf"} <= set(report["checks"])
    assert all(c["passed"] for c in report["checks"].values())
    hf = transformers.GPTNeoXForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    want = hf.generate(torch.tensor([PROMPT_IDS]), max_new_tokens=12, do_sample=False,
                       eos_token_id=hf.config.eos_token_id, pad_token_id=0)[0, len(PROMPT_IDS):].tolist()
    assert report["generated_ids"] == want


def _corrupt_merge(monkeypatch, root, out, corruption):
    """Merge with one rule deliberately broken; the manifest stays consistent with the broken files."""
    real_merge, real_chunks = convert.merge_tensor, convert.iter_merged_chunks
    monkeypatch.setattr(convert, "streams_direct", lambda plan: False)  # every concat through iter_merged_chunks
    if corruption == "row_bias_from_one_rank":
        def merge_tensor(rule, shards, **kw):
            return real_merge(Rule.DROP if rule is Rule.SUM else rule, shards, **kw)
        monkeypatch.setattr(convert, "merge_tensor", merge_tensor)
    elif corruption == "qkv_as_3_heads_hd":  # Megatron's [3, heads, hd] layout mistaken for NeoX's [heads, 3, hd]
        def iter_merged_chunks(plan, **kw):
            chunks = list(real_chunks(plan, **kw))
            if plan.key == "attention.query_key_value.weight":
                full = np.concatenate(chunks)
                heads = full.shape[0] // 3
                hd = heads // 4  # tiny_config: 4 heads
                chunks = [full.reshape(4, 3, hd, -1).transpose(1, 0, 2, 3).reshape(full.shape)]
            yield from chunks
        monkeypatch.setattr(convert, "iter_merged_chunks", iter_merged_chunks)
    elif corruption == "ranks_swapped":
        def iter_merged_chunks(plan, **kw):
            if plan.key == "mlp.dense_4h_to_h.weight":
                plan.shards.reverse()
            yield from real_chunks(plan, **kw)
        monkeypatch.setattr(convert, "iter_merged_chunks", iter_merged_chunks)
    merge_checkpoint(root, out, MergeOptions(quiet=True))
    monkeypatch.undo()


@pytest.mark.parametrize("corruption", ["row_bias_from_one_rank", "qkv_as_3_heads_hd", "ranks_swapped"])
def test_against_flags_a_corrupted_merge(make_checkpoint, tmp_path, monkeypatch, corruption):
    root, _, _ = make_checkpoint(2, "pipeline", "float32")
    _corrupt_merge(monkeypatch, root, tmp_path / "bad", corruption)
    result, report = verify_json(tmp_path / "bad", "--ids", "1,2,3,4,5", "--max-new-tokens", 4, "--against", root)
    assert result.exit_code == 7, result.output
    assert report["checks"]["against"]["passed"] is False
    assert report["checks"]["kv_cache"]["passed"] is True  # self-consistency alone would not catch it


def test_int8_on_cpu_agrees_with_full_precision(merged_fp32):
    pytest.importorskip("bitsandbytes")
    _, out = merged_fp32
    report = verify_model(out, VerifyOptions(ids=PROMPT_IDS, max_new_tokens=8, int8=True))
    assert report.ok, [c for c in report.checks if not c.passed]
    assert report.int8["top1_agreement"] >= 0.5
    assert report.int8["weight_bytes_after"] < report.int8["weight_bytes_before"]


def test_tampered_file_is_named_before_any_model_is_built(merged_fp32, tmp_path):
    import shutil

    _, out = merged_fp32
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    victim = sorted(copy.glob("model-*.safetensors"))[2]
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match=victim.name + ": blake3 differs"):
        verify_model(copy, VerifyOptions(ids=(1, 2)))
    result = CliRunner().invoke(main, ["verify", str(copy), "--ids", "1,2"])
    assert result.exit_code == 7 and victim.name in result.output
    victim.unlink()
    with pytest.raises(VerificationError, match=victim.name + ": missing"):
        verify_model(copy, VerifyOptions(ids=(1, 2)))


def test_header_that_disagrees_with_config_is_reported(merged_fp32, tmp_path):
    import shutil

    _, out = merged_fp32
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["hidden_size"] = 32
    cfg["num_attention_heads"] = 2
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(VerificationError, match="config.json implies"):
        verify_model(copy, VerifyOptions(ids=(1, 2), check_hashes=False))


@pytest.mark.parametrize("tp, layout, overrides", [
    (4, "sequential", {"parallel_residual": False, "activation": "gelu"}),
    (2, "pipeline", {"tie_word_embeddings": True}),
    (1, "pipeline", {}),
])
def test_against_passes_on_right_merges_of_other_architectures(make_checkpoint, tmp_path, tp, layout, overrides):
    root, _, _ = make_checkpoint(tp, layout, "float32", config_overrides=overrides)
    merge_checkpoint(root, tmp_path / "out", MergeOptions(quiet=True))
    report = verify_model(tmp_path / "out", VerifyOptions(ids=PROMPT_IDS, max_new_tokens=4, against=root))
    assert report.ok, [c for c in report.checks if not c.passed]


@pytest.mark.parametrize("ids", ["1,,2", "1,2,", ",1", " , "])
def test_an_empty_item_in_verify_ids_is_a_usage_error(merged_fixture, ids):
    # Before: "1,,2" was read as [1, 2] (the lost id dropped silently).
    r = cli("verify", merged_fixture, "--ids", ids)
    assert r.exit_code == 2, r.output
    assert "--ids" in r.output and "empty item" in r.output and "Traceback" not in r.output


# ----- tamper evidence -----------------------------------------------------------------------------------
def test_verify_hashes_the_index_an_index_redirected_to_an_added_file_fails(merged_fixture_copy):
    index = json.loads((merged_fixture_copy / "model.safetensors.index.json").read_text())
    name = "gpt_neox.layers.0.attention.dense.weight"
    victim = index["weight_map"][name]
    from safetensors.torch import load_file, save_file

    tensors = load_file(merged_fixture_copy / victim)
    tensors[name] = tensors[name] * 0  # changed weights in an added file
    save_file(tensors, merged_fixture_copy / "model-00099-of-00099.safetensors", metadata={"format": "pt"})
    for t in tensors:
        index["weight_map"][t] = "model-00099-of-00099.safetensors"
    redirected = json.dumps(index, indent=2) + "\n"  # same size as before: only a hash can tell
    assert len(redirected) == (merged_fixture_copy / "model.safetensors.index.json").stat().st_size
    (merged_fixture_copy / "model.safetensors.index.json").write_text(redirected)
    one_line_error(cli("verify", merged_fixture_copy, *VERIFY), 7, "model.safetensors.index.json: blake3 differs",
                    "model-00099-of-00099.safetensors, which the manifest does not list")


def test_a_folder_without_manifest_fails_integrity_unless_no_manifest(merged_fixture_copy):
    (merged_fixture_copy / "neoxconv.json").unlink()
    one_line_error(cli("verify", merged_fixture_copy, *VERIFY), 7, "no neoxconv.json", "--no-manifest")
    (merged_fixture_copy / ".neoxconv-journal.json").write_text("{}")  # an interrupted merge says so
    one_line_error(cli("verify", merged_fixture_copy, *VERIFY), 7, "the merge was interrupted; re-run it")
    (merged_fixture_copy / ".neoxconv-journal.json").unlink()
    result = cli("verify", merged_fixture_copy, *VERIFY, "--no-manifest")
    assert result.exit_code == 0, result.output
    assert "NOT proven: file contents" in result.output  # the report says what was not proven


def test_small_files_are_hashed_even_above_the_weight_hashing_threshold(merged_fixture_copy):
    report = check_output(merged_fixture_copy, load_out_config(merged_fixture_copy),
                          hashes=False)  # as above the 2 GB threshold
    assert "small files' hashes" in report.summary() and "NOT proven: the" in report.summary()
    text = (merged_fixture_copy / "config.json").read_text()  # rotary base 10000 -> 10, the file keeps its size
    (merged_fixture_copy / "config.json").write_text(text.replace('"rotary_emb_base": 10000.0',
                                                                  '"rotary_emb_base": 10.0000'))
    one_line_error(cli("verify", merged_fixture_copy, *VERIFY, "--no-check-hashes"), 7, "config.json: blake3 differs")


def test_huge_max_position_embeddings_does_not_allocate_huge_rope_tables(src_copy, tmp_path):
    config = {"model_type": "gpt_neox", "num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
              "vocab_size": 512, "intermediate_size": 128, "rotary_pct": 0.5, "max_position_embeddings": 200_000_000,
              "use_parallel_residual": True, "hidden_act": "gelu_fast", "layer_norm_eps": 1e-5}
    (tmp_path / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert cli("merge", src_copy, out, "--config", tmp_path / "config.json").exit_code == 0
    result = subprocess.run([sys.executable, "-m", "neoxconv", "verify", str(out), *VERIFY, "--json"],
                            capture_output=True, text=True, env=subprocess_env())
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["peak_memory_bytes"] < 3 << 30  # the old tables alone: 2e8 x 4 x 4 B x 2 = 6.4 GB
    from neoxconv.runtime.loading import load_model

    model = load_model(out, device="cpu", dtype="fp32").model
    assert model.rotary.cos.shape[0] == 0  # nothing until a position is used
    model(torch.tensor([[1, 2, 3]]))
    assert model.rotary.cos.shape[0] == 4096


def test_overlapping_safetensors_offsets_are_a_verification_error(merged_fixture_copy):
    from neoxconv.source.safetensors import read_safetensors_header

    victim = sorted(merged_fixture_copy.glob("model-*.safetensors"))[1]
    raw = victim.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = read_safetensors_header(victim)
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    a, b = header[names[0]], header[names[1]]
    size_b = b["data_offsets"][1] - b["data_offsets"][0]
    b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + size_b]  # b now overlaps a
    new = json.dumps(header, separators=(",", ":")).encode()
    new += b" " * (n - len(new))
    assert len(new) == n
    victim.write_bytes(raw[:8] + new + raw[8 + n:])
    (merged_fixture_copy / "neoxconv.json").unlink()  # headers only: the layout check itself must catch it
    one_line_error(cli("verify", merged_fixture_copy, *VERIFY, "--no-manifest"), 7, victim.name, "overlaps")


IDS = "12,345,67,8"


# ----- exit codes ---------------------------------------------------------------------------------------
def test_verify_a_path_that_does_not_exist_is_a_usage_error(tmp_path):
    result = cli("verify", tmp_path / "nowhere", "--ids", IDS)
    assert result.exit_code == 2 and "does not exist" in result.output


def test_verify_a_folder_that_is_not_a_merge_output_is_an_input_error(tmp_path, merged_fixture):
    (tmp_path / "empty").mkdir()
    result = cli("verify", tmp_path / "empty", "--ids", IDS)
    assert result.exit_code == 4 and "no config.json" in result.stderr and "neoxconv merge" in result.stderr
    half = tmp_path / "half"  # config.json but no index: not a finished merge
    half.mkdir()
    shutil.copy(merged_fixture / "config.json", half)
    result = cli("verify", half, "--ids", IDS)
    assert result.exit_code == 4 and "model.safetensors.index.json" in result.stderr


@pytest.mark.parametrize("args, says", [
    ((), "--prompt TEXT) or token ids (--ids"),
    (("--ids", "1,99999"), "outside the vocabulary"),
    (("--ids", "1,2", "--prompt", "hi"), "not both"),
    (("--ids", "abc"), "comma-separated token ids"),
    (("--prompt", "hi"), "no tokenizer.json"),
    (("--ids", "1,2", "--tokenizer", "/nonexistent/tokenizer.json"), "no such tokenizer file"),
    (("--ids", "1,2", "--against", "/nonexistent/checkpoint"), "does not exist"),
])
def test_verify_usage_errors_exit_2(merged_fixture, args, says):
    result = cli("verify", merged_fixture, *args)
    assert result.exit_code == 2, result.output
    assert says in result.output
    assert "Traceback" not in result.output and "internal error" not in result.output


# ----- checks that follow the stored dtype --------------------------------------------------------------
@pytest.mark.parametrize("dtype, stored", [("bf16", "bfloat16"), ("fp16", "float16")])
def test_reduced_precision_merge_passes_against_on_cpu(make_checkpoint, tmp_path, dtype, stored):
    root, _, _ = make_checkpoint(2, "pipeline", "float32")
    out = tmp_path / "out"
    assert cli("merge", root, out, "--dtype", dtype, "-q").exit_code == 0
    result = cli("verify", out, "--against", root, "--ids", IDS, "--max-new-tokens", 2, "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    against = report["checks"]["against"]
    assert report["dtype"] == "float32" and against["passed"]
    assert f"weights stored in {stored}, rounded from float32" in against["detail"]
    scale = against["tolerance"] / verify.MODEL_TOL[getattr(__import__("torch"), stored)]
    assert scale >= 1.0  # the tolerance is the stored dtype's, times max(1, max|logit|)
    if dtype == "bf16":  # what failed before: bf16 rounding is far above the fp32 tolerance
        assert against["value"] > verify.MODEL_TOL[__import__("torch").float32] * scale


def test_unrounded_weights_keep_the_tight_tolerance(merged_fixture):
    """An fp16 source merged to fp16 holds the source's own values: no widening."""
    result = cli("verify", merged_fixture, "--against", COMMITTED_FIXTURE, "--ids", IDS, "--max-new-tokens", 2,
                 "--json")
    against = json.loads(result.stdout)["checks"]["against"]
    assert result.exit_code == 0 and "rounded" not in against["detail"]
    assert against["tolerance"] < verify.MODEL_TOL[__import__("torch").float16]  # fp32's x scale (~3.5), not fp16's


def test_bf16_tolerance_still_catches_a_wrong_merge(make_checkpoint, tmp_path, monkeypatch):
    root, _, _ = make_checkpoint(2, "pipeline", "float32")
    real_chunks = convert.iter_merged_chunks

    def swapped(plan, **kw):  # ranks in the wrong order for one row-parallel weight
        if plan.key == "mlp.dense_4h_to_h.weight":
            plan.shards.reverse()
        yield from real_chunks(plan, **kw)

    monkeypatch.setattr(convert, "iter_merged_chunks", swapped)
    assert cli("merge", root, tmp_path / "bad", "--dtype", "bf16", "-q").exit_code == 0
    monkeypatch.undo()
    result = cli("verify", tmp_path / "bad", "--against", root, "--ids", IDS, "--max-new-tokens", 2, "--json")
    assert result.exit_code == 7
    assert not json.loads(result.stdout)["checks"]["against"]["passed"]


def _dup_first_entry(h: dict) -> bytes:
    """The same tensor named twice, the second copy pointing at other bytes (readers keep different ones)."""
    name = next(k for k in h if k != "__metadata__")
    other = dict(h[name], data_offsets=[0, h[name]["data_offsets"][1] - h[name]["data_offsets"][0]])
    return (json.dumps(h)[:-1] + ", " + json.dumps({name: other})[1:]).encode()


@pytest.mark.parametrize("args, message", [
    (["--max-new-tokens", "-3"], "--max-new-tokens"),
    (["--temperature", "nan"], "finite temperature"),
    (["--temperature", "inf"], "finite temperature"),
    (["--int8-threshold", "-1"], "--int8-threshold"),
    (["--int8-threshold", "nan"], "--int8-threshold"),
])
def test_bad_generation_options_are_usage_errors(merged_fp32, args, message):
    _, out = merged_fp32
    result = cli("verify", out, "--ids", "1,2", "--device", "cpu", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    no_internal_error(result)


def test_prompt_longer_than_the_model_is_a_usage_error_before_loading(merged_fp32):
    _, out = merged_fp32
    n = json.loads((out / "config.json").read_text())["max_position_embeddings"]
    result = cli("verify", out, "--ids", ",".join(["1"] * n), "--device", "cpu", "--max-new-tokens", "0")
    assert result.exit_code == 2, result.output
    assert f"the prompt has {n} tokens" in result.output and "max_position_embeddings" in result.output
    assert "load:" not in result.output  # refused before any weight is read


def test_max_new_tokens_zero_and_huge_run_resident(merged_fp32):
    """A huge --max-new-tokens stops at max_position_embeddings, and the memory verify plans for is that of the
    tokens it can generate: a tiny model stays resident (it was streamed from disk, the KV cache and logits of
    a million tokens taken as not fitting)."""
    _, out = merged_fp32
    cap = json.loads((out / "config.json").read_text())["max_position_embeddings"]
    for n in ("0", "1000000"):
        result = cli("verify", out, "--ids", "1,2", "--device", "cpu", "--max-new-tokens", n, "--json", "-q")
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert len(report["generated_ids"]) <= (0 if n == "0" else cap - 2)
        assert report["offloaded_bytes"] == 0 and report["device_map"] is None, report["notes"]


def test_cuda_on_a_machine_without_cuda_is_a_usage_error(merged_fp32):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    _, out = merged_fp32
    result = cli("verify", out, "--ids", "1,2", "--device", "cuda")
    assert result.exit_code == 2 and "no CUDA device" in result.output, result.output


@pytest.mark.parametrize("tamper, message", [
    (lambda h: json.dumps({**h, "__metadata__": {"format": 5}}).encode(), "__metadata__ is not a table of strings"),
    (lambda h: json.dumps({**h, "__metadata__": [1]}).encode(), "__metadata__ is not a table of strings"),
    (lambda h: json.dumps({**h, "__metadata__": {"x": float("nan")}}).encode(), "NaN, which is not JSON"),
    (_dup_first_entry, "twice"),
    (lambda h: b" " + json.dumps(h).encode(), "does not start with"),
])
def test_header_safetensors_would_refuse_fails_integrity_not_the_loader(merged_fp32, tmp_path, tamper, message):
    """--no-manifest checks only the headers: a header that safetensors refuses (or reads differently) must
    fail the integrity check by name, not crash the loader afterwards."""
    _, out = merged_fp32
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "neoxconv.json").unlink()
    victim = sorted(copy.glob("model-*.safetensors"))[0]
    rewrite_safetensors_header(victim, tamper(safetensors_header(victim)))
    result = cli("verify", copy, "--ids", "1,2", "--device", "cpu", "--no-manifest", "--max-new-tokens", "1")
    assert result.exit_code == 7, result.output
    assert victim.name in result.output and message in result.output
    no_internal_error(result)


def test_against_a_source_that_does_not_fit_its_config_names_the_tensor(merged_fp32, tmp_path):
    """--against-config describing another model (here: half the hidden size) than the shards hold: the
    shards are checked against it as merge checks them, not fed to a matmul that fails with a shape error."""
    root, out = merged_fp32
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
    no_internal_error(result)


def test_against_with_qkv_layout_on_a_gpt_neox_model_is_refused_as_in_merge(merged_fp32):
    root, out = merged_fp32
    result = cli("verify", out, "--ids", "1,2", "--device", "cpu", "--max-new-tokens", "1",
                  "--against", root, "--qkv-layout", "blocked")
    assert result.exit_code == 3 and "--qkv-layout applies to Llama-style" in result.output, result.output


def test_manifest_that_does_not_list_config_json_fails_integrity(merged_fp32, tmp_path):
    """Every merge records config.json's hash: a manifest without it leaves the config unchecked."""
    _, out = merged_fp32
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    manifest = json.loads((copy / "neoxconv.json").read_text())
    del manifest["files"]["config.json"]
    (copy / "neoxconv.json").write_text(json.dumps(manifest))
    result = cli("verify", copy, "--ids", "1,2", "--device", "cpu", "--max-new-tokens", "1")
    assert result.exit_code == 7 and "neoxconv.json: does not list config.json" in result.output, result.output


def test_index_naming_a_tensor_no_file_holds_fails_integrity(merged_fp32, tmp_path):
    """--no-manifest still checks that the index and the headers agree, in both directions."""
    _, out = merged_fp32
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


def test_verify_fails_when_from_pretrained_would_load_a_planted_single_file(merged_fixture_copy):
    """A ``model.safetensors`` added to a merged OUT (every tensor negated): ``from_pretrained(OUT)`` loads it
    instead of the sharded index (transformers looks for the single file first), yet `verify OUT` said
    'all checks passed' (exit 0), integrity listed it in neither 'proven' nor 'not proven', and
    ``--against SRC`` passed too (both read the index); only ``--reference hf`` saw it. Integrity should fail
    (or at least report) weight files that transformers would load besides the index: ``model.safetensors``,
    ``pytorch_model.bin*``, safetensors files the index does not name. (The same file survives a
    ``merge --force`` into a folder that held a single-file save, so the new merge is not what loads.)"""
    from safetensors.torch import load_file, save_file

    out = merged_fixture_copy
    index = json.loads((out / "model.safetensors.index.json").read_text())
    state = {}
    for f in sorted(set(index["weight_map"].values())):
        state.update(load_file(out / f))
    save_file({k: (-v).contiguous() for k, v in state.items()}, out / "model.safetensors", metadata={"format": "pt"})
    result = cli("verify", out, "--ids", "1,2,3", "--max-new-tokens", 1)
    assert result.exit_code != 0, result.output


@pytest.mark.parametrize("planted", ["model.safetensors", "pytorch_model.bin"])
def test_merge_over_a_folder_holding_a_weight_file_transformers_would_load_refuses_naming_it(merged_fixture_copy,
                                                                                          tmp_path, planted):
    """A weight file a merge never writes (``model.safetensors``, which from_pretrained looks for before the index;
    ``pytorch_model.bin``) in OUT: a re-run of the merge into its own output, or ``--force`` over a folder that
    held a single-file save, refuses (exit 6) naming it rather than leave it beside the new index."""
    (merged_fixture_copy / planted).write_bytes(b"not ours")
    result = cli("merge", "-q", COMMITTED_FIXTURE, merged_fixture_copy)
    assert result.exit_code == 6 and planted in result.output, result.output
    assert (merged_fixture_copy / planted).read_bytes() == b"not ours"
    single = tmp_path / "single"
    single.mkdir()
    (single / planted).write_bytes(b"not ours")
    (single / "config.json").write_text("{}")
    result = cli("merge", "-q", "--force", COMMITTED_FIXTURE, single)
    assert result.exit_code == 6 and planted in result.output, result.output
    assert (single / planted).read_bytes() == b"not ours"


_DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("name", ["neoxconv.json", "model.safetensors.index.json", "config.json"])
def test_verify_names_a_deeply_nested_small_file(merged_fixture_copy, name):
    """A small file of a merged OUT with JSON nested 100,000 deep (RecursionError in json.loads): a one-line
    error naming the file (exit 3, 4 or 7), never an internal error."""
    path = merged_fixture_copy / name
    raw = json.loads(path.read_text())
    path.write_text(json.dumps(raw)[:-1] + ', "zz": ' + _DEEP + "}")
    result = cli("verify", merged_fixture_copy, "--ids", "1,2", "--max-new-tokens", 1)
    assert result.exit_code in (3, 4, 7), result.output
    assert "internal error" not in result.output and name in result.output






def _copy(merged: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(merged, out)
    return out


def _index(out: Path) -> dict:
    return json.loads((out / "model.safetensors.index.json").read_text())


@pytest.mark.parametrize("edit", ["list", "number values", "dotdot", "absolute"])
def test_hostile_index_entries_are_named_by_verify_and_split(merged_fp32, tmp_path, edit):
    out = _copy(merged_fp32[1], tmp_path)
    index = _index(out)
    first = next(iter(index["weight_map"]))
    outside = tmp_path / "elsewhere" / index["weight_map"][first]
    outside.parent.mkdir()
    shutil.copyfile(out / index["weight_map"][first], outside)
    if edit == "list":
        index["weight_map"] = list(index["weight_map"])
    elif edit == "number values":
        index["weight_map"][first] = 1
    else:
        index["weight_map"][first] = str(outside) if edit == "absolute" else f"../elsewhere/{outside.name}"
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    one_line_error(cli("verify", out, "--ids", "1,2", "--max-new-tokens", "1", "--no-manifest"), 7,
                   "model.safetensors.index.json")
    one_line_error(cli("split", "-q", out, tmp_path / "neox", "--tp", 1), 4)


def test_load_model_does_not_read_weights_outside_out(merged_fp32, tmp_path):
    from neoxconv.errors import NeoXConvError
    from neoxconv.runtime.loading import load_model

    out = _copy(merged_fp32[1], tmp_path)
    index = _index(out)
    name = next(n for n in index["weight_map"] if "embed_in" in n)
    (tmp_path / "elsewhere").mkdir()
    shutil.move(out / index["weight_map"][name], tmp_path / "elsewhere" / index["weight_map"][name])
    index["weight_map"] = {k: (f"../elsewhere/{v}" if v == index["weight_map"][name] else v)
                           for k, v in index["weight_map"].items()}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(NeoXConvError, match="model.safetensors.index.json"):
        load_model(out, device="cpu", dtype="fp32")


@pytest.mark.parametrize("manifest", ["[]", '{"layers": [], "files": 1}', "[" * 50_000])
def test_a_manifest_that_is_not_an_object_is_named_by_verify_and_redone_by_merge(merged_fp32, vocab512_src, tmp_path,
                                                                                 manifest):
    out = _copy(merged_fp32[1], tmp_path)
    (out / "neoxconv.json").write_text(manifest)
    one_line_error(cli("verify", out, "--ids", "1,2", "--max-new-tokens", "1"), 7, "neoxconv.json")
    result = cli("merge", "-q", vocab512_src, out)  # not neoxconv's state: OUT is someone else's, refused by name
    one_line_error(result, 6, str(out))
