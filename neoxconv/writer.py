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
import mmap
import os
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType

import numpy as np

from neoxconv.dtypes import SAFETENSORS_NAMES, tensor_nbytes
from neoxconv.errors import OutputError

TMP_SUFFIX = ".neoxconv-tmp"
_WRITEBACK_BYTES = 32 << 20
_STAGE_BYTES = 8 << 20  # O_DIRECT staging buffer
_BLOCK = 4096  # O_DIRECT alignment of offsets and lengths
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
    """Write-to-temp-then-rename with fsync; hashes what is written (in a helper thread for big chunks).

    ``direct=True`` writes through an aligned staging buffer with O_DIRECT where the filesystem allows it:
    no copy into the page cache (which costs more CPU than the hashing when memory is full of cached
    checkpoint files) and no eviction of the user's page cache. Falls back to buffered writes, with the
    kernel's writeback started early, wherever O_DIRECT is refused.
    """

    def __init__(self, path: Path, *, direct: bool = False) -> None:
        self.path = Path(path)
        self.tmp = tmp_path_for(self.path)
        self._sha256 = hashlib.sha256()
        self._hasher: ThreadPoolExecutor | None = None  # hashes chunk k while chunk k is written
        self._pending: Future | None = None
        self._want_direct = direct and hasattr(os, "O_DIRECT")
        self._direct = False
        self._stage: mmap.mmap | None = None
        self._fill = 0  # bytes waiting in the staging buffer
        self._flushed = 0  # buffered mode: bytes handed to the kernel's writeback so far
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
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        fd = None
        try:
            if self._want_direct:
                try:
                    fd = os.open(self.tmp, flags | os.O_DIRECT, 0o644)
                    self._direct = True
                    self._stage = mmap.mmap(-1, _STAGE_BYTES)  # page-aligned, as O_DIRECT requires
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
            if fd is None:
                fd = os.open(self.tmp, flags, 0o644)
            self._f = open(fd, "wb", buffering=0)
        except OSError as e:
            raise _output_error(self.path, e) from None
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
            if self._stage is not None:  # O_DIRECT mode (or fell back from it: keep the byte order)
                self._stage_write(mv)
            else:
                self._write_all(mv)
                if self.size + len(mv) - self._flushed >= _WRITEBACK_BYTES:  # start writing to disk now
                    start_writeback(self._f.fileno(), self._flushed, self.size + len(mv) - self._flushed)
                    self._flushed = self.size + len(mv)
        except OSError as e:
            raise _output_error(self.path, e) from None
        self.size += len(mv)

    def _write_all(self, mv: memoryview) -> None:
        done = 0
        while done < len(mv):
            try:
                n = self._f.write(mv[done:])
            except OSError as e:
                if e.errno != errno.EINVAL or not self._direct:
                    raise
                self._leave_direct_mode()  # the filesystem refused O_DIRECT after all
                continue
            if not n:
                raise OSError(errno.EIO, "write returned 0 bytes")
            done += n

    def _leave_direct_mode(self) -> None:
        import fcntl

        fd = self._f.fileno()
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self._direct = False

    def _stage_write(self, mv: memoryview) -> None:
        stage = memoryview(self._stage)
        while len(mv):
            n = min(len(mv), _STAGE_BYTES - self._fill)
            stage[self._fill : self._fill + n] = mv[:n]
            self._fill += n
            mv = mv[n:]
            if self._fill == _STAGE_BYTES:
                self._write_all(stage)
                self._fill = 0

    def _finish(self) -> None:
        """Write what is staged: padded to the block size for O_DIRECT, then cut back to the true size."""
        if self._stage is None:
            return
        if self._fill:
            padded = -(-self._fill // _BLOCK) * _BLOCK
            self._stage[self._fill : padded] = bytes(padded - self._fill)
            was_direct = self._direct
            self._write_all(memoryview(self._stage)[: padded if self._direct else self._fill])
            if was_direct:
                os.ftruncate(self._f.fileno(), self.size)
            self._fill = 0
        self._release_stage()

    def _release_stage(self) -> None:
        stage, self._stage = self._stage, None
        if stage is not None:
            try:
                stage.close()
            except BufferError:  # a view is still referenced (e.g. by a traceback): the GC frees it
                pass

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            self._wait_hash()
        finally:
            if self._hasher is not None:
                self._hasher.shutdown()
                self._hasher = None
        if exc_type is None:
            try:
                self._finish()
                self._f.flush()
                os.fsync(self._f.fileno())
                self._f.close()
                os.replace(self.tmp, self.path)
            except BaseException as e:  # OSError, or Ctrl-C landing here: no temp file left behind
                self._abandon()
                if isinstance(e, OSError):
                    raise _output_error(self.path, e) from None
                raise
            self._f = None
            fsync_dir(self.path.parent)
            return
        self._abandon()

    def _abandon(self) -> None:
        f, self._f = self._f, None
        if f is not None:
            _close_quietly(f)
        self._release_stage()
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
    """Strict JSON: NaN/Infinity are refused (ValueError), never written as invalid JSON."""
    return atomic_write(path, (json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n").encode())


def safetensors_header(entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]) -> bytes:
    """The 8-byte length + JSON header for tensors stored back to back in ``entries`` order."""
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, dtype, shape in entries:
        n = tensor_nbytes(dtype, shape)
        header[name] = {"dtype": SAFETENSORS_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


class SafetensorsWriter:
    """Stream tensors into one safetensors file, in the planned order, crash-safely.

    ::

        with SafetensorsWriter(path, [(name, dtype, shape), ...]) as w:
            w.write_chunk(name, rows); ...         # a tensor whole or in consecutive pieces
        w.sha256, w.size
    """

    def __init__(self, path: Path, entries: list[tuple[str, str, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self.entries = list(entries)
        self.header = safetensors_header(self.entries, {"format": "pt", **(metadata or {})})
        self._sizes = {name: tensor_nbytes(dtype, shape) for name, dtype, shape in self.entries}
        self._file = _AtomicFile(self.path, direct=True)
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
        if data.size == 0:
            return
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
