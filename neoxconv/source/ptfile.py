"""Read tensors out of ``torch.save`` archives without torch and without running any pickled code.

A ``.pt`` file (torch >= 1.6) is an uncompressed zip: ``<name>/data.pkl`` (a pickle that describes the
tensors) and ``<name>/data/<key>`` (each storage's raw bytes). We parse the pickle with an unpickler whose
``find_class`` only knows the tensor/storage rebuild names and hands back inert stand-ins, so a hostile
``__reduce__`` payload is refused (strict mode) or turned into an inert placeholder (lenient mode, for
DeepSpeed bookkeeping files) and never executed. Tensor data is then read straight from the file by offset
(memory-mapped with numpy), which is what lets the merge stream one tensor at a time.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import struct
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from neoxconv.dtypes import NUMPY_DTYPES
from neoxconv.errors import CheckpointError, UnsafePickleError

# torch storage class name -> (our dtype name, bytes per element)
_STORAGES = {
    "HalfStorage": "float16",
    "FloatStorage": "float32",
    "DoubleStorage": "float64",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
}

_MAX_PICKLE_BYTES = 64 << 20  # the tensor description of one file; real ones are a few kB


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor's bytes are: file, absolute byte offset of its storage, view geometry."""

    path: Path
    name: str
    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int  # elements
    storage_numel: int
    data_offset: int  # absolute file offset of the storage's first byte
    storage_nbytes: int = 0  # size of the storage's zip member
    storage_crc: int = 0  # CRC-32 the zip directory records for the storage

    @property
    def covers_storage(self) -> bool:
        """True when reading this tensor reads every byte of its storage (so its CRC can be checked)."""
        return self.is_contiguous and self.storage_offset == 0 and self.nbytes == self.storage_nbytes

    @property
    def itemsize(self) -> int:
        return NUMPY_DTYPES[self.dtype].itemsize

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @property
    def is_contiguous(self) -> bool:
        expected = 1
        for size, stride in zip(reversed(self.shape), reversed(self.stride)):
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True

    @property
    def byte_offset(self) -> int:
        """Absolute file offset of the first element (meaningful for contiguous tensors)."""
        return self.data_offset + self.storage_offset * self.itemsize

    def array(self) -> np.ndarray:
        """A read-only, memory-mapped numpy view of the tensor (bfloat16 comes back as uint16 bits)."""
        dt = NUMPY_DTYPES[self.dtype]
        if self.numel == 0:
            return np.zeros(self.shape, dtype=dt)
        if self.is_contiguous:
            return np.memmap(self.path, dtype=dt, mode="r", offset=self.byte_offset, shape=self.shape)
        storage = np.memmap(self.path, dtype=dt, mode="r", offset=self.data_offset, shape=(self.storage_numel,))
        return np.lib.stride_tricks.as_strided(
            storage[self.storage_offset :],
            shape=self.shape,
            strides=tuple(s * dt.itemsize for s in self.stride),
            writeable=False,
        )


EXTRA_STATE_SUFFIX = "_extra_state"  # torch.nn.modules.module._EXTRA_STATE_KEY_SUFFIX
# pickle.dumps(None) at protocols 0..5: what TE writes (a uint8 tensor of it, or torch.save'd into an
# io.BytesIO) when a module has no fp8 state; recognised by its bytes, never unpickled
_PICKLED_NONE = frozenset({b"N.", b"\x80\x02N.", b"\x80\x03N.", b"\x80\x04N.", b"\x80\x05N."})


@dataclass(frozen=True)
class ExtraState:
    """A Transformer Engine module's ``_extra_state`` entry, described and never unpickled.

    TE's ``get_extra_state`` (pytorch/module/base.py) wrote, across versions: ``None`` (v0.3-v0.5 without fp8),
    a 1-D ``torch.uint8`` tensor of ``pickle.dumps(state)`` (v0.6-v0.11 and v2.0-v2.3; ``pickle.dumps(None)``
    without fp8) or ``torch.empty(0, dtype=torch.uint8)`` without fp8 (v2.4 on), and an ``io.BytesIO`` holding
    ``torch.save(state)`` (v0.12-v1.13, the TE gpt-neox pins). Its content is fp8 scaling state (scales, amax
    histories, the recipe), pickled: opaque here. ``empty``: the bytes say "no state" (nothing, or a pickled
    None); otherwise the module had fp8 state (``nbytes`` of it).
    """

    path: Path
    name: str
    form: str  # "none" | "uint8 tensor" | "io.BytesIO"
    nbytes: int
    empty: bool


