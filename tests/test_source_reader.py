"""The one reader of source bytes (`neoxconv.source.storage`): every byte it serves is CRC-checked, exactly
once per pass, whatever the caller does; and the bytes used are the bytes checked."""

from __future__ import annotations

import io
import json
import random
import shutil
import struct
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from neoxconv.errors import CheckpointError, NeoXConvError
from neoxconv.output.hf_merge import MergeOptions, merge_checkpoint
from neoxconv.source import checksums
from neoxconv.source.ptfile import read_pt
from neoxconv.source.storage import SourceReader, read_tensors

from conftest import COMMITTED_FIXTURE, STEP, cli, folder_bytes, merge_fails, one_line_error


def _flat_buffer_file(path: Path, n_views: int = 8, width: int = 64) -> dict[str, torch.Tensor]:
    """A ZeRO-style file: ``n_views`` fp16 views into one flat buffer with padding between them."""
    flat = torch.randn(n_views * (width + 8) + 32).half()
    views = {f"w{i}": flat[i * (width + 8): i * (width + 8) + width].view(8, width // 8) for i in range(n_views)}
    torch.save(views, path)
    return {k: v.clone() for k, v in views.items()}


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def test_a_scope_checks_what_it_served_when_it_closes(tmp_path):
    path = tmp_path / "flat.pt"
    want = _flat_buffer_file(path)
    refs = read_pt(path).tensors()
    with SourceReader() as reader:
        with reader.scope() as reads:
            got = {k: reads.read(r) for k, r in refs.items()}
            assert not reader.verified(refs.values())  # served, not checked yet
        assert reader.verified(refs.values())
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v.numpy())
    assert reader.bytes_read == refs["w0"].storage_nbytes  # the views, then the padding once


def test_padding_no_tensor_reads_is_checked_too(tmp_path):
    path = tmp_path / "flat.pt"
    _flat_buffer_file(path)
    refs = read_pt(path).tensors()
    r = refs["w0"]
    _flip(path, r.data_offset + r.storage_nbytes - 4)  # the tail padding of the flat buffer
    with pytest.raises(CheckpointError, match=r"flat\.pt: the storage holding 'w0'.* fails its CRC-32 check"):
        with SourceReader() as reader, reader.scope() as reads:
            reads.read(r)


def test_a_planned_later_scope_defers_the_check_and_a_missing_one_cannot_skip_it(tmp_path):
    """With a plan, a storage shared by scopes 0 and 1 is checked as scope 1 closes (read once in all); a
    plan naming a scope that never opens only moves the check to the reader's end, never skips it."""
    path = tmp_path / "flat.pt"
    _flat_buffer_file(path)
    refs = list(read_pt(path).tensors().values())
    first, second = refs[:4], refs[4:]
    with SourceReader(plan=[first, second]) as reader:
        with reader.scope() as reads:
            for r in first:
                reads.read(r)
        assert not reader.verified(first)  # scope 1 reads the same storage: checked with it
        with reader.scope() as reads:
            for r in second:
                reads.read(r)
        assert reader.verified(refs)
    assert reader.bytes_read == refs[0].storage_nbytes

    _flip(path, refs[0].data_offset + 2)
    with pytest.raises(CheckpointError, match="CRC-32"):
        with SourceReader(plan=[first, second, second]) as reader:
            with reader.scope() as reads:
                for r in first:
                    reads.read(r)
            # the planned scopes 1 and 2 never open: the reader's own end checks what was served


def test_read_tensors_checks_before_returning(tmp_path):
    path = tmp_path / "flat.pt"
    want = _flat_buffer_file(path)
    refs = read_pt(path).tensors()
    got = read_tensors(refs)
    np.testing.assert_array_equal(got["w3"], want["w3"].numpy())
    _flip(path, refs["w5"].data_offset + 5)
    with pytest.raises(CheckpointError, match="CRC-32"):
        read_tensors({"w0": refs["w0"]})  # its storage holds w5 too: checked whole


def test_strided_views_far_apart_are_read_exactly_and_checked(tmp_path):
    """A column slice at a high TP degree (rows far apart) and a transposed view: same values as torch."""
    path = tmp_path / "views.pt"
    full = torch.randn(64, 512).half()
    torch.save({"cols": full[:, 8:16], "t": full.t(), "expanded": torch.ones(1, 4).half().expand(4096, 4)}, path)
    refs = read_pt(path).tensors()
    with SourceReader(chunk_bytes=256) as reader, reader.scope() as reads:
        for key in ("cols", "t", "expanded"):
            want = torch.load(path, weights_only=True)[key]
            np.testing.assert_array_equal(reads.read(refs[key]), want.numpy())
            np.testing.assert_array_equal(reads.rows(refs[key], 3, 5), want[3:8].numpy())


def test_bytes_read_twice_in_one_pass_are_compared(tmp_path):
    """Overlapping views (the same bytes served twice): the first reading is checked before the second."""
    path = tmp_path / "overlap.pt"
    base = torch.randn(256).half()
    torch.save({"a": base[:200], "b": base[100:]}, path)
    refs = read_pt(path).tensors()
    with SourceReader() as reader, reader.scope() as reads:
        np.testing.assert_array_equal(reads.read(refs["a"]), base[:200].numpy())
        np.testing.assert_array_equal(reads.read(refs["b"]), base[100:].numpy())
        assert reads.same([refs["a"], refs["a"]])
    assert reader.verified(refs.values())


def test_the_reader_has_one_way_in(tmp_path):
    """No counting protocol is left to get wrong."""
    for name in ("expect", "done", "vouch", "check_whole"):
        assert not hasattr(SourceReader, name)


# ---- archives that zip readers read differently (torch.load must be what neoxconv reads) ----------------
def _zip_parts(data: bytes) -> dict:
    """Where torch.save put things: the central directory, its size, the member count, the members."""
    (n, cd_size, cd_off) = struct.unpack_from("<HII", data, len(data) - 22 + 10)
    if data[len(data) - 42: len(data) - 38] == b"PK\x06\x07":  # zip64 (torch.save always writes it)
        z_at = struct.unpack_from("<Q", data, len(data) - 42 + 8)[0]
        n, _, cd_size, cd_off = struct.unpack_from("<QQQQ", data, z_at + 24)
    return {"n": n, "cd_off": cd_off, "cd_size": cd_size}


def _tail(n: int, cd_size: int, cd_off: int, z_at: int) -> bytes:
    """zip64 end record at ``z_at``, its locator, the end record (as torch.save writes them)."""
    return (struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, n, n, cd_size, cd_off)
            + struct.pack("<IIQI", 0x07064B50, 0, z_at, 1)
            + struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, n, n, cd_size, cd_off, 0))


