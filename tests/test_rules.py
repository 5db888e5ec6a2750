"""Each merge rule on small tensors, and the table against the real 20B key set."""

import numpy as np
import pytest
import torch

from neoxconv.source.checkpoint import LayerKind, SourceLayer
from neoxconv.config import NeoXConfig
from neoxconv.dtypes import from_f32, to_f32
from neoxconv.errors import CheckpointError, MergeError
from neoxconv.merge import RULES, Rule, merge_tensor, resolve_row_bias, split_tensor
from neoxconv.plan.plan import plan_layer
from neoxconv.source.ptfile import read_pt

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
    assert "layer_02-model_01-model_states.pt" in msg and "attention.surprise" in msg and "mlp.dense_4h_to_h.bias" in msg


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
