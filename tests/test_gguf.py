"""The GGUF route (issue 20): a merged folder feeds llama.cpp's ``convert_hf_to_gguf.py``.

The converter is not a package, so these tests do what its GPT-NeoX and Llama classes do with OUT, using the
``gguf`` package it writes with (``pip install gguf``; in the test extra): read the hyperparameters from
``config.json`` by the keys the converter reads (a missing key is its KeyError), map every tensor name with
``gguf.TensorNameMap`` (an unmapped name is its "Can not map tensor" error), re-order GPT-NeoX's fused QKV rows
from ``[heads, 3, head_dim]`` to ``[3, heads, head_dim]`` as ``GPTNeoXModel.modify_tensors`` does, write a
GGUF file with ``GGUFWriter`` and read it back with ``GGUFReader``. The README's commands run the real
converter (in a venv with transformers < 5; see the last test for why).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

gguf = pytest.importorskip("gguf")

from conftest import cli  # noqa: E402


def _hf_tensors(out: Path) -> dict[str, np.ndarray]:
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors: dict[str, np.ndarray] = {}
    for file in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(out / file))
    assert set(tensors) == set(index["weight_map"])
    return tensors


def _neox_qkv_as_llama_cpp(name: str, t: np.ndarray, heads: int, hidden: int) -> np.ndarray:
    """convert_hf_to_gguf.py GPTNeoXModel.modify_tensors: per-head [q, k, v] rows -> all q, all k, all v."""
    if name.endswith("attention.query_key_value.weight"):
        return t.reshape(heads, 3, hidden // heads, hidden).transpose(1, 0, 2, 3).reshape(3 * hidden, hidden)
    if name.endswith("attention.query_key_value.bias"):
        return t.reshape(heads, 3, hidden // heads).transpose(1, 0, 2).reshape(3 * hidden)
    return t


def _write_gguf(out: Path, path: Path, arch, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """OUT's tensors under llama.cpp's names, written as GGUF; returns what was written, by GGUF name."""
    hp = json.loads((out / "config.json").read_text())
    names = gguf.TensorNameMap(arch, hp["num_hidden_layers"])
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_block_count(hp["num_hidden_layers"])
    writer.add_context_length(hp["max_position_embeddings"])
    writer.add_embedding_length(hp["hidden_size"])
    writer.add_feed_forward_length(hp["intermediate_size"])
    writer.add_head_count(hp["num_attention_heads"])
    if arch == gguf.MODEL_ARCH.GPTNEOX:  # GPTNeoXModel.set_gguf_parameters, key for key
        head_dim = hp["hidden_size"] // hp["num_attention_heads"]
        writer.add_rope_dimension_count(int(hp["rotary_pct"] * head_dim))
        writer.add_parallel_residual(hp.get("use_parallel_residual", True))
        writer.add_layer_norm_eps(hp["layer_norm_eps"])
    else:  # LlamaModel: TextModel's generic keys
        writer.add_head_count_kv(hp["num_key_value_heads"])
        writer.add_layer_norm_rms_eps(hp["rms_norm_eps"])
        writer.add_rope_freq_base(hp.get("rope_theta", hp.get("rope_parameters", {}).get("rope_theta")))
    written: dict[str, np.ndarray] = {}
    unmapped = []
    for name, t in sorted(tensors.items()):
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            unmapped.append(name)
            continue
        if arch == gguf.MODEL_ARCH.GPTNEOX:
            t = _neox_qkv_as_llama_cpp(name, t, hp["num_attention_heads"], hp["hidden_size"])
        written[new] = np.ascontiguousarray(t)
        writer.add_tensor(new, written[new])
    assert not unmapped, f"llama.cpp's converter cannot map {unmapped}"
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


def _read_back(path: Path) -> tuple[dict[str, np.ndarray], gguf.GGUFReader]:
    reader = gguf.GGUFReader(str(path))
    # GGUF stores dims innermost first; the data read back is in numpy's order
    return {t.name: np.asarray(t.data).reshape(tuple(reversed([int(d) for d in t.shape]))) for t in reader.tensors}, \
        reader


def _field(reader, key: str):
    f = reader.fields[key]
    return f.parts[f.data[0]].tolist()[0]


def _expected_kinds(arch, blocks: int) -> set[str]:
    """Every tensor llama.cpp's graph for ``arch`` reads from a model like OUT (no optional extras)."""
    t = gguf.MODEL_TENSOR
    top = {t.TOKEN_EMBD, t.OUTPUT_NORM, t.OUTPUT}
    block = {t.ATTN_NORM, t.ATTN_OUT, t.FFN_NORM, t.FFN_UP, t.FFN_DOWN}
    block |= {t.ATTN_QKV} if arch == gguf.MODEL_ARCH.GPTNEOX else {t.ATTN_Q, t.ATTN_K, t.ATTN_V, t.FFN_GATE}
    assert (top | block) <= set(gguf.MODEL_TENSORS[arch])
    return {gguf.TENSOR_NAMES[k] for k in top} | {gguf.TENSOR_NAMES[k].format(bid=i) for k in block
                                                  for i in range(blocks)}


