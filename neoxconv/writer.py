"""Crash-safe output: files appear under their final name complete or not at all.

`atomic_write` and `SafetensorsWriter` write to a hidden temporary name in the same folder, fsync, then
``os.replace`` into place (and fsync the folder). An exception, Ctrl-C or SIGKILL at any moment leaves at
most a ``.*.neoxconv-tmp`` file, which the next run removes. The safetensors header is computed up front
from the planned names, dtypes and shapes, so tensor data is streamed straight to disk in order while its
sha256 is computed on the way.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType

import numpy as np

from neoxconv.dtypes import SAFETENSORS_NAMES
from neoxconv.errors import OutputError

TMP_SUFFIX = ".neoxconv-tmp"
_WRITEBACK_BYTES = 32 << 20
_THREADED_HASH_BYTES = 1 << 20


def _load_sync_file_range():
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.sync_file_range
        fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
        return fn
    except (OSError, AttributeError):
        return None


_sync_file_range = _load_sync_file_range()


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask Linux to start writing a range to disk (SYNC_FILE_RANGE_WRITE), so the final fsync waits less."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, nbytes, 2)
_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8, "int64": 8, "int32": 4,
             "int16": 2, "int8": 1, "uint8": 1, "bool": 1}


def tmp_path_for(path: Path) -> Path:
    return path.with_name(f".{path.name}{TMP_SUFFIX}")


def fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _output_error(path: Path, e: OSError) -> OutputError:
    if e.errno == errno.ENOSPC:
        return OutputError(f"{path}: no space left on the device; free some space and re-run the same command to resume")
    return OutputError(f"{path}: cannot write: {e.strerror or e}")


class _AtomicFile:
    """Write-to-temp-then-rename with fsync; hashes what is written."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.tmp = tmp_path_for(self.path)
        self._sha256 = hashlib.sha256()
        self._hasher: ThreadPoolExecutor | None = None  # hashes chunk k while chunk k is written
        self._pending: Future | None = None
        self.size = 0
        self._f = None

    @property
    def sha256(self):
        self._wait_hash()
        return self._sha256

    def _wait_hash(self) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def __enter__(self) -> _AtomicFile:
        try:
            self._f = open(self.tmp, "wb", buffering=0)
        except OSError as e:
            raise _output_error(self.path, e) from None
        self._flushed = 0  # bytes handed to the kernel's writeback so far
        return self

    def write(self, data) -> None:
        mv = memoryview(data).cast("B")
        self._wait_hash()
        if len(mv) >= _THREADED_HASH_BYTES:
            if self._hasher is None:
                self._hasher = ThreadPoolExecutor(1, thread_name_prefix="neoxconv-sha256")
            self._pending = self._hasher.submit(self._sha256.update, mv)
        else:
            self._sha256.update(mv)
        try:
            done = 0
            while done < len(mv):
                n = self._f.write(mv[done:])
                if not n:
                    raise OSError(errno.EIO, "write returned 0 bytes")
                done += n
        except OSError as e:
            raise _output_error(self.path, e) from None
        self.size += len(mv)
        if self.size - self._flushed >= _WRITEBACK_BYTES:  # start writing to disk now, not at fsync
            start_writeback(self._f.fileno(), self._flushed, self.size - self._flushed)
            self._flushed = self.size

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        f, self._f = self._f, None
        try:
            self._wait_hash()
        finally:
            if self._hasher is not None:
                self._hasher.shutdown()
                self._hasher = None
        if exc_type is None:
            try:
                f.flush()
                os.fsync(f.fileno())
                f.close()
                os.replace(self.tmp, self.path)
            except BaseException as e:  # OSError, or Ctrl-C landing here: no temp file left behind
                _close_quietly(f)
                _unlink_quietly(self.tmp)
                if isinstance(e, OSError):
                    raise _output_error(self.path, e) from None
                raise
            fsync_dir(self.path.parent)
            return
        _close_quietly(f)
        _unlink_quietly(self.tmp)


def _close_quietly(f) -> None:
    try:
        f.close()
    except OSError:
        pass


def _unlink_quietly(p: Path) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass


def atomic_write(path: Path, data: bytes) -> str:
    """Write ``data`` to ``path`` atomically; returns its sha256."""
    with _AtomicFile(path) as f:
        f.write(data)
    return f.sha256.hexdigest()


def atomic_write_json(path: Path, obj) -> str:
    return atomic_write(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def safetensors_header(entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]) -> bytes:
    """The 8-byte length + JSON header for tensors stored back to back in ``entries`` order."""
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, dtype, shape in entries:
        n = _ITEMSIZE[dtype]
        for s in shape:
            n *= s
        header[name] = {"dtype": SAFETENSORS_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


class SafetensorsWriter:
    """Stream tensors into one safetensors file, in the planned order, crash-safely.

    ::

        with SafetensorsWriter(path, [(name, dtype, shape), ...]) as w:
            w.write_tensor(name, array)            # whole, or
            w.write_chunk(name, rows); ...         # in consecutive pieces
        w.sha256, w.size
    """

    def __init__(self, path: Path, entries: list[tuple[str, str, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self.entries = list(entries)
        self.header = safetensors_header(self.entries, {"format": "pt", **(metadata or {})})
        self._sizes = {}
        for name, dtype, shape in self.entries:
            n = _ITEMSIZE[dtype]
            for s in shape:
                n *= s
            self._sizes[name] = n
        self._file = _AtomicFile(self.path)
        self._pos = 0  # index into entries of the tensor being written
        self._written = 0  # bytes written of that tensor

    def __enter__(self) -> SafetensorsWriter:
        self._file.__enter__()
        try:
            self._file.write(self.header)
        except BaseException as e:  # __exit__ will not run for a failed __enter__: clean up here
            self._file.__exit__(type(e), e, e.__traceback__)
            raise
        return self

    def write_chunk(self, name: str, data: np.ndarray) -> None:
        while self._pos < len(self.entries) and self._written == self._sizes[self.entries[self._pos][0]]:
            self._pos += 1
            self._written = 0
        if self._pos >= len(self.entries) or self.entries[self._pos][0] != name:
            expected = self.entries[self._pos][0] if self._pos < len(self.entries) else "nothing"
            raise RuntimeError(f"{self.path}: writing {name!r} but {expected!r} is due")
        data = np.ascontiguousarray(data)
        if self._written + data.nbytes > self._sizes[name]:
            raise RuntimeError(f"{self.path}: {name!r} gets more bytes than its shape holds")
        self._file.write(data)
        self._written += data.nbytes

    def write_tensor(self, name: str, data: np.ndarray) -> None:
        self.write_chunk(name, data)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            done = self._pos == len(self.entries) - 1 and self._written == self._sizes[self.entries[-1][0]]
            if self.entries and not done:
                self._file.__exit__(RuntimeError, None, None)
                raise RuntimeError(f"{self.path}: closed before every tensor was written")
        self._file.__exit__(exc_type, exc, tb)

    @property
    def sha256(self) -> str:
        return self._file.sha256.hexdigest()

    @property
    def size(self) -> int:
        return self._file.size


def sha256_file(path: Path, *, chunk: int = 16 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
