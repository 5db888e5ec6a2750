from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from neoxconv.config import GELU_EXACT, GELU_TANH, GPT_NEOX_20B, NeoXConfig, padded_vocab_size
from neoxconv.errors import ConfigError

from conftest import COMMITTED_FIXTURE, VERIFY, cli, merge_fails, one_line_error, split_tp2

# Same shape of file as the released configs/20B.yml: braces, comments, hyphen and underscore keys,
# bare True, trailing commas, oddly indented closing braces.
YAML_20B = """# DISCLAIMER: a config in the style of the GPT-NeoX-20B release
{
  # parallelism settings
  "pipe-parallel-size": 4,
  "model-parallel-size": 2,

  # model settings
  "num-layers": 44,
  "hidden-size": 6144,
  "num-attention-heads": 64,
  "seq-length": 2048,
  "max-position-embeddings": 2048,
  "norm": "layernorm",
  "pos-emb": "rotary",
  "rotary_pct": 0.25,
  "no-weight-tying": true,
  "gpt_j_residual": true,
  "output_layer_parallelism": "column",
  "bias-gelu-fusion": true,
  "optimizer": {
    "type": "Adam",
    "params": {
      "lr": 0.97e-4,
      "betas": [0.9, 0.95],
      "eps": 1.0e-8,
      }
      },
  "zero_optimization": {
  "stage": 1,
  "allgather_partitions": True,
  "overlap_comm": True,
  },
  "tokenizer_type": "HFTokenizer",
}
"""


def test_neox_yaml_in_the_20b_style_parses_to_the_20b_preset(tmp_path):
    p = tmp_path / "20B.yml"
    p.write_text(YAML_20B)
    cfg = NeoXConfig.from_neox_yaml(p)
    assert cfg == GPT_NEOX_20B.with_(vocab_size=None)  # the YAML does not say the padded vocab
    assert cfg.head_dim == 96 and cfg.rotary_dims == 24 and cfg.ffn_size == 24576
    assert cfg.activation == GELU_TANH and cfg.parallel_residual and not cfg.tie_word_embeddings
    assert cfg.rotary_emb_base == 10000.0  # not the 1000 that old converters defaulted to


def test_layer_indices_are_derived_from_num_layers():
    assert list(GPT_NEOX_20B.block_indices) == list(range(2, 46))
    assert (GPT_NEOX_20B.final_norm_index, GPT_NEOX_20B.readout_index) == (47, 48)
    small = GPT_NEOX_20B.with_(num_layers=3)
    assert (list(small.block_indices), small.final_norm_index, small.readout_index) == ([2, 3, 4], 6, 7)


