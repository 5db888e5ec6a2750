"""Concatenated tensors read from the source files straight into the output's buffer, checked in cache.

This is the path of the bulk of every merge: the concat rules without a dtype change, over shards that
each cover their whole storage (the release format: one fresh storage per tensor). Each rank's bytes are
read with ``os.preadv``

* dim 0 (column- and vocab-parallel): straight into the writer's O_DIRECT staging buffer, rank after
  rank: no copy at all in user space;
* dim 1 (row-parallel): into one small reused buffer per rank, then interleaved into the staging buffer
  (the ranks' column blocks alternate within every output row).

Each block (~1 MB) is checked while it is in the CPU cache: its CRC-32 accumulates towards the zip
directory's value (`neoxconv.source.checksums.crc32`, hardware-accelerated) and its exponent bits are counted
for inf/nan (`NonFiniteCounter`). The writer's thread hashes and writes the staging buffer. Everything
else (casts, views into shared storages, sums, replicas) takes the general path in `neoxconv.merge`.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from neoxconv.source.checksums import crc32
from neoxconv.dtypes import NonFiniteCounter
from neoxconv.errors import CheckpointError
from neoxconv.merge import Rule
from neoxconv.plan.plan import TensorPlan
from neoxconv.source.ptfile import TensorRef
from neoxconv.source.storage import pread_exactly
from neoxconv.output.writer import SafetensorsWriter


def streams_direct(plan: TensorPlan) -> bool:
    """True when `stream_tensor` can write this tensor (byte-identical to the general path)."""
    if plan.rule not in (Rule.CONCAT_ROWS, Rule.CONCAT_COLS) or plan.src_dtype != plan.out_dtype:
        return False
    if plan.rule is Rule.CONCAT_COLS and any(len(r.shape) != 2 for r in plan.shards):
        return False
    return all(r.covers_storage for r in plan.shards)


class _RankReader:
    """Consecutive bytes of one shard, read with preadv into the caller's buffers; CRC-32 on the way."""

    def __init__(self, ref: TensorRef, key: str) -> None:
        self.ref, self.key = ref, key
        self.pos = ref.byte_offset
        self.end = ref.byte_offset + ref.nbytes
        self.crc = 0
        try:
            self._fd = os.open(ref.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            raise CheckpointError(f"{ref.path}: cannot read: {e.strerror or e}") from None

    def read_into(self, view: memoryview) -> None:
        if self.pos + len(view) > self.end:
            raise RuntimeError(f"{self.ref.path}: read past the data of {self.key!r}")
        self.pos += pread_exactly(self._fd, view, self.pos, self.ref.path,
                                  f"ends inside the data of {self.key!r} (truncated)")
        self.crc = crc32(view, self.crc)

    def check(self) -> None:
        if self.pos != self.end:
            raise RuntimeError(f"{self.ref.path}: {self.key!r} was not read to its end")
        if self.crc != self.ref.storage_crc:
            raise CheckpointError(f"{self.ref.path}: the data of {self.key!r} fails its CRC-32 check "
                                  "(the file is corrupt; re-download it)")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def stream_tensor(w: SafetensorsWriter, plan: TensorPlan, *,
                  on_block: Callable[[int], None] = lambda n: None) -> int:
    """Write ``plan``'s merged tensor into ``w`` from its shards' files; return its count of inf/nan.

    Raises `CheckpointError` when a shard fails its CRC-32 check (after reading it) or is truncated.
    ``on_block(nbytes)`` runs after every block (progress, Ctrl-C checks).
    """
    if not streams_direct(plan):
        raise ValueError(f"{plan.key!r}: not a direct-streamed tensor")
    nonfinite = NonFiniteCounter(plan.out_dtype)
    readers: list[_RankReader] = []
    try:
        for ref in plan.shards:
            readers.append(_RankReader(ref, plan.key))
        itemsize = plan.shards[0].itemsize
        if plan.rule is Rule.CONCAT_ROWS:  # the ranks' bytes back to back
            for reader in readers:
                def fill(view: memoryview, reader: _RankReader = reader) -> None:
                    reader.read_into(view)
                    nonfinite.update(view)
                    on_block(len(view))

                w.fill_chunk(plan.hf_name, reader.ref.nbytes, fill, unit=itemsize)
                reader.check()
        else:  # row-parallel: every output row is the ranks' column blocks side by side
            widths = [r.ref.shape[1] * itemsize for r in readers]  # bytes of one row of each rank
            row_bytes = sum(widths)
            scratch: list[np.ndarray | None] = [None] * len(readers)

            def fill(view: memoryview) -> None:
                rows = len(view) // row_bytes
                out = np.frombuffer(view, dtype=np.uint8).reshape(rows, row_bytes)
                col = 0
                for k, (reader, width) in enumerate(zip(readers, widths)):
                    if scratch[k] is None or scratch[k].size < rows * width:
                        scratch[k] = np.empty(rows * width, dtype=np.uint8)
                    block = scratch[k][: rows * width]
                    reader.read_into(memoryview(block))
                    out[:, col : col + width] = block.reshape(rows, width)
                    col += width
                nonfinite.update(view)
                on_block(len(view))

            if row_bytes:  # (an empty tensor has nothing to fill)
                w.fill_chunk(plan.hf_name, plan.shape[0] * row_bytes, fill, unit=row_bytes)
            for reader in readers:
                reader.check()
    finally:
        for reader in readers:
            reader.close()
    return nonfinite.count
