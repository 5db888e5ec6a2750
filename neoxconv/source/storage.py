"""The one reader of source tensor bytes: every byte neoxconv uses from a ``.pt`` file is CRC-32 checked.

A ``TensorRef`` is a view (offset, shape, stride) into a storage, and a storage is one zip member with a
CRC-32 in the zip directory. Real checkpoints share storages: under ZeRO 1/2 DeepSpeed's parameters are
views into one flat buffer of the whole rank (``p.data = flat[off:off + n].view_as(p)``), saved without
cloning, so one storage backs hundreds of tensors (with padding between them, in any order); gpt-neox's
HF->NeoX converter saves each rank's slice as a view of the full tensor. Checking the CRC per tensor would
re-read the whole storage for every view.

How it is used: one `SourceReader` per job, and every read inside a ``with reader.scope() as src:`` block
(one per layer). Leaving a block checks every byte it served, unless a later *planned* scope reads the same
storage (``SourceReader(plan=...)``, one list of refs per scope in the order the scopes open): then the
storage is checked when that last scope closes, so a ZeRO flat buffer is read once, not once per layer.
Leaving the reader's own ``with`` checks whatever is left. Nothing is counted by the caller; a wrong plan
only moves a check later or earlier, never skips one. `SourceReader.verified` says whether every byte served
from some refs' storages has passed (a merge journals a layer only then).

How the check works: the reader keeps, per storage, the CRC-32s of byte ranges known to hold the checked
bytes (at first one range, the whole storage, with the zip's CRC-32) and the CRC-32 of every range it has
served since (adjacent reads coalesce; the CRC is computed on the very bytes handed to the caller). A check
widens the served ranges to the known ranges' boundaries, reads what lies between them (padding, bytes no
tensor read) once, and compares; the known ranges are then refined to what was read, so a second pass over
the same tensors (reshard, verify --against) is checked without re-reading their neighbours. A byte that
changed between two reads therefore fails the check: the bytes used are always the checked bytes.
Bytes read: about the storages' sizes, whatever the views; memory: one row block.
"""

from __future__ import annotations

import bisect
import itertools
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from neoxconv.dtypes import NUMPY_DTYPES
from neoxconv.errors import CheckpointError
from neoxconv.source.checksums import (
    crc32,  # the one CRC-32 of the read path (hardware-accelerated)
)
from neoxconv.source.ptfile import TensorRef

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


def cached_fd(fds: dict[Path, int], path: Path) -> int:
    """The read-only descriptor of ``path`` in ``fds``, opened on first use; CheckpointError naming ``path`` when it
    cannot be opened. The caller closes the descriptors in ``fds``."""
    fd = fds.get(path)
    if fd is None:
        try:
            fd = fds[path] = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    return fd


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


