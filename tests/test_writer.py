"""The crash-safe safetensors writer: exact header bytes, O_DIRECT and buffered paths byte-identical."""

import errno
import hashlib
import json
import os
import struct

import blake3
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from neoxconv.output import writer
from neoxconv.output.hashing import hash_file
from neoxconv.output.writer import SafetensorsWriter, safetensors_header


def test_header_bytes_are_exact():
    header = safetensors_header([("a", "float16", (2, 3)), ("b", "float32", (4,))], {"format": "pt"})
    body = b'{"__metadata__":{"format":"pt"},"a":{"dtype":"F16","shape":[2,3],"data_offsets":[0,12]},' \
           b'"b":{"dtype":"F32","shape":[4],"data_offsets":[12,28]}}'
    body += b" " * (-len(body) % 8)
    assert header == struct.pack("<Q", len(body)) + body


def _write(path, arrays, **kw):
    entries = [(name, "float32", a.shape) for name, a in arrays.items()]
    with SafetensorsWriter(path, entries) as w:
        for name, a in arrays.items():
            for block in np.array_split(a, 3):  # in pieces, as the merge streams
                w.write_chunk(name, block)
    return w


@pytest.mark.parametrize("stage_bytes", [4096, 3 * 4096, 8 << 20])
def test_direct_and_buffered_paths_write_identical_valid_files(tmp_path, monkeypatch, stage_bytes):
    rng = np.random.default_rng(0)
    arrays = {f"t{i}": rng.standard_normal((n, 7)).astype(np.float32) for i, n in enumerate((1, 333, 1000, 5))}
    monkeypatch.setattr(writer, "_STAGE_BYTES", stage_bytes)
    direct = _write(tmp_path / "direct.safetensors", arrays)
    monkeypatch.setattr(writer.os, "O_DIRECT", 0, raising=False)  # O_DIRECT unavailable -> buffered
    buffered = _write(tmp_path / "buffered.safetensors", arrays)
    a, b = (tmp_path / "direct.safetensors").read_bytes(), (tmp_path / "buffered.safetensors").read_bytes()
    assert a == b and direct.hexdigest() == buffered.hexdigest() == blake3.blake3(a).hexdigest()
    loaded = load_file(str(tmp_path / "direct.safetensors"))
    for name, arr in arrays.items():
        assert np.array_equal(loaded[name].numpy(), arr)
    assert not list(tmp_path.glob(".*neoxconv-tmp"))


def test_o_direct_refused_midway_falls_back(tmp_path, monkeypatch):
    monkeypatch.setattr(writer, "_STAGE_BYTES", 4096)
    real_write = writer._AtomicFile._write_all
    calls = {"n": 0}

    def flaky(self, mv):
        calls["n"] += 1
        if calls["n"] == 2 and self._direct:
            raise_einval = self._f.write

            class Once:
                def __init__(self, f):
                    self.f, self.done = f, False

                def write(self, data):
                    if not self.done:
                        self.done = True
                        raise OSError(errno.EINVAL, "Invalid argument")
                    return self.f.write(data)

                def __getattr__(self, name):
                    return getattr(self.f, name)

            self._f = Once(self._f)
            del raise_einval
        return real_write(self, mv)

    monkeypatch.setattr(writer._AtomicFile, "_write_all", flaky)
    arrays = {"x": np.arange(5000, dtype=np.float32).reshape(1000, 5)}
    _write(tmp_path / "x.safetensors", arrays)
    assert np.array_equal(load_file(str(tmp_path / "x.safetensors"))["x"].numpy(), arrays["x"])


def test_closing_early_leaves_no_file(tmp_path):
    with pytest.raises(RuntimeError, match="before every tensor"):
        with SafetensorsWriter(tmp_path / "x.safetensors", [("a", "float32", (4,))]) as w:
            w.write_chunk("a", np.zeros(2, np.float32))
    assert list(tmp_path.iterdir()) == []


def test_fast_merge_equals_the_plain_torch_path(tmp_path):
    """The plain way (torch.load + torch.cat/sum + safetensors.save_file) gives the same tensors."""
    from neoxconv.output.hf_merge import MergeOptions, merge_checkpoint

    from conftest import COMMITTED_FIXTURE

    step = COMMITTED_FIXTURE / "global_step150000"
    merge_checkpoint(COMMITTED_FIXTURE, tmp_path / "fast", MergeOptions(quiet=True))
    index = json.loads((tmp_path / "fast" / "model.safetensors.index.json").read_text())
    fast = {}
    for file in set(index["weight_map"].values()):
        fast.update(load_file(str(tmp_path / "fast" / file)))
    r = {i: [torch.load(step / f"layer_{i:02d}-model_{k:02d}-model_states.pt", weights_only=True) for k in range(2)]
         for i in (0, 2, 3, 5, 6)}  # embedding, blocks 0-1, final norm, readout
    plain = {"gpt_neox.embed_in.weight": torch.cat([s["word_embeddings.weight"] for s in r[0]]),
             "embed_out.weight": torch.cat([s["final_linear.weight"] for s in r[6]]),
             "gpt_neox.final_layer_norm.weight": r[5][0]["norm.weight"]}
    for b, i in enumerate((2, 3)):
        p = f"gpt_neox.layers.{b}."
        plain[p + "attention.query_key_value.weight"] = torch.cat([s["attention.query_key_value.weight"] for s in r[i]])
        plain[p + "attention.dense.weight"] = torch.cat([s["attention.dense.weight"] for s in r[i]], dim=1)
        plain[p + "attention.dense.bias"] = sum(s["attention.dense.bias"].float() for s in r[i]).half()
        plain[p + "mlp.dense_4h_to_h.weight"] = torch.cat([s["mlp.dense_4h_to_h.weight"] for s in r[i]], dim=1)
    save_file({k: v.contiguous() for k, v in plain.items()}, str(tmp_path / "plain.safetensors"))
    for name, t in load_file(str(tmp_path / "plain.safetensors")).items():
        assert torch.equal(fast[name], t), name
    assert os.path.getsize(tmp_path / "plain.safetensors") > 0


def test_atomic_write_returns_the_digest_it_is_asked_for(tmp_path):
    """sha256 unless told otherwise: callers that record it under "sha256" (split's manifest) stay right."""
    data = b"neoxconv" * 1000
    assert writer.atomic_write(tmp_path / "a", data) == hashlib.sha256(data).hexdigest()
    assert writer.atomic_write(tmp_path / "b", data, hash_algo="blake3") == hash_file(tmp_path / "b", "blake3")
    assert hash_file(tmp_path / "b", "blake3") != hash_file(tmp_path / "b", "sha256")
