"""Write ``torch.save`` archives without torch, storage by storage, byte for byte as torch 2.13 writes them.

A ``.pt`` file is a zip of stored (uncompressed) members, all under one folder named after the file
(``torch.save(obj, ".../layer_02-model_00-model_states.pt")`` writes ``layer_02-model_00-model_states/...``;
a file object gets ``archive/...``). Torch's writer (``caffe2/serialize/inline_container.cc`` over miniz
3.0.2, opened with ``MZ_ZIP_FLAG_WRITE_ZIP64``) writes, in this order::

    data.pkl, .format_version ("1"), .storage_alignment ("64"), byteorder ("little"),
    data/0, data/1, ... (one per storage, in the order the pickle first meets them),
    version ("3\\n"), .data/serialization_id (40 digits),
    central directory, zip64 end-of-central-directory record and locator, end-of-central-directory record.

Each member: a 30-byte local header with CRC and sizes zeroed and flags 0x0808 (UTF-8 names, sizes in a
data descriptor; 0x0800 and no descriptor for an empty member), the name, a zip64 extra field where the
size or the header's offset reaches 2**32 - 1, then an ``FB`` extra field padded with ``Z`` so that the
data starts on a multiple of 64 bytes, the data, and a data descriptor (``PK\\x07\\x08``, CRC-32, sizes:
4-byte, or 8-byte with the zip64 extra). Times, dates and attributes are zero. So every header and every
offset follows from the names and sizes alone, and only the CRCs, which come after the data, depend on the
bytes: an archive can be written front to back while its storages stream through, each CRC-32 and the
file's hash computed while the bytes are in cache, never re-read.

The serialization id is torch's too: the libstdc++ ``std::hash`` of every record name combined in the
iteration order of torch's ``std::unordered_set`` (as Linux builds of torch compute it), then the CRCs of
the data descriptors combined in write order; so the whole file equals torch's (tests/test_ptarchive.py).

The pickle (``data.pkl``, protocol 2) is built opcode by opcode, as Python's C pickler writes it for torch
(same memo numbering), because the standard pickler would import torch to check the globals it names.
"""

from __future__ import annotations

import math
import os
import struct
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from neoxconv.source.checksums import crc32
from neoxconv.source.ptfile import _STORAGES, NUMPY_DTYPES

ALIGNMENT = 64  # torch.utils.serialization.config.save.storage_alignment (its default)
_U32 = 0xFFFFFFFF
_FIXED_HEAD = ((".format_version", b"1"), (".storage_alignment", str(ALIGNMENT).encode()), ("byteorder", b"little"))
_VERSION = ("version", b"3\n")
_ID_NAME = ".data/serialization_id"
_ID_SIZE = 40
_STORAGE_CLASS = {dtype: name for name, dtype in _STORAGES.items()}  # "float16" -> "HalfStorage"


# ----- what goes into the archive ----------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the pickle: a contiguous tensor with a storage of its own (what ``.clone()`` /
    ``.contiguous()`` and every checkpoint writer here save). Its bytes are streamed later."""

    dtype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.dtype not in _STORAGE_CLASS:
            raise ValueError(f"dtype {self.dtype!r} has no torch storage; use one of {', '.join(_STORAGE_CLASS)}")
        if not all(type(s) is int and s >= 0 for s in self.shape):
            raise ValueError(f"shape {self.shape!r} is not a tuple of non-negative ints")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * NUMPY_DTYPES[self.dtype].itemsize


@dataclass(frozen=True)
class Member:
    """One zip member: its name inside the archive folder, size, and where its local header starts."""

    name: str  # e.g. "data/0"
    path: bytes  # the name in the zip: "<archive name>/data/0"
    size: int
    offset: int
    header: bytes  # local header, path, extra fields (zip64, alignment padding)

    @property
    def zip64(self) -> bool:
        return self.size >= _U32 or self.offset >= _U32

    @property
    def data_offset(self) -> int:
        return self.offset + len(self.header)

    @property
    def end(self) -> int:
        """Offset just past the member (its data descriptor included)."""
        return self.data_offset + self.size + (0 if not self.size else 24 if self.zip64 else 16)


@dataclass(frozen=True)
class PtLayout:
    """Everything about an archive that does not depend on the tensors' bytes, decided up front."""

    archive_name: str
    pickle: bytes
    tensors: tuple[TensorSpec, ...]  # storage order: tensors[i] is data/i
    tensor_names: tuple[str, ...]  # where each sits in the object ("module/sequential.0.weight"), for errors
    members: tuple[Member, ...]  # every member, in file order
    name_hash: int  # first half of the serialization id

    @property
    def storages(self) -> tuple[Member, ...]:
        first = 1 + len(_FIXED_HEAD)
        return self.members[first : first + len(self.tensors)]

    @property
    def central_directory_offset(self) -> int:
        return self.members[-1].end

    @property
    def size(self) -> int:
        """Size of the whole file."""
        cd = sum(46 + len(m.path) + len(_zip64_extra(m.size, m.offset, central=True)) for m in self.members)
        return self.central_directory_offset + cd + 56 + 20 + 22