class _Inert:
    """Base of what lenient mode returns for a global outside the allowlist: inert, absorbs everything."""

    qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> _Inert:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:  # BUILD opcode: keep nothing
        pass

    def __repr__(self) -> str:
        return f"<inert {self.qualname}>"


class _Sealed:
    """Base of every object the unpickler itself hands to a pickle: no instance dict, BUILD refused.

    A pickle can apply BUILD (``__setstate__``) to anything it holds, including the allow-listed globals.
    These objects are created afresh for every load and refuse BUILD and attribute writes, so nothing one
    file does can change how another tensor or file is decoded.
    """

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError(f"the pickle applies BUILD to {type(self).__name__}, which takes no state")

    def __setattr__(self, name: str, value: Any) -> None:
        raise pickle.UnpicklingError(f"the pickle sets attribute {name!r:.40} on {type(self).__name__}")

    def _init(self, **fields: Any) -> None:
        for k, v in fields.items():
            object.__setattr__(self, k, v)


class StorageRef(_Sealed):
    """A storage named by the pickle's persistent id: archive key, dtype, element count."""

    __slots__ = ("key", "dtype", "numel")

    def __init__(self, key: str, dtype: str, numel: int) -> None:
        self._init(key=key, dtype=dtype, numel=numel)


class _StorageType(_Sealed):
    __slots__ = ("dtype",)

    def __init__(self, dtype: str) -> None:
        self._init(dtype=dtype)


class _PendingTensor(_Sealed):
    __slots__ = ("storage", "storage_offset", "shape", "stride", "bits")

    def __init__(self, storage: StorageRef, storage_offset: int, shape: tuple[int, ...], stride: tuple[int, ...],
                 bits: tuple[str, ...] = ()):
        self._init(storage=storage, storage_offset=storage_offset, shape=shape, stride=stride, bits=bits)


class _Global(_Sealed):
    """An allow-listed callable, wrapped so that BUILD cannot reach the function object behind it."""

    __slots__ = ("qualname", "fn")

    def __init__(self, qualname: str, fn: Any) -> None:
        self._init(qualname=qualname, fn=fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<{self.qualname}>"


class _OpaqueBytesIO(_Sealed):
    """What ``_io.BytesIO`` becomes (torch.save pickles one as NEWOBJ, then BUILD with (bytes, position, dict)):
    its bytes, kept and never read as a pickle. Each load gets a fresh subclass (NEWOBJ needs a type)."""

    __slots__ = ("value",)

    def __new__(cls, *args: Any) -> _OpaqueBytesIO:
        if args:
            raise pickle.UnpicklingError("io.BytesIO built with arguments (torch.save pickles it with none)")
        self = object.__new__(cls)
        object.__setattr__(self, "value", None)
        return self

    def __init__(self, *args: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        if self.value is not None:
            raise pickle.UnpicklingError("io.BytesIO given its state twice")
        if not (isinstance(state, tuple) and len(state) == 3 and isinstance(state[0], bytes)
                and type(state[1]) is int and state[2] in (None, {})):
            raise pickle.UnpicklingError("io.BytesIO state is not (bytes, position, None)")
        object.__setattr__(self, "value", state[0])


def _latin1_bytes(text: Any, encoding: Any = None) -> bytes:
    """``_codecs.encode(str, "latin1")``: how pickle protocol 2 (torch.save's) writes a ``bytes`` object."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is allowed only as pickle protocol 2 writes bytes (latin1)")
    return text.encode("latin-1")


class _StateDict(dict):
    """What ``collections.OrderedDict`` becomes: a plain dict (insertion-ordered) that accepts the BUILD
    step ``nn.Module.state_dict()`` pickles carry (its ``_metadata`` attribute) and keeps nothing of it."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        pass  # torch.load would set ._metadata (per-module versions); the merge has no use for it


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")  # miniz's tolower

def _int(x: Any, what: str) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise pickle.UnpicklingError(f"{what} is a {type(x).__name__}, not an int")
    return x


def _rebuild_tensor(storage, storage_offset, size, stride, *rest):
    """``_rebuild_tensor(storage, offset, size, stride)`` or ``_rebuild_tensor_v2(..., requires_grad,
    backward_hooks, metadata=None)``. The metadata dict carries torch's lazy ``neg``/``conj`` bits, which
    torch.load applies to the values; the bits set are kept so that `read_pt` refuses the tensor by name."""
    if not isinstance(storage, StorageRef):
        raise pickle.UnpicklingError("tensor rebuilt from something that is not a storage")
    if not isinstance(size, (tuple, list)) or not isinstance(stride, (tuple, list)):
        raise pickle.UnpicklingError("tensor size/stride is not a tuple")
    metadata = rest[2] if len(rest) > 2 else None
    if metadata is not None and not isinstance(metadata, dict):
        raise pickle.UnpicklingError(f"tensor metadata is a {type(metadata).__name__}, not a dict")
    bits = tuple(sorted(_short(k, 20) for k, v in (metadata or {}).items() if v))
    return _PendingTensor(storage, _int(storage_offset, "storage offset"),
                          tuple(_int(s, "size") for s in size), tuple(_int(s, "stride") for s in stride), bits)


def _rebuild_parameter(data, *_ignored):
    if not isinstance(data, _PendingTensor):
        raise pickle.UnpicklingError("parameter rebuilt from something that is not a tensor")
    return data


def _ordered_dict(*args, **kwargs):
    return _StateDict(*args, **kwargs)


_ALLOWED_FUNCTIONS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): _ordered_dict,
    ("_codecs", "encode"): _latin1_bytes,  # bytes at protocol 2 (a TE io.BytesIO's content)
}

