"""Adversary pass on the session's changes (branch attack3): Transformer Engine extra state, the split/reshard fill
path, reshard's kept rotary buffers, --no-tokenizer's clean-up, the folder descriptors, reward-model configs.

Each ``xfail(strict=True)`` test is a finding: it fails today and passes once fixed. The few plain tests are attacks
that held. References are independent of neoxconv's rule table: torch.save/torch.load, transformers' models, the
tests' own generators (`neox_checkpoints`, `neox_tp_split` through `test_transformer_engine.build_te_checkpoint`,
`llama_checkpoints`) and neoxconv's synthetic writer (which splits with its own code, not the key table).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from test_transformer_engine import build_te_checkpoint

from neoxconv.config import NeoXConfig
from neoxconv.errors import CheckpointError
from neoxconv.output import writer
from neoxconv.output.reshard import ReshardOptions, reshard_checkpoint
from neoxconv.output.split import SplitOptions, split_model
from neoxconv.source.ptfile import read_pt
from neoxconv.tools.synthetic import SyntheticSpec, tiny_config, write_checkpoint

from conftest import COMMITTED_FIXTURE, cli, make_hf_folder
from neox_checkpoints import neoxconv_names


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


# ----- 1. Transformer Engine extra state --------------------------------------------------------------------------
_BYTESIO = b"c_io\nBytesIO\n"


@pytest.mark.parametrize("payload, words", [
    # an io.BytesIO under a weight's key (the allow-listed global outside an _extra_state key)
    (b"\x80\x02}X\x08\x00\x00\x00w.weight" + _BYTESIO + b")\x81(C\x01xK\x00Ntbs.", "w.weight"),
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
    or 4h), passed to TE as is (no mlp_multiple_of rounding): fc1 has 171 rows. Refused today (exit 3, 'ParallelMLP
    cannot run such a model'), though gpt-neox built and trained it."""
    config = _te_config(171)
    truth = build_te_checkpoint(tmp_path / "src", config, tp=1, layout="pipeline", modules="mha+lnmlp",
                                form="bytesio")
    result = cli("merge", "-q", tmp_path / "src", tmp_path / "out")
    assert result.exit_code == 0, result.output
    merged = {}
    for f in (tmp_path / "out").glob("*.safetensors"):
        merged.update(load_file(f))
    want = neoxconv_names(truth.state_dict(), tied=False)
    assert set(merged) == set(want)
    for k, v in want.items():
        assert torch.equal(merged[k], v), k


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


# ----- 2. split/reshard's fill path -------------------------------------------------------------------------------
def _pt_tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.pt"))}


def test_fill_views_straddling_tiny_staging_buffers_give_the_same_bytes(tmp_path, monkeypatch):
    """Held: with 8 KiB staging buffers and 1000-byte fill views, rows of 80 (fp16), 96 (bf16 Llama GQA, SPLIT_ROWS)
    bytes straddle every buffer (the bounce path); split and reshard still write what torch.save writes for what
    torch.load reads, byte for byte the same as with the default buffers."""
    from llama_checkpoints import LlamaSpec, hf_llama

    neox = make_hf_folder(tmp_path / "neox", dtype=torch.float16, seed=3, hidden_size=40, num_attention_heads=4,
                          rotary_pct=0.2, vocab_size=520, intermediate_size=168)
    hf_llama(LlamaSpec(hidden=48, heads=6, kv_heads=2, intermediate=72, vocab=260)).to(torch.bfloat16) \
        .save_pretrained(tmp_path / "llama")

    def run(tag: str) -> dict[str, bytes]:
        out = {}
        for name, tp_back in (("neox", 4), ("llama", 1)):
            src = neox if name == "neox" else tmp_path / "llama"
            split_model(src, tmp_path / tag / name, SplitOptions(tp=2, quiet=True))
            reshard_checkpoint(tmp_path / tag / name, tmp_path / tag / f"{name}-re", ReshardOptions(tp=tp_back,
                                                                                                     quiet=True))
            for sub in (name, f"{name}-re"):
                out.update({f"{sub}/{k}": v for k, v in _pt_tree(tmp_path / tag / sub).items()})
        return out

    default = run("default")
    monkeypatch.setattr(writer, "_STAGE_BYTES", 8192)
    monkeypatch.setattr(writer, "_FILL_BYTES", 1000)
    tiny = run("tiny")
    assert default == tiny
    for rel in tiny:
        pt = tmp_path / "tiny" / rel
        again = tmp_path / "again" / pt.parent.parent.name / pt.name  # torch names the records after the file
        again.parent.mkdir(parents=True, exist_ok=True)
        torch.save(torch.load(pt, weights_only=True), again)
        assert again.read_bytes() == tiny[rel], rel


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


# ----- 4. merge --no-tokenizer's removal of the previous run's files ----------------------------------------------
def test_no_tokenizer_keeps_a_tokenizer_file_the_user_edited(tmp_path):
    """merge, then the user puts their own tokenizer_config.json (a chat template) in OUT, then `merge
    --no-tokenizer` (same source, same recorded options: the resume path) to leave the tokenizer alone: today the
    user's file is deleted. The model card's rule (`hand_over`) keeps a file that differs from its recorded entry."""
    from tiny_tokenizer import write_tokenizer

    shutil.copytree(COMMITTED_FIXTURE, tmp_path / "src")
    write_tokenizer(tmp_path / "src" / "tokenizer.json", ["hello", "world"])
    assert cli("merge", "-q", tmp_path / "src", tmp_path / "out").exit_code == 0
    mine = tmp_path / "out" / "tokenizer_config.json"
    assert mine.is_file()
    mine.write_text('{"chat_template": "the user\'s own"}')
    result = cli("merge", "-q", tmp_path / "src", tmp_path / "out", "--no-tokenizer")
    assert result.exit_code == 0, result.output
    assert mine.is_file() and "the user's own" in mine.read_text()


# ----- 5. folder descriptors --------------------------------------------------------------------------------------
def test_no_descriptor_is_left_open_by_runs_that_finish_resume_or_are_refused(tmp_path):
    """Held: merge (written, no-op resume, refused for other options, refused over a foreign folder), split and
    reshard, in-process: /proc/self/fd counts the same after each round."""
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("no /proc/self/fd")
    hf = make_hf_folder(tmp_path / "hf", dtype=torch.float16, seed=1)

    def round_() -> list[int]:
        return [cli(*a).exit_code for a in (
            ("merge", "-q", COMMITTED_FIXTURE, tmp_path / "m"),
            ("merge", "-q", COMMITTED_FIXTURE, tmp_path / "m", "--dtype", "fp32"),
            ("merge", "-q", COMMITTED_FIXTURE, tmp_path / "hf"),
            ("split", "-q", hf, tmp_path / "s", "--tp", 2),
            ("split", "-q", hf, tmp_path / "m", "--tp", 2),
            ("reshard", "-q", tmp_path / "s", tmp_path / "r", "--tp", 1),
        )]

    first = round_()
    assert first[0] == 0 and first[3] == 0 and first[5] == 0 and 0 not in (first[1], first[2], first[4]), first
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        assert round_() == first
    assert len(os.listdir("/proc/self/fd")) == before
