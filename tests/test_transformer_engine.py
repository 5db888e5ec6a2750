"""Checkpoints trained with Transformer Engine modules (issue 21): read by merge, inspect and verify --against.

The generator below does not use neoxconv's key table: a random ``transformers.GPTNeoXForCausalLM`` (the truth) is
split by the tests' own TP splitter (``neox_tp_split``), its keys renamed as TE's and gpt-neox's module
definitions name them, each TE module given an ``_extra_state`` entry in a form TE really writes, and the files
saved the way DeepSpeed saves them (a plain dict per pipeline layer and rank, or ``{"module": ...}`` per rank in
the sequential layout). Sources of the names (read at the commits named):

* gpt-neox ea7aefd8 megatron/model/transformer.py, ParallelTransformerLayer: ``self.attention =
  TEMultiheadAttention(...)`` with te_mha; with te_layernorm_mlp ``self.mlp = TELayerNormMLP(...)`` and no
  ``post_attention_layernorm``; otherwise ParallelMLP's ``linear1``/``linear2``.
* gpt-neox ea7aefd8 megatron/model/transformer_engine.py: TEMultiheadAttention passes input_layernorm=False,
  fuse_qkv_params=True and keeps its RotaryEmbedding as ``self.rotary_embeddings``.
* TransformerEngine v1.12 transformer_engine/pytorch/attention.py, MultiheadAttention: ``self.qkv = Linear(...)``
  (parameters_split None: ``weight``/``bias``), ``self.core_attention = DotProductAttention(...)`` (a
  TransformerEngineBaseModule: it has extra state), ``self.proj = Linear(...)``; with no GQA the interleaved
  rows are [groups = heads, 3, head_dim], gpt-neox's own layout (so the per-head split of the splitter holds).
* TransformerEngine v1.12 pytorch/module/layernorm_mlp.py: ``layer_norm_weight``, ``layer_norm_bias``,
  ``fc1_weight``, ``fc1_bias``, ``fc2_weight``, ``fc2_bias`` registered on the module itself.
* TransformerEngine pytorch/module/base.py ``get_extra_state`` (v1.12: ``io.BytesIO`` of ``torch.save(state)``;
  v2.0-2.3: uint8 tensor of ``pickle.dumps(state)``; v2.4 on: ``torch.empty(0, dtype=torch.uint8)`` without fp8).
* TE row-parallel Linears hold the full bias on every rank (module/linear.py): with sequential residual the
  splitter's full bias per rank is what TE saves.
"""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from neoxconv.config import NeoXConfig
from neoxconv.errors import CheckpointError
from neoxconv.source.ptfile import read_pt
from neoxconv.tools.synthetic import SyntheticSpec, tiny_config, write_checkpoint, write_root

from conftest import cli, one_line_error
from hf_reference import hf_logits
from neox_checkpoints import neoxconv_names, random_hf_model
from neox_tp_split import tp_split

IDS = [3, 17, 42, 5, 99, 64, 1, 7]

# key renames per TE module (see the module docstring); the splitter writes the 20B spellings
_MHA = {"attention.query_key_value.": "attention.qkv.", "attention.dense.": "attention.proj.",
        "attention.rotary_emb.inv_freq": "attention.rotary_embeddings.inv_freq"}
_LINEAR12 = {"mlp.dense_h_to_4h.": "mlp.linear1.", "mlp.dense_4h_to_h.": "mlp.linear2."}
_LNMLP = {"post_attention_layernorm.weight": "mlp.layer_norm_weight", "post_attention_layernorm.bias":
          "mlp.layer_norm_bias", "mlp.dense_h_to_4h.weight": "mlp.fc1_weight", "mlp.dense_h_to_4h.bias": "mlp.fc1_bias",
          "mlp.dense_4h_to_h.weight": "mlp.fc2_weight", "mlp.dense_4h_to_h.bias": "mlp.fc2_bias"}
_EXTRA = {"mha": ("attention.qkv", "attention.core_attention", "attention.proj"), "lnmlp": ("mlp",),
          "linear": ("attention.query_key_value", "attention.dense")}  # te_columnparallel/te_rowparallel