def test_hyphen_and_underscore_keys_are_the_same():
    a = NeoXConfig.from_neox_dict({"num-layers": 2, "hidden-size": 64, "num-attention-heads": 4})
    b = NeoXConfig.from_neox_dict({"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4})
    assert a == b
    assert a.activation == GELU_EXACT  # no bias-gelu-fusion: exact GELU
    assert a.tie_word_embeddings  # NeoX ties unless no-weight-tying


@pytest.mark.parametrize("raw, words", [
    ({"num-layers": 2, "hidden-size": 65, "num-attention-heads": 4}, "not divisible"),
    ({"num-layers": 2, "hidden-size": 64, "num-attention-heads": 4, "rotary_pct": 0.1}, "must be even"),
    ({"num-layers": 2, "hidden-size": 64, "num-attention-heads": 4, "pos-emb": "learned"}, "pos-emb"),
    ({"num-layers": 0, "hidden-size": 64, "num-attention-heads": 4}, "num_layers must be positive"),
    ({"hidden-size": 64, "num-attention-heads": 4}, "lacks num_layers"),
])
def test_invalid_configs_raise_a_clear_error(raw, words):
    with pytest.raises(ConfigError, match=words):
        NeoXConfig.from_neox_dict(raw)


def test_not_yaml_names_the_file(tmp_path):
    p = tmp_path / "bad.yml"
    p.write_text("{ unclosed: [")
    with pytest.raises(ConfigError, match="bad.yml"):
        NeoXConfig.from_neox_yaml(p)


def test_padded_vocab_depends_on_tp_degree():
    assert padded_vocab_size(50277, divisible_by=128, tp_degree=1) == 50304
    assert padded_vocab_size(50277, divisible_by=128, tp_degree=2) == 50432


def test_hf_config_round_trip_and_transformers_reads_it(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = GPT_NEOX_20B.with_(num_layers=3)
    d = cfg.to_hf_dict(torch_dtype="float16")
    assert NeoXConfig.from_hf_dict(d) == cfg
    (tmp_path / "config.json").write_text(json.dumps(d))
    hc = transformers.GPTNeoXConfig.from_pretrained(tmp_path)
    assert hc.hidden_act == "gelu_fast" and hc.num_hidden_layers == 3 and hc.intermediate_size == 24576
    rope = getattr(hc, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(hc, "rotary_emb_base", None))
    pct = rope.get("partial_rotary_factor", getattr(hc, "rotary_pct", None))
    assert (theta, pct) == (10000.0, 0.25)


@pytest.mark.parametrize("line", ['"num-layers": 1.5,', '"intermediate_size": 256.7,', '"num-attention-heads": true,',
                                  '"seq-length": 100.5, "max-position-embeddings": null,'])
def test_a_non_whole_number_in_the_neox_yaml_is_a_config_error(tmp_path, line):
    # Before: int() truncated them silently (1.5 layers merged as 1, and the rest of the files ignored).
    src = tmp_path / "src"
    shutil.copytree(COMMITTED_FIXTURE, src)
    yml = next((src / "configs").glob("*.yml"))
    text = yml.read_text()
    end = text.rindex("}")
    yml.write_text(text[:end] + "  " + line + "\n" + text[end:])  # after the key it overrides (last wins)
    for cmd in (("inspect", src), ("merge", "-q", src, tmp_path / "out")):
        one_line_error(cli(*cmd), 3, yml.name, "whole number", line.split('"')[1].replace("_", "-"))


def test_missing_config_asks_for_one(src_copy, tmp_path):
    shutil.rmtree(src_copy / "configs")
    merge_fails(src_copy, tmp_path / "out", ConfigError, "--config")


@pytest.mark.parametrize("model_type", ["gpt_neox", "llama"])
@pytest.mark.parametrize("key, value", [("num_hidden_layers", 1.5), ("hidden_size", 256.7),
                                        ("num_attention_heads", True), ("vocab_size", 100.5)])
def test_a_non_whole_number_in_a_hugging_face_config_is_a_config_error(tmp_path, merged_fixture, model_type, key,
                                                                       value):
    # Before: from_hf_dict truncated them with int() (1.5 layers -> 1, true heads -> 1); the NeoX YAML refused.
    cfg = json.loads((merged_fixture / "config.json").read_text())
    if model_type == "llama":
        cfg = {**cfg, "model_type": "llama", "hidden_act": "silu"}
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**cfg, key: value}))
    r = cli("merge", "-q", "--config", path, COMMITTED_FIXTURE, tmp_path / "out")
    one_line_error(r, 3, path.name, key, "whole number", repr(value))
    assert not (tmp_path / "out" / "neoxconv.json").exists()


# ----- resource bounds -----------------------------------------------------------------------------------
@pytest.mark.parametrize("num_layers, code", [(9000, None), (1_000_000, 3), (100_000_000, 3)])
def test_a_config_with_absurd_num_layers_is_fast_and_its_errors_short(src_copy, num_layers, code):
    yml = src_copy / "configs" / "model.yml"
    yml.write_text(yml.read_text().replace('"num-layers": 2,', f'"num-layers": {num_layers},'))
    t0 = time.perf_counter()
    inspect = cli("inspect", src_copy, "--json")
    merge = cli("merge", src_copy, src_copy.parent / "out")
    assert time.perf_counter() - t0 < 10
    if code is None:  # plausible but wrong: inspect lists a few missing files and a count; merge names a few
        info = json.loads(inspect.stdout)
        assert info["files_missing_count"] == 2 * (num_layers + 3) - 10  # expected files minus the 10 there
        assert len(info["files_missing"]) <= 20
        one_line_error(inspect, 4, f"{info['files_missing_count']} rank file(s) missing", "more")
        line = one_line_error(merge, 4, "missing layer_04-model_00-model_states.pt", "more")
    else:
        one_line_error(inspect, 3, "num_layers", "implausible")
        line = one_line_error(merge, 3, "num_layers", "implausible")
    assert len(line) < 1000