def archive_name_for(path: str | os.PathLike) -> str:
    """The folder name torch gives the records of ``torch.save(obj, path)``: the file name without its last
    extension (``layer_02-model_00-model_states.pt`` -> ``layer_02-model_00-model_states``)."""
    base = os.fspath(path).replace("\\", "/").rsplit("/", 1)[-1]
    stem = base[: base.rfind(".")] if "." in base else base
    if not stem:
        raise ValueError(f"{os.fspath(path)!r}: torch cannot name an archive after this file name")
    return stem


def plan_archive(obj: Any, *, archive_name: str) -> PtLayout:
    """The layout of ``torch.save(obj', path)`` where ``obj`` is ``obj'`` with every tensor replaced by its
    `TensorSpec`: a dict / OrderedDict (nested freely with lists, tuples, str, int, float, bool, None)."""
    if not archive_name or "/" in archive_name:
        raise ValueError(f"archive name {archive_name!r} must be a non-empty name without '/'")
    pickler = _TorchPickler()
    payload = pickler.dumps(obj)
    sizes = [("data.pkl", len(payload)), *((n, len(b)) for n, b in _FIXED_HEAD)]
    sizes += [(f"data/{i}", t.nbytes) for i, t in enumerate(pickler.tensors)]
    sizes += [(_VERSION[0], len(_VERSION[1])), (_ID_NAME, _ID_SIZE)]
    members: list[Member] = []
    cursor = 0
    for name, size in sizes:
        path = f"{archive_name}/{name}".encode()
        m = Member(name, path, size, cursor, _local_header(path, size, cursor))
        members.append(m)
        cursor = m.end
    names = [name for name, _ in sizes[:-1]]  # the id is computed before its own record is written
    return PtLayout(archive_name=archive_name, pickle=payload, tensors=tuple(pickler.tensors),
                    tensor_names=tuple(pickler.tensor_names), members=tuple(members),
                    name_hash=_record_name_hash(names))


# ----- streaming it out --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PtArchiveResult:
    size: int  # bytes written
    crcs: tuple[int, ...]  # CRC-32 of each storage, data/0 first
    serialization_id: str


@dataclass
class _Storage:
    """The storage being streamed."""

    index: int = 0
    written: int = 0  # bytes so far
    crc: int = 0
    head: bytes = b""  # its first 8 bytes (torch's serialization id looks at them)