def _data_span(data: bytes, name: str) -> tuple[int, int, int]:
    """(local header offset, data start, data end) of member ``name`` (found through the central directory)."""
    info = next(i for i in zipfile.ZipFile(io.BytesIO(data)).infolist() if i.filename.endswith(name))
    n, m = struct.unpack_from("<HH", data, info.header_offset + 26)
    start = info.header_offset + 30 + n + m
    return info.header_offset, start, start + info.compress_size


def _two_directories(data: bytes, victim: str = "data/0") -> bytes:
    """The attack: the end record names the real central directory (torch.load reads it), but a second one
    ends right before the end record, so Python's zipfile reads it, shifting every offset to a copy of the
    members in which ``victim``'s data is negated, its CRC-32s (descriptor, directory) made right."""
    parts = _zip_parts(data)
    cd_off, cd_size = parts["cd_off"], parts["cd_size"]
    members, cd1 = data[:cd_off], data[cd_off: cd_off + cd_size]
    _, start, end = _data_span(data, victim)
    negated = (np.frombuffer(data[start:end], dtype="<f4") * -1).astype("<f4").tobytes()
    crc = zlib.crc32(negated)
    copy = bytearray(members)
    copy[start:end] = negated
    assert copy[end:end + 4] == b"PK\x07\x08"  # torch.save's data descriptor: signature, crc, sizes
    copy[end + 4:end + 8] = struct.pack("<I", crc)
    cd2, pos = bytearray(cd1), 0
    while pos < len(cd2):  # the victim's directory entry gets the negated data's CRC-32
        n, m, k = struct.unpack_from("<HHH", cd2, pos + 28)
        if cd2[pos + 46: pos + 46 + n].decode().endswith(victim):
            cd2[pos + 16: pos + 20] = struct.pack("<I", crc)
        pos += 46 + n + m + k
    body = members + cd1 + bytes(copy) + bytes(cd2)
    return body + _tail(parts["n"], cd_size, cd_off, len(body))