# Memo indices a pickle may use: a real pickler numbers them 0, 1, 2, ... as it goes, so an index is
# never larger than the number of opcodes before it. CPython's unpickler sizes its memo by the largest
# index it sees, so a 9-byte LONG_BINPUT 2**28 would cost gigabytes; we check before unpickling.
_MEMO_PUTS = {"PUT", "BINPUT", "LONG_BINPUT"}
_MAX_DEPTH = 64  # containers nested deeper than this are not a checkpoint


def _prescan(payload: bytes) -> None:
    """Walk the opcodes once (nothing is built) and refuse memo indices a real pickler never writes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # genops decoding odd protocol-0 strings
        for n, (op, arg, _pos) in enumerate(pickletools.genops(payload)):
            if op.name in _MEMO_PUTS and not (isinstance(arg, int) and 0 <= arg <= n):
                raise pickle.UnpicklingError(
                    f"memo index {arg!r:.20} at opcode {n} (a real pickler numbers them in order)")


class _SafeUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, *, lenient: bool) -> None:
        super().__init__(io.BytesIO(data))
        self.lenient = lenient
        self.refused: list[str] = []
        # fresh, sealed stand-ins for every load: nothing is shared with another file
        self._globals: dict[tuple[str, str], Any] = {
            k: _Global(f"{k[0]}.{k[1]}", fn) for k, fn in _ALLOWED_FUNCTIONS.items()}
        self._globals.update({("torch", name): _StorageType(dtype) for name, dtype in _STORAGES.items()})
        self._globals[("_io", "BytesIO")] = type("BytesIO", (_OpaqueBytesIO,), {"__slots__": ()})
        self._inert: dict[str, type] = {}
        self._storages: dict[str, StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        if not isinstance(module, str) or not isinstance(name, str):
            raise pickle.UnpicklingError("a global named by something that is not a string")
        found = self._globals.get((module, name))
        if found is not None:
            return found
        qualname = f"{module}.{name}"[:200]
        if qualname not in self._inert:
            if len(self._inert) >= 1000:
                raise pickle.UnpicklingError("more than 1000 distinct unknown globals")
            self.refused.append(qualname)
            self._inert[qualname] = type("Inert", (_Inert,), {"qualname": qualname})
        if self.lenient:
            return self._inert[qualname]
        raise UnsafePickleError(qualname)

    def persistent_load(self, pid: Any) -> StorageRef:
        # torch unpacks exactly (typename, storage type, key, location, numel) and refuses any other shape
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id (a {type(pid).__name__})")
        if len(pid) != 5:
            raise pickle.UnpicklingError(f"a storage's persistent id has {len(pid)} fields, not 5 (torch refuses it)")
        storage_type, key, _location, numel = pid[1:]
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported storage type (a {type(storage_type).__name__})")
        if not isinstance(key, str) or len(key) > 64:
            raise pickle.UnpicklingError("storage key is not a short string")
        numel = _int(numel, "storage size")
        if numel < 0:
            raise pickle.UnpicklingError(f"storage {key!r} has a negative size")
        known = self._storages.get(key)
        if known is None:
            known = self._storages[key] = StorageRef(key, storage_type.dtype, numel)
        elif (known.dtype, known.numel) != (storage_type.dtype, numel):
            raise pickle.UnpicklingError(f"storage {key!r} is described twice, differently")
        return known


def _read_member(path: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    """A member's bytes, inflating at most ``limit`` (the directory's size may lie); CRC checked."""
    out = bytearray()
    with zf.open(info) as fh:
        while block := fh.read(1 << 20):
            out += block
            if len(out) > limit:
                raise CheckpointError(
                    f"{path}: {info.filename} inflates to more than {limit} bytes (corrupt or hostile)")
    return bytes(out)


def _data_offset(f, info: zipfile.ZipInfo) -> int:
    """Absolute offset of a stored zip member's bytes (after its local file header)."""
    f.seek(info.header_offset)
    header = f.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"bad local header for {info.filename}")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