class PtArchiveWriter:
    """Write one archive front to back through ``write``: the head now, the storages as they stream, the tail.

    ::

        layout = plan_archive(shard, archive_name=archive_name_for(final_path))
        w = PtArchiveWriter(f.write, layout, on_bytes=hasher.update)  # writes data.pkl and the small records
        for i, spec in enumerate(layout.tensors):
            for block in blocks_of(i):        # any contiguous buffers (memoryview, numpy array), any sizes
                w.write(i, block)             # CRC-32 accumulates while the block is in cache
        result = w.finish()                   # descriptors, version, serialization id, central directory

    ``write(buffer)`` must write all of it (``BufferedWriter.write``, a staged output file's ``write``);
    ``on_bytes(buffer)`` sees every byte of the file once, in order (a running hash). Storages go in order,
    each exactly ``layout.tensors[i].nbytes`` long (empty ones need no call): a block past a storage's end,
    a storage started before the previous one is complete, or `finish` before the last is complete raises
    ValueError naming the tensor. The writer keeps no tensor data: its memory is flat in the tensor sizes.
    """

    def __init__(self, write: Callable[[Any], Any], layout: PtLayout, *,
                 on_bytes: Callable[[Any], Any] | None = None, fill: Callable[..., None] | None = None) -> None:
        self.layout = layout
        self._write = write
        self._on_bytes = on_bytes
        self._fill = fill  # the sink's own ``fill(nbytes, fill, unit=)`` (`_AtomicFile.fill`), for `fill`
        self._pos = 0
        self._crcs: list[int] = []  # of every member so far, in file order (for the central directory)
        self._id_crc = 0  # torch's running combination of the data descriptors' CRCs
        self._s = _Storage()
        self._finished = False
        for m, data in zip(layout.members, (layout.pickle, *(data for _, data in _FIXED_HEAD))):
            self._emit_member(m, data)
        self._open_storage()

    @property
    def position(self) -> int:
        """Bytes written so far."""
        return self._pos

    def write(self, index: int, block) -> None:
        """Append ``block`` (any C-contiguous buffer) to storage ``index`` (``data/{index}``)."""
        mv = memoryview(block)
        n = mv.nbytes
        self._take(index, n)
        if not n:
            return
        mv = mv.cast("B")  # (refuses a non-contiguous buffer)
        self._emit(mv)
        self._took(mv)

    def fill(self, index: int, nbytes: int, fill: Callable[[memoryview], None], *, unit: int = 1) -> None:
        """Append ``nbytes`` to storage ``index`` by calling ``fill(view)`` on the sink's own buffer (no copy:
        the writer was given the sink's ``fill``); each view is CRC'd and hashed right after it is filled."""
        self._take(index, nbytes)
        if not nbytes:
            return
        if self._fill is None:
            raise ValueError(f"{self.layout.archive_name}: fill() needs a writer made with the sink's fill")

        def filled(view: memoryview) -> None:
            fill(view)
            if self._on_bytes is not None:
                self._on_bytes(view)
            self._pos += len(view)
            self._took(view)

        self._fill(nbytes, filled, unit=unit)

    def _take(self, index: int, n: int) -> None:
        """Check that ``n`` more bytes of storage ``index`` are due now (closing the storages before it)."""
        storages = self.layout.storages
        if self._finished:
            raise ValueError(f"{self.layout.archive_name}: write after finish()")
        while self._s.index < min(index, len(storages)) and self._s.written == storages[self._s.index].size:
            self._close_storage()
        s = self._s
        if s.index != index:
            raise ValueError(f"{self.layout.archive_name}: bytes for storage {index} while {self._due()} is due")
        if s.written + n > storages[index].size:
            raise ValueError(f"{self.layout.archive_name}: {self._what(index)} gets {s.written + n} bytes, "
                             f"more than its {storages[index].size}")

    def _took(self, mv: memoryview) -> None:
        """The storage's bytes ``mv`` are written: its CRC-32 and head."""
        s = self._s
        if len(s.head) < 8:
            s.head += bytes(mv[: 8 - len(s.head)])
        s.crc = crc32(mv, s.crc)
        s.written += len(mv)

    def finish(self) -> PtArchiveResult:
        """Close the last storage and write the tail; returns the size, the storages' CRCs and the id."""
        if self._finished:
            raise ValueError(f"{self.layout.archive_name}: finish() called twice")
        storages = self.layout.storages
        while self._s.index < len(storages):
            if self._s.written != storages[self._s.index].size:
                raise ValueError(f"{self.layout.archive_name}: finished while {self._due()} is due")
            self._close_storage()
        version, id_member = self.layout.members[-2:]
        self._emit_member(version, _VERSION[1])
        sid = f"{self.layout.name_hash:020d}{self._id_crc:020d}".encode()  # over what precedes it
        self._emit_member(id_member, sid)
        if self._pos != self.layout.central_directory_offset:  # the plan and the bytes disagree: a bug here
            raise RuntimeError(f"{self.layout.archive_name}: wrote {self._pos} bytes before the central "
                               f"directory, planned {self.layout.central_directory_offset}")
        self._emit(_central_directory(self.layout, self._crcs))
        self._finished = True
        first = 1 + len(_FIXED_HEAD)
        return PtArchiveResult(size=self._pos, crcs=tuple(self._crcs[first : first + len(storages)]),
                               serialization_id=sid.decode())

    # ----- internals -----
    def _emit(self, data) -> None:
        size = memoryview(data).nbytes
        n = self._write(data)
        if isinstance(n, int) and n != size:
            raise OSError(f"{self.layout.archive_name}: short write ({n} of {size} bytes)")
        if self._on_bytes is not None:
            self._on_bytes(data)
        self._pos += size

    def _emit_member(self, m: Member, data: bytes) -> None:
        """A small member whose bytes are at hand."""
        self._emit(m.header)
        self._emit(data)
        self._end_member(m, crc32(data), data)

    def _end_member(self, m: Member, crc: int, head: bytes) -> None:
        """After a member's data: its data descriptor (none for an empty member), and torch's running id."""
        self._crcs.append(crc)
        if not m.size:
            return
        # torch's writer combines the CRC field of every buffer it writes that starts like a data
        # descriptor: each descriptor's, and a member's data that happens to start with PK\x07\x08
        if m.size >= 8 and head[:4] == b"PK\x07\x08":
            self._id_crc = _hash_combine(self._id_crc, int.from_bytes(head[4:8], "little"))
        sizes = struct.pack("<QQ", m.size, m.size) if m.zip64 else struct.pack("<II", m.size, m.size)
        self._emit(struct.pack("<II", 0x08074B50, crc) + sizes)
        self._id_crc = _hash_combine(self._id_crc, crc)

    def _open_storage(self) -> None:
        if self._s.index < len(self.layout.storages):
            self._emit(self.layout.storages[self._s.index].header)

    def _close_storage(self) -> None:
        s = self._s
        self._end_member(self.layout.storages[s.index], s.crc, s.head)
        self._s = _Storage(index=s.index + 1)
        self._open_storage()

    def _what(self, index: int) -> str:
        return f"storage {index} ({self.layout.tensor_names[index]!r})"

    def _due(self) -> str:
        s = self._s
        if s.index >= len(self.layout.storages):
            return "nothing"
        return f"{self._what(s.index)} with {self.layout.storages[s.index].size - s.written} more bytes"