def test_two_central_directories_are_refused_where_python_and_torch_disagree(tmp_path):
    """merge once read a negated copy (valid CRC-32) that Python's zipfile found, exit 0, while torch.load
    reads the real weights; verify --against agreed, reading the same way."""
    w = torch.randn(8, 8)
    good = tmp_path / "good.pt"
    torch.save({"w": w}, good)
    hostile = tmp_path / "layer_02-model_00-model_states.pt"
    hostile.write_bytes(_two_directories(good.read_bytes()))
    # the attack is real: torch.load reads the weights, Python's zipfile (CRC-checked) their negation
    assert torch.equal(torch.load(hostile, weights_only=True)["w"], w)
    with zipfile.ZipFile(hostile) as zf:
        name = next(n for n in zf.namelist() if n.endswith("data/0"))
        np.testing.assert_array_equal(np.frombuffer(zf.read(name), dtype="<f4"), -w.numpy().reshape(-1))
    with pytest.raises(CheckpointError, match=r"layer_02-model_00-model_states\.pt: .*central directory.*refused"):
        read_pt(hostile)


def _hostile_variants(data: bytes) -> dict[str, bytes]:
    parts = _zip_parts(data)
    cd_off, cd_size, n = parts["cd_off"], parts["cd_size"], parts["n"]
    members, cd = data[:cd_off], data[cd_off: cd_off + cd_size]
    at, start, end = _data_span(data, "data/0")
    out = {}
    renamed = bytearray(data)  # the local header names another member than the directory does
    nlen = struct.unpack_from("<H", renamed, at + 26)[0]
    renamed[at + 30 + nlen - 1: at + 30 + nlen] = b"9"
    out["local header name"] = bytes(renamed)
    gap = members + b"\0" * 64 + cd  # bytes in no member, before the directory
    out["bytes outside every member"] = gap + _tail(n, cd_size, cd_off + 64, len(gap))
    out["comment after the end record"] = data[:-2] + struct.pack("<H", 4) + b"note"
    wrong = bytearray(data)  # the zip64 locator points elsewhere than the record before it
    struct.pack_into("<Q", wrong, len(wrong) - 42 + 8, 0)
    out["zip64 locator elsewhere"] = bytes(wrong)
    overlap, pos = bytearray(data), cd_off  # a second member's header offset inside the first's data
    pos += 46 + sum(struct.unpack_from("<HHH", data, pos + 28))
    struct.pack_into("<I", overlap, pos + 42, struct.unpack_from("<I", data, cd_off + 42)[0] + 40)
    out["overlapping members"] = bytes(overlap)
    out["two directories"] = _two_directories(data)
    return out


def test_every_ambiguous_archive_is_refused_or_read_as_torch_reads_it(tmp_path):
    w = torch.randn(8, 8)
    good = tmp_path / "good.pt"
    torch.save({"w": w, "b": torch.arange(5.0)}, good)
    for what, data in _hostile_variants(good.read_bytes()).items():
        path = tmp_path / "hostile.pt"
        path.write_bytes(data)
        try:
            refs = read_pt(path).tensors()
            got = read_tensors(refs)
        except CheckpointError as e:
            assert "hostile.pt" in str(e), (what, str(e))
            continue
        want = torch.load(path, weights_only=True)  # accepted: then it must read exactly as torch does
        for k, v in want.items():
            np.testing.assert_array_equal(got[k], v.numpy(), err_msg=what)


def test_a_merge_of_a_source_with_two_central_directories_fails_naming_the_file(tmp_path):
    import shutil

    from conftest import COMMITTED_FIXTURE, cli, one_line_error

    src = tmp_path / "src"
    shutil.copytree(COMMITTED_FIXTURE, src)
    victim = next(src.glob("global_step*")) / "layer_02-model_01-model_states.pt"
    sd = torch.load(victim, weights_only=True)
    torch.save({k: v.float() for k, v in sd.items()}, victim)  # fp32, so the helper negates whole floats
    victim.write_bytes(_two_directories(victim.read_bytes()))
    one_line_error(cli("merge", "-q", "--dtype", "fp16", src, tmp_path / "out"), 4, victim.name, "refused")
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()


