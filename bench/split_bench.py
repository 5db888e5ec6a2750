"""Split and reshard next to merge, in one run: wall incl. sync / (cp -r + sync of the input), CPU per GB, peak RSS.

    python bench/split_bench.py --hidden 2048 --heads 16 --layers 2   # a modest size (the machine is shared)
    python bench/split_bench.py                      # 20B width (hidden 6144, 64 heads), 2 and 4 layers
    python bench/split_bench.py --quick                                # toy sizes, seconds (what CI's smoke test runs)

For each layer count: a NeoX TP 2 fp16 checkpoint (the 20B release's layout), then, alternating per run,
``cp -r SRC && sync`` and ``neoxconv merge SRC HF && sync``; ``cp -r HF && sync`` and ``neoxconv split HF
--tp 2 && sync``; ``neoxconv reshard SRC --tp 4 && sync`` (its input is SRC). Each command is a fresh process
(imports and start-up in its time), its own fsyncs and the final ``sync`` in its wall time. Reported: the best
of the runs (page cache warm after the first), the ratio to the copy of its own input, the command's CPU time
(user + sys from wait4) per GB of its input, its peak RSS (no child processes: that is the tree's), and
whether every run wrote the same bytes. Then reshard of a view-heavy checkpoint (ZeRO style: every parameter
a view into one flat fp16 buffer, sequential layout): bytes read / source bytes, by read syscalls and from
storage after the source's page cache was dropped.
Targets (issue 19): split and reshard <= 1.3x cp+sync, <= 1.0 core-s/GB, peak RSS <= 0.5 GB flat in layers
and width; view-heavy bytes read <= 1.1x the source.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_bench import _child, _drop_page_cache, build, source_bytes  # noqa: E402

_GB = 1e9


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def tree_digest(folder: Path) -> str:
    from neoxconv.output.hashing import hash_file

    return "/".join(f"{p.relative_to(folder)}:{hash_file(p)}" for p in sorted(folder.rglob("*"))
                    if p.is_file() and p.name != "neoxconv.json")


def timed_cp(src: Path, dst: Path) -> float:
    shutil.rmtree(dst, ignore_errors=True)
    t = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    subprocess.run(["sync"], check=True)
    return time.perf_counter() - t


def timed_neoxconv(args: list[str], out: Path) -> tuple[float, float, int]:
    """Wall seconds incl. a final sync, CPU core-seconds and peak RSS bytes of one ``neoxconv`` process."""
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    _, rc, _, stderr, usage = _child([sys.executable, "-m", "neoxconv", *args, "--quiet"])
    if rc != 0:
        raise SystemExit(f"neoxconv {args[0]} failed: {stderr}")
    subprocess.run(["sync"], check=True)
    return time.perf_counter() - t, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024


def bench(workdir: Path, *, hidden: int, heads: int, layers: int, vocab: int, runs: int) -> list[dict]:
    src = build("pipeline", workdir / f"src-h{hidden}-l{layers}-v{vocab}-tp2", hidden=hidden, heads=heads,
                layers=layers, vocab=vocab, tp=2)
    hf = workdir / f"hf-h{hidden}-l{layers}"
    if not (hf / "neoxconv.json").exists():
        timed_neoxconv(["merge", str(src), str(hf)], hf)
    jobs = [("merge", src, ["merge", str(src)]), ("split --tp 2", hf, ["split", str(hf), "--tp", "2"]),
            ("reshard --tp 4", src, ["reshard", str(src), "--tp", "4"])]
    results = []
    for name, inp, args in jobs:
        size = source_bytes(inp) if inp == src else tree_bytes(inp)
        cp, wall, cpu, rss, digests = [], [], [], [], set()
        out = workdir / "out"
        for i in range(runs):
            cp.append(timed_cp(inp, workdir / "copy"))
            w, c, r = timed_neoxconv([args[0], *args[1:2], str(out), *args[2:]], out)
            wall.append(w)
            cpu.append(c)
            rss.append(r)
            digests.add(tree_digest(out))
            print(f"#   {layers} layers, {name}, run {i + 1}: cp+sync {cp[-1]:.2f} s, {w:.2f} s, {c:.2f} core-s, "
                  f"peak RSS {r / _GB:.3f} GB", flush=True)
        shutil.rmtree(workdir / "copy", ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        results.append({"name": name, "layers": layers, "gb": size / _GB, "cp": min(cp), "wall": min(wall),
                        "ratio": min(wall) / min(cp), "cpu_per_gb": min(cpu) / (size / _GB), "rss": max(rss),
                        "identical": len(digests) == 1})
    return results


_IO_PROBE = """
import sys
import neoxconv.output.reshard  # imports read files too: counted before the reshard starts
from neoxconv.cli import main
def io():
    return {k: int(v) for k, v in (line.split(": ") for line in open("/proc/self/io").read().splitlines())}