class _Ranges:
    """Disjoint byte ranges of one storage, each with the CRC-32 of its bytes."""

    def __init__(self) -> None:
        self.starts: list[int] = []  # sorted
        self.spans: dict[int, tuple[int, int]] = {}  # start -> (end, crc of [start, end))

    def __bool__(self) -> bool:
        return bool(self.starts)

    def items(self) -> Iterable[tuple[int, int, int]]:
        return ((s, *self.spans[s]) for s in self.starts)

    def overlaps(self, start: int, end: int) -> bool:
        i = bisect.bisect_right(self.starts, start)
        if i and self.spans[self.starts[i - 1]][0] > start:
            return True
        return i < len(self.starts) and self.starts[i] < end

    def add(self, start: int, data) -> None:
        """Record bytes ``data`` at ``start`` (the caller ensures no overlap), coalescing with neighbours."""
        end = start + len(data)
        i = bisect.bisect_right(self.starts, start)
        prev = self.starts[i - 1] if i else None
        nxt = self.starts[i] if i < len(self.starts) else None
        if prev is not None and self.spans[prev][0] == start:  # continues the previous range: one CRC pass
            start, crc = prev, crc32(data, self.spans[prev][1])
        else:
            crc = crc32(data)
            self.starts.insert(i, start)
        if nxt is not None and nxt == end:  # and joins the next one
            nend, ncrc = self.spans.pop(nxt)
            self.starts.remove(nxt)
            crc, end = crc32_combine(crc, ncrc, nend - nxt), nend
        self.spans[start] = (end, crc)

    def piece_at(self, pos: int) -> tuple[int, int, int]:
        """The range holding byte ``pos`` (the ranges must tile the storage)."""
        s = self.starts[bisect.bisect_right(self.starts, pos) - 1]
        return (s, *self.spans[s])

    def crc_of(self, lo: int, hi: int) -> int:
        """CRC-32 of [lo, hi), which must be a union of whole ranges."""
        crc, i = 0, bisect.bisect_left(self.starts, lo)
        while i < len(self.starts) and self.starts[i] < hi:
            s = self.starts[i]
            end, part = self.spans[s]
            crc = part if s == lo else crc32_combine(crc, part, end - s)
            i += 1
        return crc

    def replace(self, lo: int, hi: int, pieces: list[tuple[int, int, int]]) -> None:
        """Replace the ranges inside [lo, hi) with ``pieces`` (start, end, crc), which tile it."""
        i = bisect.bisect_left(self.starts, lo)
        j = bisect.bisect_left(self.starts, hi)
        for s in self.starts[i:j]:
            del self.spans[s]
        self.starts[i:j] = [p[0] for p in pieces]
        for s, e, c in pieces:
            self.spans[s] = (e, c)


class _Storage:
    """One storage: where it is, the ranges known to hold checked bytes, the ranges served since."""

    def __init__(self, ref: TensorRef, last_scope: int) -> None:
        self.path, self.offset = ref.path, ref.data_offset
        self.nbytes = ref.storage_nbytes
        self.known = _Ranges()  # CRCs of the checked bytes: the whole storage (zip CRC-32), refined by checks
        self.known.starts, self.known.spans = [0], {0: (ref.storage_nbytes, ref.storage_crc)}
        self.first_check = True  # no byte of it has passed against the zip directory yet
        self.served = _Ranges()  # handed to a caller, not checked yet
        self.last_scope = last_scope  # the last planned scope that reads it (-1: none planned)
        self.names: list[str] = []  # (the first few) tensors served since its last check, for messages

    def name(self, key: str) -> None:
        if key not in self.names and len(self.names) < 3:
            self.names.append(key)