# ----- zip records ---------------------------------------------------------------------------------------------
def _zip64_extra(size: int, offset: int, *, central: bool) -> bytes:
    """miniz's zip64 extended-information field: the sizes when the size reaches 2**32-1, the local header's
    offset when that does. In the local header the compressed size is still 0 (miniz knows it only later)."""
    fields = b""
    if size >= _U32:
        fields += struct.pack("<QQ", size, size if central else 0)
    if offset >= _U32:
        fields += struct.pack("<Q", offset)
    return struct.pack("<HH", 1, len(fields)) + fields if fields else b""


def _local_header(full_name: bytes, size: int, offset: int) -> bytes:
    zip64 = _zip64_extra(size, offset, central=False)
    start = offset + 30 + len(full_name) + len(zip64) + 4
    pad = -start % ALIGNMENT
    extra = zip64 + b"FB" + struct.pack("<H", pad) + b"Z" * pad
    flags = 0x0800 | (0x0008 if size else 0)
    fixed = struct.pack("<IHHHHHIIIHH", 0x04034B50, 0, flags, 0, 0, 0, 0, 0, 0, len(full_name), len(extra))
    return fixed + full_name + extra


def _central_directory(layout: PtLayout, crcs: list[int]) -> bytes:
    out = bytearray()
    for m, crc in zip(layout.members, crcs, strict=True):
        name = m.path
        extra = _zip64_extra(m.size, m.offset, central=True)
        flags = 0x0800 | (0x0008 if m.size else 0)
        out += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 0, 0, flags, 0, 0, 0, crc, min(m.size, _U32),
                           min(m.size, _U32), len(name), len(extra), 0, 0, 0, 0, min(m.offset, _U32))
        out += name + extra
    cd_offset, cd_size, n = layout.central_directory_offset, len(out), len(layout.members)
    out += struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 0x031E, 0x002D, 0, 0, n, n, cd_size, cd_offset)
    out += struct.pack("<IIQI", 0x07064B50, 0, cd_offset + cd_size, 1)
    out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, min(n, 0xFFFF), min(n, 0xFFFF), min(cd_size, _U32),
                       min(cd_offset, _U32), 0)
    return bytes(out)


