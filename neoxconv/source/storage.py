"""Storage-level reading: every storage of a source archive is read and CRC-checked at most once per merge.

A ``TensorRef`` is a view (offset, shape, stride) into a storage, and a storage is one zip member with a
CRC-32 in the zip directory. Real checkpoints share storages: under ZeRO 1/2 DeepSpeed's parameters are
views into one flat buffer of the whole rank (``p.data = flat[off:off + n].view_as(p)``), saved without
cloning, so one storage backs hundreds of tensors (with padding between them, in any order); gpt-neox's
HF->NeoX converter saves each rank's slice as a view of the full tensor. Checking the CRC per tensor would
re-read the whole storage for every view.

`SourceReader` instead reads only the bytes each tensor needs, in row blocks (bounded memory), and keeps
the CRC-32 of every byte range it has read, coalescing adjacent ranges with `crc32_combine`. When the last
planned read of a storage is done it reads the gaps (padding, bytes no planned tensor covers) once,
combines everything in order and compares with the zip directory. Bytes read: about the storages' sizes,
whatever the views; memory: one row block.
"""

from __future__ import annotations

import bisect
import math
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from neoxconv.source.checksums import crc32  # the one CRC-32 of the read path (hardware-accelerated)
from neoxconv.errors import CheckpointError
from neoxconv.source.ptfile import NUMPY_DTYPES, TensorRef

CHUNK_BYTES = 16 << 20


# CRC-32 of a concatenation from the CRCs of its parts (zlib's crc32_combine, which Python's zlib does not
# expose): multiply crc1 by x^(8 * len2) modulo the CRC polynomial, then add crc2. GF(2) arithmetic on the
# reflected polynomial; x2n[k] is x^(2^k) mod P.
_POLY = 0xEDB88320


def _multmodp(a: int, b: int) -> int:
    m, p = 1 << 31, 0
    while m:
        if a & m:
            p ^= b
            if not a & (m - 1):
                break
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1
    return p


def _x2n_table() -> list[int]:
    table, p = [1 << 30], 1 << 30  # x^1
    for _ in range(31):
        p = _multmodp(p, p)
        table.append(p)
    return table


