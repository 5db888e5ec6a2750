"""Crash-safe output: files appear under their final name complete or not at all.

`atomic_write` and `SafetensorsWriter` write to a hidden temporary name in the same folder, fsync, then
``os.replace`` into place (and fsync the folder). Where a file goes is an `OutFile`: its name in a folder held
open as a descriptor (`neoxconv.output.folder.OutDir` holds OUT's); the create, rename, unlink and fsync are
relative to that descriptor, so a folder swapped for a link after it was opened is never written through. An
exception, Ctrl-C or SIGKILL at any moment leaves at most a ``.*.neoxconv-tmp`` file, which the next run
removes. The safetensors header is computed up front from the planned names, dtypes and shapes, so tensor data
is streamed straight to disk in order while its hash (BLAKE3 by default, see `neoxconv.output.hashing`) is
computed on the way. Tensor data can be read from the source straight into the buffer that is written
(`SafetensorsWriter.fill_chunk`): no copy in between.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import struct
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np

from neoxconv.dtypes import SAFETENSORS_NAMES, tensor_nbytes
from neoxconv.errors import OutputError
from neoxconv.output.hashing import DEFAULT_HASH, StreamHasher

TMP_SUFFIX = ".neoxconv-tmp"
_WRITEBACK_BYTES = 32 << 20
_STAGE_BYTES = 8 << 20  # O_DIRECT staging buffer
_BLOCK = 4096  # O_DIRECT alignment of offsets and lengths
# BLAKE3 on one thread: on a 1 MB block in cache it costs 0.15 CPU-s/GB on one core vs 0.22 spread over
# two (bench/checks_bench.py), and one core already hashes faster than the disk writes; hash_file (verify,
# resume), with nothing to overlap, uses every core.
_HASH_THREADS = 1
_FILL_BYTES = 1 << 20  # fill_chunk hands out views of at most this much: they stay in the CPU cache


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


@dataclass(frozen=True)
class OutFile:
    """Where a file is written: ``path.name`` in the folder open as ``dir_fd`` (held by its owner, an
    `neoxconv.output.folder.OutDir`, for the whole run); ``path`` is what messages show."""

    path: Path
    dir_fd: int

    @property
    def name(self) -> str:
        return self.path.name


def open_folder(path: Path) -> int:
    """A descriptor of the folder ``path`` names (a link the caller gave is followed: they named it)."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))


def output_error(path: Path, e: OSError) -> OutputError:
    """The OutputError for a failed write of ``path``: a full disk says how to resume."""
    if e.errno == errno.ENOSPC:
        return OutputError(
            f"{path}: no space left on the device; free some space and re-run the same command to resume"
        )
    return OutputError(f"{path}: cannot write: {e.strerror or e}")


