"""Each merge rule on small tensors, and the table against the real 20B key set."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from neoxconv.config import NeoXConfig
from neoxconv.dtypes import from_f32, to_f32
from neoxconv.errors import CheckpointError, MergeError
from neoxconv.merge import RULES, Rule, merge_tensor, resolve_row_bias, rotary_inv_freq_close, split_tensor
from neoxconv.output.hf_merge import MergeOptions, merge_checkpoint
from neoxconv.plan.plan import plan_layer
from neoxconv.source.checkpoint import LayerKind, SourceLayer
from neoxconv.source.ptfile import read_pt
from neoxconv.tools.synthetic import SyntheticSpec, tiny_config, write_checkpoint

from conftest import COMMITTED_FIXTURE, STEP, cli, merge_fails, one_line_error, rewrite_pt, run_cli

transformers = pytest.importorskip("transformers")

NEOX_20B_BLOCK_KEYS = {
    "input_layernorm.weight", "input_layernorm.bias",
    "attention.query_key_value.weight", "attention.query_key_value.bias", "attention.rotary_emb.inv_freq",
    "attention.dense.weight", "attention.dense.bias",
    "post_attention_layernorm.weight", "post_attention_layernorm.bias",
    "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias", "mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.bias",
}


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_concat_rules_round_trip_bit_exact_and_slices_give_back_each_shard(n):
    rng = np.random.default_rng(n)
    full = rng.standard_normal((3 * n, 4 * n)).astype(np.float16)
    for rule, axis in ((Rule.CONCAT_ROWS, 0), (Rule.CONCAT_COLS, 1)):
        shards = split_tensor(rule, full, n)
        merged = merge_tensor(rule, shards, dtype="float16")
        assert merged.tobytes() == full.tobytes()
        for k, shard in enumerate(shards):
            piece = np.split(merged, n, axis=axis)[k]
            assert piece.tobytes() == np.ascontiguousarray(shard).tobytes()


def test_concat_dim0_and_dim1_differ_on_3x4_shards():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = -a
    assert merge_tensor(Rule.CONCAT_ROWS, [a, b], dtype="float32").shape == (6, 4)
    cols = merge_tensor(Rule.CONCAT_COLS, [a, b], dtype="float32")
    assert cols.shape == (3, 8) and (cols[:, :4] == a).all() and (cols[:, 4:] == b).all()


def test_sum_is_accumulated_in_fp32_then_cast():
    # fp16 parts whose fp16 running sum loses the small part: 2048 + 1 + 1 is 2048 in fp16 arithmetic
    parts = [np.array([2048.0], np.float16), np.array([1.0], np.float16), np.array([1.0], np.float16)]
    assert merge_tensor(Rule.SUM, parts, dtype="float16")[0] == np.float16(2050.0)
    assert (parts[0] + parts[1] + parts[2])[0] == np.float16(2048.0)  # what a naive fp16 sum gives
    three = [np.full((3, 4), v, np.float32) for v in (1.0, 2.0, 4.0)]
    assert (merge_tensor(Rule.SUM, three, dtype="float32") == 7.0).all()


def test_replicated_writes_the_fp32_mean():
    a, b = np.full(4, 1.0, np.float32), np.full(4, 1.5, np.float32)
    assert (merge_tensor(Rule.REPLICATED, [a, b], dtype="float32") == 1.25).all()
    assert (merge_tensor(Rule.REPLICATED, [a, a, a], dtype="float32") == a).all()


@pytest.mark.parametrize("copies", [2, 3, 4, 8])
def test_identical_replicas_merge_bit_exact(copies):
    """3 or 8 equal fp32 copies: their fp32 mean moves many values by 1 ulp; the merge must not average."""
    rng = np.random.default_rng(copies)
    a = (1 + 0.1 * rng.standard_normal(4096)).astype(np.float32)
    mean = sum(a.astype(np.float32) for _ in range(copies)) / np.float32(copies)
    if copies in (3, 8):  # the failure this guards against is real for these counts
        assert (mean.view(np.uint32) != a.view(np.uint32)).any()
    for dtype, arr in (("float32", a), ("float16", a.astype(np.float16)),
                       ("bfloat16", from_f32(a, "bfloat16"))):
        merged = merge_tensor(Rule.REPLICATED, [arr.copy() for _ in range(copies)], dtype=dtype)
        assert merged.tobytes() == arr.tobytes()
    # a NaN (or -0.0) replicated bit for bit stays exactly what the ranks hold
    b = a.copy()
    b[:2] = [np.nan, -0.0]
    assert merge_tensor(Rule.REPLICATED, [b.copy() for _ in range(copies)], dtype="float32").tobytes() == b.tobytes()
    # ranks that differ are still averaged in fp32
    c = a.copy()
    c[0] += 1
    out = merge_tensor(Rule.REPLICATED, [c] + [a.copy() for _ in range(copies - 1)], dtype="float32")
    assert abs(out[0] - (a[0] + 1 / copies)) < 1e-5


def test_bf16_casts_match_torch_bit_for_bit():
    x = torch.randn(10000) * torch.logspace(-30, 30, 10000)
    ours = from_f32(x.numpy(), "bfloat16")
    assert (ours == x.to(torch.bfloat16).view(torch.uint16).numpy()).all()
    assert (to_f32(ours, "bfloat16") == x.to(torch.bfloat16).float().numpy()).all()
    assert (from_f32(x.numpy(), "float16").view(np.uint16) == x.half().view(torch.uint16).numpy()).all()


def test_row_bias_rule_follows_the_config_unless_overridden():
    par, seq = NeoXConfig(), NeoXConfig(parallel_residual=False)
    assert resolve_row_bias("auto", par) is Rule.SUM
    assert resolve_row_bias("auto", seq) is Rule.REPLICATED
    assert resolve_row_bias("replicated", par) is Rule.REPLICATED
    assert resolve_row_bias("sum", seq) is Rule.SUM


def test_rule_table_covers_the_20b_keys_and_maps_them_to_hf_names():
    assert set(RULES[LayerKind.BLOCK]) >= NEOX_20B_BLOCK_KEYS
    names = {k: s.hf_name for k, s in RULES[LayerKind.BLOCK].items()}
    assert names["attention.rotary_emb.inv_freq"] is None  # derived: dropped
    assert names["attention.dense.weight"] == "gpt_neox.layers.{i}.attention.dense.weight"
    assert RULES[LayerKind.BLOCK]["attention.dense.bias"].rule is Rule.ROW_BIAS
    assert RULES[LayerKind.READOUT]["final_linear.weight"].hf_name == "embed_out.weight"
    assert RULES[LayerKind.FINAL_NORM]["norm.weight"].hf_name == "gpt_neox.final_layer_norm.weight"


def _block_shards(tmp_path, tp, mutate=None):
    cfg = NeoXConfig(num_layers=1, hidden_size=8, num_heads=2, vocab_size=16, rotary_pct=0.5)
    H, F = 8, 32
    shapes = {"input_layernorm.weight": (H,), "input_layernorm.bias": (H,),
              "attention.query_key_value.weight": (3 * H // tp, H), "attention.query_key_value.bias": (3 * H // tp,),
              "attention.dense.weight": (H, H // tp), "attention.dense.bias": (H,),
              "post_attention_layernorm.weight": (H,), "post_attention_layernorm.bias": (H,),
              "mlp.dense_h_to_4h.weight": (F // tp, H), "mlp.dense_h_to_4h.bias": (F // tp,),
              "mlp.dense_4h_to_h.weight": (H, F // tp), "mlp.dense_4h_to_h.bias": (H,)}
    shards = []
    for r in range(tp):
        d = {k: torch.randn(s).half() for k, s in shapes.items()}
        if mutate:
            mutate(r, d)
        p = tmp_path / f"layer_02-model_{r:02d}-model_states.pt"
        torch.save(d, p)
        shards.append(read_pt(p).tensors())
    files = [f"layer_02-model_{r:02d}-model_states.pt" for r in range(tp)]
    return cfg, shards, files


def _plan(cfg, shards, files):
    return plan_layer(SourceLayer(2, LayerKind.BLOCK, 0), shards, files=files, config=cfg, row_bias=Rule.SUM,
                      out_dtype=None)


def test_plan_accepts_a_well_formed_layer(tmp_path):
    plan = _plan(*_block_shards(tmp_path, 2))
    rules = {t.key: t.rule for t in plan.tensors}
    assert rules["attention.dense.bias"] is Rule.SUM and rules["attention.dense.weight"] is Rule.CONCAT_COLS
    assert {t.hf_name for t in plan.tensors} >= {"gpt_neox.layers.0.attention.query_key_value.weight"}


def test_unknown_and_missing_keys_are_reported_together_with_the_file(tmp_path):
    def mutate(rank, d):
        if rank == 1:
            d["attention.surprise"] = torch.zeros(1)
            del d["mlp.dense_4h_to_h.bias"]
    with pytest.raises(CheckpointError) as e:
        _plan(*_block_shards(tmp_path, 2, mutate))
    msg = str(e.value)
    assert "layer_02-model_01-model_states.pt" in msg and "attention.surprise" in msg
    assert "mlp.dense_4h_to_h.bias" in msg


def test_every_shape_and_dtype_problem_of_a_layer_is_in_one_message(tmp_path):
    def mutate(rank, d):
        if rank == 1:
            d["attention.dense.weight"] = torch.randn(8, 3).half()  # wrong column count
            d["input_layernorm.weight"] = d["input_layernorm.weight"].float()  # dtype differs
    with pytest.raises(MergeError) as e:
        _plan(*_block_shards(tmp_path, 2, mutate))
    msg = str(e.value)
    assert "attention.dense.weight" in msg and "[8, 3]" in msg
    assert "input_layernorm.weight" in msg and "rank 1: float32" in msg


def test_shape_mismatch_between_ranks_names_key_and_ranks(src_copy, tmp_path):
    rewrite_pt(src_copy / STEP / "layer_03-model_01-model_states.pt",
             lambda d: d.__setitem__("mlp.dense_h_to_4h.weight", d["mlp.dense_h_to_4h.weight"][:-1]))
    merge_fails(src_copy, tmp_path / "out", MergeError, "layer 03", "mlp.dense_h_to_4h.weight", "rank 1: [63, 32]")


def test_shape_against_config(src_copy, tmp_path):
    for r in range(2):
        rewrite_pt(src_copy / STEP / f"layer_02-model_{r:02d}-model_states.pt",
                 lambda d: d.__setitem__("input_layernorm.weight", torch.ones(31, dtype=torch.float16)))
    merge_fails(src_copy, tmp_path / "out", MergeError, "input_layernorm.weight", "config expects [32]")


def test_unknown_key_names_file_and_key(src_copy, tmp_path):
    rewrite_pt(src_copy / STEP / "layer_02-model_00-model_states.pt",
               lambda d: d.__setitem__("attention.new_thing", torch.ones(1)))
    merge_fails(src_copy, tmp_path / "out", CheckpointError, "layer_02-model_00-model_states.pt", "attention.new_thing")


def test_known_derived_buffers_are_dropped(src_copy, tmp_path):
    for r in range(2):
        rewrite_pt(src_copy / STEP / f"layer_02-model_{r:02d}-model_states.pt",
                 lambda d: d.update({"attention.bias": torch.ones(1, 1, 4, 4, dtype=torch.bool),
                                     "attention.masked_bias": torch.tensor(-1e4)}))
    merge_checkpoint(src_copy, tmp_path / "out", MergeOptions(quiet=True))


def test_replica_divergence_fails_beyond_tolerance(src_copy, tmp_path):
    rewrite_pt(src_copy / STEP / "layer_05-model_01-model_states.pt", lambda d: d["norm.weight"].add_(0.5))
    msg = merge_fails(src_copy, tmp_path / "out", MergeError, "norm.weight", "0.5", "--replica-tolerance")
    assert "layer 05" in msg
    report = merge_checkpoint(src_copy, tmp_path / "out", MergeOptions(quiet=True, replica_tolerance=1.0))
    assert report.max_replica_divergence == pytest.approx(0.5, abs=1e-3)


def _add_to_layer(step: Path, index: int, tensors: dict, tp: int = 2) -> None:
    for r in range(tp):
        p = step / f"layer_{index:02d}-model_{r:02d}-model_states.pt"
        sd = torch.load(p, map_location="cpu", weights_only=True)
        sd.update(tensors)
        torch.save(sd, p)


def test_expanded_dropped_buffer_is_compared_without_expanding(tmp_path, make_checkpoint):
    """attention.bias saved as an expand()ed 16384x16384 view once cost 5.2 GB to compare across ranks."""
    root, _, _ = make_checkpoint(2, "pipeline", "float16")
    src = tmp_path / "src"
    shutil.copytree(root, src)
    step = next(src.glob("global_step*"))
    mask = torch.ones(1, 1, 1, 1, dtype=torch.float16).expand(1, 1, 16384, 16384)  # 512 MiB if materialised
    _add_to_layer(step, 2, {"attention.bias": mask})
    assert (step / "layer_02-model_00-model_states.pt").stat().st_size < 1 << 20
    rc, err, rss = run_cli("merge", str(src), str(tmp_path / "out"), "--quiet")
    assert rc == 0, err
    assert rss < 150, f"peak RSS {rss} MB"
    manifest = json.loads((tmp_path / "out" / "neoxconv.json").read_text())
    assert any("attention.bias" in e["dropped"] for e in manifest["layers"].values())


def test_dropped_buffer_shapes_are_checked(tmp_path, make_checkpoint):
    root, _, _ = make_checkpoint(2, "pipeline", "float16")
    src = tmp_path / "src"
    shutil.copytree(root, src)
    _add_to_layer(next(src.glob("global_step*")), 2,
                  {"attention.masked_bias": torch.tensor(-1e4).half().expand(16384, 16384)})
    rc, err, _ = run_cli("merge", str(src), str(tmp_path / "out"), "--quiet")
    assert rc == 5 and "masked_bias" in err and "single value" in err, err


def test_dropped_buffers_that_differ_across_ranks_are_refused(tmp_path, make_checkpoint):
    root, _, _ = make_checkpoint(2, "pipeline", "float16")
    src = tmp_path / "src"
    shutil.copytree(root, src)
    step = next(src.glob("global_step*"))
    for r, v in enumerate([-1e4, -1e9]):
        p = step / f"layer_02-model_{r:02d}-model_states.pt"
        sd = torch.load(p, map_location="cpu", weights_only=True)
        sd["attention.masked_bias"] = torch.tensor(v)
        torch.save(sd, p)
    with pytest.raises(Exception, match="derived buffer differs.*masked_bias"):
        merge_checkpoint(src, tmp_path / "out", MergeOptions(quiet=True))


def test_bad_last_layer_fails_before_anything_is_written(tmp_path):
    shutil.copytree(COMMITTED_FIXTURE, tmp_path / "src")
    path = tmp_path / "src" / STEP / "layer_06-model_01-model_states.pt"
    d = torch.load(path, weights_only=True)
    d["final_linear.weight"] = d["final_linear.weight"][:, :-1].contiguous()
    torch.save(d, path)
    with pytest.raises(MergeError, match="final_linear.weight"):
        merge_checkpoint(tmp_path / "src", tmp_path / "out", MergeOptions(quiet=True))
    assert not (tmp_path / "out").exists()


def test_merge_of_a_tied_config_with_a_readout_file_is_refused_or_verifiable(tmp_path):
    """The NeoX YAML says the embedding is tied (``no-weight-tying: false``) but the readout layer files are
    there (and differ from the embedding): `merge` exited 0 writing ``embed_out.weight`` and config.json
    ``tie_word_embeddings: true``. Its own `verify` then refuses the folder ("unexpected tensor
    'embed_out.weight' for this config", exit 7); transformers 5 loads the readout untied, 4.x ties it to the
    embedding. merge should refuse as split does for the same ambiguity (naming the YAML and the readout files),
    or drop the readout only when it equals the embedding."""
    src = tmp_path / "src"
    shutil.copytree(COMMITTED_FIXTURE, src)
    yml = src / "configs" / "model.yml"
    assert '"no-weight-tying": true' in yml.read_text()
    yml.write_text(yml.read_text().replace('"no-weight-tying": true', '"no-weight-tying": false'))
    out = tmp_path / "out"
    result = cli("merge", "-q", src, out)
    if result.exit_code != 0:
        assert result.exit_code in (3, 4) and "internal error" not in result.output, result.output
        return
    check = cli("verify", out, "--ids", "1,2", "--max-new-tokens", 1)
    assert check.exit_code == 0, check.output


def test_merge_of_a_tied_config_drops_a_readout_equal_to_the_embedding_and_refuses_one_that_differs(tmp_path):
    """A tied config (``no-weight-tying: false``) with readout layer files present: a readout equal to the
    embedding bit for bit is dropped (as split drops it), so the output is a tied model that verifies; one
    that differs is refused (exit 4), the message naming the setting and the readout files."""
    src = tmp_path / "src"
    shutil.copytree(COMMITTED_FIXTURE, src)
    yml = src / "configs" / "model.yml"
    yml.write_text(yml.read_text().replace('"no-weight-tying": true', '"no-weight-tying": false'))
    refused = cli("merge", "-q", src, tmp_path / "refused")
    assert refused.exit_code == 4, refused.output
    assert "no-weight-tying" in refused.output and "layer_06-model_00-model_states.pt" in refused.output
    assert not (tmp_path / "refused").exists() or not any((tmp_path / "refused").glob("*.safetensors"))
    for rank in (0, 1):
        emb = torch.load(src / STEP / f"layer_00-model_0{rank}-model_states.pt", weights_only=True)
        rewrite_pt(src / STEP / f"layer_06-model_0{rank}-model_states.pt",
                   lambda d, w=emb["word_embeddings.weight"]: d.__setitem__("final_linear.weight", w.clone()))
    out = tmp_path / "out"
    result = cli("merge", "-q", src, out)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert config["tie_word_embeddings"] is True and "embed_out.weight" not in index["weight_map"]
    check = cli("verify", out, "--ids", "1,2", "--max-new-tokens", 1)
    assert check.exit_code == 0, check.output


def _sequential_copy(make_checkpoint, tmp_path: Path) -> tuple[Path, Path]:
    root, _, _ = make_checkpoint(2, "sequential", "float16")
    src = tmp_path / "seq"
    shutil.copytree(root, src)
    return src, next((src / "configs").glob("*.yml"))


def test_sequential_keys_of_layers_the_config_does_not_have_are_refused(make_checkpoint, tmp_path):
    """The sequential layout keeps every layer in one mp_rank file per rank: a config with fewer layers than the
    files hold (num-layers 1 for a 2-block model) made `merge` exit 0 with the first block only. Keys of a layer
    num_layers does not give are refused (exit 4), naming the layers and the config."""
    src, yml = _sequential_copy(make_checkpoint, tmp_path)
    text = yml.read_text()
    assert '"num-layers": 2' in text
    yml.write_text(text.replace('"num-layers": 2', '"num-layers": 1'))
    for command in (["merge", "-q", src, tmp_path / "out"], ["inspect", src], ["reshard", "-q", src, tmp_path / "r",
                                                                             "--tp", 1]):
        line = one_line_error(cli(*command), 4, "module keys of layers", "num_layers=1", yml.name)
        assert "mp_rank_00_model_states.pt" in line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.safetensors"))


def test_a_tied_config_over_sequential_files_with_a_readout_is_refused_as_for_the_pipeline(make_checkpoint, tmp_path):
    """no-weight-tying: false over sequential files that hold a readout (its keys at layer L+4) that differs from
    the embedding: the readout was ignored (a tied model written, exit 0); now refused as the pipeline layout's
    readout files are (exit 4, naming the setting)."""
    src, yml = _sequential_copy(make_checkpoint, tmp_path)
    text = yml.read_text()
    assert '"no-weight-tying": true' in text
    yml.write_text(text.replace('"no-weight-tying": true', '"no-weight-tying": false'))
    one_line_error(cli("merge", "-q", src, tmp_path / "out"), 4, "no-weight-tying is false", "differ")


# ----- 3. reshard's kept rotary buffers ---------------------------------------------------------------------------
def _with_inv_freq(root: Path, make) -> None:
    """Every block file's attention.rotary_emb.inv_freq replaced by ``make(original)`` (same on every rank)."""
    for p in sorted((root / "global_step10").glob("layer_0[2-3]-model_*-model_states.pt")):
        sd = torch.load(p, weights_only=True)
        sd["attention.rotary_emb.inv_freq"] = make(sd["attention.rotary_emb.inv_freq"])
        torch.save(sd, p)


@pytest.mark.parametrize("command, buffer", [("reshard", "int64"), ("reshard", "base 1000"), ("merge", "base 1000")])
def test_a_saved_inv_freq_that_contradicts_the_config_is_refused(command, buffer, tmp_path):
    """gpt-neox saves inv_freq as a float (1 / base^(2i/d), in params_dtype or fp32); before 2024-03 it used the
    saved buffer in the forward pass. An int64 [0, 1], or base 1000 under a config of base 10000 (DESIGN 6: the
    1000-vs-10000 bug), means the config is not the files': reshard writes the buffer on as it is and says
    rotary_save_freqs_buffer: true; merge writes a model of base 10000."""
    config = tiny_config(vocab_size=512)
    write_checkpoint(tmp_path / "src", SyntheticSpec(config=config, tp_degree=2, dtype="float16", step=10))
    d = config.rotary_dims
    base1000 = (1.0 / (1000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)))
    _with_inv_freq(tmp_path / "src", lambda t: torch.arange(t.numel(), dtype=torch.int64) if buffer == "int64"
                   else base1000.to(t.dtype))
    args = ("--tp", 1) if command == "reshard" else ()
    result = cli(command, "-q", tmp_path / "src", tmp_path / "out", *args)
    assert "Traceback" not in result.output
    assert result.exit_code != 0 and "inv_freq" in result.output, result.output


