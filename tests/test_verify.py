"""verify: the JSON contract, the checks, and --against catching corrupted merges."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from neoxconv.output import hf_merge as convert
from neoxconv.cli import main
from neoxconv.output.hf_merge import MergeOptions, merge_checkpoint
from neoxconv.errors import VerificationError
from neoxconv.merge import Rule
from neoxconv.verify import VerifyOptions, verify_model

PROMPT_IDS = (12092, 1533, 13, 50, 7000)


@pytest.fixture(scope="module")
def merged(tmp_path_factory, make_checkpoint):
    root, reference, spec = make_checkpoint(2, "pipeline", "float32")
    out = tmp_path_factory.mktemp("merged") / "out"
    merge_checkpoint(root, out, MergeOptions(quiet=True))
    return root, out


def _verify_json(*args):
    result = CliRunner().invoke(main, ["verify", *map(str, args), "--json"])
    return result, (json.loads(result.stdout) if result.stdout.strip().startswith("{") else None)


def test_json_contract_and_greedy_ids_equal_transformers(merged):
    transformers = pytest.importorskip("transformers")
    import torch

    root, out = merged
    result, report = _verify_json(out, "--ids", ",".join(map(str, PROMPT_IDS)), "--max-new-tokens", 12,
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


def test_text_prompt_with_the_real_tokenizer(make_checkpoint, tmp_path, real_tokenizer):
    if real_tokenizer is None:
        pytest.skip("no real 20B tokenizer (set NEOXCONV_TOKENIZER, or put it in ../shared/data)")
    root, _, _ = make_checkpoint(2, "pipeline", "float16", tokenizer=real_tokenizer)
    merge_checkpoint(root, tmp_path / "out", MergeOptions(quiet=True))
    result, report = _verify_json(tmp_path / "out", "--prompt", "Hello world", "--max-new-tokens", 4)
    assert result.exit_code == 0, result.output
    assert report["prompt_ids"] == [12092, 1533] and isinstance(report["text"], str)


def test_prompt_without_tokenizer_is_a_clear_error(merged):
    _, out = merged
    result = CliRunner().invoke(main, ["verify", str(out), "--prompt", "Hello"])
    assert result.exit_code == 2 and "--ids" in result.output


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
    result, report = _verify_json(tmp_path / "bad", "--ids", "1,2,3,4,5", "--max-new-tokens", 4, "--against", root)
    assert result.exit_code == 7, result.output
    assert report["checks"]["against"]["passed"] is False
    assert report["checks"]["kv_cache"]["passed"] is True  # self-consistency alone would not catch it


def test_int8_on_cpu_agrees_with_full_precision(merged):
    pytest.importorskip("bitsandbytes")
    _, out = merged
    report = verify_model(out, VerifyOptions(ids=PROMPT_IDS, max_new_tokens=8, int8=True))
    assert report.ok, [c for c in report.checks if not c.passed]
    assert report.int8["top1_agreement"] >= 0.5 and report.int8["weight_bytes_after"] < report.int8["weight_bytes_before"]


def test_tampered_file_is_named_before_any_model_is_built(merged, tmp_path):
    import shutil

    _, out = merged
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


def test_header_that_disagrees_with_config_is_reported(merged, tmp_path):
    import shutil

    _, out = merged
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