_EOCD = struct.Struct("<IHHHHIIH")  # end of central directory record (22 bytes)
_LOC64 = struct.Struct("<IIQI")  # zip64 end of central directory locator (20 bytes)
_EOCD64 = struct.Struct("<IQHHIIQQQQ")  # zip64 end of central directory record (56 bytes)
_CDH = struct.Struct("<IHHHHHHIIIHHHHHII")  # central directory file header (46 bytes)
_LFH = struct.Struct("<IHHHHHIIIHH")  # local file header (30 bytes)


def _check_zip_layout(path: Path, f, size: int, infos: list[zipfile.ZipInfo]) -> None:
    """Refuse an archive that two zip readers could read differently.

    torch.load (miniz, caffe2/serialize/inline_container.cc) takes the central directory at the offset the
    end record names; Python's zipfile takes the one that ends right before the end record and shifts every
    offset by the difference ("data prepended to the archive"). An archive with two central directories thus
    reads as two different sets of bytes, each with valid CRC-32s. torch.save writes one tight layout:
    members back to back from offset 0 (local header, data, data descriptor), the central directory right
    after them, the zip64 end record and locator, and the end record as the last 22 bytes, no comment. We
    require exactly that, so both readers find the same directory, the same members and the same bytes.
    """
    def refuse(why: str) -> None:
        raise CheckpointError(f"{path}: {why}; zip readers (torch.load among them) could read different bytes "
                              "from it, so it is refused (the file was tampered with or badly re-zipped)")

    def read(offset: int, n: int) -> bytes:
        f.seek(offset)
        return f.read(n)

    if size < _EOCD.size:
        refuse("no end-of-central-directory record")
    sig, disk, cd_disk, _, entries, cd_size, cd_off, comment = _EOCD.unpack(read(size - _EOCD.size, _EOCD.size))
    if sig != 0x06054B50 or comment:
        refuse("the end-of-central-directory record is not the last 22 bytes of the file")
    if disk or cd_disk:
        refuse("a multi-disk archive")
    cd_end = size - _EOCD.size
    loc_at = cd_end - _LOC64.size
    if loc_at >= 0 and read(loc_at, 4) == b"PK\x06\x07":
        _, _, z_at, _ = _LOC64.unpack(read(loc_at, _LOC64.size))
        if z_at != loc_at - _EOCD64.size:  # miniz follows the pointer; Python reads the record before the locator
            refuse("the zip64 locator does not point at the zip64 end record just before it")
        z = _EOCD64.unpack(read(z_at, _EOCD64.size))
        if z[0] != 0x06064B50 or z[1] != _EOCD64.size - 12:
            refuse("malformed zip64 end record")
        for plain, wide, sentinel in ((entries, z[7], 0xFFFF), (cd_size, z[8], 0xFFFFFFFF), (cd_off, z[9], 0xFFFFFFFF)):
            if plain not in (wide, sentinel):
                refuse("the end record and the zip64 end record disagree")
        entries, cd_size, cd_off, cd_end = z[7], z[8], z[9], z_at
    if cd_off + cd_size != cd_end:
        refuse(f"the central directory the end record names (bytes {cd_off}..{cd_off + cd_size}) does not end "
               f"where the end record starts ({cd_end}): a second central directory or hidden bytes")
    if entries != len(infos):
        refuse(f"the end record counts {entries} members, the central directory holds {len(infos)}")
    directory = read(cd_off, cd_size)
    pos, names = 0, []
    for _ in range(entries):
        if pos + _CDH.size > len(directory) or directory[pos:pos + 4] != b"PK\x01\x02":
            refuse("malformed central directory")
        h = _CDH.unpack_from(directory, pos)
        names.append(directory[pos + _CDH.size: pos + _CDH.size + h[10]])
        pos += _CDH.size + h[10] + h[11] + h[12]
    if pos != cd_size:
        refuse("the central directory holds bytes after its last entry")
    expected = 0  # members must tile the file from 0 to the central directory: no gap, no overlap
    for info, raw_name in sorted(zip(infos, names), key=lambda x: x[0].header_offset):
        at = info.header_offset
        if at != expected:
            what = "overlaps the member before it" if at < expected else f"leaves bytes {expected}..{at} in no member"
            refuse(f"member {info.filename[:80]!r} {what}")
        head = read(at, _LFH.size)
        if len(head) != _LFH.size or head[:4] != b"PK\x03\x04":
            refuse(f"member {info.filename[:80]!r} has no local header where the central directory says")
        _, _, flag, method, _, _, crc, csize, usize, n, m = _LFH.unpack(head)
        if read(at + _LFH.size, n) != raw_name or method != info.compress_type:
            refuse(f"the local header of member {info.filename[:80]!r} disagrees with the central directory")
        end = at + _LFH.size + n + m + info.compress_size
        if flag & 0x08:  # a data descriptor follows the data (torch.save writes one): crc, sizes (4 or 8 bytes)
            d = read(end, 24)
            skip = 4 if d[:4] == b"PK\x07\x08" else 0
            body = d[skip:]
            sizes = (info.compress_size, info.file_size)
            if len(body) >= 12 and struct.unpack_from("<I", body)[0] == info.CRC and \
                    struct.unpack_from("<II", body, 4) == sizes:
                end += skip + 12
            elif len(body) >= 20 and struct.unpack_from("<I", body)[0] == info.CRC and \
                    struct.unpack_from("<QQ", body, 4) == sizes:
                end += skip + 20
            else:
                refuse(f"the data descriptor of member {info.filename[:80]!r} disagrees with the central directory")
        elif crc != info.CRC or csize not in (info.compress_size, 0xFFFFFFFF) or \
                usize not in (info.file_size, 0xFFFFFFFF):
            refuse(f"the local header of member {info.filename[:80]!r} disagrees with the central directory")
        expected = end
    if expected != cd_off:
        refuse(f"bytes {expected}..{cd_off} between the last member and the central directory are in no member")