# ----- torch's serialization id --------------------------------------------------------------------------------
_M64 = (1 << 64) - 1
_MUL = 0xC6A4A7935BD1E995


def _shift_mix(v: int) -> int:
    return v ^ (v >> 47)


def _std_hash(data: bytes) -> int:
    """libstdc++'s ``std::hash<std::string>`` on 64-bit (``_Hash_bytes``, seed 0xc70f6907)."""
    n = len(data)
    aligned = n & ~7
    h = (0xC70F6907 ^ (n * _MUL)) & _M64
    for i in range(0, aligned, 8):
        k = (_shift_mix((int.from_bytes(data[i : i + 8], "little") * _MUL) & _M64) * _MUL) & _M64
        h = ((h ^ k) * _MUL) & _M64
    if n & 7:
        h = ((h ^ int.from_bytes(data[aligned:], "little")) * _MUL) & _M64
    return _shift_mix((_shift_mix(h) * _MUL) & _M64)


def _hash_combine(seed: int, value: int) -> int:
    """``c10::hash_combine`` on 64-bit ``size_t``."""
    return (seed ^ ((value + 0x9E3779B9 + (seed << 6) + (seed >> 2)) & _M64)) & _M64


# libstdc++'s _Prime_rehash_policy: bucket counts (the start of its __prime_list) and the small-n table
_PRIMES = (
    2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79, 83, 89, 97, 103, 109, 113,
    127, 137, 139, 149, 157, 167, 179, 193, 199, 211, 227, 241, 257, 277, 293, 313, 337, 359, 383, 409, 439, 467,
    503, 541, 577, 619, 661, 709, 761, 823, 887, 953, 1031, 1109, 1193, 1289, 1381, 1493, 1613, 1741, 1879, 2029,
    2179, 2357, 2549, 2753, 2971, 3209, 3469, 3739, 4027, 4349, 4703, 5087, 5503, 5953, 6427, 6949, 7517, 8123,
    8783, 9497, 10273, 11113, 12011, 12983, 14033, 15173, 16411, 17749, 19183, 20753, 22447, 24281, 26267, 28411,
    30727, 33223, 35933, 38873, 42043, 45481, 49201, 53201, 57557, 62233, 67307,
)
_FAST_BUCKETS = (2, 2, 2, 3, 5, 5, 7, 7, 11, 11, 11, 11, 13, 13)


def _unordered_set_order(names: list[str]) -> list[str]:
    """The iteration order of a libstdc++ ``std::unordered_set<std::string>`` after inserting ``names`` in
    order (a singly linked list; each bucket points at the node before its first; rehash at load factor 1)."""
    hashes = {s: _std_hash(s.encode()) for s in names}
    before_begin = object()
    nxt: dict[Any, Any] = {before_begin: None}
    buckets: dict[int, Any] = {}
    n_buckets, next_resize = 1, 0

    def rehash(n: int) -> None:
        nonlocal buckets, n_buckets
        p, nxt[before_begin], buckets, bbegin = nxt[before_begin], None, {}, 0
        while p is not None:
            following, b = nxt[p], hashes[p] % n
            if b not in buckets:
                nxt[p], nxt[before_begin] = nxt[before_begin], p
                buckets[b] = before_begin
                if nxt[p] is not None:
                    buckets[bbegin] = p
                bbegin = b
            else:
                nxt[p], nxt[buckets[b]] = nxt[buckets[b]], p
            p = following
        n_buckets = n

    for count, s in enumerate(names):
        if count + 1 > next_resize:
            min_buckets = max(count + 1, 0 if next_resize else 11)
            if min_buckets >= n_buckets:
                want = max(min_buckets + 1, 2 * n_buckets)
                if want < len(_FAST_BUCKETS):
                    n = _FAST_BUCKETS[want]
                elif want <= _PRIMES[-1]:
                    n = _PRIMES[bisect_left(_PRIMES, want, lo=6)]
                else:
                    raise ValueError(f"{len(names)} records in one archive: more than this writer can name")
                next_resize = n
                rehash(n)
            else:
                next_resize = n_buckets
        b = hashes[s] % n_buckets
        if b in buckets:
            nxt[s], nxt[buckets[b]] = nxt[buckets[b]], s
        else:
            nxt[s], nxt[before_begin] = nxt[before_begin], s
            if nxt[s] is not None:
                buckets[hashes[nxt[s]] % n_buckets] = s
            buckets[b] = before_begin
    out, p = [], nxt[before_begin]
    while p is not None:
        out.append(p)
        p = nxt[p]
    return out


