"""Hostile and unusual source files, as a user meets them: the reader's items of the hardening issue.

Every edit keeps the zip CRCs valid (the archive is rewritten), so the reader itself must stop the attack.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from neoxconv.output.hf_merge import MergeOptions, merge_checkpoint
from neoxconv.errors import CheckpointError
from neoxconv.source.ptfile import read_pt
from neoxconv.source.storage import SourceReader

from conftest import COMMITTED_FIXTURE, REPO

STEP = "global_step150000"
LAYER = "layer_02-model_00-model_states.pt"


def rezip(path: Path, *, pkl=None, add=(), deflate_pkl: bool = False) -> None:
    """Rewrite a torch archive member by member (valid CRCs), data.pkl through ``pkl``, members appended."""
    with zipfile.ZipFile(path) as zf:
        items = [(i.filename, zf.read(i)) for i in zf.infolist()]
    tmp = path.with_name(path.name + ".rezip")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate names some tests add
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as out:
            for name, data in items:
                is_pkl = name.endswith("data.pkl")
                if is_pkl and pkl is not None:
                    data = pkl(data)
                deflate = is_pkl and deflate_pkl
                out.writestr(name, data, compress_type=zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED)
            for name, data in add:
                out.writestr(name, data)
    os.replace(tmp, path)


def prefix_of(path: Path) -> str:
    with zipfile.ZipFile(path) as zf:
        return next(n for n in zf.namelist() if n.endswith("data.pkl"))[: -len("data.pkl")]


def copy_fixture(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    shutil.copytree(COMMITTED_FIXTURE, src)
    return src


def run_cli(*args: str, timeout: float = 120) -> tuple[int, str, int]:
    """Run ``python -m neoxconv ARGS`` in a child; returns (exit code, stderr, the child's peak RSS in MB)."""
    wrapper = ("import json, resource, subprocess, sys\n"
               "r = subprocess.run([sys.executable, '-m', 'neoxconv', *sys.argv[1:]], capture_output=True, text=True)\n"
               "sys.stderr.write(r.stderr)\n"
               "print(json.dumps([r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024]))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-c", wrapper, *args], capture_output=True, text=True, timeout=timeout,
                         env=env)
    rc, rss = json.loads(res.stdout.strip().splitlines()[-1])
    return rc, res.stderr, rss


# ---- state leaking across files ----------------------------------------------------------------------
def _build_on(module: str, name: str, attr: str, value: str) -> bytes:
    """Opcodes that apply BUILD to an allow-listed global, then drop it (a prefix for any pickle)."""
    def s(x: str) -> bytes:
        b = x.encode()
        return b"X" + struct.pack("<I", len(b)) + b
    return b"c" + f"{module}\n{name}\n".encode() + b"}" + s(attr) + s(value) + b"sb0"


@pytest.mark.parametrize("target", [("torch", "HalfStorage", "dtype", "bfloat16"),
                                    ("torch._utils", "_rebuild_tensor_v2", "__defaults__", "x"),
                                    ("collections", "OrderedDict", "fn", "x")])
def test_build_on_an_allowed_global_is_refused_and_never_leaks(tmp_path, target):
    """One edited layer file once made every later file's fp16 data decode as bf16, with exit 0."""
    src = copy_fixture(tmp_path)
    victim = src / STEP / LAYER
    rezip(victim, pkl=lambda d: d[:2] + _build_on(*target) + d[2:])  # after the PROTO opcode
    rc, err, _ = run_cli("merge", str(src), str(tmp_path / "out"), "--quiet")
    assert rc == 4, err
    assert LAYER in err and "BUILD" in err and "Traceback" not in err
    with pytest.raises(CheckpointError, match="BUILD"):
        read_pt(victim)
    # and in this process, after the hostile file, another file still decodes exactly as torch.load does
    other = src / STEP / "layer_03-model_00-model_states.pt"
    want = torch.load(other, map_location="cpu", weights_only=True)
    with SourceReader() as reader, reader.scope() as reads:
        for k, ref in read_pt(other).tensors().items():
            assert ref.dtype == str(want[k].dtype).removeprefix("torch.")
            np.testing.assert_array_equal(reads.read(ref), want[k].numpy())