@dataclass
class PtArchive:
    """The tensors of one ``torch.save`` file, found without reading their data."""

    path: Path
    objects: Any  # the unpickled structure, with TensorRef in place of tensors
    refused_globals: tuple[str, ...] = ()

    def tensors(self, prefix_path: tuple[str, ...] = ()) -> dict[str, TensorRef | ExtraState]:
        """The flat ``{key: TensorRef}`` dict at ``prefix_path`` (e.g. ``("module",)``); a key ending in
        ``_extra_state`` (torch's suffix for a module's extra state) is an `ExtraState` in one of the forms
        Transformer Engine writes, and anything else under such a key is refused, naming file and key."""
        node = self.objects
        for part in prefix_path:
            if not isinstance(node, dict) or part not in node:
                raise CheckpointError(f"{self.path}: no {'/'.join(prefix_path)!r} entry in the archive")
            node = node[part]
        if not isinstance(node, dict):
            raise CheckpointError(f"{self.path}: expected a dict of tensors, got {type(node).__name__}")
        out: dict[str, TensorRef | ExtraState] = {}
        empty: dict[int, bool] = {}  # a value shared by many keys (the pickle's memo) is looked at once
        for k, v in node.items():
            if not isinstance(k, str):
                raise CheckpointError(f"{self.path}: a key is a {type(k).__name__}, not a tensor name (corrupt)")
            if k.endswith(EXTRA_STATE_SUFFIX):
                out[k] = _extra_state(self.path, k, v, empty)
            elif isinstance(v, TensorRef):
                out[k] = v
            else:
                what = "an io.BytesIO" if isinstance(v, _BytesIOValue) else type(v).__name__
                raise CheckpointError(f"{self.path}: key {_short(k)!r} holds {what}, not a tensor")
        return out