class _AtomicFile:
    """Write-to-temp-then-rename with fsync; hashes what is written, in order.

    ``staged=True`` (big files) writes through two page-aligned staging buffers: the caller fills one
    (copying with `write`, or reading straight into it with `reserve`/`commit`, which hashes the bytes
    while they are in the CPU cache) while a helper thread writes the other to disk. The file is opened
    with O_DIRECT where the filesystem allows it: no copy into the page cache (which costs more CPU than
    the hashing when memory is full of cached checkpoint files) and no eviction of the user's page cache.
    Falls back to buffered writes, with the kernel's writeback started early, wherever O_DIRECT is refused.
    """

    def __init__(self, where: Path | OutFile, *, staged: bool = False, hash_algo: str = DEFAULT_HASH) -> None:
        """``where``: an `OutFile` (its folder's descriptor is the owner's), or a path (its folder is opened here,
        once, and closed with the file)."""
        self._where = where
        self.path = where.path if isinstance(where, OutFile) else Path(where)
        self.tmp = tmp_path_for(self.path)
        self._dir_fd: int | None = None  # the folder every call below is relative to
        self.hash_algo = hash_algo
        self._hash = StreamHasher(hash_algo, threads=_HASH_THREADS)
        self._staged = staged
        self._want_direct = staged and hasattr(os, "O_DIRECT")
        self._direct = False
        self._stages: list[mmap.mmap] = []  # staged mode: the buffer being filled and the one being written
        self._current = 0  # index of the stage being filled
        self._fill = 0  # bytes waiting in it
        self._io: ThreadPoolExecutor | None = None  # writes one stage while the caller fills the other
        self._writes: list[Future | None] = [None, None]
        self._written = 0  # bytes handed to the kernel so far (in file order)
        self._flushed = 0  # buffered mode: bytes whose writeback was started
        self.size = 0
        self._f = None

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    def __enter__(self) -> _AtomicFile:
        fd = None
        try:
            self._dir_fd = self._where.dir_fd if isinstance(self._where, OutFile) else open_folder(self.path.parent)
            fd = self._create()
            self._f = open(fd, "wb", buffering=0)
            if self._staged:  # page-aligned, as O_DIRECT requires; reused, so touched (faulted in) once
                self._stages = [mmap.mmap(-1, _STAGE_BYTES), mmap.mmap(-1, _STAGE_BYTES)]
                self._io = ThreadPoolExecutor(1, thread_name_prefix="neoxconv-write")
        except OSError as e:
            if fd is not None and self._f is None:
                os.close(fd)
            self._abandon()
            if e.errno == errno.ENOENT and isinstance(self._where, OutFile):  # only a removed folder says that
                raise OutputError(f"{self.path}: cannot write: its folder was removed by another process after "
                                  "neoxconv checked it; make sure no other process changes OUT, then re-run") from None
            raise output_error(self.path, e) from None
        return self

    def _create(self) -> int:
        """Create the temporary: O_EXCL|O_NOFOLLOW, so a file or symlink planted (or left) under its name is
        never written through; such a leftover is removed (the link itself, never its target) and the
        temporary created afresh. A folder there is refused (EISDIR/EPERM), never entered. Relative to the folder's
        descriptor: a folder swapped for a link since it was opened is not followed."""
        try:
            return self._open_new()
        except FileExistsError:
            try:
                os.unlink(self.tmp.name, dir_fd=self._dir_fd)
            except FileNotFoundError:  # gone meanwhile
                pass
            return self._open_new()

    def _open_new(self) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        if self._want_direct:
            try:
                fd = os.open(self.tmp.name, flags | os.O_DIRECT, 0o644, dir_fd=self._dir_fd)
                self._direct = True
                return fd
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
        return os.open(self.tmp.name, flags, 0o644, dir_fd=self._dir_fd)

    # ----- filling -----
    def write(self, data) -> None:
        """Append ``data`` (any contiguous buffer): hashed now, copied into a stage (staged mode)."""
        mv = memoryview(data).cast("B")
        if not self._staged:
            self._hash.update(mv)
            try:
                self._write_all(mv)
            except OSError as e:
                raise output_error(self.path, e) from None
            self.size += len(mv)
            return
        while len(mv):
            view = self.reserve(len(mv))
            n = len(view)
            view[:] = mv[:n]
            self.commit(n)
            mv = mv[n:]

    def reserve(self, nbytes: int) -> memoryview:
        """A writable view of the next ``min(nbytes, stage space)`` bytes of the file (staged mode only).

        Fill it, then `commit` the bytes filled; nothing else may be written in between.
        """
        if not self._staged:
            raise RuntimeError(f"{self.path}: reserve() needs a staged file")
        return memoryview(self._stages[self._current])[self._fill : self._fill + min(nbytes, self.stage_space)]

    @property
    def stage_space(self) -> int:
        return _STAGE_BYTES - self._fill

    def fill(self, nbytes: int, fill: Callable[[memoryview], None], *, unit: int = 1) -> None:
        """Append ``nbytes`` by calling ``fill(view)`` on the staging buffer itself (staged mode only): no copy.

        ``fill`` receives consecutive writable views, each a multiple of ``unit`` bytes (a whole element or
        row) of at most ~1 MB (they stay in the CPU cache while checked), and must fill each completely, in
        order. A unit that would straddle two staging buffers is filled in a bounce buffer and copied.
        """
        if nbytes % unit:
            raise ValueError(f"{self.path}: {nbytes} bytes is not a multiple of the unit {unit}")
        left = nbytes
        while left:
            n = min(left, max(_FILL_BYTES // unit, 1) * unit, self.stage_space // unit * unit)
            if n:
                fill(self.reserve(n))
                self.commit(n)
            else:  # less than one unit left in this stage
                n = unit
                bounce = bytearray(n)
                fill(memoryview(bounce))
                self.write(bounce)
            left -= n

    def commit(self, nbytes: int) -> None:
        """The first ``nbytes`` of the last `reserve` view are filled; a full stage goes to the writer."""
        # hashed here, by the thread that just filled these bytes: they are still in its core's cache
        self._hash.update(memoryview(self._stages[self._current])[self._fill : self._fill + nbytes])
        self._fill += nbytes
        self.size += nbytes
        if self._fill == _STAGE_BYTES:
            self._submit(_STAGE_BYTES)

    def _submit(self, nbytes: int) -> None:
        """Hand the current stage to the writer thread; wait until the other one is free to fill."""
        stage = self._current
        self._writes[stage] = self._io.submit(self._write_stage, memoryview(self._stages[stage])[:nbytes])
        self._current = 1 - stage
        self._fill = 0
        self._wait(self._current)

    def _wait(self, stage: int) -> None:
        pending, self._writes[stage] = self._writes[stage], None
        if pending is not None:
            try:
                pending.result()
            except OSError as e:
                raise output_error(self.path, e) from None

    # ----- writing (the writer thread in staged mode) -----
    def _write_stage(self, view: memoryview) -> None:
        self._write_all(view)
        self._written += len(view)
        if not self._direct and self._written - self._flushed >= _WRITEBACK_BYTES:  # start writing to disk now
            start_writeback(self._f.fileno(), self._flushed, self._written - self._flushed)
            self._flushed = self._written

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

    def _finish(self) -> None:
        """Write what is staged: padded to the block size for O_DIRECT, then cut back to the true size."""
        if not self._staged:
            return
        for stage in (1 - self._current, self._current):
            self._wait(stage)
        if self._fill:
            padded = -(-self._fill // _BLOCK) * _BLOCK
            stage = self._stages[self._current]
            stage[self._fill : padded] = bytes(padded - self._fill)
            was_direct = self._direct
            self._write_all(memoryview(stage)[: padded if self._direct else self._fill])
            if was_direct:
                os.ftruncate(self._f.fileno(), self.size)
            self._fill = 0

    def _stop_io(self) -> None:
        """Let a write in flight end (its error, if any, is the caller's to report), stop the thread."""
        io, self._io = self._io, None
        if io is not None:
            io.shutdown(wait=True)
        self._writes = [None, None]

    def _release_stages(self) -> None:
        stages, self._stages = self._stages, []
        for stage in stages:
            try:
                stage.close()
            except BufferError:  # a view is still referenced (e.g. by a traceback): the GC frees it
                pass

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc_type is None:
            try:
                try:
                    self._finish()
                finally:
                    self._stop_io()
                self._f.flush()
                os.fsync(self._f.fileno())
                self._f.close()
                os.replace(self.tmp.name, self.path.name, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd)
            except BaseException as e:  # OSError, or Ctrl-C landing here: no temp file left behind
                self._abandon()
                if isinstance(e, OSError):
                    raise output_error(self.path, e) from None
                raise
            self._f = None
            self._release_stages()
            try:
                os.fsync(self._dir_fd)  # the rename
            except OSError:
                pass
            self._release_folder()
            return
        self._abandon()

    def _abandon(self) -> None:
        self._stop_io()
        f, self._f = self._f, None
        if f is not None:
            _close_quietly(f)
        self._release_stages()
        if self._dir_fd is not None:
            try:
                os.unlink(self.tmp.name, dir_fd=self._dir_fd)
            except OSError:
                pass
        self._release_folder()

    def _release_folder(self) -> None:
        """Close the folder's descriptor when this file opened it (an `OutFile`'s belongs to its owner)."""
        fd, self._dir_fd = self._dir_fd, None
        if fd is not None and not isinstance(self._where, OutFile):
            os.close(fd)


def _close_quietly(f) -> None:
    try:
        f.close()
    except OSError:
        pass


def atomic_write(where: Path | OutFile, data: bytes, *, hash_algo: str = "sha256") -> str:
    """Write ``data`` to ``where`` atomically; returns its hex digest under ``hash_algo`` (sha256 unless asked:
    callers that record the digest name the algorithm)."""
    with _AtomicFile(where, hash_algo=hash_algo) as f:
        f.write(data)
    return f.hexdigest()


def json_bytes(obj) -> bytes:
    """The bytes neoxconv writes for a JSON file. Strict JSON: NaN/Infinity are refused (ValueError), never
    written as invalid JSON."""
    return (json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n").encode()


def atomic_write_json(where: Path | OutFile, obj, *, hash_algo: str = "sha256") -> str:
    return atomic_write(where, json_bytes(obj), hash_algo=hash_algo)


def open_atomic(where: Path | OutFile, *, hash_algo: str = DEFAULT_HASH, staged: bool = False) -> _AtomicFile:
    """A file written to a hidden temporary and renamed to ``where`` when the ``with`` block ends without an
    error; ``write`` hashes as it writes (``hexdigest()``, ``size`` once closed). ``staged``: big files, through
    the staging buffers and O_DIRECT (as `SafetensorsWriter` writes)."""
    return _AtomicFile(where, hash_algo=hash_algo, staged=staged)


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
            w.fill_chunk(name, nbytes, fill)       # or: fill(view) reads its bytes straight into the output
        w.hexdigest(), w.hash_algo, w.size
    """

    def __init__(self, where: Path | OutFile, entries: list[tuple[str, str, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None, *, hash_algo: str = DEFAULT_HASH) -> None:
        self._file = _AtomicFile(where, staged=True, hash_algo=hash_algo)
        self.path = self._file.path
        self.entries = list(entries)
        self.header = safetensors_header(self.entries, {"format": "pt", **(metadata or {})})
        self._sizes = {name: tensor_nbytes(dtype, shape) for name, dtype, shape in self.entries}
        self.hash_algo = hash_algo
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

    def _advance(self, name: str, nbytes: int) -> None:
        """Check that ``nbytes`` more of ``name`` are due now."""
        while self._pos < len(self.entries) and self._written == self._sizes[self.entries[self._pos][0]]:
            self._pos += 1
            self._written = 0
        if self._pos >= len(self.entries) or self.entries[self._pos][0] != name:
            expected = self.entries[self._pos][0] if self._pos < len(self.entries) else "nothing"
            raise RuntimeError(f"{self.path}: writing {name!r} but {expected!r} is due")
        if self._written + nbytes > self._sizes[name]:
            raise RuntimeError(f"{self.path}: {name!r} gets more bytes than its shape holds")

    def write_chunk(self, name: str, data: np.ndarray) -> None:
        if data.size == 0:
            return
        data = np.ascontiguousarray(data)
        self._advance(name, data.nbytes)
        self._file.write(data)
        self._written += data.nbytes

    def fill_chunk(self, name: str, nbytes: int, fill: Callable[[memoryview], None], *, unit: int = 1) -> None:
        """Write the next ``nbytes`` of ``name`` by calling ``fill(view)`` on the output buffer itself.

        ``fill`` receives consecutive writable views, each a multiple of ``unit`` bytes (a whole element or
        row) of at most ~1 MB, and must fill each completely, in order. A unit that would straddle two
        staging buffers is filled in a bounce buffer and copied.
        """
        if nbytes % unit:
            raise ValueError(f"{name!r}: {nbytes} bytes is not a multiple of the unit {unit}")
        self._advance(name, nbytes)
        self._file.fill(nbytes, fill, unit=unit)
        self._written += nbytes

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            done = self._pos == len(self.entries) - 1 and self._written == self._sizes[self.entries[-1][0]]
            if self.entries and not done:
                self._file.__exit__(RuntimeError, None, None)
                raise RuntimeError(f"{self.path}: closed before every tensor was written")
        self._file.__exit__(exc_type, exc, tb)

    def hexdigest(self) -> str:
        """The file's digest under ``hash_algo`` (complete once the writer is closed)."""
        return self._file.hexdigest()

    @property
    def sha256(self) -> str:
        if self.hash_algo != "sha256":
            raise ValueError(f"{self.path}: written with hash {self.hash_algo!r}; use hexdigest()")
        return self._file.hexdigest()

    @property
    def size(self) -> int:
        return self._file.size