# ---- duplicate zip member names -------------------------------------------------------------------------
def test_duplicate_member_names_are_refused(tmp_path):
    """neoxconv took the last copy, torch.load the first: different weights with exit 0."""
    src = copy_fixture(tmp_path)
    victim = src / STEP / LAYER
    rezip(victim, add=[(prefix_of(victim) + "data/0", bytes(4096))])
    rc, err, _ = run_cli("merge", str(src), str(tmp_path / "out"), "--quiet")
    assert rc == 4 and LAYER in err and "duplicate" in err, err
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()


# ---- resource exhaustion from tiny inputs ------------------------------------------------------------
def _nested_shared(levels: int) -> list:
    x: list = []
    for _ in range(levels):
        x = [x, x]  # each list holds the previous one twice: 2**levels leaves, a few hundred pickle bytes
    return x


def test_shared_references_stay_shared(tmp_path, make_checkpoint):
    """A 225-byte pickle of shared references once cost 925 MB; it must cost what its bytes say."""
    root, _, _ = make_checkpoint(2, "sequential", "float16")
    src = tmp_path / "src"
    shutil.copytree(root, src)
    book = next(src.glob("global_step*")) / "mp_rank_00_model_states.pt"
    state = torch.load(book, map_location="cpu", weights_only=False)
    state["rng_tracker_states"] = _nested_shared(60)
    torch.save(state, book)
    t0 = time.monotonic()
    rc, err, rss = run_cli("merge", str(src), str(tmp_path / "out"), "--quiet", timeout=120)
    assert rc == 0, err
    assert time.monotonic() - t0 < 60 and rss < 150, rss
    # in a layer file (strict), the same structure is a clean, fast refusal
    layer = tmp_path / "layer_00-model_00-model_states.pt"
    torch.save({"word_embeddings.weight": torch.zeros(2, 2), "junk": _nested_shared(60)}, layer)
    with pytest.raises(CheckpointError, match="junk"):
        read_pt(layer).tensors()


def test_huge_memo_index_is_refused_before_unpickling(tmp_path):
    """9 bytes (LONG_BINPUT 2**28) once grew the unpickler's memo to 4.1 GB."""
    src = copy_fixture(tmp_path)
    rezip(src / STEP / LAYER, pkl=lambda d: b"\x80\x02]r\x00\x00\x00\x10.")
    rc, err, rss = run_cli("merge", str(src), str(tmp_path / "out"), "--quiet")
    assert rc == 4 and LAYER in err and "memo" in err, err
    assert rss < 150, rss


def _patch_declared_size(path: Path, member: str, size: int) -> None:
    """Make the zip's local header and central directory claim ``size`` bytes for ``member`` (a lie)."""
    data = bytearray(path.read_bytes())
    name = member.encode()
    local = data.find(b"PK\x03\x04" + bytes(22) [:0])
    while local != -1:
        n = struct.unpack_from("<H", data, local + 26)[0]
        if data[local + 30: local + 30 + n] == name:
            struct.pack_into("<I", data, local + 22, size)
        local = data.find(b"PK\x03\x04", local + 4)
    central = data.find(b"PK\x01\x02")
    while central != -1:
        n = struct.unpack_from("<H", data, central + 28)[0]
        if data[central + 46: central + 46 + n] == name:
            struct.pack_into("<I", data, central + 24, size)
        central = data.find(b"PK\x01\x02", central + 4)
    path.write_bytes(bytes(data))