def test_a_merged_gpt_neox_folder_becomes_gguf_with_llama_cpp_names_and_hparams(merged_fixture, tmp_path):
    hp = json.loads((merged_fixture / "config.json").read_text())
    tensors = _hf_tensors(merged_fixture)
    written = _write_gguf(merged_fixture, tmp_path / "model.gguf", gguf.MODEL_ARCH.GPTNEOX, tensors)
    back, reader = _read_back(tmp_path / "model.gguf")

    assert set(back) == set(written) and len(back) == len(tensors)
    for name, t in written.items():
        assert back[name].dtype == t.dtype and np.array_equal(back[name], t), name
    wanted = _expected_kinds(gguf.MODEL_ARCH.GPTNEOX, hp["num_hidden_layers"])
    assert {n.rsplit(".", 1)[0] for n in back} == wanted  # every tensor llama.cpp reads, nothing else
    assert {n for n in back if n.endswith(".bias")}  # GPT-NeoX keeps its biases

    # the fused QKV re-ordered as llama.cpp expects: its first `hidden` rows are the queries of every head
    heads, hidden = hp["num_attention_heads"], hp["hidden_size"]
    qkv = tensors["gpt_neox.layers.0.attention.query_key_value.weight"].reshape(heads, 3, hidden // heads, hidden)
    assert np.array_equal(back["blk.0.attn_qkv.weight"][:hidden], qkv[:, 0].reshape(hidden, hidden))

    assert str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8") == "gptneox"
    assert _field(reader, "gptneox.block_count") == hp["num_hidden_layers"]
    assert _field(reader, "gptneox.rope.dimension_count") == int(hp["rotary_pct"] * (hidden // heads)) > 0
    assert bool(_field(reader, "gptneox.use_parallel_residual")) == hp["use_parallel_residual"]
    assert _field(reader, "gptneox.attention.layer_norm_epsilon") == pytest.approx(hp["layer_norm_eps"])


def test_a_merged_llama_style_folder_maps_to_llama_cpp_names(tmp_path):
    pytest.importorskip("transformers")
    from llama_checkpoints import LlamaSpec, write_llama_checkpoint

    write_llama_checkpoint(tmp_path / "ckpt", LlamaSpec())
    assert cli("merge", tmp_path / "ckpt", tmp_path / "out", "-q").exit_code == 0
    hp = json.loads((tmp_path / "out" / "config.json").read_text())
    tensors = _hf_tensors(tmp_path / "out")
    written = _write_gguf(tmp_path / "out", tmp_path / "model.gguf", gguf.MODEL_ARCH.LLAMA, tensors)
    back, _ = _read_back(tmp_path / "model.gguf")
    assert set(back) == set(written) and len(back) == len(tensors)
    assert {n.rsplit(".", 1)[0] for n in back} == _expected_kinds(gguf.MODEL_ARCH.LLAMA, hp["num_hidden_layers"])
    for name, t in written.items():
        assert np.array_equal(back[name], t), name


def test_transformers_5_drops_rotary_pct_which_llama_cpp_reads(merged_fixture):
    """Why the README says to run the converter with transformers < 5: it reads hparams through
    ``AutoConfig.from_pretrained(OUT).to_dict()`` and then ``hparams["rotary_pct"]``, which transformers 5 moves
    into ``rope_parameters`` (for official Pythia configs too). OUT's config.json itself has it."""
    transformers = pytest.importorskip("transformers")
    assert "rotary_pct" in json.loads((merged_fixture / "config.json").read_text())
    hparams = transformers.AutoConfig.from_pretrained(merged_fixture).to_dict()
    if int(transformers.__version__.split(".")[0]) < 5:
        assert "rotary_pct" in hparams
    else:
        assert "rotary_pct" not in hparams  # when this fails, transformers 5 works with the converter again