SYNTH_STEP = 10


# ----- 2. inv_freq against the config ----------------------------------------------------------------------------
def _gpt_neox_inv_freq(dims: int, base: float) -> torch.Tensor:
    """gpt-neox ea7aefd8 megatron/model/positional_embeddings.py RotaryEmbedding, in fp32 as it computes it."""
    return 1.0 / (base ** (torch.arange(0, dims, 2).float() / dims))


def _numpy(t: torch.Tensor) -> tuple[np.ndarray, str]:
    name = str(t.dtype).removeprefix("torch.")
    return (t.view(torch.uint16).numpy() if t.dtype == torch.bfloat16 else t.numpy()), name


def _replace_inv_freq(root: Path, value: torch.Tensor) -> None:
    for p in sorted((root / f"global_step{SYNTH_STEP}").glob("layer_0[2-3]-model_*-model_states.pt")):
        sd = torch.load(p, weights_only=True)
        assert "attention.rotary_emb.inv_freq" in sd
        sd["attention.rotary_emb.inv_freq"] = value
        torch.save(sd, p)


@pytest.mark.parametrize("hidden, heads, pct, base, dtype", [
    (6144, 64, 0.25, 10000, torch.float16),   # GPT-NeoX-20B's release: fp16 buffer, 24 rotary dims
    (6144, 64, 0.25, 10000, torch.bfloat16),
    (2048, 16, 0.25, 10000, torch.float32),   # Pythia-1.4B: 32 rotary dims
    (4096, 32, 1.0, 500000, torch.bfloat16),
])
def test_real_writers_buffers_pass_the_config_check(hidden, heads, pct, base, dtype):
    config = NeoXConfig(num_layers=1, hidden_size=hidden, num_heads=heads, vocab_size=512, rotary_pct=pct,
                        rotary_emb_base=base)
    value, name = _numpy(_gpt_neox_inv_freq(config.rotary_dims, base).to(dtype))
    assert rotary_inv_freq_close(config, value, name)
    wrong, _ = _numpy(_gpt_neox_inv_freq(config.rotary_dims, base / 10).to(dtype))  # another base: caught
    assert not rotary_inv_freq_close(config, wrong, name)