def read_pt(path: Path, *, lenient: bool = False) -> PtArchive:
    """Open a ``torch.save`` zip archive and describe its tensors, safely.

    ``lenient=False`` (layer files): any global outside the allowlist is refused with
    `UnsafePickleError`. ``lenient=True`` (bookkeeping files): such globals become inert placeholders.
    Nothing from the file is ever called.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    if size == 0:
        raise CheckpointError(f"{path}: the file is empty (0 bytes); re-download or re-copy it")
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":
                raise CheckpointError(
                    f"{path}: not a torch zip archive (legacy torch.save format, truncated, or not a checkpoint); "
                    "re-save it with torch >= 1.6 or re-download it"
                )
            f.seek(0)
            zf = zipfile.ZipFile(f)
            infos = zf.infolist()
            _check_zip_layout(path, f, size, infos)
            members = {i.filename: i for i in infos}
            # torch.load's miniz looks members up case-insensitively in ASCII only (data/A can stand for data/a;
            # the Kelvin sign is not k): names equal once A-Z are lower-cased are refused, as exact duplicates are
            # (data.pkl and byteorder included).
            folded: dict[str, int] = {}
            for i in infos:
                key = i.filename.translate(_ASCII_LOWER)
                folded[key] = folded.get(key, 0) + 1
            if len(folded) != len(infos):
                dup = sorted({i.filename for i in infos if folded[i.filename.translate(_ASCII_LOWER)] > 1})
                raise CheckpointError(
                    f"{path}: the archive has duplicate member names ({', '.join(map(repr, dup[:3]))}, equal "
                    "ignoring case); readers disagree on which copy counts, so it is refused (the file was "
                    "tampered with or badly re-zipped)"[:400])
            pkl = [n for n in members if n.endswith("/data.pkl") or n == "data.pkl"]
            if len(pkl) != 1:
                raise CheckpointError(f"{path}: expected one data.pkl in the archive, found {len(pkl)}")
            prefix = pkl[0][: -len("data.pkl")]
            order = members.get(prefix + "byteorder")
            if order is not None and _read_member(path, zf, order, 16) != b"little":
                raise CheckpointError(f"{path}: saved on a big-endian machine; re-save it on a little-endian one")
            if members[pkl[0]].file_size > _MAX_PICKLE_BYTES:
                raise CheckpointError(f"{path}: data.pkl is implausibly large ({members[pkl[0]].file_size} bytes)")
            payload = _read_member(path, zf, members[pkl[0]], _MAX_PICKLE_BYTES)  # CRC checked; inflation bounded
            _prescan(payload)
            unpickler = _SafeUnpickler(payload, lenient=lenient)
            try:
                objects = unpickler.load()
            except UnsafePickleError as e:
                if e.args[0].startswith("transformer_engine."):  # Float8Tensor & co. (TE's fp8_model_init)
                    raise UnsafePickleError(
                        f"{path}: refused to load: the pickle asks for {e.args[0]!r}: weights saved as Transformer "
                        "Engine fp8 tensors (fp8_model_init), which neoxconv does not read; nothing from it was "
                        "executed (save the model with its weights in params_dtype)") from None
                raise UnsafePickleError(
                    f"{path}: refused to load: the pickle asks for {e.args[0]!r}, which is not a tensor; "
                    "nothing from it was executed (the file is corrupt or hostile)"
                ) from None

            offsets: dict[str, tuple[int, int, int]] = {}

            def locate(storage: StorageRef) -> tuple[int, int, int]:
                name = f"{prefix}data/{storage.key}"
                info = members.get(name)
                if info is None:
                    raise CheckpointError(f"{path}: storage {storage.key!r} is missing from the archive")
                if info.compress_type != zipfile.ZIP_STORED:
                    raise CheckpointError(f"{path}: storage {storage.key!r} is compressed; torch never does this")
                need = storage.numel * NUMPY_DTYPES[storage.dtype].itemsize
                if info.file_size < need:
                    raise CheckpointError(
                        f"{path}: storage {storage.key!r} has {info.file_size} bytes, needs {need} (truncated?)"
                    )
                if name not in offsets:
                    start = _data_offset(f, info)
                    if start + info.file_size > size:
                        raise CheckpointError(f"{path}: storage {storage.key!r} runs past the end of the file")
                    offsets[name] = (start, info.file_size, info.CRC)
                return offsets[name]

            # Each object is resolved once (memoised by identity): a pickle that shares references
            # (a list holding the previous list twice, 60 times over) stays as small as its bytes.
            done: dict[int, Any] = {}

            def resolve(node: Any, key: str, depth: int) -> Any:
                if id(node) in done:
                    return done[id(node)]
                if depth > _MAX_DEPTH:
                    raise CheckpointError(f"{path}: objects nested more than {_MAX_DEPTH} deep (corrupt or hostile)")
                if isinstance(node, _PendingTensor):
                    st = node.storage
                    _check_view(path, key, node)
                    if node.bits:
                        raise CheckpointError(
                            f"{path}: tensor {key!r} was saved with torch's lazy {'/'.join(node.bits)} bit set "
                            "(torch.load applies it to the values; neoxconv does not); re-save it after "
                            "t.resolve_neg().resolve_conj()")
                    start, nbytes, crc = locate(st)
                    out: Any = TensorRef(
                        path=path, name=key, dtype=st.dtype, shape=node.shape, stride=node.stride,
                        storage_offset=node.storage_offset, storage_numel=st.numel, data_offset=start,
                        storage_nbytes=nbytes, storage_crc=crc,
                    )
                elif isinstance(node, _OpaqueBytesIO):
                    if node.value is None:
                        raise CheckpointError(f"{path}: {key!r} holds an io.BytesIO without content (corrupt)")
                    out = _BytesIOValue(node.value)
                elif isinstance(node, dict):
                    out = done[id(node)] = {}
                    for k, v in node.items():
                        out[k] = resolve(v, _short(k), depth + 1)
                elif isinstance(node, list):
                    out = done[id(node)] = []
                    out.extend(resolve(v, key, depth + 1) for v in node)
                elif isinstance(node, tuple):
                    out = tuple(resolve(v, key, depth + 1) for v in node)
                else:
                    return node
                done[id(node)] = out
                return out

            objects = resolve(objects, "", 0)
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, pickle.UnpicklingError, EOFError, ValueError, TypeError,
            AttributeError, LookupError, ArithmeticError, struct.error, RecursionError, MemoryError,
            NotImplementedError, zlib.error) as e:
        raise CheckpointError(f"{path}: corrupt checkpoint file ({type(e).__name__}: {_short(e, 200)})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    return PtArchive(path=path, objects=objects, refused_globals=tuple(unpickler.refused))


@dataclass(frozen=True)
class _BytesIOValue:
    """An io.BytesIO's bytes as `read_pt` leaves them (only an ``_extra_state`` key may hold one)."""

    data: bytes


