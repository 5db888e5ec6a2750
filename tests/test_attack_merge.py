"""Adversarial checks of merge / inspect / synth through the CLI: each test is a defect found by attacking
the landed code (a hostile or careless user), fixed at the shared mechanism."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import COMMITTED_FIXTURE, REPO, cli, one_line_error


def _merge_subprocess(src: Path, out: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "neoxconv", "merge", "-q", str(src), str(out)], env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("target", ["dangling", "existing"])
def test_a_symlink_planted_as_the_lock_is_refused_and_nothing_outside_out_is_touched(tmp_path, target):
    # Before: the lock followed the symlink (O_CREAT created the dangling target outside OUT) and then spun
    # for ever, because the file it locked was never the one at OUT/.neoxconv.lock.
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    if target == "existing":
        victim.write_text("precious\n")
    (out / ".neoxconv.lock").symlink_to(victim)
    r = _merge_subprocess(COMMITTED_FIXTURE, out)  # a hang here is the bug: the timeout fails the test
    assert r.returncode == 6, (r.returncode, r.stderr)
    assert ".neoxconv.lock" in r.stderr and "symbolic link" in r.stderr and "internal error" not in r.stderr
    if target == "existing":
        assert victim.read_text() == "precious\n"
    else:
        assert not victim.exists()
    assert sorted(p.name for p in out.iterdir()) == [".neoxconv.lock"]


def test_a_directory_planted_as_the_lock_is_named(tmp_path):
    out = tmp_path / "out"
    (out / ".neoxconv.lock").mkdir(parents=True)
    one_line_error(cli("merge", "-q", COMMITTED_FIXTURE, out), 6, ".neoxconv.lock", "is a directory")


def test_a_stale_lock_file_of_a_dead_pid_is_taken_over(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".neoxconv.lock").write_text("999999999\n")  # a SIGKILLed merge leaves it behind, unlocked
    r = cli("merge", "-q", COMMITTED_FIXTURE, out)
    assert r.exit_code == 0, r.output
    assert not (out / ".neoxconv.lock").exists() and (out / "neoxconv.json").is_file()


def test_synth_of_a_size_that_does_not_fit_on_disk_is_refused_before_writing(tmp_path):
    # Before: torch tried to allocate 512 GB and the CLI printed "internal error: RuntimeError".
    out = tmp_path / "ckpt"
    one_line_error(cli("synth", out, "--hidden", 1_000_000_000, "--heads", 4, "--vocab", 128, "--layers", 1),
                    6, str(out), "free")
    assert not out.exists()


def test_synth_of_a_size_that_does_not_fit_in_memory_is_refused_before_writing(tmp_path, monkeypatch):
    monkeypatch.setattr("neoxconv.runtime.placement.meminfo", lambda key: 1 << 20)  # 1 MiB available
    out = tmp_path / "ckpt"
    one_line_error(cli("synth", out, "--hidden", 256, "--heads", 4, "--vocab", 1024, "--layers", 1,
                         "--layout", "sequential"), 2, "memory", "--layout pipeline")
    assert not out.exists()


def test_synth_heads_zero_is_an_error_not_the_default(tmp_path):
    # Before: --heads 0 was read as "not given" and the error talked about "--heads 1".
    one_line_error(cli("synth", tmp_path / "c", "--hidden", 64, "--heads", 0), 2, "num_heads", "got 0")


def test_llama_blocks_of_different_key_generations_are_refused(tmp_path):
    # The QKV layout of a GQA Llama-style checkpoint is decided from the first block's MLP key generation
    # (w1/w2/w3 -> interleaved rows). Before: a later block spelled linear1/linear2 (blocked rows, copied from
    # a newer run) was merged with the first block's layout: exit 0 and a silently wrong model.
    from llama_checkpoints import LlamaSpec, write_llama_checkpoint

    old = LlamaSpec(tp=2, heads=8, kv_heads=2, layers=2, qkv="interleaved", mlp_keys="w1w2w3")
    new = LlamaSpec(tp=2, heads=8, kv_heads=2, layers=2, qkv="blocked", mlp_keys="linear1")
    write_llama_checkpoint(tmp_path / "old", old)
    write_llama_checkpoint(tmp_path / "new", new)
    for r in range(2):
        name = f"layer_03-model_{r:02d}-model_states.pt"
        shutil.copyfile(tmp_path / "new" / "global_step10" / name, tmp_path / "old" / "global_step10" / name)
    for cmd in (("merge", "-q", tmp_path / "old", tmp_path / "out"), ("inspect", tmp_path / "old")):
        one_line_error(cli(*cmd), 4, "layer_03", "w1/w2/w3", "linear1/linear2")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.safetensors"))


@pytest.mark.parametrize("content", [b"\x00\xff\xfe", b"global_step150000\nfoo", b"x" * 5000, b"global_step9"])
def test_a_bad_latest_file_is_a_one_line_checkpoint_error(tmp_path, content):
    # Before: a binary `latest` was "internal error: UnicodeDecodeError"; a two-line one printed a
    # two-line error (the path with its newline).
    src = tmp_path / "src"
    shutil.copytree(COMMITTED_FIXTURE, src)
    (src / "latest").write_bytes(content)
    for cmd in (("inspect", src), ("merge", "-q", src, tmp_path / "out")):
        line = one_line_error(cli(*cmd), 4, "latest", "pass the step folder itself as SRC")
        assert "\n" not in line


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


def _view_heavy(tmp_path, layers=12):
    from real_writers import WriterSpec, write_real_checkpoint

    root = tmp_path / "src"
    write_real_checkpoint(root, WriterSpec(tp=2, layout="sequential", num_layers=layers, clone="none"))
    return root, sorted(next(root.glob("global_step*")).glob("mp_rank_*.pt"))


def test_reshard_of_a_view_heavy_checkpoint_reads_each_shared_storage_once(tmp_path, monkeypatch):
    # Before: every tensor was read with a fresh SourceReader, whose CRC check re-read the whole ZeRO flat
    # buffer (the gaps) per tensor: 182x the source for 12 layers, quadratic in the layer count.
    from neoxconv.source import storage

    root, files = _view_heavy(tmp_path)
    read = [0]
    pread = storage.SourceReader._pread

    def counting(self, st, start, view):
        read[0] += len(view)
        return pread(self, st, start, view)

    monkeypatch.setattr(storage.SourceReader, "_pread", counting)
    r = cli("reshard", "-q", root, tmp_path / "out", "--tp", 1)
    assert r.exit_code == 0, r.output
    source = sum(p.stat().st_size for p in files)
    assert read[0] <= 2.2 * source, f"read {read[0]} bytes for {source} ({read[0] / source:.1f}x)"
    # and the result is the merge of the source, bit for bit
    assert cli("merge", "-q", root, tmp_path / "m1").exit_code == 0
    assert cli("merge", "-q", tmp_path / "out", tmp_path / "m2").exit_code == 0
    for f in sorted((tmp_path / "m1").glob("*.safetensors")):
        assert f.read_bytes() == (tmp_path / "m2" / f.name).read_bytes(), f.name


def test_reshard_of_a_corrupt_flat_buffer_fails_before_writing(tmp_path):
    root, files = _view_heavy(tmp_path, layers=2)
    data = bytearray(files[1].read_bytes())
    data[len(data) // 2] ^= 0x10  # inside rank 1's flat buffer
    files[1].write_bytes(bytes(data))
    one_line_error(cli("reshard", "-q", root, tmp_path / "out", "--tp", 1), 4, files[1].name, "CRC-32")
    out = tmp_path / "out"
    assert not out.exists() or not any(out.rglob("*.pt"))


def _redirect_member(path: Path, key: str, to_key: str) -> None:
    """Point the zip directory entry of ``key``'s storage at ``to_key``'s storage bytes (its own CRC kept)."""
    import struct
    import zipfile

    from neoxconv.source.ptfile import read_pt

    refs = read_pt(path).tensors()
    with zipfile.ZipFile(path) as z:
        infos = [i for i in z.infolist() if "/data/" in i.filename]
    with open(path, "rb") as f:
        def member(ref):
            for i in infos:
                f.seek(i.header_offset + 26)
                n, m = struct.unpack("<HH", f.read(4))
                if i.header_offset + 30 + n + m == ref.data_offset:
                    return i
            raise AssertionError(ref)
        a, b = member(refs[to_key]), member(refs[key])
    assert a.file_size == b.file_size and a.CRC != b.CRC
    raw = bytearray(path.read_bytes())
    pos = 0
    while True:  # the central directory entry of b
        pos = raw.index(b"PK\x01\x02", pos)
        n, m, k = struct.unpack("<HHH", raw[pos + 28:pos + 34])
        if raw[pos + 46:pos + 46 + n].decode() == b.filename:
            raw[pos + 42:pos + 46] = struct.pack("<I", a.header_offset)
            break
        pos += 46 + n + m + k
    path.write_bytes(bytes(raw))


def test_a_storage_entry_redirected_to_another_storages_bytes_fails_its_own_crc(tmp_path, monkeypatch):
    # Two zip directory entries pointing at one member's bytes: the storages were keyed by file offset only,
    # so the second shared the first's CRC check and its own recorded CRC-32 was never compared: exit 0 and
    # a tensor silently holding another tensor's values.
    from neoxconv.source import ptfile

    src = tmp_path / "src"
    shutil.copytree(COMMITTED_FIXTURE, src)
    victim = src / "global_step150000" / "layer_02-model_01-model_states.pt"
    _redirect_member(victim, "attention.dense.bias", "input_layernorm.bias")  # a summed row bias: no replica check
    # the archive's members now overlap: refused when it is opened
    one_line_error(cli("merge", "-q", src, tmp_path / "out"), 4, victim.name, "overlaps")
    # and, were it opened, each entry is still checked against its own CRC-32
    monkeypatch.setattr(ptfile, "_check_zip_layout", lambda *a: None)
    one_line_error(cli("merge", "-q", src, tmp_path / "out2"), 4, victim.name, "CRC-32")


def _tokenizer(path: Path, n: int) -> Path:
    import json

    vocab = {f"t{i}": i for i in range(n - 1)}
    eos = {"id": n - 1, "content": "<|endoftext|>", "special": True, "single_word": False, "lstrip": False,
           "rstrip": False, "normalized": False}  # every field, as tokenizers writes it (it loads nothing less)
    path.write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab, "merges": []}, "added_tokens": [eos]}))
    return path


def test_a_tokenizer_bigger_than_the_embedding_is_refused(tmp_path):
    # Before: merge wrote a model whose tokenizer yields ids past its embedding (exit 0); verify --prompt then
    # failed on the output ("token ids ... are outside the vocabulary"). synth wrote such a pair too.
    rows = 512  # the committed fixture's padded vocabulary (2 ranks x 256)
    big = _tokenizer(tmp_path / "tok.json", rows + 1)
    one_line_error(cli("merge", "-q", COMMITTED_FIXTURE, tmp_path / "out", "--tokenizer", big), 4,
                    "tok.json", f"{rows + 1} tokens", f"{rows} rows", "--tokenizer")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    fits = _tokenizer(tmp_path / "fits.json", rows)
    r = cli("merge", "-q", COMMITTED_FIXTURE, tmp_path / "out2", "--tokenizer", fits)
    assert r.exit_code == 0, r.output
    one_line_error(cli("synth", tmp_path / "c", "--hidden", 64, "--heads", 4, "--vocab", 128, "--tokenizer",
                         _tokenizer(tmp_path / "t200.json", 200)), 2, "200 tokens", "--vocab 128")