def _record_name_hash(names: list[str]) -> int:
    h = 0
    for s in _unordered_set_order(names):
        h = _hash_combine(h, _std_hash(s.encode()))
    return h


# ----- the pickle --------------------------------------------------------------------------------------------
class _Global:
    """A class or function the pickle names (GLOBAL opcode); one object per name, memoised like one."""

    __slots__ = ("module", "name")

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name


_BATCH = 1000  # pickle's batch size for APPENDS / SETITEMS


class _TorchPickler:
    """Protocol-2 pickle bytes as ``torch.save``'s C pickler writes them: the same opcodes and memo numbers.

    Memoisation follows the C pickler: by object identity, for str, non-empty tuples, lists, dicts and
    reduced objects; a tensor's size, stride and persistent-id tuples are fresh objects in torch, so they
    are always written out (and memoised) anew.
    """

    def __init__(self) -> None:
        self.out = bytearray(b"\x80\x02")
        self.memo: dict[int, int] = {}  # id(obj) -> memo index
        self.n_memo = 0
        self.keep: list[Any] = []  # memoised objects stay alive, so their ids stay unique
        self.tensors: list[TensorSpec] = []
        self.tensor_names: list[str] = []
        self.path: list[str] = []
        self.ordered_dict = _Global("collections", "OrderedDict")
        self.rebuild = _Global("torch._utils", "_rebuild_tensor_v2")
        self.storage_types: dict[str, _Global] = {}

    def dumps(self, obj: Any) -> bytes:
        self.save(obj)
        self.out += b"."
        return bytes(self.out)

    # memo
    def put(self, obj: Any) -> None:
        idx = self.n_memo
        self.n_memo += 1
        self.memo[id(obj)] = idx
        self.keep.append(obj)
        self.out += b"q" + bytes([idx]) if idx < 256 else b"r" + struct.pack("<I", idx)

    def get(self, obj: Any) -> bool:
        idx = self.memo.get(id(obj))
        if idx is None:
            return False
        self.out += b"h" + bytes([idx]) if idx < 256 else b"j" + struct.pack("<I", idx)
        return True

    def save(self, obj: Any) -> None:
        t = type(obj)
        if obj is None:
            self.out += b"N"
        elif t is bool:
            self.out += b"\x88" if obj else b"\x89"
        elif t is int:
            self.save_int(obj)
        elif t is float:
            self.out += b"G" + struct.pack(">d", obj)
        elif self.get(obj):
            pass
        elif t is str:
            raw = obj.encode("utf-8", "surrogatepass")
            self.out += b"X" + struct.pack("<I", len(raw)) + raw
            self.put(obj)
        elif t is TensorSpec:
            self.save_tensor(obj)
        elif t is tuple:
            self.save_tuple(obj)
        elif t is list:
            self.out += b"]"
            self.put(obj)
            self.save_list_items(obj)
        elif t is dict:
            self.out += b"}"
            self.put(obj)
            self.save_dict_items(obj)
        elif t is OrderedDict:
            self.save_global(self.ordered_dict)
            self.out += b")R"  # OrderedDict(), then its items
            self.put(obj)
            if obj:
                self.save_setitems(obj)
        elif t is _Global:
            self.save_global(obj)
        else:
            raise TypeError(f"{'/'.join(self.path) or 'the object'}: a {t.__name__} cannot go into a torch archive "
                            "here (tensors as TensorSpec; dict, list, tuple, str, int, float, bool, None)")

    def save_int(self, v: int) -> None:
        if 0 <= v <= 0xFF:
            self.out += b"K" + bytes([v])
        elif 0 <= v <= 0xFFFF:
            self.out += b"M" + struct.pack("<H", v)
        elif -(2**31) <= v < 2**31:
            self.out += b"J" + struct.pack("<i", v)
        else:
            raw = v.to_bytes((v.bit_length() >> 3) + 1, "little", signed=True)
            if v < 0 and len(raw) > 1 and raw[-1] == 0xFF and raw[-2] & 0x80:
                raw = raw[:-1]
            self.out += (b"\x8a" + bytes([len(raw)]) if len(raw) < 256 else b"\x8b" + struct.pack("<i", len(raw))) + raw

    def save_global(self, g: _Global) -> None:
        if not self.get(g):
            self.out += b"c" + f"{g.module}\n{g.name}\n".encode()
            self.put(g)

    def save_tuple(self, items: tuple) -> None:
        if not items:
            self.out += b")"
            return
        if len(items) <= 3:
            for x in items:
                self.save(x)
            self.out += b"\x85\x86\x87"[len(items) - 1 : len(items)]
        else:
            self.out += b"("
            for x in items:
                self.save(x)
            self.out += b"t"
        self.put(items)

    def save_list_items(self, items: list) -> None:
        # the C pickler's batch_list_exact: one item -> APPEND; else MARK ... APPENDS per 1000
        if len(items) == 1:
            self.save(items[0])
            self.out += b"a"
            return
        for start in range(0, len(items), _BATCH):
            self.out += b"("
            for x in items[start : start + _BATCH]:
                self.save(x)
            self.out += b"e"

    def save_dict_items(self, d: dict) -> None:
        # batch_dict_exact: one item -> SETITEM; else MARK ... SETITEMS per 1000, and an empty batch after
        # a full last one
        if not d:
            return
        items = list(d.items())
        if len(items) == 1:
            self.save_item(*items[0])
            self.out += b"s"
            return
        start = 0
        while True:
            batch = items[start : start + _BATCH]
            self.out += b"("
            for k, v in batch:
                self.save_item(k, v)
            self.out += b"u"
            start += _BATCH
            if len(batch) < _BATCH:
                return

    def save_setitems(self, d: dict) -> None:
        # batch_dict over an iterator (reduced objects, e.g. OrderedDict): a lone last item -> SETITEM
        items = list(d.items())
        for start in range(0, len(items), _BATCH):
            batch = items[start : start + _BATCH]
            if len(batch) == 1:
                self.save_item(*batch[0])
                self.out += b"s"
            else:
                self.out += b"("
                for k, v in batch:
                    self.save_item(k, v)
                self.out += b"u"

    def save_item(self, key: Any, value: Any) -> None:
        self.save(key)
        self.path.append(str(key))
        self.save(value)
        self.path.pop()

    def save_tensor(self, spec: TensorSpec) -> None:
        """``_rebuild_tensor_v2(storage, 0, size, stride, False, OrderedDict())``, the storage named by the
        persistent id ``("storage", <StorageClass>, key, "cpu", numel)`` (memo order as torch's)."""
        key = str(len(self.tensors))  # torch numbers storages as the pickle first meets them
        self.tensors.append(spec)
        self.tensor_names.append("/".join(self.path))
        storage_type = self.storage_types.setdefault(spec.dtype, _Global("torch", _STORAGE_CLASS[spec.dtype]))
        stride, step = [], 1
        for size in reversed(spec.shape):
            stride.append(step)
            step *= max(size, 1)  # torch: a 0-length dim counts as 1 in the strides
        self.save_global(self.rebuild)
        self.out += b"("
        self.save_tuple(("storage", storage_type, key, "cpu", spec.numel))
        self.out += b"Q"  # BINPERSID
        self.save(0)
        self.save_tuple(tuple([*spec.shape]))  # a fresh tuple, as torch's size()
        self.save_tuple(tuple(reversed(stride)))
        self.save(False)
        self.save_global(self.ordered_dict)
        self.out += b")R"  # backward hooks: an empty OrderedDict
        self.put(object())
        self.out += b"t"
        self.put(object())  # the args tuple
        self.out += b"R"
        self.put(spec)