# ---- the bytes used are the bytes checked (a source rewritten while neoxconv runs) ----------------------
def _rewrite(path: Path, offset: int) -> None:
    """Change one byte in place (same size; the zip directory keeps the old CRC-32), as a concurrent writer."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


def test_bytes_read_after_a_whole_check_are_checked_again(tmp_path):
    """reshard checks a shared storage whole first, then reads its tensors layer by layer: a rewrite in
    between was used unchecked."""
    path = tmp_path / "flat.pt"
    _flat_buffer_file(path)
    refs = read_pt(path).tensors()
    with SourceReader() as reader:
        reader.check(refs.values())
        read_before = reader.bytes_read
        with reader.scope() as reads:  # unchanged: checked against the remembered spans, nothing re-read
            reads.read(refs["w2"])
        assert reader.bytes_read == read_before + refs["w2"].nbytes
        _rewrite(path, refs["w3"].byte_offset + 1)
        with pytest.raises(CheckpointError, match=r"flat\.pt: the storage holding .*'w3'.* changed while"):
            with reader.scope() as reads:
                reads.read(refs["w3"])


@pytest.mark.parametrize("between", ["scopes", "reads in one scope"])
def test_a_second_pass_over_a_rewritten_storage_fails(tmp_path, between):
    path = tmp_path / "flat.pt"
    _flat_buffer_file(path)
    refs = read_pt(path).tensors()
    with SourceReader() as reader, pytest.raises(CheckpointError, match="changed while neoxconv read it"):
        with reader.scope() as reads:
            for r in refs.values():
                reads.read(r)
        with reader.scope() as reads:
            reads.read(refs["w1"])
            if between == "reads in one scope":
                reads.read(refs["w6"])
            _rewrite(path, refs["w6"].byte_offset)
            reads.read(refs["w6"])
            reads.read(refs["w1"])


def test_reshard_fails_when_a_source_is_rewritten_after_its_first_reads(tmp_path, monkeypatch):
    # reshard reads a shared storage once (its small tensors first, then layer by layer) and checks it with
    # the last layer that reads it: a rewrite between the first reads and the later ones is caught, and
    # nothing written from it is left
    from conftest import cli, one_line_error
    from real_writers import WriterSpec, write_real_checkpoint

    root = tmp_path / "src"
    write_real_checkpoint(root, WriterSpec(tp=2, layout="sequential", num_layers=2, clone="none"))
    victim = next(root.glob("global_step*")) / "mp_rank_01_model_states.pt"
    ref = read_pt(victim, lenient=True).tensors(("module",))["sequential.2.attention.dense.weight"]
    real_scope = SourceReader.scope

    def scope_then_rewrite(self):
        if self._scopes == 1:  # the small tensors were read; now the bytes change
            _rewrite(victim, ref.byte_offset + 3)
        return real_scope(self)

    monkeypatch.setattr(SourceReader, "scope", scope_then_rewrite)
    line = one_line_error(cli("reshard", "-q", root, tmp_path / "out", "--tp", 1), 4, victim.name)
    assert "CRC-32" in line
    assert not any((tmp_path / "out").rglob("*.pt"))


def test_verify_against_a_corrupt_source_is_a_crc_error(make_checkpoint, tmp_path):
    """verify --against read the source memory-mapped, unchecked: a flipped byte became an 'against' failure
    (or a pass), not the named CRC error that merge gives."""
    import shutil

    from neoxconv.output.hf_merge import MergeOptions, merge_checkpoint

    from conftest import cli, one_line_error

    root, _, _ = make_checkpoint(2, "pipeline", "float32")
    src = tmp_path / "src"
    shutil.copytree(root, src)
    merge_checkpoint(src, tmp_path / "out", MergeOptions(quiet=True))
    victim = next(src.glob("global_step*")) / "layer_02-model_01-model_states.pt"
    ref = read_pt(victim).tensors()["mlp.dense_4h_to_h.weight"]
    _rewrite(victim, ref.byte_offset + 2)
    line = one_line_error(cli("verify", tmp_path / "out", "--ids", "1,2,3", "--max-new-tokens", 2,
                              "--against", src), 4, victim.name, "CRC-32")
    assert "mlp.dense_4h_to_h.weight" in line


# ---- safetensors headers: one reader, bounded ------------------------------------------------------------
def _inflate_header(path: Path, pad: int) -> None:
    """Rewrite a safetensors file with a ``pad``-byte string in its __metadata__ (data unchanged)."""
    from neoxconv.source.safetensors import header_bytes

    text, data_len = header_bytes(path)
    data = path.read_bytes()[-data_len:] if data_len else b""
    header = json.loads(text)
    header["__metadata__"] = {**header.get("__metadata__", {}), "pad": "x" * pad}
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.fixture()
def merged_out(make_checkpoint, tmp_path):
    from neoxconv.output.hf_merge import MergeOptions, merge_checkpoint

    root, _, _ = make_checkpoint(2, "pipeline", "float32")
    merge_checkpoint(root, tmp_path / "out", MergeOptions(quiet=True))
    return tmp_path / "out"


def test_a_100_mib_safetensors_header_is_refused_before_it_is_read(merged_out, tmp_path):
    """Once 19-40 s and 1.6 GB per file (MemoryError under a 1 GiB limit); real headers are kB to a few MB."""
    import time
    import tracemalloc

    from neoxconv.source.safetensors import MAX_HEADER_BYTES, read_header

    from conftest import cli, one_line_error

    victim = sorted(merged_out.glob("model-*.safetensors"))[1]
    _inflate_header(victim, 100 << 20)
    tracemalloc.start()
    t = time.perf_counter()
    with pytest.raises(ValueError, match=f"more than neoxconv reads \\({MAX_HEADER_BYTES / 1e6:g} MB"):
        read_header(victim)
    assert time.perf_counter() - t < 0.5 and tracemalloc.get_traced_memory()[1] < 1 << 20
    tracemalloc.stop()
    # every command that reads safetensors headers names the file and the limit
    line = one_line_error(cli("split", merged_out, tmp_path / "split", "--tp", 2), 4, victim.name, "16 MB")
    assert "internal error" not in line
    r = cli("verify", merged_out, "--ids", "1,2", "--max-new-tokens", 1)
    assert r.exit_code != 0 and victim.name in r.output and "16 MB" in r.output, r.output
    assert "internal error" not in r.output and "Traceback" not in r.output


def test_headers_up_to_the_limit_are_read(tmp_path):
    from neoxconv.source.safetensors import MAX_HEADER_BYTES, checked_safetensors_header

    path = tmp_path / "a.safetensors"
    raw = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(8))
    _inflate_header(path, MAX_HEADER_BYTES - len(raw) - 64)
    assert list(checked_safetensors_header(path)) == ["w", "__metadata__"]
    _inflate_header(path, MAX_HEADER_BYTES)
    with pytest.raises(ValueError, match="16 MB"):
        checked_safetensors_header(path)


def test_many_huge_headers_under_a_1_gib_address_space(merged_out):
    """Bounded per file, not growing with the file count: no MemoryError under RLIMIT_AS = 1 GiB."""
    import subprocess
    import sys

    from conftest import subprocess_env

    files = sorted(merged_out.glob("model-*.safetensors"))
    for f in files:
        _inflate_header(f, 100 << 20)
    script = ("import resource, sys\n"
              "resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n"
              "from neoxconv.source.safetensors import read_header\n"
              "for f in sys.argv[1:]:\n"
              "    try:\n"
              "        read_header(f)\n"
              "    except ValueError as e:\n"
              "        assert '16 MB' in str(e), e\n"
              "    else:\n"
              "        raise SystemExit('read a 100 MiB header')\n"
              "print('ok')\n")
    res = subprocess.run([sys.executable, "-c", script, *map(str, files * 5)], capture_output=True, text=True,
                         env=subprocess_env(), timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_split_refuses_a_source_file_rewritten_after_its_header_was_checked(merged_out):
    """safetensors record no checksum: what split uses must be the file its header check saw."""
    import os

    from neoxconv.plan.plan import plan_hf_folder
    from neoxconv.source.hf_folder import HFModel

    model = HFModel(merged_out)
    layer, layer_names = next(iter(plan_hf_folder(model).names.items()))
    name = next(iter(layer_names.values()))
    file = model.tensors[name].file
    with model.open_rows() as rows:  # split's reader
        assert rows.rows(name, 0, 1, "float32").size
        rows.check_unchanged()  # unchanged: fine
        data = file.read_bytes()
        file.write_bytes(data)  # same size, same bytes, but written: its data is no longer the checked file's
        os.utime(file, ns=(model.states[file].mtime_ns, model.states[file].mtime_ns))  # even with the mtime back
        rows.rows(name, 0, 1, "float32")
        with pytest.raises(CheckpointError, match=f"{file.name}: changed while neoxconv read it"):
            rows.check_unchanged()


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


def test_missing_rank_file(src_copy, tmp_path):
    (src_copy / STEP / "layer_03-model_01-model_states.pt").unlink()
    merge_fails(src_copy, tmp_path / "out", CheckpointError, "layer_03-model_01-model_states.pt", "missing")
    assert not (tmp_path / "out").exists()  # preflight: nothing was created


def test_rank_count_differs_between_layers(src_copy, tmp_path):
    shutil.copy(src_copy / STEP / "layer_02-model_01-model_states.pt",
                src_copy / STEP / "layer_02-model_02-model_states.pt")
    merge_fails(src_copy, tmp_path / "out", CheckpointError, "layer 00", "missing layer_00-model_02-model_states.pt")


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


def _layer_bytes(files):
    return {k: v for k, v in files.items() if k.startswith("model-")}


def test_fuzz_truncations_and_byte_flips(tmp_path, clean_merge):
    """Random damage to layer files: every run is a bit-identical merge or a NeoXConvError, never a crash."""
    _, clean = clean_merge
    rng = random.Random(1234)
    originals = sorted((COMMITTED_FIXTURE / STEP).glob("layer_*.pt"))
    outcomes = {"merged": 0, "error": 0}
    for trial in range(60):
        src = tmp_path / f"src{trial}"
        shutil.copytree(COMMITTED_FIXTURE, src)
        victim = src / STEP / rng.choice(originals).name
        data = bytearray(victim.read_bytes())
        if trial % 3 == 0:
            data = data[: rng.randrange(len(data))]
        else:
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        victim.write_bytes(bytes(data))
        out = tmp_path / f"out{trial}"
        try:
            merge_checkpoint(src, out, MergeOptions(quiet=True))
        except NeoXConvError as e:
            assert victim.name in str(e) or "layer" in str(e), str(e)
            outcomes["error"] += 1
        else:
            # accepted: then it must be exactly the clean merge (the damage hit bytes nothing reads)
            assert _layer_bytes(folder_bytes(out)) == _layer_bytes(clean), (
                f"trial {trial}: silent corruption of {victim.name}")
            outcomes["merged"] += 1
        shutil.rmtree(src)
    assert outcomes["error"] > 30, outcomes


def test_flipped_tensor_byte_is_caught_by_crc(tmp_path):
    shutil.copytree(COMMITTED_FIXTURE, tmp_path / "src")
    victim = tmp_path / "src" / STEP / "layer_02-model_01-model_states.pt"
    from neoxconv.source.ptfile import read_pt

    ref = read_pt(victim).tensors()["mlp.dense_4h_to_h.weight"]
    data = bytearray(victim.read_bytes())
    data[ref.byte_offset + 5] ^= 0x10
    victim.write_bytes(bytes(data))
    with pytest.raises(NeoXConvError, match="layer_02-model_01.*mlp.dense_4h_to_h.weight.*CRC"):
        merge_checkpoint(tmp_path / "src", tmp_path / "out", MergeOptions(quiet=True))


def _case_twin_storage(src: Path, dst: Path) -> None:
    """Rewrite the torch.save archive ``src`` as ``dst``: storage key '0' renamed 'a' (the pickle's only
    reference to it), member ``data/a`` its real bytes, then a member ``data/A`` holding the same bytes with
    every sign bit flipped (a valid CRC-32 for each)."""
    import zipfile

    import numpy as np

    zin = zipfile.ZipFile(src)
    names = zin.namelist()
    pkl_name = next(n for n in names if n.endswith("data.pkl"))
    prefix = pkl_name[: -len("data.pkl")]
    pkl = zin.read(pkl_name)
    old = b"X\x01\x00\x00\x000"  # BINUNICODE '0'
    assert pkl.count(old) == 1
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as z:
        for n in names:
            if n == pkl_name:
                z.writestr(n, pkl.replace(old, b"X\x01\x00\x00\x00a"))
            elif n == prefix + "data/0":
                real = zin.read(n)
                z.writestr(prefix + "data/a", real)
                z.writestr(prefix + "data/A", (np.frombuffer(real, np.uint16) ^ 0x8000).astype(np.uint16).tobytes())
            else:
                z.writestr(n, zin.read(n))


def test_storage_members_differing_only_in_case_are_read_as_torch_reads_them_or_refused(tmp_path):
    """An archive holding ``data/a`` (the storage the pickle names) and ``data/A`` (its negation): miniz's
    ``mz_zip_reader_locate_file`` (flags 0) compares names case-insensitively, so ``torch.load`` returned the
    negated tensor while `read_pt` returned the other one, both with valid CRC-32s, and `merge` exited 0 with
    the tensor torch does not see. Names equal under case folding should be refused as duplicate names are
    (`read_pt`: ``len({n.lower() for n in members}) != len(members)``)."""
    import torch

    from neoxconv.errors import CheckpointError
    from neoxconv.source.ptfile import read_pt

    t = torch.arange(1, 9, dtype=torch.float16)
    plain = tmp_path / "plain.pt"
    torch.save({"w": t}, plain)
    twin = tmp_path / "twin.pt"
    _case_twin_storage(plain, twin)
    want = torch.load(twin, weights_only=True)["w"].numpy()
    assert (want == -t.numpy()).all()  # what torch reads: the negated copy
    try:
        got = read_pt(twin).tensors()["w"].array()
    except CheckpointError:
        return
    assert (got == want).all(), (got, want)


def test_merge_of_a_layer_file_with_a_case_twin_storage_is_refused(tmp_path):
    """The same case twin planted in a layer file of the committed fixture: `merge` exited 0 with weights
    torch.load does not read from that file. It should refuse the file (exit 4) naming it."""
    src = tmp_path / "src"
    shutil.copytree(COMMITTED_FIXTURE, src)
    layer = src / "global_step150000" / "layer_02-model_00-model_states.pt"
    _case_twin_storage(layer, tmp_path / "twin.pt")
    shutil.move(tmp_path / "twin.pt", layer)
    result = cli("merge", "-q", src, tmp_path / "out")
    assert result.exit_code == 4, result.output


def test_a_tensor_saved_with_its_negative_bit_reads_as_torch_load_reads_it(tmp_path):
    """``torch.save`` of a negative view (``torch._neg_view``) writes the storage as it is plus the metadata
    ``{'neg': True}`` as the 7th argument of ``_rebuild_tensor_v2``; ``torch.load`` (weights_only or not) gives
    the negated values. A layer file re-saved with one tensor stored that way (``_neg_view(-w)``: torch.load
    still gives ``w``) merged with exit 0 to ``-w``: `_rebuild_tensor` drops the metadata. It should apply
    the neg bit (negate on read) or refuse metadata it does not implement (``conj``/``neg``), naming file and
    key."""
    import torch
    from safetensors.torch import load_file

    src = tmp_path / "src"
    shutil.copytree(COMMITTED_FIXTURE, src)
    layer = src / "global_step150000" / "layer_02-model_00-model_states.pt"
    state = torch.load(layer, weights_only=True)
    key = "attention.dense.weight"
    state[key] = torch._neg_view(-state[key])
    torch.save(state, layer)
    assert torch.equal(torch.load(layer, weights_only=True)[key].resolve_neg(),
                       torch.load(COMMITTED_FIXTURE / "global_step150000" / layer.name, weights_only=True)[key])
    result = cli("merge", "-q", src, tmp_path / "out")
    if result.exit_code != 0:
        assert result.exit_code == 4 and "internal error" not in result.output, result.output
        return
    plain = tmp_path / "plain"
    assert cli("merge", "-q", COMMITTED_FIXTURE, plain).exit_code == 0
    name = "model-00002-of-00005.safetensors"
    got, want = load_file(tmp_path / "out" / name), load_file(plain / name)
    assert all(torch.equal(got[k], want[k]) for k in want)


_RANK_CHILD = r"""
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
sys.path.insert(0, sys.argv[2])
from neoxconv.errors import NeoXConvError
from neoxconv.source.checkpoint import open_checkpoint
try:
    open_checkpoint(sys.argv[1], strict=False)
