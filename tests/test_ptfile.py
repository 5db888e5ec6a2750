from __future__ import annotations

import argparse
import io
import json
import os
import random
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
from click.testing import CliRunner

from neoxconv.cli import main
from neoxconv.errors import CheckpointError, NeoXConvError, UnsafePickleError
from neoxconv.output.hf_merge import MergeOptions, merge_checkpoint
from neoxconv.source.ptfile import read_pt
from neoxconv.source.storage import SourceReader

from conftest import COMMITTED_FIXTURE, REPO, STEP, run_cli
from real_writers import WriterSpec, write_real_checkpoint


def _np(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    return t.view(torch.uint16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def test_tensors_read_without_torch_equal_torch_load(tmp_path):
    tensors = {
        "half": torch.randn(3, 4).half(),
        "bf16": torch.randn(5, dtype=torch.bfloat16),
        "fp32_view": torch.randn(4, 6)[:, 1:3],  # non-contiguous view into a larger storage
        "offset_view": torch.randn(10)[4:],
        "param": torch.nn.Parameter(torch.randn(2, 2)),
    }
    torch.save(tensors, tmp_path / "t.pt")
    refs = read_pt(tmp_path / "t.pt").tensors()
    assert set(refs) == set(tensors)
    for k, ref in refs.items():
        np.testing.assert_array_equal(np.asarray(ref.array()), _np(tensors[k]))
        assert ref.shape == tuple(tensors[k].shape)
    assert refs["half"].covers_storage and not refs["fp32_view"].covers_storage


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_hostile_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "payload-ran"
    torch.save({"x": torch.zeros(2), "evil": _Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(UnsafePickleError, match="evil.pt.*posix.mkdir|evil.pt.*mkdir"):
        read_pt(tmp_path / "evil.pt")
    assert not marker.exists()


def test_lenient_mode_keeps_payloads_inert(tmp_path):
    marker = tmp_path / "payload-ran"
    torch.save({"module": {"w": torch.ones(2)}, "args": argparse.Namespace(a=1), "evil": _Payload(marker)},
               tmp_path / "mp_rank_00_model_states.pt")
    archive = read_pt(tmp_path / "mp_rank_00_model_states.pt", lenient=True)
    assert set(archive.tensors(("module",))) == {"w"}
    assert "argparse.Namespace" in archive.refused_globals
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["empty", "text", "truncated"])
def test_broken_files_name_the_file(tmp_path, damage):
    p = tmp_path / "layer_00-model_00-model_states.pt"
    torch.save({"w": torch.randn(64, 64)}, p)
    data = p.read_bytes()
    p.write_bytes({"empty": b"", "text": b"hello, not a checkpoint", "truncated": data[: len(data) // 2]}[damage])
    with pytest.raises(CheckpointError, match="layer_00-model_00-model_states.pt"):
        read_pt(p)


def test_hostile_layer_file_is_refused_through_the_cli(src_copy, tmp_path):
    import os

    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    torch.save({"word_embeddings.weight": torch.zeros(256, 32, dtype=torch.float16), "x": Payload()},
               src_copy / STEP / "layer_00-model_01-model_states.pt")
    result = CliRunner().invoke(main, ["merge", str(src_copy), str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 4
    assert "layer_00-model_01-model_states.pt" in result.output and "refused" in result.output
    assert "Traceback" not in result.output and not marker.exists()


_OPS = [b"r\xff\xff\xff\x7f", b"q\x05", b"h\x07", b"j\x00\x00\x01\x00", b"R", b"0", b"2", b"(", b"e", b"u", b"s",
        b"a", b"t", b"b", b"\x85", b"\x86", b"\x87", b".", b"N", b"]", b"}", b")", b"K\x00", b"J\xff\xff\xff\xff",
        b"\x8a\x09" + b"\xff" * 9, b"\x94", b"\x95" + b"\xff" * 8, b"c__builtin__\neval\n", b"\x93"]


def mutate(data: bytes, rng: random.Random) -> bytes:
    d = bytearray(data)
    kind = rng.randrange(7)
    i = rng.randrange(len(d))
    if kind == 0:
        d[i] = rng.randrange(256)
    elif kind == 1:
        for _ in range(rng.randint(1, 4)):
            d[rng.randrange(len(d))] ^= 1 << rng.randrange(8)
    elif kind == 2:  # an integer argument becomes extreme
        d[i:i + 4] = rng.choice([b"\xff\xff\xff\xff", b"\xff\xff\xff\x7f", b"\x00\x00\x00\x80", b"\x00\x00\x00\x00"])
    elif kind == 3:
        del d[i:i + rng.randint(1, 16)]
    elif kind == 4:
        j = rng.randrange(len(d))
        d[j:j] = d[i:i + rng.randint(1, 64)]
    elif kind == 5:
        d[i:i] = rng.choice(_OPS)
    else:
        del d[i:]
    return bytes(d)


def with_pkl(template: list[tuple[str, bytes]], pkl: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, data in template:
            zf.writestr(name, pkl if name.endswith("data.pkl") else data)
    return buf.getvalue()


def overwrite(path: Path, data: bytes) -> None:
    """Replace a file's bytes in place (re-creating a file per case costs more than the parse)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


def members(path: Path) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(path) as zf:
        return [(i.filename, zf.read(i)) for i in zf.infolist()]


def check_parse(path: Path, *, lenient: bool) -> str:
    """Parse and read every tensor; 'error' for a NeoXConvError naming the file, 'ok' when the result
    agrees with torch.load (where torch.load can load it at all). Anything else raises."""
    try:
        archive = read_pt(path, lenient=lenient)
        if lenient:
            node = archive.objects.get("module") if isinstance(archive.objects, dict) else None
            refs = archive.tensors(("module",)) if isinstance(node, dict) else {}
        else:
            refs = archive.tensors()
        got = {}
        with SourceReader() as reader, reader.scope() as reads:
            for k, ref in refs.items():
                got[k] = reads.read(ref, key=k)
    except NeoXConvError as e:
        assert path.name in str(e), str(e)
        assert len(str(e)) < 2000
        return "error"
    if not lenient:
        try:
            want = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # torch refuses what we accept (e.g. bytes after STOP): nothing to compare
            return "ok"
        if isinstance(want, dict) and all(isinstance(v, torch.Tensor) for v in want.values()):
            assert set(want) == set(got)
            for k, v in want.items():
                a = v.view(torch.uint16) if v.dtype == torch.bfloat16 else v
                assert tuple(a.shape) == got[k].shape and a.numpy().tobytes() == got[k].tobytes(), k
    return "ok"


CHILD = r"""
import json, random, resource, shutil, sys
from pathlib import Path
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[4]) << 20, int(sys.argv[4]) << 20))
sys.path.insert(0, sys.argv[3])
from neoxconv.output.hf_merge import MergeOptions, merge_checkpoint
from neoxconv.errors import NeoXConvError
from test_ptfile import members, mutate, overwrite, with_pkl

src, work = Path(sys.argv[1]), Path(sys.argv[2])
victim = next(src.glob("global_step*")) / "layer_02-model_01-model_states.pt"
template = members(victim)
pkl = next(d for n, d in template if n.endswith("data.pkl"))
rng = random.Random(int(sys.argv[5]))
codes = []
for case in range(int(sys.argv[6])):
    overwrite(victim, with_pkl(template, mutate(pkl, rng) or b"."))
    out = work / f"out{case}"
    try:
        merge_checkpoint(src, out, MergeOptions(quiet=True))
        codes.append(0)
    except NeoXConvError as e:
        codes.append(e.exit_code if victim.name in str(e) or "layer 02" in str(e) else -2)
    except MemoryError:
        codes.append(-3)
    shutil.rmtree(out, ignore_errors=True)
print(json.dumps(codes))
"""


@pytest.mark.parametrize("source", ["layer", "bookkeeping"])
def test_fuzzed_data_pkl_with_valid_crc_in_process(tmp_path, source):
    if source == "layer":
        base = COMMITTED_FIXTURE / STEP / "layer_02-model_00-model_states.pt"
        name, lenient, cases = base.name, False, 1200
    else:  # a genuine state_dict() of ZeRO views, cuda:0 tags, DeepSpeed/gpt-neox bookkeeping
        write_real_checkpoint(tmp_path / "ck", WriterSpec(tp=1, layout="sequential", num_layers=1, hidden_size=32))
        base = tmp_path / "ck" / "global_step1000" / "mp_rank_00_model_states.pt"
        name, lenient, cases = base.name, True, 800
    template = members(base)
    pkl = next(d for n, d in template if n.endswith("data.pkl"))
    rng = random.Random(8)
    outcomes = {"ok": 0, "error": 0}
    path = tmp_path / name
    for case in range(cases):
        data = pkl
        for _ in range(rng.choice([1, 1, 2, 3])):
            data = mutate(data, rng) or b"."
        overwrite(path, with_pkl(template, data))
        try:
            outcomes[check_parse(path, lenient=lenient)] += 1
        except AssertionError:
            raise
        except Exception as e:  # an internal error: show the case
            raise AssertionError(f"case {case}: {type(e).__name__}: {e!s:.300}") from e
    assert outcomes["error"] > cases // 4 and outcomes["ok"] > 0, outcomes


def test_fuzzed_data_pkl_merges_end_to_end_under_a_memory_cap(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(COMMITTED_FIXTURE, src)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(Path(__file__).parent)])}
    res = subprocess.run([sys.executable, "-c", CHILD, str(src), str(tmp_path), str(REPO), "2048", "5", "12"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    codes = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(codes) <= {0, 4, 5}, codes  # a merge, a checkpoint error, a merge error; never internal/OOM
    assert codes.count(4) >= 3, codes


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


# ---- state leaking across files ----------------------------------------------------------------------
def _build_on(module: str, name: str, attr: str, value: str) -> bytes:
    """Opcodes that apply BUILD to an allow-listed global, then drop it (a prefix for any pickle)."""
    def s(x: str) -> bytes:
        b = x.encode()
        return b"X" + struct.pack("<I", len(b)) + b
    return b"c" + f"{module}\n{name}\n".encode() + b"}" + s(attr) + s(value) + b"sb0"


# ---- resource exhaustion from tiny inputs ------------------------------------------------------------
def _nested_shared(levels: int) -> list:
    x: list = []
    for _ in range(levels):
        x = [x, x]  # each list holds the previous one twice: 2**levels leaves, a few hundred pickle bytes
    return x


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


def _payload_file(path, marker, module):
    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    torch.save({"module": module, "args": Payload(), "iteration": 1}, path)


def test_bookkeeping_files_never_run_code(tmp_path, make_checkpoint):
    marker = tmp_path / "payload-ran"
    # pipeline layout: the mp_rank files are not even opened
    shutil.copytree(COMMITTED_FIXTURE, tmp_path / "pipe")
    _payload_file(tmp_path / "pipe" / STEP / "mp_rank_00_model_states.pt", marker, None)
    merge_checkpoint(tmp_path / "pipe", tmp_path / "out1", MergeOptions(quiet=True))
    # sequential layout: the weights live in them; everything but the tensors is inert
    root, _, _ = make_checkpoint(2, "sequential", "float16")
    shutil.copytree(root, tmp_path / "seq")
    path = tmp_path / "seq" / STEP / "mp_rank_01_model_states.pt"
    module = torch.load(path, weights_only=False)["module"]  # our own fixture, written by this test session
    _payload_file(path, marker, module)
    merge_checkpoint(tmp_path / "seq", tmp_path / "out2", MergeOptions(quiet=True))
    assert not marker.exists()


# ---- persistent ids as torch reads them --------------------------------------------------------------------
@pytest.mark.parametrize("extra", [b"N", b"NN"], ids=["6 fields", "7 fields"])
def test_a_persistent_id_with_more_than_five_fields_is_refused_as_torch_refuses_it(tmp_path, extra):
    """torch unpacks a storage's persistent id as exactly (typename, storage type, key, location, numel)
    (serialization.py persistent_load): one with more fields fails there, so neoxconv refuses it too."""
    import re

    src = copy_fixture(tmp_path)
    victim = src / STEP / "layer_02-model_00-model_states.pt"
    rezip(victim, pkl=lambda d: re.sub(rb"(X\x03\x00\x00\x00cpuq.K.)t", lambda m: m.group(1) + extra + b"t", d,
                                       count=1, flags=re.S))
    with pytest.raises(Exception):  # noqa: B017  (torch raises a ValueError or an UnpicklingError)
        torch.load(victim, map_location="cpu", weights_only=True)
    with pytest.raises(CheckpointError, match="persistent id"):
        read_pt(victim)
    rc, err, _ = run_cli("merge", str(src), str(tmp_path / "out"), "--quiet")
    assert rc == 4 and "layer_02-model_00-model_states.pt" in err and "Traceback" not in err, err