def _torch_saved(obj) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(obj, buf)  # what TE 1.x get_extra_state returns (position left at the end, as TE leaves it)
    return buf


class _Planted:
    """Pickled as ``open(path, "w")``: running this pickle creates ``path``."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def extra_state(form: str, marker: Path | None = None):
    """One ``_extra_state`` value in a form TE writes (``fp8``/``planted``: with state, as TE 1.x writes it)."""
    if form == "none":
        return None
    if form == "bytesio":
        return _torch_saved(None)
    if form == "uint8-empty":
        return torch.empty(0, dtype=torch.uint8)
    if form == "uint8-pickled-none":
        return torch.frombuffer(bytearray(pickle.dumps(None)), dtype=torch.uint8)
    if form == "fp8":
        return _torch_saved({"scale_fwd": torch.ones(3), "amax_history_fwd": torch.zeros(1, 3),
                             "extra_fp8_variables": {"num_gemms": 1}})
    if form == "planted-bytesio":
        return _torch_saved({"scale_fwd": torch.ones(3), "hook": _Planted(marker)})
    if form == "planted-uint8":
        return torch.frombuffer(bytearray(pickle.dumps({"recipe": _Planted(marker)})), dtype=torch.uint8)
    raise ValueError(form)


def _rename(key: str, modules: str) -> str:
    table = {"mha": _MHA, "mha+lnmlp": _MHA, "lnmlp": {}, "linear": {}}[modules]
    mlp = _LNMLP if "lnmlp" in modules else _LINEAR12
    for old, new in {**table, **mlp}.items():
        if key.startswith(old):
            return new + key[len(old):] if old.endswith(".") else new
    return key


def build_te_checkpoint(root: Path, config: NeoXConfig, *, tp: int, layout: str, modules: str, form: str,
                        marker: Path | None = None, seed: int = 0):
    """A TE-trained checkpoint of a random GPTNeoXForCausalLM (returned: the truth), see the module docstring."""
    spec = SyntheticSpec(config=config, tp_degree=tp, layout=layout, dtype="float32", seed=seed, step=10)
    model = random_hf_model(config, seed=seed)
    hf_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    shards, row_bias = tp_split(neoxconv_names(hf_sd, tied=False), layers=config.num_layers, heads=config.num_heads,
                                rotary_dims=config.rotary_dims, base=config.rotary_emb_base, tp=tp,
                                parallel_residual=config.parallel_residual)
    for (idx, key), bias in row_bias.items():  # parallel residual (TP 1 only here): the one rank holds the bias
        for shard in shards[idx]:
            shard[key] = bias.clone()
    step = write_root(root, spec)
    yml = root / "configs" / "model.yml"
    flags = {"mha": '"te_mha": true,', "lnmlp": '"te_layernorm_mlp": true,',
             "mha+lnmlp": '"te_mha": true, "te_layernorm_mlp": true,',
             "linear": '"te_columnparallel": true, "te_rowparallel": true,'}
    text = yml.read_text()
    if "lnmlp" in modules:  # TE LayerNormMLP's gelu is the tanh form whatever bias-gelu-fusion says
        text = text.replace('"bias-gelu-fusion": true,', '"bias-gelu-fusion": false,')
    yml.write_text(text.replace('"output_layer_parallelism"', flags[modules] + '\n  "output_layer_parallelism"'))
    extras = [m for part in modules.split("+") for m in _EXTRA[part]]
    module: list[dict] = [{} for _ in range(tp)]
    for idx, ranks in sorted(shards.items()):
        for r, shard in enumerate(ranks):
            sd = {(_rename(k, modules) if 2 <= idx < config.num_layers + 2 else k): v.contiguous().clone()
                  for k, v in shard.items()}
            if 2 <= idx < config.num_layers + 2:
                sd.update({f"{m}._extra_state": extra_state(form, marker) for m in extras})
            if layout == "pipeline":
                torch.save(sd, step / f"layer_{idx:02d}-model_{r:02d}-model_states.pt")
            else:
                module[r].update({f"sequential.{idx}.{k}": v for k, v in sd.items()})
    for r in range(tp):
        torch.save({"module": module[r] if layout == "sequential" else None, "dp_world_size": 1,
                    "mp_world_size": tp, "iteration": 10, "global_steps": 10},
                   step / f"mp_rank_{r:02d}_model_states.pt")
    return model


def _config(parallel_residual: bool) -> NeoXConfig:
    return NeoXConfig(num_layers=2, hidden_size=64, num_heads=4, vocab_size=256, max_position_embeddings=64,
                      rotary_pct=0.25, parallel_residual=parallel_residual, activation="gelu_fast")


def _merged_logits(out: Path, config: NeoXConfig) -> torch.Tensor:
    from transformers import GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    return hf_logits(model, IDS)


CASES = {  # modules, TP, layout, residual, extra-state form
    "mha+lnmlp-tp1-pipeline-parallel-bytesio": ("mha+lnmlp", 1, "pipeline", True, "bytesio"),
    "mha+lnmlp-tp2-sequential-uint8": ("mha+lnmlp", 2, "sequential", False, "uint8-empty"),
    "mha-tp2-pipeline-pickled-none": ("mha", 2, "pipeline", False, "uint8-pickled-none"),
    "lnmlp-tp2-sequential-none": ("lnmlp", 2, "sequential", False, "none"),
    "linear-tp2-pipeline-bytesio": ("linear", 2, "pipeline", False, "bytesio"),
}


def _assert_merged_is(out: Path, truth) -> None:
    """Every tensor of the merged folder ``out`` equals the truth model's (transformers' names), bit for bit."""
    merged = {}
    for f in out.glob("*.safetensors"):
        merged.update(load_file(f))
    want = neoxconv_names(truth.state_dict(), tied=False)
    assert set(merged) == set(want)
    for k, v in want.items():
        assert torch.equal(merged[k], v), k


@pytest.mark.parametrize("case", CASES)
def test_merge_of_te_checkpoints_gives_transformers_logits(case, tmp_path):
    modules, tp, layout, residual, form = CASES[case]
    config = _config(residual)
    truth = build_te_checkpoint(tmp_path / "src", config, tp=tp, layout=layout, modules=modules, form=form)
    result = cli("merge", "-q", tmp_path / "src", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "fp8" not in result.output  # empty extra state: nothing to say
    _assert_merged_is(tmp_path / "out", truth)
    torch.testing.assert_close(_merged_logits(tmp_path / "out", config), hf_logits(truth, IDS), rtol=1e-4, atol=1e-4)
    info = json.loads(cli("inspect", "--json", tmp_path / "src").output)
    want_generation = {"mha+lnmlp": "te_mha+te_layernorm_mlp", "mha": "te_mha", "lnmlp": "te_layernorm_mlp",
                       "linear": "linear1/linear2"}[modules]
    assert info["key_generation"] == want_generation and info["fp8_state"] is None


@pytest.fixture(scope="module")
def te_tp2(tmp_path_factory):
    root = tmp_path_factory.mktemp("te") / "src"
    truth = build_te_checkpoint(root, _config(False), tp=2, layout="pipeline", modules="mha+lnmlp", form="bytesio")
    return root, truth


def test_verify_against_passes_and_catches_upstreams_summed_te_biases(te_tp2, tmp_path):
    root, _ = te_tp2
    assert cli("merge", "-q", root, tmp_path / "ok").exit_code == 0
    verify = ("--against", root, "--max-new-tokens", "2", "--ids", "3,17,42", "--device", "cpu")
    result = cli("verify", tmp_path / "ok", *verify)
    assert result.exit_code == 0, result.output
    # gpt-neox's converter sums every row-parallel bias; TE's are full on every rank: summing doubles them
    assert cli("merge", "-q", "--row-bias", "sum", root, tmp_path / "summed").exit_code == 0
    result = cli("verify", tmp_path / "summed", *verify)
    assert result.exit_code == 7, result.output


def test_a_wrong_layer_norm_mapping_is_caught_by_transformers_logits(te_tp2, tmp_path, monkeypatch):
    """The fused LayerNormMLP norm mapped to input_layernorm (and the other way round): merge still runs (both are
    [H] norms), but transformers' logits on the merged folder leave the truth's."""
    import dataclasses

    from neoxconv import merge

    root, truth = te_tp2
    block = dict(merge.RULES[merge.LayerKind.BLOCK])
    for param in ("weight", "bias"):
        post, inp = f"post_attention_layernorm.{param}", f"input_layernorm.{param}"
        block[post] = dataclasses.replace(block[post], hf_name=block[inp].hf_name)
        block[inp] = dataclasses.replace(block[inp], hf_name=merge.RULES[merge.LayerKind.BLOCK][post].hf_name)
    monkeypatch.setitem(merge.RULES, merge.LayerKind.BLOCK, block)
    assert cli("merge", "-q", root, tmp_path / "wrong").exit_code == 0
    wrong = _merged_logits(tmp_path / "wrong", _config(False))
    assert not torch.allclose(wrong, hf_logits(truth, IDS), rtol=1e-2, atol=1e-2)
    monkeypatch.undo()
    assert cli("merge", "-q", root, tmp_path / "right").exit_code == 0
    torch.testing.assert_close(_merged_logits(tmp_path / "right", _config(False)), hf_logits(truth, IDS),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("form", ["planted-bytesio", "planted-uint8"])
def test_extra_state_pickles_are_never_run(form, tmp_path, caplog):
    marker = tmp_path / "pwned"
    build_te_checkpoint(tmp_path / "src", _config(False), tp=1, layout="pipeline", modules="mha+lnmlp", form=form,
                        marker=marker)
    merged = cli("merge", tmp_path / "src", tmp_path / "out")
    assert merged.exit_code == 0, merged.output
    assert "fp8 scaling state" in caplog.text  # non-empty extra state is said, not converted
    inspected = cli("inspect", tmp_path / "src")
    assert inspected.exit_code == 0 and "fp8 state" in inspected.output
    verified = cli("verify", tmp_path / "out", "--against", tmp_path / "src", "--max-new-tokens", "1",
                   "--ids", "3,17", "--device", "cpu")
    assert verified.exit_code == 0, verified.output
    assert not marker.exists()
    # the plant works: what TE's set_extra_state would do with it (torch.load / pickle.loads) creates the file
    sd = torch.load(tmp_path / "src" / "global_step10" / "layer_02-model_00-model_states.pt", weights_only=False)
    value = sd["attention.qkv._extra_state"]
    if isinstance(value, io.BytesIO):
        value.seek(0)
        torch.load(value, weights_only=False)
    else:
        pickle.loads(value.numpy().tobytes())
    assert marker.exists()


def test_fp8_state_is_reported_by_merge_and_inspect_json(tmp_path):
    build_te_checkpoint(tmp_path / "src", _config(False), tp=1, layout="sequential", modules="mha", form="fp8")
    info = json.loads(cli("inspect", "--json", tmp_path / "src").output)
    # te_mha: qkv, core_attention and proj in each of the 2 blocks
    assert info["fp8_state"].startswith("6 Transformer Engine _extra_state entries hold fp8 scaling state")
    result = cli("merge", "--json", "-q", tmp_path / "src", tmp_path / "out")
    assert result.exit_code == 0 and any("fp8 scaling state" in w for w in json.loads(result.output)["warnings"])


@pytest.mark.parametrize("value,words", [
    ("a string", ["holds str"]),
    (torch.zeros(3), ["float32 tensor of shape [3]"]),
    ({"scale": torch.ones(1)}, ["holds dict"]),
    (b"\x80\x02N.", ["holds bytes"]),
])
def test_an_unknown_extra_state_value_is_refused_naming_file_and_key(value, words, tmp_path):
    build_te_checkpoint(tmp_path / "src", _config(False), tp=1, layout="pipeline", modules="mha+lnmlp", form="none")
    path = tmp_path / "src" / "global_step10" / "layer_03-model_00-model_states.pt"
    sd = torch.load(path, weights_only=False)
    sd["attention.proj._extra_state"] = value
    torch.save(sd, path)
    for cmd in (("merge", "-q", tmp_path / "src", tmp_path / "out"), ("inspect", tmp_path / "src")):
        one_line_error(cli(*cmd), 4, "layer_03-model_00", "attention.proj._extra_state", *words)


def test_an_extra_state_of_a_module_te_does_not_have_is_an_unknown_key(tmp_path):
    build_te_checkpoint(tmp_path / "src", _config(False), tp=1, layout="pipeline", modules="mha", form="none")
    path = tmp_path / "src" / "global_step10" / "layer_02-model_00-model_states.pt"
    sd = torch.load(path, weights_only=False)
    sd["input_layernorm._extra_state"] = None
    torch.save(sd, path)
    one_line_error(cli("merge", "-q", tmp_path / "src", tmp_path / "out"), 4, "unknown key",
                   "input_layernorm._extra_state")


def test_te_row_parallel_with_parallel_residual_at_tp2_is_refused(tmp_path):
    build_te_checkpoint(tmp_path / "src", _config(True), tp=2, layout="pipeline", modules="mha+lnmlp", form="none")
    one_line_error(cli("merge", "-q", tmp_path / "src", tmp_path / "out"), 3, "gpt_j_residual", "TP 2",
                   "attention.proj.weight")


def test_te_layernorm_mlp_with_another_epsilon_is_refused(tmp_path):
    build_te_checkpoint(tmp_path / "src", _config(False), tp=1, layout="pipeline", modules="lnmlp", form="none")
    yml = tmp_path / "src" / "configs" / "model.yml"
    yml.write_text(yml.read_text().replace('"layernorm-epsilon": 1e-05', '"layernorm-epsilon": 1.0e-6'))
    one_line_error(cli("merge", "-q", tmp_path / "src", tmp_path / "out"), 3, "LayerNormMLP", "eps")


def test_reshard_refuses_a_te_source_in_one_line(te_tp2, tmp_path):
    root, _ = te_tp2
    one_line_error(cli("reshard", "-q", root, tmp_path / "re", "--tp", 1), 3, "Transformer Engine", "reshard",
                   "split")
    assert not (tmp_path / "re" / "latest").exists()


@pytest.mark.parametrize("te_key", ["attention.qkv.weight", "attention.qkv._extra_state"])
def test_te_names_in_a_llama_style_checkpoint_are_refused(tmp_path, te_key):
    """gpt-neox's converter maps TE names for GPT-NeoX models only, and TE's GQA rows lie per kv group: a
    Llama-style (rmsnorm) block with a TE key is refused (exit 4) naming it, before anything is written."""
    from llama_checkpoints import LlamaSpec, write_llama_checkpoint

    root = tmp_path / "llama"
    write_llama_checkpoint(root, LlamaSpec(tp=2))
    for f in sorted((root / "global_step10").glob("layer_02-*")):
        sd = torch.load(f, weights_only=True)
        if te_key.endswith("_extra_state"):
            sd[te_key] = torch.empty(0, dtype=torch.uint8)  # TE >= 2.4's "no fp8 state"
        else:
            sd[te_key] = sd.pop("attention.query_key_value.weight")
        torch.save(sd, f)
    line = one_line_error(cli("merge", root, tmp_path / "out"), 4, "Transformer Engine", "Llama-style", repr(te_key))
    assert "layer 02" in line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.safetensors"))


def test_a_deflate_bomb_in_an_io_bytesio_extra_state_is_bounded():
    """An io.BytesIO extra state is a torch.save zip whose data.pkl is compared with a pickled None: a member that
    claims 2 bytes but inflates to 200 MB must cost neither the 200 MB nor the time (read at most 9 bytes)."""
    import struct
    import time
    import tracemalloc
    import zipfile

    from neoxconv.source.ptfile import _saved_none

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", b"\x80\x02N." + bytes(200 << 20))
    data = bytearray(buf.getvalue())
    local, central = data.index(b"PK\x03\x04"), data.index(b"PK\x01\x02")
    struct.pack_into("<I", data, local + 22, 2)  # the uncompressed size, in both headers: a lie
    struct.pack_into("<I", data, central + 24, 2)
    tracemalloc.start()
    t = time.perf_counter()
    assert _saved_none(bytes(data)) is False
    elapsed, peak = time.perf_counter() - t, tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert elapsed < 1 and peak < 8 << 20, (elapsed, peak)


# ----- adversary's attacks on the extra-state reader and the TE config flags --------------------------------
class _RawPickler:
    """A ``pickle_module.Pickler`` for torch.save that writes the given bytes as data.pkl: torch's own zip layout
    (what `read_pt` requires) around a pickle written by hand."""

    def __init__(self, f, protocol=None):
        self.f = f

    def dump(self, obj: bytes) -> None:
        self.f.write(obj)


def _save_raw_pickle(path: Path, payload: bytes) -> Path:
    torch.save(payload, path, pickle_module=SimpleNamespace(__name__="raw", Pickler=_RawPickler))
    return path


_BYTESIO = b"c_io\nBytesIO\n"


@pytest.mark.parametrize("payload, words", [
    # an io.BytesIO under a weight's key (the allow-listed global outside an _extra_state key)
    (b"\x80\x02}X\x08\x00\x00\x00w.weight" + _BYTESIO + b")\x81(C\x01xK\x00Ntbs.", "'w.weight' holds an io.BytesIO"),
    # BUILD applied to the BytesIO stand-in's class itself
    (b"\x80\x02}X\x0e\x00\x00\x00a._extra_state" + _BYTESIO + b"(C\x01xK\x00Ntbs.", "corrupt"),
    # NEWOBJ_EX with keyword arguments, and NEWOBJ with arguments
    (b"\x80\x04}X\x0e\x00\x00\x00a._extra_state" + _BYTESIO + b")}X\x01\x00\x00\x00kK\x01s\x92(C\x01xK\x00Ntbs.",
     "corrupt"),
    (b"\x80\x02}X\x0e\x00\x00\x00a._extra_state" + _BYTESIO + b"C\x01x\x85\x81s.", "corrupt"),
    # state given twice; a state dict that is not empty; a state whose data is not bytes
    (b"\x80\x02}X\x0e\x00\x00\x00a._extra_state" + _BYTESIO + b")\x81(C\x01xK\x00Ntb(C\x01yK\x00Ntbs.", "twice"),
    (b"\x80\x02}X\x0e\x00\x00\x00a._extra_state" + _BYTESIO + b")\x81(C\x01xK\x00}X\x01\x00\x00\x00kK\x01stbs.",
     "corrupt"),
    (b"\x80\x02}X\x0e\x00\x00\x00a._extra_state" + _BYTESIO + b")\x81(X\x01\x00\x00\x00xK\x00Ntbs.", "corrupt"),
    # _codecs.encode other than protocol 2's latin1 bytes (utf-8, a non-latin1 text)
    (b"\x80\x02}X\x0e\x00\x00\x00a._extra_state" + _BYTESIO + b")\x81(c_codecs\nencode\nX\x01\x00\x00\x00x"
     b"X\x05\x00\x00\x00utf-8\x86RK\x00Ntbs.", "_codecs"),
    (b"\x80\x02}X\x0e\x00\x00\x00a._extra_state" + _BYTESIO + b")\x81(c_codecs\nencode\nX\x02\x00\x00\x00\xc4\x81"
     b"X\x06\x00\x00\x00latin1\x86RK\x00Ntbs.", "corrupt"),
    # bytes (not an io.BytesIO) under an _extra_state key, and a real weight under one
    (b"\x80\x02}X\x0e\x00\x00\x00a._extra_state" + b"c_codecs\nencode\nX\x01\x00\x00\x00xX\x06\x00\x00\x00latin1"
     b"\x86Rs.", "bytes"),
])
def test_abuse_of_the_te_allow_listed_globals_is_refused_naming_the_file(payload, words, tmp_path):
    """Held: the new globals (_io.BytesIO, _codecs.encode) do nothing outside the forms torch.save writes."""
    pt = _save_raw_pickle(tmp_path / "layer_02-model_00-model_states.pt", payload)
    with pytest.raises(CheckpointError) as e:
        read_pt(pt).tensors()
    assert str(pt) in str(e.value) and words in str(e.value), str(e.value)


def test_a_real_weight_under_an_extra_state_key_is_refused(tmp_path):
    pt = tmp_path / "layer_02-model_00-model_states.pt"
    torch.save({"attention.qkv._extra_state": torch.randn(4, 4)}, pt)
    with pytest.raises(CheckpointError, match="qkv._extra_state"):
        read_pt(pt).tensors()


def _many_member_zip(min_bytes: int) -> bytes:
    """A zip holding ``torch.save(None)``'s pickle and many empty members (not a TE state: only its size counts)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("a/data.pkl", pickle.dumps(None, protocol=2))
        i = 0
        while buf.tell() * 2 < min_bytes:
            z.writestr(f"m{i}", b"")
            i += 1
    return buf.getvalue()