except NeoXConvError as e:
    print("refused:", type(e).__name__, str(e)[:200])
else:
    print("accepted")
"""


def test_a_stray_sequential_file_with_a_huge_rank_number_is_refused_cheaply(make_checkpoint, tmp_path):
    """An empty file ``mp_rank_1000000000000_model_states.pt`` beside a sequential checkpoint: `open_checkpoint`
    takes ``tp = max(rank) + 1`` and builds ``set(range(tp))``: `inspect` used 2.3 GB and 10 s for rank 1e8,
    then ``internal error: MemoryError`` under a 4 GiB cap (rank 1e12 never ends). The rank file names
    should be checked against the ranks found (e.g. a rank >= the number of rank files is named as a stray or
    missing-files problem without building the range), in bounded memory."""
    import subprocess
    import sys

    from conftest import REPO, subprocess_env

    root, _, _ = make_checkpoint(tp=2, layout="sequential")
    src = tmp_path / "src"
    shutil.copytree(root, src)
    step = next(src.glob("global_step*"))
    (step / "mp_rank_1000000000000_model_states.pt").touch()
    child = subprocess.run([sys.executable, "-c", _RANK_CHILD, str(src), str(REPO)], capture_output=True,
                           text=True, timeout=60, env=subprocess_env())
    assert child.stdout.startswith("refused: CheckpointError"), (child.stdout, child.stderr[-500:])


def _merge_capped(src: Path, out: Path, cap: int = 1 << 30):
    """``python -m neoxconv merge -q SRC OUT`` in a child under RLIMIT_AS = ``cap``."""
    import resource
    import subprocess
    import sys

    from conftest import subprocess_env

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    return subprocess.run([sys.executable, "-m", "neoxconv", "merge", "-q", str(src), str(out)], capture_output=True,
                          text=True, timeout=120, env={**subprocess_env(), "OPENBLAS_NUM_THREADS": "1"},
                          preexec_fn=limit)


@pytest.mark.parametrize("which", ["yaml", "manifest", "journal"])
def test_a_huge_sparse_small_file_is_refused_not_read_whole(tmp_path, which):
    """A 2 GiB sparse file (a few KB on disk) as the NeoX YAML (``configs/model.yml``), or as OUT's
    ``neoxconv.json`` / ``.neoxconv-journal.json`` before a re-run: ``read_text()`` reads it whole and the merge
    ends in ``internal error: MemoryError`` under a 1 GiB cap (without a cap it takes 2 GiB+ of RAM; the same
    holds for ``verify`` on the index, manifest or config.json, and ``split`` on an HF folder's index).
    Config, index and manifest files should be size-capped before reading (as tokenizer.json is at 256 MiB
    and safetensors headers at 16 MiB) and refused with a one-line error naming the file."""
    src = tmp_path / "src"
    shutil.copytree(COMMITTED_FIXTURE, src)
    out = tmp_path / "out"
    if which == "yaml":
        target = src / "configs" / "model.yml"
    else:
        assert cli("merge", "-q", src, out).exit_code == 0
        target = out / ("neoxconv.json" if which == "manifest" else ".neoxconv-journal.json")
    with open(target, "r+b" if target.exists() else "wb") as f:  # the journal exists only mid-run
        f.truncate(2 << 30)
    child = _merge_capped(src, out)
    assert "internal error" not in child.stderr, child.stderr
    assert child.returncode in (0, 3, 4, 6), child.stderr


def test_merge_capped_baseline(tmp_path):
    """The child itself fits the cap: a plain merge of the fixture under RLIMIT_AS = 1 GiB exits 0."""
    child = _merge_capped(COMMITTED_FIXTURE, tmp_path / "out")
    assert child.returncode == 0, child.stderr


def test_a_latest_naming_a_path_with_a_nul_byte_is_one_line(tmp_path):
    """``latest`` holding ``global_step150000\\0x``: a one-line checkpoint error quoting it escaped (exit 4)."""
    src = tmp_path / "src"
    shutil.copytree(COMMITTED_FIXTURE, src)
    (src / "latest").write_bytes(b"global_step150000\0x")
    one_line_error(cli("inspect", src), 4, "latest")


def test_member_names_differing_only_in_non_ascii_case_are_not_duplicates(tmp_path):
    """What happened: an archive holding ``…/extraK`` (U+212A KELVIN SIGN) and ``…/extrak`` is refused as
    having duplicate member names, yet torch.load (miniz: ASCII-only tolower) reads it as two different members.
    What should happen: only names equal under ASCII case folding are duplicates (fold the raw name bytes with
    ``bytes.lower()`` in ``ptfile.read_pt``)."""
    p = tmp_path / "t.pt"
    torch.save({"w": torch.ones(3)}, p)
    prefix = zipfile.ZipFile(p).namelist()[0].split("/")[0]
    with zipfile.ZipFile(p, "a", compression=zipfile.ZIP_STORED) as z:
        z.writestr(prefix + "/extra\u212a", b"x")
        z.writestr(prefix + "/extrak", b"x")
    assert torch.equal(torch.load(p, weights_only=True)["w"], torch.ones(3))
    read_pt(p)