@pytest.mark.parametrize("change, words", [
    ({"num_attention_heads": 0}, ["num_heads must be positive"]),
    ({"layer_norm_eps": float("nan")}, ["layernorm_eps must be positive (and finite)", "nan"]),
    ({"layer_norm_eps": -1e-5}, ["layernorm_eps"]),
    ({"rotary_emb_base": float("inf")}, ["rotary_emb_base", "inf"]),
    ({"rotary_pct": float("nan")}, ["rotary_pct"]),
    ({"hidden_size": -32}, ["hidden_size must be positive"]),
    ({"max_position_embeddings": float("inf")}, ["bad value"]),
    ({"rope_scaling": "linear", "rotary_pct": None}, ["bad value"]),
])
def test_bad_config_values_are_config_errors(tmp_path, merged_fixture, change, words):
    config = json.loads((merged_fixture / "config.json").read_text())
    config.update(change)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))  # Python writes NaN / Infinity, as a careless tool would
    one_line_error(cli("merge", COMMITTED_FIXTURE, tmp_path / "out", "--config", path), 3, path, *words)
    out = tmp_path / "copy"  # the same config.json inside a merged folder: verify says exit 3 too
    shutil.copytree(merged_fixture, out)
    shutil.copy(path, out / "config.json")
    one_line_error(cli("verify", out, *VERIFY), 3, "config.json", *words)


def test_nan_in_a_neox_yaml_is_a_config_error(src_copy):
    yml = src_copy / "configs" / "model.yml"
    yml.write_text(yml.read_text().replace('"layernorm-epsilon": 1e-05,', '"layernorm-epsilon": .nan,'))
    one_line_error(cli("merge", src_copy, src_copy.parent / "out"), 3, "model.yml", "layernorm_eps")


@pytest.mark.parametrize("change, words", [
    ({"layer_norm_eps": float("nan")}, ["layernorm_eps must be positive (and finite)", "nan"]),
    ({"layer_norm_eps": -1e-5}, ["layernorm_eps"]),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": float("inf"), "partial_rotary_factor": 0.25}},
     ["rotary_emb_base", "inf"]),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": float("nan")}},
     ["rotary_pct"]),
    ({"hidden_size": -64}, ["hidden_size must be positive"]),
    ({"max_position_embeddings": float("inf")}, ["bad value"]),
    ({"num_attention_heads": 0}, ["num_heads must be positive"]),
])
def test_bad_hf_config_values_are_config_errors(hf_sharded, tmp_path, change, words):
    src = Path(shutil.copytree(hf_sharded, tmp_path / "hf"))
    config = json.loads((src / "config.json").read_text())
    config.update(change)
    (src / "config.json").write_text(json.dumps(config))  # Python writes NaN / Infinity, as a careless tool would
    one_line_error(cli("split", src, tmp_path / "out", "--tp", "2"), 3, src / "config.json", *words)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, message", [
    ({"rope_scaling": {"type": "linear", "factor": 4.0}}, "uses RoPE scaling (rope_scaling: 'linear')"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "uses RoPE scaling (rope_scaling: 'dynamic')"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}, "rotary base as rotary_emb_base"),
    ({"rope_theta": 1000.0}, "rotary base as rotary_emb_base"),
    ({"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 1.0}}, "rotary share as rotary_pct"),
])
def test_rope_settings_neoxconv_would_ignore_are_refused(merged_fp32, tmp_path, change, message):
    """GPT-NeoX config.json with RoPE scaling (transformers' GPTNeoX implements it; neoxconv's layers and gpt-neox
    checkpoints do not), or two spellings of one RoPE setting that disagree (transformers 4 reads the legacy
    key, 5 rope_parameters): verify and split refuse it (exit 3) instead of silently using one reading."""
    _, out = merged_fp32
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    cfg = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**cfg, **change}))
    for result in (cli("verify", copy, "--ids", "1,2", "--device", "cpu", "--no-check-hashes"),
                   split_tp2(copy, tmp_path / "neox")):
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


def _cap_1gib() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


_LAUGHS = "".join(
    [' "lol0": &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"],\n']
    + [f' "lol{i}": &a{i} [{", ".join([f"*a{i - 1}"] * 9)}],\n' for i in range(1, 9)])