def test_one_io_bytesio_shared_by_many_extra_state_keys_is_parsed_once(tmp_path, monkeypatch):
    """A pickle may reference one memoised io.BytesIO from every key: 2000 keys and a 1 MB zip of 11k members took
    87 s in `tensors()` (a 1 MB file). The work must not grow with the number of keys that share the value."""
    data = _many_member_zip(200_000)
    pt = tmp_path / "layer_02-model_00-model_states.pt"
    shared = io.BytesIO(data)  # pickled once, then referenced from the memo by every key
    torch.save({f"attention.k{i}._extra_state": shared for i in range(40)}, pt)
    parsed = []
    real_zipfile = zipfile.ZipFile

    class Counting(real_zipfile):
        def __init__(self, file, *args, **kwargs):
            if isinstance(file, io.BytesIO):
                parsed.append(len(file.getbuffer()))
            super().__init__(file, *args, **kwargs)

    monkeypatch.setattr(zipfile, "ZipFile", Counting)
    entries = read_pt(pt).tensors()
    assert len(entries) == 40
    size = len(data)
    assert sum(parsed) <= 2 * size, f"{len(parsed)} parses of a {size}-byte zip"


def _te_config(ffn: int | None = None) -> NeoXConfig:
    return NeoXConfig(num_layers=2, hidden_size=64, num_heads=4, vocab_size=256, max_position_embeddings=64,
                      rotary_pct=0.25, parallel_residual=False, activation="gelu_fast", intermediate_size=ffn)


