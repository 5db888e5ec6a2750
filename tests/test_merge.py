"""The merged model is right: Hugging Face loads what merge writes and its logits match the reference
model; dtypes, digests, the fast path and non-finite weights."""

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open

from neoxconv.dtypes import NonFiniteCounter, count_nonfinite
from neoxconv.errors import MergeError
from neoxconv.output import hf_merge as convert
from neoxconv.output import streaming, writer
from neoxconv.output.hashing import hash_file
from neoxconv.output.hf_merge import MergeOptions, merge_checkpoint

from conftest import COMMITTED_FIXTURE, STEP, all_bytes, merge_fails, model_files, rewrite_pt
from hf_reference import hf_logits, hf_model

transformers = pytest.importorskip("transformers")


def test_nonfinite_weights_fail_unless_allowed(src_copy, tmp_path):
    def poison(d):
        d["attention.query_key_value.weight"][3, 4] = float("nan")
    rewrite_pt(src_copy / STEP / "layer_03-model_00-model_states.pt", poison)
    merge_fails(src_copy, tmp_path / "out", MergeError, "attention.query_key_value.weight", "non-finite",
                "--allow-nonfinite")
    report = merge_checkpoint(src_copy, tmp_path / "out", MergeOptions(quiet=True, allow_nonfinite=True))
    assert any("non-finite" in w for w in report.warnings)


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
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert "embed_out.weight" not in index["weight_map"]
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


def test_two_merges_are_byte_identical(make_checkpoint, tmp_path):
    root, _, _ = make_checkpoint(2, "pipeline", "float16")
    merge_checkpoint(root, tmp_path / "a", MergeOptions(quiet=True))
    merge_checkpoint(root, tmp_path / "b", MergeOptions(quiet=True))
    assert all_bytes(tmp_path / "a") == all_bytes(tmp_path / "b")


# sha256 of the model files that main's code (before this change) wrote for the committed fixture
BEFORE = {
    "auto": ["f98d96224df7ce8b93307efddef7eab275d3f7836d84d5d37ade8f60589c651d",
             "2688a897b38809da059592cdb26b0b37119a8b6b47cde726a01d0f0094f6f706",
             "61853e1aa53b5bc72c4b811313dd32d69dd30ca88af3330be18f5e71a82fbd39",
             "933e782e881a94c5b7580cbc1a8d7d4c584e0126ed77450fa68dcd813e8e0d00",
             "f7851bf8e2d3dabdde409e7becef77a629a421c7595f973c319ab157bacdc3de"],
    "bf16": ["4efedf93daf97d9e8f52e2e42054c3f81bd773c91994e899aa1291bff27e20a7",
             "79cf803fa911f232529b1e81e46b48819f98324c68652fdc6367a7b16de9face",
             "3568c680030584279d4ed7a8fc606e9d109b8c3b2513432a541d9c88f19e0279",
             "b06b0949452a394260878deab75b1723e6ac008b2bdde83840e1f6dc8cf6a168",
             "93d9ec475095d26dd7e780bad7ea509f21ea6ae7406aced9f77829f7f4c97e9e"],
    "fp32": ["684a3b725fc84ad3ac8fd4211fd9926e667e7074df0b0051ca39f382da830025",
             "7fec54ac23afb806b35599519fee7a6a42b1c42f36f626c09be5d99d96981dfe",
             "3a2fcd17d091a30a137346598c9aab27204dfbab67aeb314f50b346835c508e8",
             "a330e0bb03661dd2b9e5422e7854580054e6c920d0048cc2b731725e3650393d",
             "c22dcda2618a41f16a5a72a77a9df5e7e21956a8f07ce6405e1249ecbca42c2b"],
}


@pytest.fixture()
def streamed(monkeypatch):
    """Count the tensors that take the fast path (so a comparison with the general path is not vacuous)."""
    calls = []
    real = convert.stream_tensor

    def spy(w, plan, **kw):
        calls.append(plan.key)
        return real(w, plan, **kw)

    monkeypatch.setattr(convert, "stream_tensor", spy)
    return calls


def _poison(path, key, index, value):
    d = torch.load(path, weights_only=True)
    d[key][index] = value
    torch.save(d, path)


@pytest.mark.parametrize("dtype", ["auto", "bf16", "fp32"])
def test_output_is_byte_identical_to_before(tmp_path, dtype, streamed):
    merge_checkpoint(COMMITTED_FIXTURE, tmp_path / "out", MergeOptions(quiet=True, dtype=dtype))
    got = [hashlib.sha256(b).hexdigest() for b in model_files(tmp_path / "out").values()]
    assert got == BEFORE[dtype]
    assert bool(streamed) == (dtype == "auto")  # casts take the general path


