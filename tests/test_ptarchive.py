"""`neoxconv.output.ptarchive` writes what ``torch.save`` writes, without torch, streaming storage by storage.

Every shard below is written twice, by ``torch.save`` and by `PtArchiveWriter` fed the tensors' bytes in
small blocks, and compared: what ``torch.load(weights_only=True)`` gives back, the zip structure (member
names, order, offsets, 64-byte data alignment), the whole file byte for byte (the serialization id
included), neoxconv's own reader and DeepSpeed's loaders. Zip64 is checked on a sparse file whose largest
member is over 4 GiB without writing that data.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import subprocess
import sys
import zipfile
import zlib
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from neoxconv.output.ptarchive import (
    ALIGNMENT,
    PtArchiveWriter,
    TensorSpec,
    archive_name_for,
    plan_archive,
)
from neoxconv.source.ptfile import read_pt

_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32", torch.int64: "int64"}


# ----- helpers: a torch object -> (specs, byte blocks) ---------------------------------------------------------
def _spec(obj):
    """``obj`` with every tensor replaced by its TensorSpec (containers rebuilt with the same types)."""
    if isinstance(obj, torch.Tensor):
        return TensorSpec(_DTYPES[obj.dtype], tuple(obj.shape))
    if isinstance(obj, dict):
        return type(obj)((k, _spec(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_spec(v) for v in obj)
    return obj


def _tensors(obj, out=None):
    """The tensors of ``obj`` in pickling order (the order torch numbers their storages)."""
    out = [] if out is None else out
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _tensors(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _tensors(v, out)
    return out


def _raw(t: torch.Tensor) -> memoryview:
    """The tensor's bytes, without a copy (bfloat16 through its int16 bits)."""
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return memoryview(t.numpy().reshape(-1).view(np.uint8))


def _write_ours(obj, path, *, block=4096, on_bytes=None):
    layout = plan_archive(_spec(obj), archive_name=archive_name_for(path))
    with open(path, "wb") as f:
        w = PtArchiveWriter(f.write, layout, on_bytes=on_bytes)
        for i, t in enumerate(_tensors(obj)):
            raw = _raw(t)
            for start in range(0, len(raw), block):
                w.write(i, raw[start : start + block])
        result = w.finish()
    assert result.size == layout.size == os.path.getsize(path)
    return layout, result


def _pair(obj, tmp_path, name="layer_02-model_00-model_states.pt", **kw):
    """(torch.save's file, our file): same file name in two folders, so the archive names agree."""
    (tmp_path / "torch").mkdir(exist_ok=True)
    (tmp_path / "ours").mkdir(exist_ok=True)
    ref, mine = tmp_path / "torch" / name, tmp_path / "ours" / name
    torch.save(obj, ref)
    _write_ours(obj, mine, **kw)
    return ref, mine


def _bitwise_equal(a, b) -> None:
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape, a.stride(), a.storage_offset()) == (b.dtype, b.shape, b.stride(), b.storage_offset())
        assert bytes(_raw(a)) == bytes(_raw(b))
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _bitwise_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _bitwise_equal(x, y)
    else:
        assert a == b


def _layer(seed=0):
    g = torch.Generator().manual_seed(seed)
    return OrderedDict([
        ("input_layernorm.weight", torch.randn(64, generator=g).half()),
        ("attention.query_key_value.weight", torch.randn(96, 64, generator=g).half()),
        ("attention.rotary_emb.inv_freq", torch.rand(4, generator=g)),  # fp32 next to fp16, as DeepSpeed writes
        ("attention.dense.weight", torch.randn(64, 32, generator=g).half()),
    ])


