"""Merged tensors streamed from the source reader: straight into the output's buffer, or in row blocks.

`stream_tensor` is the path of the bulk of every merge: the concat rules without a dtype change, over shards
that each cover their whole storage (the release format: one fresh storage per tensor). Each rank's bytes
are read through the layer's `neoxconv.source.storage.Reads` (``read_into``, one ``os.preadv`` per block)

* dim 0 (column- and vocab-parallel): straight into the writer's O_DIRECT staging buffer, rank after
  rank: no copy at all in user space;
* dim 1 (row-parallel): into one small reused buffer per rank, then interleaved into the staging buffer
  (the ranks' column blocks alternate within every output row).

Each block (~1 MB) is checked while it is in the CPU cache: the reader accumulates its CRC-32 towards the
zip directory's value (and compares once the storage is covered), and its exponent bits are counted for
inf/nan (`NonFiniteCounter`). The writer's thread hashes and writes the staging buffer.

Everything else (casts, views into shared storages, splits) goes through `iter_merged_chunks` (bounded row
blocks); the small tensors (sums, replicas) are read whole with ``Reads.read``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np

from neoxconv.dtypes import NUMPY_DTYPES, NonFiniteCounter, from_f32, to_f32
from neoxconv.merge import Rule, merge_tensor
from neoxconv.output.writer import SafetensorsWriter
from neoxconv.plan.plan import TensorPlan
from neoxconv.source.ptfile import TensorRef
from neoxconv.source.storage import CHUNK_BYTES, Reads


def streams_direct(plan: TensorPlan) -> bool:
    """True when `stream_tensor` can write this tensor (byte-identical to the general path)."""
    if plan.rule not in (Rule.CONCAT_ROWS, Rule.CONCAT_COLS) or plan.src_dtype != plan.out_dtype:
        return False
    if plan.rule is Rule.CONCAT_COLS and any(len(r.shape) != 2 for r in plan.shards):
        return False
    return all(r.covers_storage for r in plan.shards)


def stream_tensor(w: SafetensorsWriter, plan: TensorPlan, *, reader: Reads,
                  on_block: Callable[[int], None] = lambda n: None) -> int:
    """Write ``plan``'s merged tensor into ``w`` from its shards, read through ``reader``; return its count of
    inf/nan.

    Raises `CheckpointError` when a shard fails its CRC-32 check (as its last block is read) or is truncated.
    ``on_block(nbytes)`` runs after every block (progress, Ctrl-C checks).
    """
    if not streams_direct(plan):
        raise ValueError(f"{plan.key!r}: not a direct-streamed tensor")
    nonfinite = NonFiniteCounter(plan.out_dtype)
    itemsize = plan.shards[0].itemsize
    if plan.rule is Rule.CONCAT_ROWS:  # the ranks' bytes back to back
        for ref in plan.shards:
            pos = [0]

            def fill(view: memoryview, ref: TensorRef = ref, pos: list[int] = pos) -> None:
                reader.read_into(ref, pos[0], view, key=plan.key)
                pos[0] += len(view)
                nonfinite.update(view)
                on_block(len(view))

            w.fill_chunk(plan.hf_name, ref.nbytes, fill, unit=itemsize)
    else:  # row-parallel: every output row is the ranks' column blocks side by side
        widths = [r.shape[1] * itemsize for r in plan.shards]  # bytes of one row of each rank
        row_bytes = sum(widths)
        scratch: list[np.ndarray | None] = [None] * len(widths)
        done = [0] * len(widths)  # bytes of each rank read so far

        def fill(view: memoryview) -> None:
            rows = len(view) // row_bytes
            out = np.frombuffer(view, dtype=np.uint8).reshape(rows, row_bytes)
            col = 0
            for k, (ref, width) in enumerate(zip(plan.shards, widths)):
                if scratch[k] is None or scratch[k].size < rows * width:
                    scratch[k] = np.empty(rows * width, dtype=np.uint8)
                block = scratch[k][: rows * width]
                reader.read_into(ref, done[k], memoryview(block), key=plan.key)
                done[k] += rows * width
                out[:, col : col + width] = block.reshape(rows, width)
                col += width
            nonfinite.update(view)
            on_block(len(view))

        if row_bytes:  # (an empty tensor has nothing to fill)
            w.fill_chunk(plan.hf_name, plan.shape[0] * row_bytes, fill, unit=row_bytes)
    return nonfinite.count


def iter_merged_chunks(plan: TensorPlan, *, reader: Reads, chunk_bytes: int = CHUNK_BYTES) -> Iterator[np.ndarray]:
    """The merged tensor of a concat or split rule, as consecutive row blocks (bounded memory), read through
    the layer's ``reader``."""
    if plan.rule not in (Rule.CONCAT_ROWS, Rule.CONCAT_COLS, Rule.SPLIT_ROWS):
        raise ValueError(f"{plan.rule} is not streamed")

    def row_bytes(ref: TensorRef) -> int:
        return NUMPY_DTYPES[ref.dtype].itemsize * math.prod(ref.shape[1:])

    def cast(a: np.ndarray) -> np.ndarray:
        return a if plan.src_dtype == plan.out_dtype else from_f32(to_f32(a, plan.src_dtype), plan.out_dtype)

    if plan.rule is Rule.SPLIT_ROWS:  # each rank's segments, rank after rank
        for ref in plan.shards:
            step = max(1, chunk_bytes // max(1, row_bytes(ref)))
            for start, count in plan.segments:
                for i in range(start, start + count, step):
                    yield cast(reader.rows(ref, i, min(step, start + count - i), key=plan.key))
    elif plan.rule is Rule.CONCAT_ROWS:  # the ranks' bytes back to back
        for ref in plan.shards:
            rows = ref.shape[0] if ref.shape else 0
            step = max(1, chunk_bytes // max(1, row_bytes(ref)))
            for i in range(0, rows, step):
                yield cast(reader.rows(ref, i, min(step, rows - i), key=plan.key))
    else:  # row-parallel: interleave each output row from the ranks' column blocks
        rows = plan.shape[0]
        step = max(1, chunk_bytes // max(1, sum(row_bytes(r) for r in plan.shards)))
        for i in range(0, rows, step):
            n = min(step, rows - i)
            blocks = [reader.rows(ref, i, n, key=plan.key) for ref in plan.shards]
            yield merge_tensor(Rule.CONCAT_COLS, blocks, dtype=plan.src_dtype, out_dtype=plan.out_dtype)