def test_deflate_bomb_in_data_pkl_is_bounded_by_bytes_inflated(tmp_path):
    """A 1 MB deflated data.pkl once inflated to 2.1 GB: the size guard trusted the zip directory."""
    src = copy_fixture(tmp_path)
    victim = src / STEP / LAYER
    rezip(victim, pkl=lambda d: d + bytes(256 << 20), deflate_pkl=True)  # a valid pickle, then 256 MiB of zeros
    _patch_declared_size(victim, prefix_of(victim) + "data.pkl", 4096)  # ... that claims to be 4 KiB
    assert victim.stat().st_size < 4 << 20
    rc, err, rss = run_cli("merge", str(src), str(tmp_path / "out"), "--quiet")
    assert rc == 4 and LAYER in err, err
    assert rss < 150, f"peak RSS {rss} MB"


def test_deflated_data_pkl_within_bounds_is_read(tmp_path):
    """Re-zipping with compression is unusual but harmless: the description is read, the data is not."""
    src = copy_fixture(tmp_path)
    rezip(src / STEP / LAYER, deflate_pkl=True)
    merge_checkpoint(src, tmp_path / "out", MergeOptions(quiet=True))
    merge_checkpoint(COMMITTED_FIXTURE, tmp_path / "clean", MergeOptions(quiet=True))
    for p in (tmp_path / "clean").glob("model-*.safetensors"):
        assert (tmp_path / "out" / p.name).read_bytes() == p.read_bytes()


def _add_to_layer(step: Path, index: int, tensors: dict, tp: int = 2) -> None:
    for r in range(tp):
        p = step / f"layer_{index:02d}-model_{r:02d}-model_states.pt"
        sd = torch.load(p, map_location="cpu", weights_only=True)
        sd.update(tensors)
        torch.save(sd, p)


def test_expanded_dropped_buffer_is_compared_without_expanding(tmp_path, make_checkpoint):
    """attention.bias saved as an expand()ed 16384x16384 view once cost 5.2 GB to compare across ranks."""
    root, _, _ = make_checkpoint(2, "pipeline", "float16")
    src = tmp_path / "src"
    shutil.copytree(root, src)
    step = next(src.glob("global_step*"))
    mask = torch.ones(1, 1, 1, 1, dtype=torch.float16).expand(1, 1, 16384, 16384)  # 512 MiB if materialised
    _add_to_layer(step, 2, {"attention.bias": mask})
    assert (step / "layer_02-model_00-model_states.pt").stat().st_size < 1 << 20
    rc, err, rss = run_cli("merge", str(src), str(tmp_path / "out"), "--quiet")
    assert rc == 0, err
    assert rss < 150, f"peak RSS {rss} MB"
    manifest = json.loads((tmp_path / "out" / "neoxconv.json").read_text())
    assert any("attention.bias" in e["dropped"] for e in manifest["layers"].values())


def test_dropped_buffer_shapes_are_checked(tmp_path, make_checkpoint):
    root, _, _ = make_checkpoint(2, "pipeline", "float16")
    src = tmp_path / "src"
    shutil.copytree(root, src)
    _add_to_layer(next(src.glob("global_step*")), 2,
                  {"attention.masked_bias": torch.tensor(-1e4).half().expand(16384, 16384)})
    rc, err, _ = run_cli("merge", str(src), str(tmp_path / "out"), "--quiet")
    assert rc == 5 and "masked_bias" in err and "single value" in err, err


def test_dropped_buffers_that_differ_across_ranks_are_refused(tmp_path, make_checkpoint):
    root, _, _ = make_checkpoint(2, "pipeline", "float16")
    src = tmp_path / "src"
    shutil.copytree(root, src)
    step = next(src.glob("global_step*"))
    for r, v in enumerate([-1e4, -1e9]):
        p = step / f"layer_02-model_{r:02d}-model_states.pt"
        sd = torch.load(p, map_location="cpu", weights_only=True)
        sd["attention.masked_bias"] = torch.tensor(v)
        torch.save(sd, p)
    with pytest.raises(Exception, match="derived buffer differs.*masked_bias"):
        merge_checkpoint(src, tmp_path / "out", MergeOptions(quiet=True))


