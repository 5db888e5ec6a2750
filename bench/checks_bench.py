"""Micro-benchmark of the merge's per-byte checks on one buffer: hash, CRC-32, finiteness, copy.

    python bench/checks_bench.py              # 256 MB buffer, best of 5
    python bench/checks_bench.py --mb 16      # smaller

Prints seconds per GB for each implementation side by side, wall and CPU (CPU is the figure that matters
on a shared machine), on the whole buffer at once (from memory) and on a 1 MB block in the CPU cache
(how the merge calls them: on a block its read has just brought in). These are the figures behind
neoxconv's choices: BLAKE3 over sha256, a hardware CRC-32 over zlib's, the exponent-mask finiteness test
over np.isfinite. An implementation whose
package is missing is reported as such, not skipped silently.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time
import zlib

import numpy as np


def best(fn, buf, repeat: int) -> tuple[float, float]:
    """(wall, CPU) seconds of the fastest of ``repeat`` calls; CPU counts every thread of this process."""
    fn(buf)  # warm
    runs = []
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        fn(buf)
        runs.append((time.perf_counter() - t, time.process_time() - c))
    return min(runs)


def in_cache(fn, block: int):
    """``fn`` on one ``block``-byte piece, as many times as the buffer holds blocks: the way the merge
    calls it, on a block the read has just brought into the CPU cache."""
    def run(buf):
        piece = buf[:block]
        for _ in range(len(buf) // block):
            fn(piece)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--block-kb", type=int, default=1024, help="block size of the in-cache column (the merge's)")
    args = ap.parse_args()
    nbytes = args.mb << 20
    block = args.block_kb << 10
    rng = np.random.default_rng(0)
    f16 = rng.standard_normal(nbytes // 2, dtype=np.float32).astype(np.float16)
    buf = memoryview(f16).cast("B")
    gb = nbytes / 1e9

    rows: list[tuple[str, str, tuple | None]] = []

    def row(group: str, name: str, fn, *, blocks: bool = True) -> None:
        try:
            whole = best(fn, buf, args.repeat)
            cached = best(in_cache(fn, block), buf, args.repeat) if blocks else None
            rows.append((group, name, (whole, cached)))
        except ImportError as e:
            rows.append((group, f"{name} (missing: {e.name})", None))

    row("hash", "hashlib.sha256", lambda b: hashlib.sha256(b).digest())

    def blake3_n(threads):
        def fn(b):
            import blake3

            return blake3.blake3(b, max_threads=threads).digest()
        return fn

    row("hash", "blake3, 1 thread", blake3_n(1))
    row("hash", f"blake3, all threads ({os.cpu_count()})", blake3_n(-1))  # blake3.AUTO == -1

    row("crc32", "zlib.crc32", lambda b: zlib.crc32(b))

    def isal_crc(b):
        from isal import isal_zlib

        return isal_zlib.crc32(b)

    def zlib_ng_crc(b):
        from zlib_ng import zlib_ng

        return zlib_ng.crc32(b)

    row("crc32", "isal isal_zlib.crc32", isal_crc)
    row("crc32", "zlib_ng.crc32", zlib_ng_crc)

    from neoxconv.source.checksums import CRC32_IMPLEMENTATION, crc32

    row("crc32", f"neoxconv.source.checksums.crc32 ({CRC32_IMPLEMENTATION})", lambda b: crc32(b))

    from neoxconv.dtypes import NonFiniteCounter

    def counter(dtype):
        c = NonFiniteCounter(dtype)  # one per row, reused across blocks as in the merge
        return lambda b: c.update(b)

    row("finite fp16", "np.isfinite(a).all()", lambda b: np.isfinite(np.frombuffer(b, np.float16)).all())
    row("finite fp16", "NonFiniteCounter (exponent mask, chosen)", counter("float16"))
    row("finite bf16", "NonFiniteCounter (exponent mask, chosen)", counter("bfloat16"))
    row("finite fp32", "np.isfinite(a).all()", lambda b: np.isfinite(np.frombuffer(b, np.float32)).all())
    row("finite fp32", "NonFiniteCounter (exponent mask, chosen)", counter("float32"))

    dst = np.ones(nbytes, dtype=np.uint8)  # touched: measures the copy, not page faults

    def copy(b):
        dst[: len(b)] = np.frombuffer(b, np.uint8)

    row("copy", "one memory-to-memory copy", copy)

    print(f"{args.mb} MB of random fp16, best of {args.repeat}, {os.cpu_count()} CPU(s); seconds per GB, "
          f"wall / CPU (all threads)")
    print(f"{'check':12s} {'implementation':44s} {'whole buffer':>15s} {f'{args.block_kb} kB in cache':>15s}")
    for group, name, v in rows:
        if v is None:
            print(f"{group:12s} {name:44s} {'-':>15s} {'-':>15s}")
            continue
        cells = [f"{w / gb:.3f} / {c / gb:.3f}" if (w, c) else "-" for w, c in (x or (0, 0) for x in v)]
        print(f"{group:12s} {name:44s} {cells[0]:>15s} {cells[1]:>15s}")


if __name__ == "__main__":
    main()
