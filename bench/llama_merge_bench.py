"""Llama-style merge benchmark: the split rules (per-rank QKV and gated halves) vs `cp -r` + `sync`.

    python bench/llama_merge_bench.py                              # Llama-2-7B width, GQA 32/8, 2 layers, TP=2 fp16
    python bench/llama_merge_bench.py --kv-heads 32                # multi-head: per-head QKV segments
    python bench/llama_merge_bench.py --hidden 256 --heads 8 --kv-heads 2 --intermediate 512 --vocab 1024 --runs 1

Builds the checkpoint with the test generator (tests/llama_checkpoints.py: a random transformers
LlamaForCausalLM split as gpt-neox's model code lays it out), then times `neoxconv merge` (a fresh process,
imports included) and `cp -r` + `sync` alternately; reports medians, the ratio and the merge's peak RSS.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", type=Path)
    args = ap.parse_args()

    import torch

    sys.path.insert(0, str(REPO / "tests"))
    from llama_checkpoints import LlamaSpec, write_llama_checkpoint

    work = args.workdir or Path(tempfile.mkdtemp(prefix="neoxconv-llama-bench-"))
    spec = LlamaSpec(tp=args.tp, hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads, layers=args.layers,
                     intermediate=args.intermediate, vocab=args.vocab, max_positions=2048, dtype=torch.float16)
    t = time.perf_counter()
    write_llama_checkpoint(work / "src", spec)
    size = sum(p.stat().st_size for p in (work / "src").rglob("*.pt"))
    print(f"# built {size / 1e9:.2f} GB ({args.layers} layers, hidden {args.hidden}, {args.heads}/{args.kv_heads} "
          f"heads, TP={args.tp}) in {time.perf_counter() - t:.1f} s", flush=True)

    merge_s, cp_s, rss = [], [], []
    for _ in range(args.runs):
        shutil.rmtree(work / "cp", ignore_errors=True)
        t = time.perf_counter()
        subprocess.run(["cp", "-r", str(work / "src"), str(work / "cp")], check=True)
        subprocess.run(["sync"], check=True)
        cp_s.append(time.perf_counter() - t)
        shutil.rmtree(work / "out", ignore_errors=True)
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "neoxconv", "merge", str(work / "src"), str(work / "out"), "--quiet"],
                       check=True)
        merge_s.append(time.perf_counter() - t)
        rss.append(max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 2**20)
    m, c = statistics.median(merge_s), statistics.median(cp_s)
    print(f"merge {m:.2f} s (min {min(merge_s):.2f}, max {max(merge_s):.2f}) vs cp -r + sync {c:.2f} s "
          f"= {m / c:.2f}x; peak RSS {max(rss):.2f} GiB")
    if args.workdir is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