_X2N = _x2n_table()


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32 of ``a + b`` given ``crc32(a)``, ``crc32(b)`` and ``len(b)``."""
    p, n, k = 1 << 31, len2, 3  # x^0; len2 bytes = 8 * len2 bits = 2^3 * len2
    while n:
        if n & 1:
            p = _multmodp(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return _multmodp(p, crc1) ^ crc2



def pread_exactly(fd: int, view: memoryview, offset: int, path: Path | str, truncated: str) -> int:
    """Fill ``view`` from ``fd`` at ``offset`` (short reads retried); CheckpointError naming ``path`` when it
    cannot be read or ends first (``truncated`` says what it ends inside). Returns the bytes read."""
    done = 0
    while done < len(view):
        try:
            n = os.preadv(fd, [view[done:]], offset + done)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
        if n <= 0:
            raise CheckpointError(f"{path}: {truncated}")
        done += n
    return done

class _Storage:
    """One storage: where it is, its recorded CRC, and the CRCs of the disjoint byte ranges read so far."""

    def __init__(self, ref: TensorRef) -> None:
        self.path, self.offset = ref.path, ref.data_offset
        self.nbytes, self.crc = ref.storage_nbytes, ref.storage_crc
        self.starts: list[int] = []  # sorted starts of recorded ranges
        self.ranges: dict[int, tuple[int, int]] = {}  # start -> (end, crc of [start, end))
        self.pending = 0  # planned tensor reads not done yet
        self.verified = False
        self.names: list[str] = []

    def record(self, start: int, data: memoryview) -> None:
        """Remember the CRC of bytes [start, start + len) (skipped if it overlaps a range already kept)."""
        end = start + len(data)
        if end <= start:
            return
        i = bisect.bisect_right(self.starts, start)
        prev = self.starts[i - 1] if i else None
        nxt = self.starts[i] if i < len(self.starts) else None
        if (prev is not None and self.ranges[prev][0] > start) or (nxt is not None and nxt < end):
            return  # overlapping view: those bytes are checked through the other range or as a gap
        crc = crc32(data)
        if prev is not None and self.ranges[prev][0] == start:  # extends the previous range
            start, crc = prev, crc32_combine(self.ranges[prev][1], crc, end - start)
        else:
            self.starts.insert(i, start)
        if nxt is not None and nxt == end:  # and joins the next one
            nend, ncrc = self.ranges.pop(nxt)
            self.starts.remove(nxt)
            crc, end = crc32_combine(crc, ncrc, nend - nxt), nend
        self.ranges[start] = (end, crc)


class SourceReader:
    """Reads source tensors by storage. Call `expect` with every planned read, then `rows`/`read` and
    `done` per tensor; a storage is CRC-checked when its last expected read is done (or at `close`)."""

    def __init__(self, *, chunk_bytes: int = CHUNK_BYTES) -> None:
        self.chunk_bytes = chunk_bytes
        self.bytes_read = 0
        self._storages: dict[tuple[Path, int, int, int], _Storage] = {}
        self._fds: dict[Path, int] = {}

    def __enter__(self) -> SourceReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _storage(self, ref: TensorRef) -> _Storage:
        # the recorded size and CRC are part of the key: two zip entries pointing at the same bytes are each
        # checked against their own CRC-32 (keyed by offset alone, the second shared the first's check)
        key = (ref.path, ref.data_offset, ref.storage_nbytes, ref.storage_crc)
        st = self._storages.get(key)
        if st is None:
            st = self._storages[key] = _Storage(ref)
        return st

    def expect(self, refs: Iterable[TensorRef]) -> None:
        for ref in refs:
            st = self._storage(ref)
            st.pending += 1
            st.verified = False

    def verified(self, refs: Iterable[TensorRef]) -> bool:
        """True when the storages behind ``refs`` have all passed their CRC check."""
        return all(self._storage(r).verified for r in refs)

    # ---- raw reads ----
    def _pread(self, st: _Storage, start: int, view: memoryview) -> None:
        fd = self._fds.get(st.path)
        if fd is None:
            try:
                fd = self._fds[st.path] = os.open(st.path, os.O_RDONLY)
            except OSError as e:
                raise CheckpointError(f"{st.path}: cannot read: {e.strerror or e}") from None
        self.bytes_read += pread_exactly(fd, view, st.offset + start, st.path,
                                         "ends inside storage data (truncated; re-download it)")

    def _span(self, ref: TensorRef, start_row: int, shape: tuple[int, ...]) -> tuple[int, int]:
        """Element range [lo, hi) of the storage that rows ``start_row ...`` of shape ``shape`` touch."""
        lo = ref.storage_offset + (start_row * ref.stride[0] if ref.shape else 0)
        return lo, lo + 1 + sum((n - 1) * s for n, s in zip(shape, ref.stride))

    # ---- tensors ----
    def rows(self, ref: TensorRef, start: int, count: int) -> np.ndarray:
        """Rows ``start .. start + count`` of ``ref`` as a fresh contiguous array (all of it for 0-d)."""
        dt = NUMPY_DTYPES[ref.dtype]
        shape = (count, *ref.shape[1:]) if ref.shape else ()
        if math.prod(shape) == 0:
            return np.zeros(shape, dtype=dt)
        st = self._storage(ref)
        lo, hi = self._span(ref, start, shape)
        strides = ref.stride[: len(shape)]
        if _contiguous(shape, strides):
            buf = np.empty(shape, dtype=dt)
            view = memoryview(buf.reshape(-1)).cast("B")
            self._pread(st, lo * dt.itemsize, view)
            st.record(lo * dt.itemsize, view)
            return buf
        if (hi - lo) * dt.itemsize > max(4 * self.chunk_bytes, 4 * math.prod(shape) * dt.itemsize):
            # a view whose rows are far apart in its storage (e.g. a transposed weight): map it, so memory
            # stays bounded; those bytes are CRC-checked with the storage's gaps
            mapped = np.memmap(st.path, dtype=dt, mode="r", offset=st.offset + lo * dt.itemsize, shape=(hi - lo,))
            self.bytes_read += math.prod(shape) * dt.itemsize
            out = np.lib.stride_tricks.as_strided(mapped, shape, tuple(s * dt.itemsize for s in strides),
                                                  writeable=False)
            return np.ascontiguousarray(out)
        span = np.empty(hi - lo, dtype=dt)
        view = memoryview(span).cast("B")
        self._pread(st, lo * dt.itemsize, view)
        st.record(lo * dt.itemsize, view)
        out = np.lib.stride_tricks.as_strided(span, shape, tuple(s * dt.itemsize for s in strides), writeable=False)
        return np.ascontiguousarray(out)

    def read(self, ref: TensorRef) -> np.ndarray:
        """A whole (small) tensor."""
        return self.rows(ref, 0, ref.shape[0] if ref.shape else 1)

    def same(self, refs: list[TensorRef]) -> bool:
        """Whether the tensors hold identical values, comparing storage bytes without expanding views
        (a dropped buffer saved as an ``expand()``ed 16384x16384 view costs its storage, not 1 GiB)."""
        first = refs[0]
        for ref in refs[1:]:
            if ref.shape != first.shape or ref.dtype != first.dtype:
                return False
            if ref.stride == first.stride and self._same_span(first, ref):
                continue
            if math.prod(ref.shape) > (1 << 20):  # different layouts of a big buffer: not worth expanding
                return False
            if self.read(first).tobytes() != self.read(ref).tobytes():
                return False
        return True

    def _same_span(self, a: TensorRef, b: TensorRef) -> bool:
        if math.prod(a.shape) == 0:
            return True
        isz = NUMPY_DTYPES[a.dtype].itemsize
        (alo, ahi), (blo, _) = self._span(a, 0, a.shape), self._span(b, 0, b.shape)
        sa, sb = self._storage(a), self._storage(b)
        pos, end = alo * isz, ahi * isz
        shift = (blo - alo) * isz
        while pos < end:
            n = min(self.chunk_bytes, end - pos)
            x, y = bytearray(n), bytearray(n)
            self._pread(sa, pos, memoryview(x))
            self._pread(sb, pos + shift, memoryview(y))
            sa.record(pos, memoryview(x))
            sb.record(pos + shift, memoryview(y))
            if x != y:
                return False
            pos += n
        return True

    def check_whole(self, refs: Iterable[TensorRef]) -> None:
        """Read and CRC-check, once each, the whole storages behind ``refs``: for a caller that reads them in
        many separate passes without `expect` (``reshard``), so that each pass does not re-read the gaps."""
        for ref in refs:
            st = self._storage(ref)
            if not st.verified:
                st.starts, st.ranges = [], {}
                self._verify(st)

    def vouch(self, ref: TensorRef) -> None:
        """The caller read ``ref``'s whole storage itself and checked its CRC-32 (`neoxconv.output.streaming`):
        one planned read done, nothing left to read or check for that storage."""
        st = self._storage(ref)
        st.pending -= 1
        st.verified = True
        st.starts, st.ranges = [], {}

    def done(self, ref: TensorRef, key: str) -> None:
        """One planned read of ``ref`` is finished; the last one checks the storage's CRC-32."""
        st = self._storage(ref)
        st.pending -= 1
        if key not in st.names and len(st.names) < 3:
            st.names.append(key)
        if st.pending <= 0 and not st.verified:
            self._verify(st)

    def _verify(self, st: _Storage) -> None:
        """Read the bytes no tensor read (once), combine with the recorded ranges, compare with the zip."""
        crc, pos = 0, 0
        for start in [*st.starts, st.nbytes]:
            while pos < start:  # a gap
                block = bytearray(min(self.chunk_bytes, start - pos))
                self._pread(st, pos, memoryview(block))
                crc = crc32(block, crc)
                pos += len(block)
            if start < st.nbytes:
                end, part = st.ranges[start]
                crc = crc32_combine(crc, part, end - start)
                pos = end
        if crc != st.crc:
            what = ", ".join(repr(n) for n in st.names)
            raise CheckpointError(
                f"{st.path}: the storage holding {what} fails its CRC-32 check (the file is corrupt; re-download it)")
        st.verified = True
        st.starts, st.ranges = [], {}


def _contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    expected = 1
    for size, step in zip(reversed(shape), reversed(stride)):
        if size != 1 and step != expected:
            return False
        expected *= size
    return True