_MAX_EXTRA_STATE_BYTES = 1 << 20  # TE's fp8 state is a few kB (scales and amax histories per GEMM)
_SAVED_NONE_MAX = 4096  # torch.save(None) is 1261 bytes (torch 2.13); its archive names make it vary a little


def _extra_state(path: Path, key: str, value: Any, empty: dict[int, bool]) -> ExtraState:
    """The `ExtraState` a ``..._extra_state`` entry holds, in one of the forms TE writes; a CheckpointError naming
    file and key for anything else. Its bytes are compared, never unpickled."""
    if value is None:
        return ExtraState(path, key, "none", 0, True)
    if isinstance(value, TensorRef):
        if value.dtype != "uint8" or len(value.shape) != 1 or not value.is_contiguous:
            raise CheckpointError(
                f"{path}: {_short(key)!r} is a {value.dtype} tensor of shape {list(value.shape)}; Transformer Engine "
                "saves its extra state as a 1-D uint8 tensor (or an io.BytesIO): not a TE checkpoint entry")
        if value.nbytes > _MAX_EXTRA_STATE_BYTES:
            raise CheckpointError(f"{path}: {_short(key)!r} holds {value.nbytes} bytes of extra state; Transformer "
                                  "Engine's fp8 state is a few kB (corrupt or not a TE checkpoint)")
        empty = value.nbytes == 0 or (value.nbytes <= 8 and bytes(value.array()) in _PICKLED_NONE)
        return ExtraState(path, key, "uint8 tensor", value.nbytes, empty)
    if isinstance(value, _BytesIOValue):
        if len(value.data) > _MAX_EXTRA_STATE_BYTES:
            raise CheckpointError(f"{path}: {_short(key)!r} holds an io.BytesIO of {len(value.data)} bytes; "
                                  "Transformer Engine's fp8 state is a few kB (corrupt or not a TE checkpoint)")
        if id(value) not in empty:  # torch.save(None) is ~1.3 kB: a bigger zip holds state, never parsed
            empty[id(value)] = len(value.data) <= _SAVED_NONE_MAX and _saved_none(value.data)
        return ExtraState(path, key, "io.BytesIO", len(value.data), empty[id(value)])
    raise CheckpointError(
        f"{path}: {_short(key)!r} holds {'bytes' if isinstance(value, bytes) else type(value).__name__}; Transformer "
        "Engine saves extra state as None, a uint8 tensor or an io.BytesIO, so it is refused (corrupt or hostile)")


