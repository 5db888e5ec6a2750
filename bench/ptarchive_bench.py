"""Micro-benchmark: one ``.pt`` shard written by ``torch.save`` and by neoxconv's streaming writer, side by side.

    python bench/ptarchive_bench.py              # a ~1 GB fp16 shard, best of 2
    python bench/ptarchive_bench.py --mb 200     # smaller

Rows (each ends with fsync, as an output file does; CPU counts every thread of this process):
  torch.save                         what split/reshard call today
  torch.save + re-read for the hash  today's whole cost: the written file is read again to hash it (BLAKE3)
  ptarchive                          PtArchiveWriter from the tensors' memory in 16 MB blocks (CRC-32 while
                                     the block is in cache), through a buffered file
  ptarchive + BLAKE3 while writing   the same with the file's hash computed on the way (``on_bytes``)
and whether the files are byte-identical to torch.save's. The tensors are built once, in memory, before
any timing.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from neoxconv.output.hashing import StreamHasher, hash_file
from neoxconv.output.ptarchive import (
    PtArchiveWriter,
    TensorSpec,
    archive_name_for,
    plan_archive,
)

_BLOCK = 16 << 20


def shard(mb: int) -> OrderedDict:
    """A transformer layer's shapes (hidden h, 4h MLP, fp16), scaled so the shard is about ``mb`` MB."""
    h = max(64, int((mb * 1e6 / 2 / 12) ** 0.5) // 64 * 64)  # 12 h^2 parameters per layer
    g = torch.Generator().manual_seed(0)
    return OrderedDict([
        ("input_layernorm.weight", torch.ones(h, dtype=torch.float16)),
        ("attention.query_key_value.weight", torch.randn(3 * h, h, generator=g).half()),
        ("attention.query_key_value.bias", torch.zeros(3 * h, dtype=torch.float16)),
        ("attention.dense.weight", torch.randn(h, h, generator=g).half()),
        ("mlp.dense_h_to_4h.weight", torch.randn(4 * h, h, generator=g).half()),
        ("mlp.dense_4h_to_h.weight", torch.randn(h, 4 * h, generator=g).half()),
    ])


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_torch(obj, path: Path, *, rehash: bool) -> None:
    torch.save(obj, path)
    fsync(path)
    if rehash:
        hash_file(path, "blake3")


def write_ours(obj, path: Path, *, hashed: bool) -> None:
    specs = OrderedDict((k, TensorSpec(str(t.dtype).removeprefix("torch."), tuple(t.shape))) for k, t in obj.items())
    layout = plan_archive(specs, archive_name=archive_name_for(path))
    hasher = StreamHasher("blake3") if hashed else None
    with open(path, "wb", buffering=_BLOCK) as f:
        w = PtArchiveWriter(f.write, layout, on_bytes=hasher.update if hasher else None)
        for i, t in enumerate(obj.values()):
            raw = memoryview(t.numpy().reshape(-1).view("u1"))
            for start in range(0, len(raw), _BLOCK):
                w.write(i, raw[start : start + _BLOCK])
        w.finish()
        f.flush()
        os.fsync(f.fileno())
    if hasher:
        hasher.hexdigest()


def timed(fn, repeat: int) -> tuple[float, float]:
    runs = []
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        fn()
        runs.append((time.perf_counter() - t, time.process_time() - c))
    return min(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=1000, help="shard size in MB (default ~1 GB)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    obj = shard(args.mb)
    gb = sum(t.numel() * t.element_size() for t in obj.values()) / 1e9
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        ref = Path(tmp) / "a" / "layer_02-model_00-model_states.pt"
        mine = Path(tmp) / "b" / "layer_02-model_00-model_states.pt"
        ref.parent.mkdir()
        mine.parent.mkdir()
        rows = [
            ("torch.save", lambda: write_torch(obj, ref, rehash=False)),
            ("torch.save + re-read for the hash", lambda: write_torch(obj, ref, rehash=True)),
            ("ptarchive", lambda: write_ours(obj, mine, hashed=False)),
            ("ptarchive + BLAKE3 while writing", lambda: write_ours(obj, mine, hashed=True)),
        ]
        print(f"shard: {len(obj)} fp16 tensors, {gb:.3f} GB; best of {args.repeat}; each ends with fsync")
        print(f"{'':36s} {'wall s/GB':>10s} {'CPU s/GB':>10s}")
        for name, fn in rows:
            wall, cpu = timed(fn, args.repeat)
            print(f"{name:36s} {wall / gb:10.3f} {cpu / gb:10.3f}")
        same = hash_file(ref, "blake3") == hash_file(mine, "blake3")
        print(f"same bytes as torch.save: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