# ---- formats that must keep working (or stay refused) --------------------------------------------------
def test_legacy_non_zip_format_is_refused_clearly(tmp_path):
    p = tmp_path / LAYER
    torch.save({"w": torch.zeros(2)}, p, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="legacy torch.save format"):
        read_pt(p)


def test_torch_1x_style_archive_prefixes(tmp_path):
    """torch 1.x named the records after the file (not ``archive/``) and wrote no byteorder record."""
    src = copy_fixture(tmp_path)
    for p in (src / STEP).glob("layer_*.pt"):
        with zipfile.ZipFile(p) as zf:
            items = [(i.filename, zf.read(i)) for i in zf.infolist()]
        with zipfile.ZipFile(p, "w", zipfile.ZIP_STORED) as out:
            for name, data in items:
                tail = name.split("/", 1)[1]
                if tail in ("byteorder", ".data/serialization_id", ".format_version", ".storage_alignment"):
                    continue
                out.writestr(f"some_other_prefix/{tail}", data)
    merge_checkpoint(src, tmp_path / "out", MergeOptions(quiet=True))
    merge_checkpoint(COMMITTED_FIXTURE, tmp_path / "clean", MergeOptions(quiet=True))
    for p in (tmp_path / "clean").glob("model-*.safetensors"):
        assert (tmp_path / "out" / p.name).read_bytes() == p.read_bytes()


@pytest.mark.parametrize("order,message", [(b"big", "big-endian"), (b"little" * 100, "inflates to more than")])
def test_big_endian_archives_are_refused(tmp_path, order, message):
    src = copy_fixture(tmp_path)
    victim = src / STEP / LAYER
    with zipfile.ZipFile(victim) as zf:
        items = [(i.filename, zf.read(i)) for i in zf.infolist()]
    with zipfile.ZipFile(victim, "w", zipfile.ZIP_STORED) as out:
        for name, data in items:
            out.writestr(name, order if name.endswith("/byteorder") else data)
    with pytest.raises(CheckpointError, match=f"{LAYER}.*{message}"):
        read_pt(victim)


# ---- zip64: archives over 4 GiB (a sparse file: no disk, no time) ---------------------------------------
def _zero_crc(n: int) -> int:
    from neoxconv.source.storage import crc32_combine

    block = 1 << 24
    c_block, crc = zlib.crc32(bytes(block)), 0
    for _ in range(n // block):
        crc = crc32_combine(crc, c_block, block)
    return crc32_combine(crc, zlib.crc32(bytes(n % block)), n % block)


def _write_zip64(path: Path, members: list[tuple[str, bytes | int]]) -> None:
    """A stored zip whose members are bytes or a size of zeros (written as a hole); zip64 where needed."""
    central, offset = [], 0
    with open(path, "wb") as f:
        for name, data in members:
            size = data if isinstance(data, int) else len(data)
            crc = _zero_crc(size) if isinstance(data, int) else zlib.crc32(data)
            big = size >= 0xFFFFFFFF
            extra = struct.pack("<HHQQ", 1, 16, size, size) if big else b""
            f.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 45, 0, 0, 0, 0, crc,
                                0xFFFFFFFF if big else size, 0xFFFFFFFF if big else size, len(name), len(extra)))
            f.write(name.encode() + extra)
            if isinstance(data, int):
                f.seek(size, os.SEEK_CUR)
            else:
                f.write(data)
            central.append((name, crc, size, offset))
            offset = f.tell()
        cd_start = offset
        for name, crc, size, off in central:
            fields = ([size, size] if size >= 0xFFFFFFFF else []) + ([off] if off >= 0xFFFFFFFF else [])
            extra = struct.pack("<HH", 1, 8 * len(fields)) + struct.pack(f"<{len(fields)}Q", *fields) if fields else b""
            f.write(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45, 0, 0, 0, 0, crc,
                                min(size, 0xFFFFFFFF), min(size, 0xFFFFFFFF), len(name), len(extra), 0, 0, 0, 0,
                                min(off, 0xFFFFFFFF)))
            f.write(name.encode() + extra)
        cd_end = f.tell()
        f.write(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, len(central), len(central),
                            cd_end - cd_start, cd_start))
        f.write(struct.pack("<IIQI", 0x07064B50, 0, cd_end, 1))
        f.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0))