@pytest.mark.parametrize("tp,dtype,layout,hidden,heads", [
    (2, "float16", "pipeline", 48, 2), (4, "bfloat16", "pipeline", 64, 4), (2, "float32", "sequential", 48, 2),
    (1, "float16", "pipeline", 48, 2)])
def test_fast_path_equals_general_path_across_staging_boundaries(tmp_path, monkeypatch, make_checkpoint, streamed,
                                                                 tp, dtype, layout, hidden, heads):
    """Tiny staging buffers and fill blocks: rows and elements straddle buffers (hidden 48: 96-byte rows)."""
    root, _, _ = make_checkpoint(tp, layout, dtype, config_overrides={"hidden_size": hidden, "num_heads": heads})
    monkeypatch.setattr(writer, "_STAGE_BYTES", 4096)
    monkeypatch.setattr(writer, "_FILL_BYTES", 1000)
    merge_checkpoint(root, tmp_path / "fast", MergeOptions(quiet=True))
    assert any("dense_4h_to_h.weight" in k for k in streamed) and any("query_key_value" in k for k in streamed)
    monkeypatch.setattr(convert, "streams_direct", lambda plan: False)
    n = len(streamed)
    merge_checkpoint(root, tmp_path / "general", MergeOptions(quiet=True))
    assert len(streamed) == n
    assert model_files(tmp_path / "fast") == model_files(tmp_path / "general")
    for p in (tmp_path / "fast").glob("model-*.safetensors"):  # and the manifest's digest is the file's
        entry = json.loads((tmp_path / "fast" / "neoxconv.json").read_text())["layers"][p.name]
        assert entry["blake3"] == hash_file(p, "blake3")


# ----- finiteness ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_nonfinite_counter_matches_isfinite_in_any_blocks(dtype):
    torch_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    g = torch.Generator().manual_seed(0)
    t = (torch.randn(10_000, generator=g) * 1000).to(torch_dtype)
    t[[0, 17, 4095, 4096, 9999]] = torch.tensor([float("inf"), float("-inf"), float("nan"), float("inf"), float("nan")],
                                                dtype=torch_dtype)
    t[5000] = torch.finfo(torch_dtype).max  # the largest finite values are finite
    t[5001] = -torch.finfo(torch_dtype).max
    expected = int((~torch.isfinite(t)).sum())
    raw = t.view(torch.uint8).numpy().tobytes()
    counter = NonFiniteCounter(dtype)
    item = t.element_size()
    for start in range(0, len(raw), 999 * item):  # blocks of whole elements, of uneven size
        counter.update(memoryview(raw)[start: start + 999 * item])
    assert counter.count == expected == 5
    assert count_nonfinite(np.frombuffer(raw, np.uint16 if item == 2 else np.uint32), dtype) == expected


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("key,index", [("attention.query_key_value.weight", (3, 4)),  # dim-0, fast path
                                       ("mlp.dense_4h_to_h.weight", (1, 2)),  # dim-1, fast path
                                       ("attention.dense.bias", (5,))])  # summed in memory
def test_inf_in_the_source_fails_the_merge(tmp_path, make_checkpoint, dtype, key, index):
    root, _, _ = make_checkpoint(2, "pipeline", dtype)
    src = tmp_path / "src"
    shutil.copytree(root, src)
    _poison(src / STEP / "layer_03-model_01-model_states.pt", key, index, float("inf"))
    with pytest.raises(MergeError, match=f"layer 03.*'{key}'.*1 non-finite value.*--allow-nonfinite"):
        merge_checkpoint(src, tmp_path / "out", MergeOptions(quiet=True))
    report = merge_checkpoint(src, tmp_path / "out2", MergeOptions(quiet=True, allow_nonfinite=True))
    assert any(key in w and "non-finite" in w for w in report.warnings)


def test_streams_direct_only_where_it_is_byte_identical(make_checkpoint):
    from neoxconv.merge import Rule
    from neoxconv.plan.plan import plan_checkpoint
    from neoxconv.source.checkpoint import open_checkpoint

    root, _, _ = make_checkpoint(2, "pipeline", "float16")
    ckpt = open_checkpoint(root)
    _, plans = plan_checkpoint(ckpt, row_bias=Rule.SUM, out_dtype=None)
    direct = {t.key for p in plans for t in p.tensors if streaming.streams_direct(t)}
    assert "attention.dense.weight" in direct and "word_embeddings.weight" in direct
    assert not direct & {"attention.dense.bias", "input_layernorm.weight", "norm.weight"}
    _, plans32 = plan_checkpoint(ckpt, row_bias=Rule.SUM, out_dtype="float32")
    assert not any(streaming.streams_direct(t) for p in plans32 for t in p.tensors)
