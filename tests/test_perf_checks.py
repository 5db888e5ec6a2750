"""The fast merge path writes the same bytes as before and every check still fires.

Fast path = concat tensors read straight into the writer's staging buffer (`neoxconv.output.streaming`), CRC-32
by `neoxconv.source.checksums`, finiteness from exponent bits (`NonFiniteCounter`), BLAKE3 as the default hash.
"""

import hashlib
import json
import shutil
import sys
import zlib

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from neoxconv.source import checksums

from neoxconv.output import hf_merge as convert

from neoxconv.output import streaming

from neoxconv.output import writer
from neoxconv.cli import main
from neoxconv.output.hf_merge import MergeOptions, merge_checkpoint
from neoxconv.dtypes import NonFiniteCounter, count_nonfinite
from neoxconv.errors import CheckpointError, MergeError, VerificationError
from neoxconv.output.hashing import hash_file
from neoxconv.check.integrity import check_output
from neoxconv.config import load_out_config
from neoxconv.source.ptfile import read_pt

from conftest import COMMITTED_FIXTURE

STEP = "global_step150000"

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


def _model_files(out):
    return {p.name: p.read_bytes() for p in sorted(out.glob("model-*.safetensors"))}


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


@pytest.mark.parametrize("dtype", ["auto", "bf16", "fp32"])
def test_output_is_byte_identical_to_before(tmp_path, dtype, streamed):
    merge_checkpoint(COMMITTED_FIXTURE, tmp_path / "out", MergeOptions(quiet=True, dtype=dtype))
    got = [hashlib.sha256(b).hexdigest() for b in _model_files(tmp_path / "out").values()]
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
    assert _model_files(tmp_path / "fast") == _model_files(tmp_path / "general")
    for p in (tmp_path / "fast").glob("model-*.safetensors"):  # and the manifest's digest is the file's
        entry = json.loads((tmp_path / "fast" / "neoxconv.json").read_text())["layers"][p.name]
        assert entry["blake3"] == hash_file(p, "blake3")


# ----- CRC-32 ------------------------------------------------------------------------------------------
def test_crc32_matches_zlib_and_falls_back(monkeypatch):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, 100_003, dtype=np.uint8).tobytes()
    assert checksums.crc32(data) == zlib.crc32(data)
    assert checksums.crc32(data[50:], checksums.crc32(data[:50])) == zlib.crc32(data)
    assert checksums.crc32(memoryview(np.frombuffer(data[:-1], np.uint16))) == zlib.crc32(data[:-1])
    monkeypatch.setitem(sys.modules, "isal", None)  # neither accelerated package importable
    monkeypatch.setitem(sys.modules, "isal.isal_zlib", None)
    monkeypatch.setitem(sys.modules, "zlib_ng", None)
    fn, name = checksums._pick()
    assert name == "zlib" and fn(data) == zlib.crc32(data)


@pytest.mark.parametrize("key,file", [
    ("attention.query_key_value.weight", "layer_02-model_01-model_states.pt"),  # dim-0 concat
    ("attention.dense.weight", "layer_03-model_00-model_states.pt"),  # dim-1 concat (interleaved)
    ("word_embeddings.weight", "layer_00-model_01-model_states.pt"),  # vocab-parallel
    ("input_layernorm.bias", "layer_02-model_00-model_states.pt"),  # replicated, merged in memory
])
@pytest.mark.parametrize("dtype", ["auto", "fp32"])  # the fast path and the general (casting) path
def test_flipped_source_byte_fails_the_crc(tmp_path, key, file, dtype):
    shutil.copytree(COMMITTED_FIXTURE, tmp_path / "src")
    victim = tmp_path / "src" / STEP / file
    ref = read_pt(victim).tensors()[key]
    data = bytearray(victim.read_bytes())
    data[ref.byte_offset + ref.nbytes - 1] ^= 0x01  # the last byte: the check must see the whole shard
    victim.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{file}: .*'{key}'.* fails its CRC-32 check"):
        merge_checkpoint(tmp_path / "src", tmp_path / "out", MergeOptions(quiet=True, dtype=dtype))
    assert not list((tmp_path / "out").glob("model-*")) or not (tmp_path / "out" / "neoxconv.json").exists()


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


def _poison(path, key, index, value):
    d = torch.load(path, weights_only=True)
    d[key][index] = value
    torch.save(d, path)


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


# ----- the hash the manifest records ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def merged_both(tmp_path_factory):
    work = tmp_path_factory.mktemp("hashes")
    merge_checkpoint(COMMITTED_FIXTURE, work / "blake3", MergeOptions(quiet=True))
    result = CliRunner().invoke(main, ["merge", str(COMMITTED_FIXTURE), str(work / "sha256"), "--hash", "sha256",
                                       "--quiet"])
    assert result.exit_code == 0, result.output
    return work