def _shards():
    g = torch.Generator().manual_seed(1)
    big = torch.randn(300, 300, generator=g)  # 360 KB: > 64 KiB, many blocks
    return {
        "layer_fp16_ordereddict": _layer(),
        "bf16_and_shapes": OrderedDict([
            ("scalar", torch.tensor(3.5)), ("vec", torch.randn(7, generator=g).bfloat16()),
            ("mat", torch.randn(3, 5, generator=g).bfloat16()), ("empty", torch.zeros(0, dtype=torch.bfloat16)),
            ("empty2d", torch.zeros(4, 0)), ("cube", torch.randn(2, 3, 4, generator=g)),
            ("ids", torch.arange(-3, 9, dtype=torch.int64)),
            ("specials", torch.tensor([float("inf"), -0.0, 1e-8]).half()),
        ]),
        "large_fp32": OrderedDict([("big", big), ("after", torch.ones(3))]),
        "plain_dict": {f"w{i}": torch.full((i % 4 + 1,),
                                           float(i)).half() for i in range(20)},  # DeeperSpeed {k: v.cpu()}
        "many_tensors": OrderedDict((f"t{i}", torch.full((i % 3,), i, dtype=torch.float16)) for i in range(1003)),
        "mp_rank_sequential": {
            "module": OrderedDict((f"sequential.{i}.weight", torch.randn(4, 4, generator=g).half()) for i in (0, 2, 3)),
            "buffer_names": [], "global_steps": 3, "global_samples": 0, "skipped_steps": 0, "iteration": 3,
            "mp_world_size": 1, "dp_world_size": 1,
        },
        "mp_rank_bookkeeping": {
            "module": None, "buffer_names": [], "global_steps": 150000, "global_samples": 2**40, "skipped_steps": -1,
            "iteration": 70000, "mp_world_size": 2, "dp_world_size": 1, "lr": 1.5e-4, "ok": True,
            "args": ("a", ["b", 1, None], {"c": 2.0}), "many": list(range(1001)),
        },
    }


SHARDS = _shards()


# ----- (a) torch.load reads the same objects; (b) the same archive; byte-identical -------------------------------
@pytest.mark.parametrize("name", SHARDS)
def test_torch_load_gives_back_what_torch_save_would(tmp_path, name):
    ref, mine = _pair(SHARDS[name], tmp_path)
    theirs, ours = torch.load(ref, weights_only=True), torch.load(mine, weights_only=True)
    _bitwise_equal(theirs, ours)
    _bitwise_equal(SHARDS[name], ours)
    _bitwise_equal(theirs, torch.load(mine, weights_only=True, mmap=True))


@pytest.mark.parametrize("name", SHARDS)
def test_archive_structure_matches_torch_save(tmp_path, name):
    ref, mine = _pair(SHARDS[name], tmp_path)

    def structure(path):
        with open(path, "rb") as f, zipfile.ZipFile(f) as zf:
            rows = []
            for info in zf.infolist():
                f.seek(info.header_offset)
                fixed = f.read(30)
                name_len, extra_len = struct.unpack("<HH", fixed[26:30])
                data = info.header_offset + 30 + name_len + extra_len
                rows.append((info.filename, info.header_offset, data, info.file_size, info.compress_type,
                             info.flag_bits, info.CRC))
            return rows

    theirs, ours = structure(ref), structure(mine)
    assert [r[0] for r in ours] == [r[0] for r in theirs]  # names and order
    assert ours == theirs  # offsets, sizes, flags, CRCs
    stem = "layer_02-model_00-model_states/"
    assert [r[0] for r in ours][:4] == [stem + n for n in ("data.pkl", ".format_version", ".storage_alignment",
                                                           "byteorder")]
    assert all(r[2] % ALIGNMENT == 0 for r in ours)  # every record's data 64-byte aligned
    assert all(r[4] == zipfile.ZIP_STORED for r in ours)


@pytest.mark.parametrize("name", SHARDS)
def test_whole_file_is_byte_identical_to_torch_save(tmp_path, name):
    ref, mine = _pair(SHARDS[name], tmp_path, block=1000)
    assert mine.read_bytes() == ref.read_bytes()  # the serialization id included


@pytest.mark.parametrize("count", [0, 1, 2, 6, 7, 12, 13, 40, 120, 300, 2500])
def test_serialization_id_follows_torch_for_any_number_of_records(tmp_path, count):
    """The id hashes the record names in libstdc++'s unordered_set order, which reshuffles at each rehash."""
    obj = OrderedDict((f"k{i}", torch.full((i % 3 + 1,), float(i))) for i in range(count))
    ref, mine = _pair(obj, tmp_path, name=f"shard_{count}.pt")
    assert mine.read_bytes() == ref.read_bytes()


def test_a_storage_that_starts_like_a_data_descriptor_gets_torchs_id(tmp_path):
    """torch's writer mistakes any buffer starting with PK\\x07\\x08 for a data descriptor in its id."""
    obj = {"x": torch.tensor([0x0000000508074B50, 7], dtype=torch.int64), "y": torch.ones(2)}
    assert bytes(_raw(obj["x"]))[:4] == b"PK\x07\x08"
    ref, mine = _pair(obj, tmp_path)
    assert mine.read_bytes() == ref.read_bytes()