class SourceReader:
    """Reads source tensors by storage and CRC-checks every byte it serves (see the module docstring)."""

    def __init__(self, *, chunk_bytes: int = CHUNK_BYTES, plan: Sequence[Iterable[TensorRef]] = ()) -> None:
        self.chunk_bytes = chunk_bytes
        self.bytes_read = 0
        self._last: dict[tuple, int] = {}
        for k, refs in enumerate(plan):
            for r in refs:
                self._last[_key(r)] = k
        self._storages: dict[tuple, _Storage] = {}
        self._fds: dict[Path, int] = {}
        self._scopes = 0  # scopes opened so far

    def __enter__(self) -> SourceReader:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.check_served()
        finally:
            self.close()

    def close(self) -> None:
        """Close the files (nothing is checked: leave the ``with`` block normally for that)."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def scope(self) -> Reads:
        """A block of reads (one layer): ``with reader.scope() as src: src.rows(...)``."""
        self._scopes += 1
        return Reads(self, self._scopes - 1)

    def verified(self, refs: Iterable[TensorRef]) -> bool:
        """True when every byte served from the storages behind ``refs`` has passed its check."""
        return not any(st.served for st in (self._storages.get(_key(r)) for r in refs) if st is not None)

    def check_served(self, *, upto_scope: int | None = None) -> None:
        """Check every storage with bytes served and not checked yet (whose last planned scope is at most
        ``upto_scope``, when given)."""
        for st in self._storages.values():
            if st.served and (upto_scope is None or st.last_scope <= upto_scope):
                self._check(st)

    def check(self, refs: Iterable[TensorRef]) -> None:
        """Read the storages behind ``refs`` whole, now, and check them, remembering the CRC-32 of every
        tensor's byte span: later reads of those tensors are then checked without re-reading the rest of
        their storage (a ZeRO flat buffer read layer by layer, several times, by ``reshard``)."""
        cuts: dict[tuple, set[int]] = {}
        for r in refs:
            st = self._storage(r)
            st.name(r.name)
            lo, hi = _span(r, 0, r.shape)
            isz = NUMPY_DTYPES[r.dtype].itemsize
            cuts.setdefault(_key(r), set()).update((lo * isz, hi * isz) if r.numel else ())
        for key, points in cuts.items():
            st = self._storages[key]
            if st.served:
                self._check(st)
            bounds = sorted({0, st.nbytes, *(p for p in points if 0 < p < st.nbytes)})
            pieces = []
            for lo, hi in itertools.pairwise(bounds):
                crc = 0
                for pos in range(lo, hi, self.chunk_bytes):
                    block = bytearray(min(self.chunk_bytes, hi - pos))
                    self._pread(st, pos, memoryview(block))
                    crc = crc32(block, crc)
                pieces.append((lo, hi, crc))
            self._settle(st, 0, st.nbytes, pieces)

    # ---- internals ----
    def _storage(self, ref: TensorRef) -> _Storage:
        # the recorded size and CRC are part of the key: two zip entries pointing at the same bytes are each
        # checked against their own CRC-32 (keyed by offset alone, the second shared the first's check)
        key = _key(ref)
        st = self._storages.get(key)
        if st is None:
            st = self._storages[key] = _Storage(ref, self._last.get(key, -1))
        return st

    def _pread(self, st: _Storage, start: int, view: memoryview) -> None:
        """The one read of the reader: ``len(view)`` bytes of ``st`` from byte ``start``."""
        fd = cached_fd(self._fds, st.path)
        self.bytes_read += pread_exactly(fd, view, st.offset + start, st.path,
                                         "ends inside storage data (truncated; re-download it)")

    def _serve(self, st: _Storage, start: int, view: memoryview) -> None:
        """Read bytes [start, start + len) of ``st`` into ``view`` and remember their CRC-32 for the check."""
        if not len(view):
            return
        if st.served.overlaps(start, start + len(view)):
            self._check(st)  # bytes read twice in one pass: check the first reading before the second counts
        self._pread(st, start, view)
        st.served.add(start, view)
        # the common case, checked at once and without I/O: the served range is exactly one known range
        # (a tensor that is its whole storage, or a span `check` remembered)
        s, (end, crc) = self._served_around(st, start)
        if st.known.spans.get(s, (None,))[0] == end:
            del st.served.spans[s]
            st.served.starts.remove(s)
            self._compare(st, crc, st.known.spans[s][1])
            st.first_check = False
            if not st.served:
                st.names.clear()

    @staticmethod
    def _served_around(st: _Storage, pos: int) -> tuple[int, tuple[int, int]]:
        s = st.served.starts[bisect.bisect_right(st.served.starts, pos) - 1]
        return s, st.served.spans[s]

    def _check(self, st: _Storage) -> None:
        """Check every served range of ``st``: widen each to the known ranges around it, read the bytes in
        between once, compare the combined CRC-32 with the known one, then refine the known ranges."""
        served = list(st.served.items())
        st.served = _Ranges()
        windows: list[list] = []  # [lo, hi, [(start, end, crc) served inside]]
        for s, e, c in served:
            lo = st.known.piece_at(s)[0]
            hi = st.known.piece_at(e - 1)[1]
            if windows and lo < windows[-1][1]:
                windows[-1][1] = max(windows[-1][1], hi)
                windows[-1][2].append((s, e, c))
            else:
                windows.append([lo, hi, [(s, e, c)]])
        for lo, hi, inside in windows:
            pieces, crc, pos = [], 0, lo
            for s, e, c in [*inside, (hi, hi, 0)]:
                if pos < s:  # a gap: read it (in blocks), remember its CRC as a known piece
                    gap_crc, start = 0, pos
                    while pos < s:
                        block = bytearray(min(self.chunk_bytes, s - pos))
                        self._pread(st, pos, memoryview(block))
                        gap_crc = crc32(block, gap_crc)
                        pos += len(block)
                    pieces.append((start, s, gap_crc))
                    crc = gap_crc if start == lo else crc32_combine(crc, gap_crc, s - start)
                if s < e:
                    pieces.append((s, e, c))
                    crc = c if s == lo else crc32_combine(crc, c, e - s)
                    pos = e
            self._settle(st, lo, hi, pieces, crc)

    def _settle(self, st: _Storage, lo: int, hi: int, pieces: list[tuple[int, int, int]],
                crc: int | None = None) -> None:
        """Compare the CRC-32 of [lo, hi) as read (``pieces``) with the known one; then know the pieces."""
        if crc is None:
            crc = 0
            for s, e, c in pieces:
                crc = c if s == lo else crc32_combine(crc, c, e - s)
        self._compare(st, crc, st.known.crc_of(lo, hi))
        st.known.replace(lo, hi, pieces)
        st.first_check = False
        if not st.served:
            st.names.clear()

    def _compare(self, st: _Storage, got: int, want: int) -> None:
        if got == want:
            return
        what = ", ".join(repr(n) for n in st.names) or "its tensors"
        if st.first_check:
            raise CheckpointError(
                f"{st.path}: the storage holding {what} fails its CRC-32 check (the file is corrupt; re-download it)")
        raise CheckpointError(
            f"{st.path}: the storage holding {what} changed while neoxconv read it (its bytes no longer match the "
            "ones that passed the CRC-32 check); re-run once nothing writes to the file")


class Reads:
    """The reads of one scope (a layer): rows, whole tensors, consecutive bytes; checked when it closes."""

    def __init__(self, reader: SourceReader, index: int) -> None:
        self._reader, self.index = reader, index

    def __enter__(self) -> Reads:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self._reader.check_served(upto_scope=self.index)

    def _storage(self, ref: TensorRef, key: str | None) -> _Storage:
        st = self._reader._storage(ref)
        st.name(key or ref.name)
        return st

    def rows(self, ref: TensorRef, start: int, count: int, *, key: str | None = None) -> np.ndarray:
        """Rows ``start .. start + count`` of ``ref`` as a fresh contiguous array (all of it for 0-d)."""
        dt = NUMPY_DTYPES[ref.dtype]
        shape = (count, *ref.shape[1:]) if ref.shape else ()
        if math.prod(shape) == 0:
            return np.zeros(shape, dtype=dt)
        st = self._storage(ref, key)
        serve, isz = self._reader._serve, dt.itemsize
        lo, hi = _span(ref, start, shape)
        strides = ref.stride[: len(shape)]
        if _contiguous(shape, strides):
            buf = np.empty(shape, dtype=dt)
            serve(st, lo * isz, memoryview(buf.reshape(-1)).cast("B"))
            return buf
        budget = max(4 * self._reader.chunk_bytes, 4 * math.prod(shape) * isz)
        if (hi - lo) * isz <= budget:  # read the span the rows lie in, then pick them out
            span = np.empty(hi - lo, dtype=dt)
            serve(st, lo * isz, memoryview(span).cast("B"))
            out = np.lib.stride_tricks.as_strided(span, shape, tuple(s * isz for s in strides), writeable=False)
            return np.ascontiguousarray(out)
        # rows far apart in their storage (a column slice at a high TP degree): one read per row when a row
        # is contiguous, else (a transposed view) the span in blocks, picking out the elements in each
        out = np.empty(shape, dtype=dt)
        inner, inner_strides = shape[1:], strides[1:]
        if _contiguous(inner, inner_strides):
            for i in range(count):
                r_lo = _span(ref, start + i, (1, *inner))[0]
                serve(st, r_lo * isz, memoryview(out[i].reshape(-1)).cast("B"))
            return out
        flat = np.zeros((), dtype=np.int64)
        for n, s in zip(shape, strides):
            flat = flat[..., None] + np.arange(n, dtype=np.int64) * s
        flat = flat.reshape(-1) + (ref.storage_offset + (start * ref.stride[0] if ref.shape else 0) - lo)
        dst = out.reshape(-1)
        step = max(1, self._reader.chunk_bytes // isz)
        for p in range(0, hi - lo, step):
            block = np.empty(min(step, hi - lo - p), dtype=dt)
            serve(st, (lo + p) * isz, memoryview(block).cast("B"))
            sel = (flat >= p) & (flat < p + block.size)
            dst[sel] = block[flat[sel] - p]
        return out

    def read(self, ref: TensorRef, *, key: str | None = None) -> np.ndarray:
        """A whole (small) tensor."""
        return self.rows(ref, 0, ref.shape[0] if ref.shape else 1, key=key)

    def read_into(self, ref: TensorRef, offset: int, view: memoryview, *, key: str | None = None) -> None:
        """Bytes ``offset .. offset + len(view)`` of a contiguous tensor's data, into the caller's buffer
        (`neoxconv.output.streaming` reads straight into the output's staging buffer this way)."""
        if not ref.is_contiguous or offset < 0 or offset + len(view) > ref.nbytes:
            raise ValueError(f"{ref.path}: bytes {offset}+{len(view)} are not inside contiguous {ref.name!r}")
        st = self._storage(ref, key)
        self._reader._serve(st, ref.storage_offset * ref.itemsize + offset, view)

    def same(self, refs: list[TensorRef], *, key: str | None = None) -> bool:
        """Whether the tensors hold identical values, comparing storage bytes without expanding views
        (a dropped buffer saved as an ``expand()``ed 16384x16384 view costs its storage, not 1 GiB)."""
        first = refs[0]
        for ref in refs[1:]:
            if ref.shape != first.shape or ref.dtype != first.dtype:
                return False
            if ref.stride == first.stride and self._same_span(first, ref, key):
                continue
            if math.prod(ref.shape) > (1 << 20):  # different layouts of a big buffer: not worth expanding
                return False
            if self.read(first, key=key).tobytes() != self.read(ref, key=key).tobytes():
                return False
        return True

    def _same_span(self, a: TensorRef, b: TensorRef, key: str | None) -> bool:
        if math.prod(a.shape) == 0:
            return True
        isz = NUMPY_DTYPES[a.dtype].itemsize
        (alo, ahi), (blo, _) = _span(a, 0, a.shape), _span(b, 0, b.shape)
        sa, sb = self._storage(a, key), self._storage(b, key)
        pos, end = alo * isz, ahi * isz
        shift = (blo - alo) * isz
        chunk = self._reader.chunk_bytes
        while pos < end:
            n = min(chunk, end - pos)
            x, y = bytearray(n), bytearray(n)
            self._reader._serve(sa, pos, memoryview(x))
            self._reader._serve(sb, pos + shift, memoryview(y))
            if x != y:
                return False
            pos += n
        return True


def read_tensors(refs: dict[str, TensorRef]) -> dict[str, np.ndarray]:
    """Whole (small) tensors by key, every storage behind them checked before they are returned."""
    with SourceReader() as reader, reader.scope() as src:
        return {k: src.read(r, key=k) for k, r in refs.items()}


def _key(ref: TensorRef) -> tuple:
    return (ref.path, ref.data_offset, ref.storage_nbytes, ref.storage_crc)


def _span(ref: TensorRef, start_row: int, shape: tuple[int, ...]) -> tuple[int, int]:
    """Element range [lo, hi) of the storage that rows ``start_row ...`` of shape ``shape`` touch."""
    lo = ref.storage_offset + (start_row * ref.stride[0] if ref.shape else 0)
    return lo, lo + 1 + sum((n - 1) * s for n, s in zip(shape, ref.stride))


def _contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    expected = 1
    for size, step in zip(reversed(shape), reversed(stride)):
        if size != 1 and step != expected:
            return False
        expected *= size
    return True