def test_an_fp32_buffer_of_20_rotary_dims_is_not_refused(tmp_path):
    """Pythia-2.8B's shape (head_dim 80, rotary_pct 0.25: 20 rotary dims) trained in fp32 (or bf16 where the buffer
    stays fp32): gpt-neox's own fp32 inv_freq, on every rank. Today merge exits 3 ('the config does not give')."""
    config = tiny_config(vocab_size=512, hidden_size=160, num_heads=2)
    assert config.rotary_dims == 20
    write_checkpoint(tmp_path / "src", SyntheticSpec(config=config, tp_degree=2, dtype="bfloat16", step=SYNTH_STEP))
    _replace_inv_freq(tmp_path / "src", _gpt_neox_inv_freq(20, 10000.0))
    result = cli("merge", "-q", tmp_path / "src", tmp_path / "out")
    assert result.exit_code == 0, result.output


def test_an_fp16_buffer_of_a_large_rotary_base_is_not_refused(tmp_path):
    """fp16 training halves the buffer (gpt-neox's _prepare_cache: inv_freq.to(precision)); base 1e6, 16 rotary
    dims: the last values are fp16 subnormals. Today merge (and reshard) exit 3."""
    config = tiny_config(vocab_size=512, hidden_size=128, num_heads=2, rotary_emb_base=1_000_000)
    write_checkpoint(tmp_path / "src", SyntheticSpec(config=config, tp_degree=2, dtype="float16", step=SYNTH_STEP))
    _replace_inv_freq(tmp_path / "src", _gpt_neox_inv_freq(config.rotary_dims, 1e6).half())
    result = cli("merge", "-q", tmp_path / "src", tmp_path / "out")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("command", ["merge", "reshard"])
def test_strided_views_and_huge_buffers(command, tmp_path):
    """A buffer that is a strided view of a larger storage (the right values at every other element) passes; a
    70000-value buffer is refused by its shape before its values are read (held)."""
    config = tiny_config(vocab_size=512)
    write_checkpoint(tmp_path / "src", SyntheticSpec(config=config, tp_degree=2, dtype="float16", step=SYNTH_STEP))
    right = _gpt_neox_inv_freq(config.rotary_dims, 10000.0).half()
    _replace_inv_freq(tmp_path / "src", torch.stack([right, torch.zeros_like(right)], 1).reshape(-1)[::2])
    args = ("--tp", 1) if command == "reshard" else ()
    result = cli(command, "-q", tmp_path / "src", tmp_path / "ok", *args)
    assert result.exit_code == 0, result.output
    _replace_inv_freq(tmp_path / "src", torch.zeros(70000, dtype=torch.float16))
    one_line_error(cli(command, "-q", tmp_path / "src", tmp_path / "bad", *args), 5, "inv_freq", "70000")