before = io()
try:
    main(["reshard", sys.argv[1], sys.argv[2], "--tp", "1", "--quiet"], standalone_mode=False)
finally:
    after = io()
    print("\\n".join(f"{k}: {after[k] - before[k]}" for k in after))
"""


def view_heavy_bytes_read(workdir: Path, *, hidden: int, vocab: int) -> tuple[float, float, float]:
    """(rchar / source, read_bytes / source, source GB) of reshard --tp 1 of a ZeRO-style sequential checkpoint."""
    zero = build("zero", workdir / f"zero-h{hidden}-tp2", hidden=hidden, heads=max(4, hidden // 64), layers=2,
                 vocab=vocab, tp=2)
    out = workdir / "zero-out"
    shutil.rmtree(out, ignore_errors=True)
    _drop_page_cache(zero)
    _, rc, stdout, stderr, _ = _child([sys.executable, "-c", _IO_PROBE, str(zero), str(out)])
    shutil.rmtree(out, ignore_errors=True)
    if rc != 0:
        raise SystemExit(f"reshard of the view-heavy checkpoint failed: {stderr}")
    io = {k: int(v) for k, v in (line.split(": ") for line in stdout.splitlines() if ": " in line)}
    size = source_bytes(zero)
    return io["rchar"] / size, io["read_bytes"] / size, size / _GB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="toy sizes (seconds); targets are not meaningful there")
    ap.add_argument("--hidden", type=int, help="default 6144 (64 with --quick)")
    ap.add_argument("--heads", type=int, help="default 64 (4 with --quick)")
    ap.add_argument("--layers", type=int, action="append", help="transformer layers (repeatable); default 2 and 4")
    ap.add_argument("--vocab", type=int, help="default 50432 (1024 with --quick)")
    ap.add_argument("--runs", type=int, help="default 2 (1 with --quick)")
    ap.add_argument("--view-hidden", type=int,
                    help="width of the view-heavy checkpoint; default 1024 (64 with --quick)")
    ap.add_argument("--workdir", type=Path, help="keep fixtures here between runs (default: a temp folder)")
    args = ap.parse_args()
    quick = args.quick
    hidden = args.hidden or (64 if quick else 6144)
    heads = args.heads or (4 if quick else 64)
    vocab = args.vocab or (1024 if quick else 50432)
    runs = args.runs or (1 if quick else 2)
    layer_counts = args.layers or ([1, 2] if quick else [2, 4])
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="neoxconv-split-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"# {os.cpu_count()} CPU(s); fixtures in {workdir}", flush=True)
    try:
        results = [r for n in layer_counts
                   for r in bench(workdir, hidden=hidden, heads=heads, layers=n, vocab=vocab, runs=runs)]
        view_hidden = args.view_hidden or (64 if quick else 1024)
        rchar, read_bytes, zero_gb = view_heavy_bytes_read(workdir, hidden=view_hidden, vocab=vocab)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    print(f"\nfp16, hidden {hidden}, {heads} heads, vocab {vocab}, source TP 2; best of {runs}")
    print(f"{'command':>15} {'layers':>6} {'input':>9} | {'cp -r + sync':>12} | {'wall + sync':>11} | "
          f"{'ratio to cp':>11} | {'CPU core-s/GB':>13} | {'peak RSS':>9} | same bytes")
    for r in results:
        print(f"{r['name']:>15} {r['layers']:>6} {r['gb']:7.3f}GB | {r['cp']:10.2f} s | {r['wall']:9.2f} s | "
              f"{r['ratio']:10.2f}x | {r['cpu_per_gb']:13.2f} | {r['rss'] / _GB:6.3f} GB | "
              f"{'yes' if r['identical'] else 'NO'}")
    print("targets: split/reshard <= 1.3x cp+sync, <= 1.0 core-s/GB, peak RSS <= 0.5 GB flat in layers and width")
    for name in dict.fromkeys(r["name"] for r in results):
        print(f"peak RSS by layer count, {name}: " + ", ".join(
            f"{r['layers']}: {r['rss'] / _GB:.3f} GB" for r in results if r["name"] == name))
    print(f"view-heavy checkpoint (ZeRO-style flat fp16 buffer, sequential, TP 2, 2 layers, {zero_gb:.3f} GB): "
          f"reshard --tp 1 bytes read / source bytes: {rchar:.2f} (read syscalls), {read_bytes:.2f} (from storage, "
          "page cache dropped first) (target <= 1.1)")
    if not all(r["identical"] for r in results):
        raise SystemExit("outputs differed between runs")


if __name__ == "__main__":
    main()