def test_archive_names_follow_torch(tmp_path):
    assert archive_name_for("/a/b/layer_02-model_00-model_states.pt") == "layer_02-model_00-model_states"
    assert archive_name_for("x.tar.pt") == "x.tar" and archive_name_for("noext") == "noext"
    with pytest.raises(ValueError):
        archive_name_for("dir/.pt")
    obj = _layer()
    buf = io.BytesIO()
    torch.save(obj, buf)  # a file object: torch names the folder "archive"
    layout = plan_archive(_spec(obj), archive_name="archive")
    out = io.BytesIO()
    w = PtArchiveWriter(out.write, layout)
    for i, t in enumerate(_tensors(obj)):
        w.write(i, _raw(t))
    w.finish()
    assert out.getvalue() == buf.getvalue()


# ----- (c) neoxconv's reader; (d) DeepSpeed's loaders -------------------------------------------------------------
@pytest.mark.parametrize("name", ["layer_fp16_ordereddict", "bf16_and_shapes", "large_fp32", "mp_rank_sequential"])
def test_neoxconv_reader_reads_it(tmp_path, name):
    obj = SHARDS[name]
    ref, mine = _pair(obj, tmp_path)
    where = ("module",) if "module" in obj else ()
    ours, theirs = read_pt(mine).tensors(where), read_pt(ref).tensors(where)
    flat = obj.get("module", obj)
    assert list(ours) == list(theirs) == list(flat)
    for key, t in flat.items():
        a, b = ours[key], theirs[key]
        assert (a.dtype, a.shape, a.stride, a.data_offset, a.storage_nbytes, a.storage_crc, a.covers_storage) == (
            b.dtype, b.shape, b.stride, b.data_offset, b.storage_nbytes, b.storage_crc, b.covers_storage)
        assert (a.dtype, a.shape) == (_DTYPES[t.dtype], tuple(t.shape))
        assert a.array().tobytes() == bytes(_raw(t))
        assert a.storage_crc == zlib.crc32(bytes(_raw(t)))


@pytest.fixture(scope="module")
def ds():
    """DeepSpeed's loading code (as tests/test_deepspeed_load.py drives it: CPU, no process group)."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import (
        TorchCheckpointEngine,
    )
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.pipe.module import PipelineModule
    from deepspeed.runtime.state_dict_factory import SDLoaderFactory

    return SimpleNamespace(engine=TorchCheckpointEngine(), DeepSpeedEngine=DeepSpeedEngine,
                           PipelineModule=PipelineModule, SDLoaderFactory=SDLoaderFactory)


def test_deepspeed_pipeline_loader_reads_layer_files(tmp_path, ds):
    """`PipelineModule.load_state_dir` globs ``layer_XX-*model_states.pt``, picks each rank's file, loads strict."""
    tp = 2
    full = nn.Linear(8, 6)
    for rank in range(tp):  # a column-parallel layer: each rank holds 3 output rows
        shard = OrderedDict(weight=full.weight.detach()[rank * 3 : (rank + 1) * 3].clone().half(),
                            bias=full.bias.detach()[rank * 3 : (rank + 1) * 3].clone().half())
        _write_ours(shard, tmp_path / f"layer_01-model_{rank:02d}-model_states.pt", block=7)
    for rank in range(tp):
        module = ds.PipelineModule.__new__(ds.PipelineModule)  # no process group: set what load_state_dir uses
        nn.Module.__init__(module)
        module.forward_funcs = [lambda x: x, nn.Linear(8, 3).half()]
        module._local_start, module.tied_comms = 0, {}
        module._grid = SimpleNamespace(get_slice_parallel_rank=lambda r=rank: r,
                                       get_slice_parallel_world_size=lambda: tp)
        module.load_state_dir(str(tmp_path), checkpoint_engine=ds.engine, strict=True)
        assert torch.equal(module.forward_funcs[1].weight, full.weight.detach()[rank * 3 : (rank + 1) * 3].half())


