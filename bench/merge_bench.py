"""Merge benchmark: `neoxconv merge` vs `cp -r` + `sync` on the same synthetic checkpoint, side by side.

    python bench/merge_bench.py                          # 20B width (hidden 6144, 64 heads), 4 layers, TP=2 fp16
    python bench/merge_bench.py --layers 2 --layers 4    # RSS flatness across layer counts
    python bench/merge_bench.py --hidden 256 --heads 8 --vocab 4096 --runs 1   # CI-sized smoke run

Runs cp+sync and merge alternately (page cache warm after the first pass), reports medians and min-max,
the ratio, the merge's peak RSS (from /usr/bin/time or getrusage), and checks that every merge run wrote
identical bytes. Process start and imports are included in the merge time, as a user sees them.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_fixture(root: Path, *, hidden: int, heads: int, layers: int, vocab: int, tp: int) -> Path:
    from neoxconv.synthetic import SyntheticSpec, tiny_config, write_checkpoint

    marker = root / ".complete"
    if not marker.exists():
        shutil.rmtree(root, ignore_errors=True)
        t = time.perf_counter()
        cfg = tiny_config(hidden_size=hidden, num_heads=heads, num_layers=layers, vocab_size=vocab,
                          max_position_embeddings=2048)
        write_checkpoint(root, SyntheticSpec(cfg, tp_degree=tp, dtype="float16"), keep_reference=False)
        marker.write_text("ok")
        print(f"# built fixture {root} in {time.perf_counter() - t:.1f} s", flush=True)
    return root


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_cp(src: Path, dst: Path) -> float:
    shutil.rmtree(dst, ignore_errors=True)
    t = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    subprocess.run(["sync"], check=True)
    return time.perf_counter() - t


def run_merge(src: Path, out: Path) -> tuple[float, int]:
    """Wall seconds and peak RSS bytes of one `neoxconv merge` process."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "neoxconv", "merge", str(src), str(out), "--quiet"]
    gnu_time = shutil.which("time") or ("/usr/bin/time" if os.path.exists("/usr/bin/time") else None)
    if gnu_time:
        cmd = [gnu_time, "-f", "%M", *cmd]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"merge failed: {proc.stderr}")
    if gnu_time:
        rss = int(proc.stderr.strip().splitlines()[-1]) * 1024
    else:
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return wall, rss


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        if p.is_file():
            h.update(p.name.encode())
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def fmt(xs: list[float]) -> str:
    return f"{statistics.median(xs):7.2f} s  ({min(xs):.2f}-{max(xs):.2f})"


def bench(workdir: Path, *, hidden: int, heads: int, layers: int, vocab: int, tp: int, runs: int) -> dict:
    src = make_fixture(workdir / f"src-h{hidden}-l{layers}-v{vocab}-tp{tp}", hidden=hidden, heads=heads,
                       layers=layers, vocab=vocab, tp=tp)
    size = du(src)
    cp_times, merge_times, rss, digests = [], [], [], set()
    for i in range(runs):
        cp_times.append(run_cp(src, workdir / "copy"))
        wall, peak = run_merge(src, workdir / "merged")
        merge_times.append(wall)
        rss.append(peak)
        digests.add(digest(workdir / "merged"))
        print(f"#   run {i + 1}: cp+sync {cp_times[-1]:.2f} s, merge {wall:.2f} s, merge peak RSS {peak / 2**30:.3f} GiB",
              flush=True)
    shutil.rmtree(workdir / "copy", ignore_errors=True)
    shutil.rmtree(workdir / "merged", ignore_errors=True)
    ratio = statistics.median(merge_times) / statistics.median(cp_times)
    print(f"layers {layers}, hidden {hidden}, TP {tp}: source {size / 1e9:.2f} GB")
    print(f"  cp -r + sync      {fmt(cp_times)}")
    print(f"  neoxconv merge    {fmt(merge_times)}   ratio merge / (cp+sync) = {ratio:.2f}x (target <= 1.2x)")
    print(f"  merge peak RSS    {max(rss) / 2**30:.3f} GiB (target <= 0.5 GiB)")
    print(f"  outputs identical across runs: {'yes' if len(digests) == 1 else 'NO'}")
    return {"layers": layers, "ratio": ratio, "rss": max(rss), "identical": len(digests) == 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=6144)
    ap.add_argument("--heads", type=int, default=64)
    ap.add_argument("--layers", type=int, action="append", help="transformer layers (repeatable); default 4")
    ap.add_argument("--vocab", type=int, default=50432)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", type=Path, help="keep fixtures here between runs (default: a temp folder)")
    args = ap.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="neoxconv-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results = [bench(workdir, hidden=args.hidden, heads=args.heads, layers=n, vocab=args.vocab, tp=args.tp,
                     runs=args.runs) for n in (args.layers or [4])]
    if len(results) > 1:
        print("peak RSS by layer count: " + ", ".join(f"{r['layers']}: {r['rss'] / 2**30:.3f} GiB" for r in results))
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    if not all(r["identical"] for r in results):
        raise SystemExit("merge outputs differed between runs")


if __name__ == "__main__":
    main()