def test_a_yaml_alias_bomb_in_the_neox_config_is_refused_quickly(tmp_path):
    """A NeoX YAML of ~700 bytes whose ``norm`` is an alias nested 9 levels (9**9 strings once expanded):
    ``yaml.safe_load`` builds it cheaply (shared references), but `from_neox_dict` calls ``str()`` on the value
    (and a message would ``repr`` it): `inspect` ran past 60 s at 1.5 GB and grew. Values should be type-checked
    before they are turned into text (a non-scalar ``norm`` is a ConfigError naming the key, the value never
    expanded), or aliases refused by the loader; exit 3 in well under a second."""
    import subprocess
    import sys

    from conftest import subprocess_env

    src = tmp_path / "src"
    shutil.copytree(COMMITTED_FIXTURE, src)
    yml = src / "configs" / "model.yml"
    text = yml.read_text()
    assert '"norm": "layernorm",' in text
    yml.write_text(text.replace("{\n", "{\n" + _LAUGHS, 1).replace('"norm": "layernorm",', '"norm": *a8,'))
    try:
        child = subprocess.run([sys.executable, "-m", "neoxconv", "inspect", str(src)], capture_output=True,
                               text=True, timeout=10, env=subprocess_env(), preexec_fn=_cap_1gib)
    except subprocess.TimeoutExpired:
        pytest.fail("inspect still running after 10 s")
    assert child.returncode == 3, child.stderr


@pytest.mark.parametrize("key", ["norm", "pos-emb", "activation", "mlp_type", "train_impl"])
def test_a_non_scalar_neox_text_value_is_a_config_error_naming_the_key(key):
    """A list or mapping where the NeoX config expects a word is refused by key, never turned into text."""
    raw = {"num-layers": 2, "hidden-size": 64, "num-attention-heads": 4, key: [["x"] * 3] * 3}
    with pytest.raises(ConfigError, match=f"{key.replace('_', '-')} is a list, not a string"):
        NeoXConfig.from_neox_dict(raw)


def test_yaml_integer_over_python_digit_limit_is_a_config_error(tmp_path):
    """What happened: ``"hidden-size": 999…9`` (5000 digits) in the NeoX YAML makes PyYAML's int constructor hit
    Python's int-string digit limit; ``inspect`` exits 1 with ``internal error: ValueError: Exceeds the limit``.
    What should happen: exit 3, one ``neoxconv: error:`` line naming the YAML (catch ValueError with the YAML
    errors in ``config.read_neox_yaml``)."""
    src = tmp_path / "src"
    shutil.copytree(COMMITTED_FIXTURE, src)
    yml = src / "configs" / "model.yml"
    yml.write_text(yml.read_text().replace('"hidden-size": 32', '"hidden-size": ' + "9" * 5000))
    one_line_error(cli("inspect", src), 3, "model.yml")


def test_a_gelu_mlp_is_sized_as_gpt_neox_sizes_it():
    """gpt-neox's ParallelMLP (ea7aefd8): intermediate_size, else expansion_factor x h, else 4h; linear1's rows
    round up to 2 x mlp_multiple_of, linear2's inputs to mlp_multiple_of, and a size where they differ cannot run."""
    from neoxconv.config import ungated_intermediate_size

    assert ungated_intermediate_size(64) is None  # 4h
    assert ungated_intermediate_size(64, expansion_factor=2.5) == 160
    assert ungated_intermediate_size(64, intermediate_size=200, multiple_of=100) == 200
    with pytest.raises(ConfigError, match="linear1 400 rows but linear2 300 inputs"):
        ungated_intermediate_size(64, intermediate_size=300, multiple_of=100)
    with pytest.raises(ConfigError, match="linear1 258 rows but linear2 257"):
        ungated_intermediate_size(64, intermediate_size=257)
    base = {"num-layers": 2, "hidden-size": 64, "num-attention-heads": 4, "max-position-embeddings": 128,
            "norm": "layernorm", "pos-emb": "rotary", "activation": "gelu"}
    assert NeoXConfig.from_neox_dict({**base, "expansion_factor": 3}).ffn_size == 192
    assert NeoXConfig.from_neox_dict(base).ffn_size == 256


@pytest.mark.parametrize("bad", [[1, 2], {"a": 1}, "x", "12 heads"])
def test_a_non_number_where_a_whole_number_goes_names_the_key(bad):
    """`pad_token_id: [1, 2]` was refused as "int() argument must be ..." without the key's name."""
    d = {"model_type": "gpt_neox", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
         "vocab_size": 128, "pad_token_id": bad}
    with pytest.raises(ConfigError, match="pad_token_id must be a whole number"):
        NeoXConfig.from_hf_dict(d)
    with pytest.raises(ConfigError, match="num-attention-heads must be a whole number"):
        NeoXConfig.from_neox_dict({"num-layers": 2, "hidden-size": 64, "num-attention-heads": bad})