def test_deepspeed_engine_reads_mp_rank_files(tmp_path, ds):
    """The sequential layout's ``module`` through `DeepSpeedEngine.load_module_state_dict` (strict), and the
    pipeline layout's bookkeeping (``module: None``) through the same SD loader."""
    model = nn.Sequential(OrderedDict([("0", nn.Linear(4, 4)), ("2", nn.LayerNorm(4))])).half()
    book = {"module": model.state_dict(), "buffer_names": [], "global_steps": 5, "global_samples": 0,
            "skipped_steps": 0, "iteration": 5, "mp_world_size": 1, "dp_world_size": 1}
    path = tmp_path / "mp_rank_00_model_states.pt"
    _write_ours(book, path)
    _, checkpoint, _ = ds.SDLoaderFactory.get_sd_loader([str(path)], checkpoint_engine=ds.engine).load(1, 0)
    fresh = nn.Sequential(OrderedDict([("0", nn.Linear(4, 4)), ("2", nn.LayerNorm(4))])).half()
    ds.DeepSpeedEngine.load_module_state_dict(SimpleNamespace(module=fresh), checkpoint=checkpoint, strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value)
    assert (checkpoint["iteration"], checkpoint["mp_world_size"]) == (5, 1)

    _write_ours({**book, "module": None}, path)
    _, checkpoint, _ = ds.SDLoaderFactory.get_sd_loader([str(path)], checkpoint_engine=ds.engine).load(
        1, 0, is_pipe_parallel=True)
    assert checkpoint["module"] is None and checkpoint["global_steps"] == 5


