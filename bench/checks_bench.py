"""Micro-benchmark of the merge's per-byte checks on one buffer: hash, CRC-32, finiteness, copy.

    python bench/checks_bench.py              # 256 MB buffer, best of 5
    python bench/checks_bench.py --mb 16      # smaller

Prints seconds per GB for each implementation side by side (the figures behind neoxconv's choices:
BLAKE3 over sha256, a hardware CRC-32 over zlib's, the exponent-mask finiteness test over np.isfinite).
An implementation whose package is missing is reported as such, not skipped silently.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time
import zlib

import numpy as np


def best(fn, buf, repeat: int) -> float:
    fn(buf)  # warm
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn(buf)
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    nbytes = args.mb << 20
    rng = np.random.default_rng(0)
    f16 = rng.standard_normal(nbytes // 2, dtype=np.float32).astype(np.float16)
    buf = memoryview(f16).cast("B")
    gb = nbytes / 1e9

    rows: list[tuple[str, str, float | None]] = []

    def row(group: str, name: str, fn) -> None:
        try:
            rows.append((group, name, best(fn, buf, args.repeat) / gb))
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

    from neoxconv.checksums import crc32

    row("crc32", "neoxconv.checksums.crc32 (chosen)", lambda b: crc32(b))

    row("finite fp16", "np.isfinite(a).all()", lambda b: np.isfinite(np.frombuffer(b, np.float16)).all())
    row("finite fp16", "exponent mask, bitwise_and + max",
        lambda b: (np.bitwise_and(np.frombuffer(b, np.uint16), 0x7C00).max() == 0x7C00))

    from neoxconv.dtypes import count_nonfinite

    row("finite fp16", "neoxconv.dtypes.count_nonfinite (chosen)",
        lambda b: count_nonfinite(np.frombuffer(b, np.float16), "float16"))
    row("finite fp32", "np.isfinite(a).all()", lambda b: np.isfinite(np.frombuffer(b, np.float32)).all())
    row("finite fp32", "neoxconv.dtypes.count_nonfinite (chosen)",
        lambda b: count_nonfinite(np.frombuffer(b, np.float32), "float32"))

    dst = bytearray(nbytes)
    row("copy", "bytearray slice copy", lambda b: dst.__setitem__(slice(None), b))

    print(f"buffer {args.mb} MB of random fp16, best of {args.repeat}, {os.cpu_count()} CPU(s)")
    print(f"{'check':12s} {'implementation':45s} {'s/GB':>7s}")
    for group, name, v in rows:
        print(f"{group:12s} {name:45s} {'-' if v is None else f'{v:7.3f}':>7s}")


if __name__ == "__main__":
    main()