def test_a_te_layernorm_mlp_checkpoint_with_an_odd_ffn_size_merges(tmp_path):
    """gpt-neox ea7aefd8 transformer_engine.py TELayerNormMLP: ffn_dim = intermediate_size (or expansion_factor x h,
    or 4h), passed to TE as is (no mlp_multiple_of rounding): fc1 has 171 rows. It was refused (exit 3, 'ParallelMLP
    cannot run such a model') though gpt-neox built and trained it."""
    config = _te_config(171)
    truth = build_te_checkpoint(tmp_path / "src", config, tp=1, layout="pipeline", modules="mha+lnmlp",
                                form="bytesio")
    result = cli("merge", "-q", tmp_path / "src", tmp_path / "out")
    assert result.exit_code == 0, result.output
    _assert_merged_is(tmp_path / "out", truth)


def test_te_layernorm_mlp_in_the_config_of_files_without_it_is_not_taken_as_tanh_gelu(tmp_path):
    """A checkpoint with plain MLP keys and bias-gelu-fusion false (exact GELU), under a config that also says
    te_layernorm_mlp: true: gpt-neox with that config would build TELayerNormMLP and could not load these files, so
    the config does not describe them. Today: exit 0 and hidden_act gelu_fast (the tanh form), silently."""
    config = tiny_config(vocab_size=512, activation="gelu", parallel_residual=False)
    write_checkpoint(tmp_path / "src", SyntheticSpec(config=config, tp_degree=2, dtype="float32", step=10))
    yml = tmp_path / "src" / "configs" / "model.yml"
    text = yml.read_text()
    assert '"bias-gelu-fusion": false,' in text
    yml.write_text(text.replace('"bias-gelu-fusion": false,', '"bias-gelu-fusion": false, "te_layernorm_mlp": true,'))
    result = cli("merge", "-q", tmp_path / "src", tmp_path / "out")
    assert "Traceback" not in result.output
    if result.exit_code == 0:  # following the files (exact GELU) would do too
        assert json.loads((tmp_path / "out" / "config.json").read_text())["hidden_act"] == "gelu"
    else:
        assert "te_layernorm_mlp" in result.output, result.output