# ----- (e) zip64 ---------------------------------------------------------------------------------------------------
def test_zip64_member_over_4gib_on_a_sparse_file(tmp_path):
    """A 4 GiB + 16 B storage (zip64 sizes) and a storage after it (zip64 offset), written as holes."""
    big = TensorSpec("float16", ((1 << 31) + 8,))
    obj = OrderedDict([("small", TensorSpec("float32", (3,))), ("big", big), ("after", TensorSpec("bfloat16", (2, 2)))])
    layout = plan_archive(obj, archive_name="shard")
    zeros = memoryview(bytes(64 << 20))
    path = tmp_path / "shard.pt"
    with open(path, "wb") as f:
        def sparse_write(data):  # our zero block becomes a hole: nothing is written or held
            if isinstance(data, memoryview) and data.obj is zeros.obj:
                f.seek(len(data), os.SEEK_CUR)
            else:
                f.write(data)

        w = PtArchiveWriter(sparse_write, layout)
        w.write(0, np.array([1, 2, 3], dtype=np.float32))
        left = big.nbytes
        while left:
            n = min(left, len(zeros))
            w.write(1, zeros[:n])
            left -= n
        w.write(2, np.array([1, 2, 3, 4], dtype=np.uint16))
        result = w.finish()
    assert os.path.getsize(path) == result.size == layout.size
    crc_zeros = 0
    for _ in range(big.nbytes // len(zeros)):
        crc_zeros = zlib.crc32(zeros, crc_zeros)
    crc_zeros = zlib.crc32(zeros[: big.nbytes % len(zeros)], crc_zeros)
    assert result.crcs[1] == crc_zeros

    with zipfile.ZipFile(path) as zf:  # Python's parser: sizes from the zip64 extra fields, CRCs of the rest
        infos = {i.filename: i for i in zf.infolist()}
        assert infos["shard/data/1"].file_size == big.nbytes
        assert infos["shard/data/2"].header_offset > 1 << 32
        assert zf.read("shard/data/2") == np.array([1, 2, 3, 4], dtype=np.uint16).tobytes()
        assert zf.read("shard/version") == b"3\n"
    loaded = torch.load(path, weights_only=True, mmap=True)  # torch's reader, without touching the hole
    assert loaded["big"].shape == (big.numel,) and loaded["big"].dtype == torch.float16
    assert torch.equal(loaded["after"].view(torch.int16), torch.tensor([[1, 2], [3, 4]], dtype=torch.int16))
    assert read_pt(path).tensors()["after"].data_offset % ALIGNMENT == 0


def test_zip64_descriptor_and_directory_records(tmp_path):
    """The planned records (no data written): miniz's zip64 fields, 24-byte descriptors, capped 32-bit fields."""
    obj = OrderedDict([("big", TensorSpec("float32", (1 << 30,))), ("after", TensorSpec("float32", (1,)))])
    layout = plan_archive(obj, archive_name="a")
    big, after = layout.storages
    assert big.size == 1 << 32 and big.zip64 and after.offset > 1 << 32 and after.zip64
    extra = big.header[30 + len(big.path):]
    assert extra[:4] == struct.pack("<HH", 1, 16) and struct.unpack("<QQ", extra[4:20]) == (1 << 32, 0)
    assert extra[20:22] == b"FB" and big.data_offset % ALIGNMENT == 0
    extra = after.header[30 + len(after.path):]
    assert extra[:4] == struct.pack("<HH", 1, 8) and struct.unpack("<Q", extra[4:12]) == (after.offset,)
    assert after.data_offset % ALIGNMENT == 0
    assert big.end == big.data_offset + big.size + 24  # 8-byte sizes in the descriptor
    assert layout.members[0].end == layout.members[0].data_offset + layout.members[0].size + 16


# ----- (f) CRC, hash, wrong lengths --------------------------------------------------------------------------------
def test_streamed_crc_and_running_hash_match_the_file(tmp_path):
    obj = SHARDS["large_fp32"]
    h = hashlib.sha256()
    path = tmp_path / "x.pt"
    layout, result = _write_ours(obj, path, block=4093, on_bytes=h.update)
    data = path.read_bytes()
    assert h.hexdigest() == hashlib.sha256(data).hexdigest()  # hashed while written, never re-read
    for m, crc, t in zip(layout.storages, result.crcs, _tensors(obj)):
        assert crc == zlib.crc32(data[m.data_offset : m.data_offset + m.size]) == zlib.crc32(bytes(_raw(t)))
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None  # every member's CRC as the directory records it
        assert zf.read("x/.data/serialization_id").decode() == result.serialization_id


def test_a_wrong_length_stream_is_refused(tmp_path):
    layout = plan_archive(OrderedDict(a=TensorSpec("float16", (4,)), b=TensorSpec("float32", (2,))), archive_name="x")
    w = PtArchiveWriter(io.BytesIO().write, layout)
    with pytest.raises(ValueError, match=r"storage 0 \('a'\) gets 10 bytes, more than its 8"):
        w.write(0, bytes(10))
    w.write(0, bytes(6))
    with pytest.raises(ValueError, match=r"bytes for storage 1 while storage 0 \('a'\) with 2 more bytes is due"):
        w.write(1, bytes(8))
    with pytest.raises(ValueError, match="storage 0 .* is due"):
        w.finish()
    w.write(0, bytes(2))
    w.write(1, bytes(4))
    with pytest.raises(ValueError, match=r"finished while storage 1 \('b'\) with 4 more bytes is due"):
        w.finish()
    with pytest.raises(ValueError, match="bytes for storage 0 while storage 1"):
        w.write(0, bytes(1))  # going back


def test_empty_storages_need_no_call_and_a_short_sink_write_is_an_error(tmp_path):
    obj = OrderedDict(a=torch.zeros(0), b=torch.ones(2), c=torch.zeros(3, 0), d=torch.ones(1))
    layout = plan_archive(_spec(obj), archive_name="layer_02-model_00-model_states")
    out = io.BytesIO()
    w = PtArchiveWriter(out.write, layout)
    w.write(1, _raw(obj["b"]))
    w.write(3, _raw(obj["d"]))
    w.finish()
    buf = io.BytesIO()
    torch.save(obj, buf)
    assert zipfile.ZipFile(buf).namelist()[0].startswith("archive/")
    ref, _ = _pair(obj, tmp_path)
    assert out.getvalue() == ref.read_bytes()
    with pytest.raises(OSError, match="short write"):
        PtArchiveWriter(lambda data: 1, layout)


def test_what_cannot_be_pickled_is_refused_by_name():
    with pytest.raises(TypeError, match="module/w: a bytes cannot go into a torch archive"):
        plan_archive({"module": {"w": b"raw"}}, archive_name="x")
    with pytest.raises(TypeError, match="ndarray"):
        plan_archive({"w": np.zeros(2)}, archive_name="x")
    with pytest.raises(ValueError, match="no torch storage"):
        TensorSpec("float8", (2,))
    with pytest.raises(ValueError, match="non-negative"):
        TensorSpec("float16", (-1,))


def test_bench_runs_and_writes_torchs_bytes(tmp_path):
    bench = Path(__file__).resolve().parents[1] / "bench" / "ptarchive_bench.py"
    proc = subprocess.run([sys.executable, str(bench), "--mb", "1", "--repeat", "1", "--workdir", str(tmp_path)],
                          check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ptarchive + BLAKE3 while writing" in proc.stdout and "same bytes as torch.save: yes" in proc.stdout