@pytest.mark.parametrize("algo", ["blake3", "sha256"])
def test_manifest_records_the_algorithm_and_every_files_digest(merged_both, algo):
    out = merged_both / algo
    manifest = json.loads((out / "neoxconv.json").read_text())
    assert manifest["hash"] == algo
    entries = {**manifest["layers"], **manifest["files"]}
    assert len(entries) == 8  # 5 layer files, config.json, generation_config.json, the index (no tokenizer here)
    other = {"blake3": "sha256", "sha256": "blake3"}[algo]
    for name, entry in entries.items():
        assert entry[algo] == hash_file(out / name, algo) and other not in entry
    sha = {name: entry["sha256"] for name, entry in entries.items()} if algo == "sha256" else {}
    for name, digest in sha.items():  # what Hub LFS ids are: the plain sha256 of the file
        assert digest == hashlib.sha256((out / name).read_bytes()).hexdigest()
    assert _model_files(out) == _model_files(merged_both / other)  # same bytes either way


@pytest.mark.parametrize("algo", ["blake3", "sha256"])
def test_tampered_output_is_detected_under_either_hash(merged_both, tmp_path, algo):
    out = tmp_path / "copy"
    shutil.copytree(merged_both / algo, out)
    victim = sorted(out.glob("model-*.safetensors"))[1]
    config = load_out_config(out)
    assert check_output(out, config, hashes=True).hashes_checked
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x04  # same size: only the hash can tell
    victim.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match=f"{victim.name}: {algo} differs from the manifest"):
        check_output(out, config, hashes=True)


def test_old_sha256_manifest_still_verifies(merged_both, tmp_path):
    """A manifest from before BLAKE3: sha256 entries and no "hash" field."""
    out = tmp_path / "old"
    shutil.copytree(merged_both / "sha256", out)
    manifest = json.loads((out / "neoxconv.json").read_text())
    del manifest["hash"]
    (out / "neoxconv.json").write_text(json.dumps(manifest))
    report = check_output(out, load_out_config(out), hashes=True)
    assert report.hashes_checked and report.files_checked >= 6  # 5 layer files and config.json at least
    victim = sorted(out.glob("model-*.safetensors"))[0]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0x01
    victim.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match="sha256 differs"):
        check_output(out, load_out_config(out), hashes=True)


def test_resume_under_another_hash_reuses_layers_and_rehashes_them(merged_both, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(merged_both / "sha256", out)
    before = _model_files(out)
    report = merge_checkpoint(COMMITTED_FIXTURE, out, MergeOptions(quiet=True))  # default: blake3
    assert report.files_reused == len(before) and report.files_written == 0
    manifest = json.loads((out / "neoxconv.json").read_text())
    assert manifest["hash"] == "blake3"
    for name, entry in {**manifest["layers"], **manifest["files"]}.items():
        assert entry["blake3"] == hash_file(out / name, "blake3") and "sha256" not in entry
    assert _model_files(out) == before


def test_unknown_hash_is_refused():
    result = CliRunner().invoke(main, ["merge", str(COMMITTED_FIXTURE), "x", "--hash", "md5"])
    assert result.exit_code == 2 and "md5" in result.output
    with pytest.raises(ValueError, match="unknown hash 'md5'"):
        merge_checkpoint(COMMITTED_FIXTURE, "x", MergeOptions(hash="md5"))


def test_streams_direct_only_where_it_is_byte_identical(make_checkpoint):
    from neoxconv.source.checkpoint import open_checkpoint
    from neoxconv.merge import Rule
    from neoxconv.plan.plan import plan_checkpoint

    root, _, _ = make_checkpoint(2, "pipeline", "float16")
    ckpt = open_checkpoint(root)
    _, plans = plan_checkpoint(ckpt, row_bias=Rule.SUM, out_dtype=None)
    direct = {t.key for p in plans for t in p.tensors if streaming.streams_direct(t)}
    assert "attention.dense.weight" in direct and "word_embeddings.weight" in direct
    assert not direct & {"attention.dense.bias", "input_layernorm.weight", "norm.weight"}
    _, plans32 = plan_checkpoint(ckpt, row_bias=Rule.SUM, out_dtype="float32")
    assert not any(streaming.streams_direct(t) for p in plans32 for t in p.tensors)


def test_atomic_write_returns_the_digest_it_is_asked_for(tmp_path):
    """sha256 unless told otherwise: callers that record it under "sha256" (split's manifest) stay right."""
    data = b"neoxconv" * 1000
    assert writer.atomic_write(tmp_path / "a", data) == hashlib.sha256(data).hexdigest()
    assert writer.atomic_write(tmp_path / "b", data, hash_algo="blake3") == hash_file(tmp_path / "b", "blake3")
    assert hash_file(tmp_path / "b", "blake3") != hash_file(tmp_path / "b", "sha256")