def test_zip64_archive_over_4_gib(tmp_path):
    """A storage past the 4 GiB mark is located through the zip64 records (sparse file: ~no disk used)."""
    import collections
    import pickle

    big_n = (4 << 30) + 2  # bytes of the first storage: the next one starts beyond 4 GiB

    class Storage:
        def __init__(self, key, numel):
            self.key, self.numel = key, numel

    class Tensor:
        def __init__(self, storage, shape):
            self.storage, self.shape = storage, shape

        def __reduce__(self):
            return (torch._utils._rebuild_tensor_v2,
                    (self.storage, 0, self.shape, (1,), False, collections.OrderedDict()))

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.HalfStorage, obj.key, "cuda:0", obj.numel) if isinstance(obj, Storage) else None

    small = torch.arange(16, dtype=torch.float16)
    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump({"big": Tensor(Storage("0", big_n // 2), (big_n // 2,)),
                                   "small": Tensor(Storage("1", 16), (16,))})
    path = tmp_path / "layer_00-model_00-model_states.pt"
    try:
        _write_zip64(path, [("archive/data.pkl", buf.getvalue()), ("archive/data/0", big_n),
                            ("archive/data/1", small.numpy().tobytes()), ("archive/version", b"3\n")])
    except OSError as e:  # a file system without sparse files or 4 GiB files
        pytest.skip(f"cannot write a sparse 4 GiB file here: {e}")
    refs = read_pt(path).tensors()
    assert refs["big"].storage_nbytes == big_n and refs["small"].data_offset > 1 << 32
    with SourceReader() as reader:
        with reader.scope() as reads:
            np.testing.assert_array_equal(reads.read(refs["small"]), small.numpy())
        assert reader.verified([refs["small"]])  # its CRC-32 checked as the scope closed
    assert torch.equal(torch.load(path, map_location="cpu", weights_only=False, mmap=True)["small"], small)


# ---- errors that once escaped as "internal error" (exit 1) ---------------------------------------------
def _deep_lists(n: int) -> bytes:
    return b"\x80\x02" + b"]" * n + b"a" * (n - 1) + b"."


def _huge_shape(d: bytes) -> bytes:
    """Every BININT (a 4-byte int: sizes, strides, offsets) becomes 2**31 - 1."""
    out, i = bytearray(), 0
    while i < len(d):
        if d[i:i + 1] == b"J" and i > 0:
            out += b"J\xff\xff\xff\x7f"
            i += 5
        else:
            out += d[i:i + 1]
            i += 1
    return bytes(out)


@pytest.mark.parametrize("payload", [
    pytest.param(lambda d: _deep_lists(100_000), id="deep-nesting(RecursionError)"),
    pytest.param(lambda d: b"\x80\x02}q\x00}b.", id="build-on-dict(AttributeError)"),
    pytest.param(lambda d: d.replace(b"K\x01", b"\x8a\x09" + b"\xff" * 8 + b"\x7f", 1), id="huge-int(OverflowError)"),
    pytest.param(_huge_shape, id="huge-geometry"),
    pytest.param(lambda d: b"\x80\x02}K\x00K\x01s.", id="int-key(TypeError)"),
    pytest.param(lambda d: d[: len(d) // 2], id="truncated(EOFError)"),
])
def test_hostile_pickles_are_checkpoint_errors_through_the_cli(tmp_path, payload):
    src = copy_fixture(tmp_path)
    rezip(src / STEP / LAYER, pkl=payload)
    rc, err, _ = run_cli("merge", str(src), str(tmp_path / "out"), "--quiet")
    assert rc == 4 and LAYER in err and "Traceback" not in err and len(err.splitlines()) == 1, err