def _saved_none(data: bytes) -> bool:
    """True when ``data`` is ``torch.save(None)``: a zip whose only pickle is a pickled None and that has no
    storages (read as bytes: the nested pickle is compared, never run)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            infos = z.infolist()
            pkl = [i for i in infos if i.filename.endswith("data.pkl")]
            if len(pkl) != 1 or pkl[0].file_size > 8 or any("/data/" in i.filename for i in infos):
                return False
            with z.open(pkl[0]) as f:  # at most 9 bytes inflated, whatever the member claims (a deflate bomb)
                return f.read(9) in _PICKLED_NONE
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, zlib.error, struct.error):
        return False


def _short(x: Any, limit: int = 80) -> str:
    """``str(x)`` cut to ``limit`` characters, never expensive (no repr of a big structure)."""
    if isinstance(x, (str, int, float, BaseException)):
        try:
            text = str(x)
        except ValueError:  # an int too long to print
            text = f"<{type(x).__name__}>"
    else:
        text = f"<{type(x).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_view(path: Path, key: str, t: _PendingTensor) -> None:
    """The view must stay inside its storage (a corrupt header must not make us read elsewhere)."""
    if len(t.shape) != len(t.stride) or any(s < 0 for s in t.shape) or any(s < 0 for s in t.stride):
        raise CheckpointError(f"{path}: tensor {key!r} has a malformed shape/stride {t.shape}/{t.stride}")
    if t.storage_offset < 0:
        raise CheckpointError(f"{path}: tensor {key!r} has a negative storage offset")
    if all(t.shape):
        last = t.storage_offset + sum((n - 1) * s for n, s in zip(t.shape, t.stride))
        if last >= t.storage.numel:
            raise CheckpointError(
                f"{path}: tensor {key!r} reaches element {last} of a storage with {t.storage.numel} (corrupt header)"
            )
