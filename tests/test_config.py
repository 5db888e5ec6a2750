import json

import pytest

from neoxconv.config import GELU_EXACT, GELU_TANH, GPT_NEOX_20B, NeoXConfig, padded_vocab_size
from neoxconv.errors import ConfigError

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
