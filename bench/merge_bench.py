"""Merge benchmark: `neoxconv merge` vs `cp -r` + `sync`, CPU per GB, peak RSS and bytes read, in one run.

    python bench/merge_bench.py                       # 20B width (hidden 6144, 64 heads), TP=2 fp16, 2 and 4 layers
    python bench/merge_bench.py --layers 4 --runs 3   # one layer count, more runs
    python bench/merge_bench.py --quick               # toy sizes, seconds (what CI's smoke test runs)

For each layer count: cp+sync and merge run alternately (page cache warm after the first pass); the merge
is a fresh `python -m neoxconv merge` process, so process start and imports are in its time, and its
wall time includes its own fsyncs. Reported side by side: medians (min-max), merge / (cp+sync), the
merge's CPU time (user + sys of the child, from wait4) per GB of source, its peak RSS, and whether every
run wrote identical bytes. Then a view-heavy checkpoint (ZeRO style: every parameter a view into one flat
fp16 buffer, `{"module": model.state_dict()}` in the sequential layout's mp_rank files, built with torch)
is merged once to measure bytes read / source bytes: by read syscalls (/proc/self/io rchar) and from
storage after the source's page cache was dropped (read_bytes, which also counts memory-mapped reads).
Targets (issue 11): merge <= 1.1x cp+sync, <= 0.6 core-s/GB, peak RSS <= 0.3 GiB flat in layers,
bytes read <= 1.1x source.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_GIB = 1 << 30


# ----- fixtures -------------------------------------------------------------------------------------
def make_fixture(root: Path, *, hidden: int, heads: int, layers: int, vocab: int, tp: int) -> Path:
    """The pipeline-layout checkpoint of the 20B release's shape (one fresh storage per tensor)."""
    from neoxconv.tools.synthetic import SyntheticSpec, tiny_config, write_checkpoint

    marker = root / ".complete"
    if not marker.exists():
        shutil.rmtree(root, ignore_errors=True)
        t = time.perf_counter()
        cfg = tiny_config(hidden_size=hidden, num_heads=heads, num_layers=layers, vocab_size=vocab,
                          max_position_embeddings=2048)
        write_checkpoint(root, SyntheticSpec(cfg, tp_degree=tp, dtype="float16"), keep_reference=False)
        marker.write_text("ok")
        print(f"# built fixture {root.name} in {time.perf_counter() - t:.1f} s", flush=True)
    return root


def make_zero_fixture(root: Path, *, hidden: int, heads: int, layers: int, vocab: int, tp: int) -> Path:
    """A sequential-layout checkpoint as a DeepSpeed engine with ZeRO 1/2 saves it.

    Each rank's model is a real ``torch.nn`` module tree with gpt-neox's names; its fp16 parameters are
    then re-pointed into one flat buffer (ZeRO's flattening, with tail padding), so
    ``model.state_dict()`` holds views into a single storage, written once by ``torch.save``.
    """
    import torch
    from torch import nn

    marker = root / ".complete"
    if marker.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    step = root / "global_step1000"
    step.mkdir(parents=True)
    (root / "latest").write_text(step.name)
    (root / "configs").mkdir()
    (root / "configs" / "model.yml").write_text(json.dumps({
        "pipe-parallel-size": 0, "model-parallel-size": tp, "num-layers": layers, "hidden-size": hidden,
        "num-attention-heads": heads, "max-position-embeddings": 2048, "seq-length": 2048, "rotary_pct": 0.25,
        "no-weight-tying": True, "gpt_j_residual": True, "bias-gelu-fusion": True, "norm": "layernorm",
        "pos-emb": "rotary", "layernorm-epsilon": 1e-5}, indent=1))
    H, F, V = hidden, 4 * hidden, vocab
    rotary = int(hidden // heads * 0.25)

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.query_key_value = nn.Linear(H, 3 * H // tp)
            self.dense = nn.Linear(H // tp, H)
            self.rotary_emb = nn.Module()
            self.rotary_emb.register_buffer(
                "inv_freq", 1.0 / (10000 ** (torch.arange(0, rotary, 2).float() / rotary)))

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dense_h_to_4h = nn.Linear(H, F // tp)
            self.dense_4h_to_h = nn.Linear(F // tp, H)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.input_layernorm = nn.LayerNorm(H)
            self.attention = Attention()
            self.post_attention_layernorm = nn.LayerNorm(H)
            self.mlp = MLP()

    class Embedding(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.word_embeddings = nn.Embedding(V // tp, H)

    class Norm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(H)

    class Readout(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.final_linear = nn.Linear(H, V // tp, bias=False)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.sequential = nn.Sequential(Embedding(), nn.Identity(), *[Block() for _ in range(layers)],
                                            nn.Identity(), Norm(), Readout())

    torch.manual_seed(0)
    for rank in range(tp):
        model = Model().half()
        params = list(model.parameters())
        total = sum(p.numel() for p in params)
        flat = torch.empty(total + (-total % 512), dtype=torch.float16)  # ZeRO pads the flat group
        offset = 0
        with torch.no_grad():
            for p in params:
                flat[offset: offset + p.numel()].copy_(p.reshape(-1))
                p.data = flat[offset: offset + p.numel()].view_as(p)
                offset += p.numel()
        torch.save({"module": model.state_dict(), "optimizer": None, "global_steps": 1000, "dp_world_size": 1,
                    "mp_world_size": tp, "ds_version": "0.19.8"}, step / f"mp_rank_{rank:02d}_model_states.pt")
    marker.write_text("ok")
    return root


_BUILDERS = {"pipeline": make_fixture, "zero": make_zero_fixture}


def build(kind: str, root: Path, **kw) -> Path:
    """Build a fixture in a child process: this process stays small (no torch, no numpy), because a
    child's peak RSS as wait4 reports it starts at the size of the process that forked it."""
    if not (root / ".complete").exists():
        subprocess.run([sys.executable, __file__, "--build", json.dumps({"kind": kind, "root": str(root), **kw})],
                       check=True)
    return root


def source_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*.pt"))


# ----- runs -----------------------------------------------------------------------------------------
def _child(cmd: list[str]) -> tuple[float, int, str, str, object]:
    """Run ``cmd``; wall seconds, exit status, stdout, stderr and its resource usage (wait4)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return wall, proc.returncode, out.read().decode(errors="replace"), err.read().decode(errors="replace"), usage


def run_cp(src: Path, dst: Path) -> float:
    shutil.rmtree(dst, ignore_errors=True)
    t = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    subprocess.run(["sync"], check=True)
    return time.perf_counter() - t


def run_merge(src: Path, out: Path) -> tuple[float, float, int]:
    """Wall seconds, CPU core-seconds (user + sys) and peak RSS bytes of one `neoxconv merge` process."""
    shutil.rmtree(out, ignore_errors=True)
    wall, rc, _, stderr, usage = _child([sys.executable, "-m", "neoxconv", "merge", str(src), str(out), "--quiet"])
    if rc != 0:
        raise SystemExit(f"merge failed: {stderr}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024


def digest(folder: Path) -> str:
    from neoxconv.output.hashing import hash_file

    return "/".join(f"{p.name}:{hash_file(p)}" for p in sorted(folder.iterdir())
                    if p.is_file() and p.name != "neoxconv.json")


def _drop_page_cache(folder: Path) -> None:
    """Evict the folder's files from the page cache (no root needed: fsync, then POSIX_FADV_DONTNEED)."""
    for p in folder.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


_IO_PROBE = """
import sys
import neoxconv.output.hf_merge, neoxconv.output.streaming  # imports read files too: counted before the merge starts
from neoxconv.cli import main
def io():
    return {k: int(v) for k, v in (line.split(": ") for line in open("/proc/self/io").read().splitlines())}
before = io()
try:
    main(["merge", sys.argv[1], sys.argv[2], "--quiet"], standalone_mode=False)
finally:
    after = io()
    print("\\n".join(f"{k}: {after[k] - before[k]}" for k in after))
"""


def bytes_read(src: Path, out: Path) -> tuple[dict[str, int] | None, str]:
    """The merge's /proc/self/io counters, with the source's page cache dropped first; or the error."""
    shutil.rmtree(out, ignore_errors=True)
    _drop_page_cache(src)
    _, rc, stdout, stderr, _ = _child([sys.executable, "-c", _IO_PROBE, str(src), str(out)])
    io = dict(line.split(": ") for line in stdout.splitlines() if ": " in line)
    counters = {k: int(v) for k, v in io.items()} if io else None
    if rc != 0:
        lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
        return counters, lines[-1] if lines else f"exit status {rc}"
    return counters, ""


def fmt(xs: list[float]) -> str:
    return f"{statistics.median(xs):6.2f} s ({min(xs):.2f}-{max(xs):.2f})"


def bench(workdir: Path, *, hidden: int, heads: int, layers: int, vocab: int, tp: int, runs: int) -> dict:
    src = build("pipeline", workdir / f"src-h{hidden}-l{layers}-v{vocab}-tp{tp}", hidden=hidden, heads=heads,
                layers=layers, vocab=vocab, tp=tp)
    size = source_bytes(src)
    cp_times, merge_times, cpu, rss, digests = [], [], [], [], set()
    for i in range(runs):
        cp_times.append(run_cp(src, workdir / "copy"))
        wall, core_s, peak = run_merge(src, workdir / "merged")
        merge_times.append(wall)
        cpu.append(core_s)
        rss.append(peak)
        digests.add(digest(workdir / "merged"))
        print(f"#   {layers} layers, run {i + 1}: cp+sync {cp_times[-1]:.2f} s, merge {wall:.2f} s, "
              f"{core_s:.2f} core-s, peak RSS {peak / _GIB:.3f} GiB", flush=True)
    shutil.rmtree(workdir / "copy", ignore_errors=True)
    shutil.rmtree(workdir / "merged", ignore_errors=True)
    return {"layers": layers, "gb": size / 1e9, "cp": cp_times, "merge": merge_times,
            "ratio": statistics.median(merge_times) / statistics.median(cp_times),
            "cpu_per_gb": statistics.median(cpu) / (size / 1e9), "rss": max(rss), "identical": len(digests) == 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="toy sizes (seconds); targets are not meaningful there")
    ap.add_argument("--hidden", type=int, help="default 6144 (64 with --quick)")
    ap.add_argument("--heads", type=int, help="default 64 (4 with --quick)")
    ap.add_argument("--layers", type=int, action="append", help="transformer layers (repeatable); default 2 and 4")
    ap.add_argument("--vocab", type=int, help="default 50432 (1024 with --quick)")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--runs", type=int, help="default 2")
    ap.add_argument("--view-hidden", type=int,
                    help="width of the view-heavy checkpoint; default 1024 (64 with --quick)")
    ap.add_argument("--workdir", type=Path, help="keep fixtures here between runs (default: a temp folder)")
    ap.add_argument("--build", help=argparse.SUPPRESS)  # internal: build one fixture in this (child) process
    args = ap.parse_args()
    if args.build:
        spec = json.loads(args.build)
        _BUILDERS[spec.pop("kind")](Path(spec.pop("root")), **spec)
        return
    quick = args.quick
    hidden = args.hidden or (64 if quick else 6144)
    heads = args.heads or (4 if quick else 64)
    vocab = args.vocab or (1024 if quick else 50432)
    runs = args.runs or 2
    view_hidden = args.view_hidden or (64 if quick else 1024)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="neoxconv-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    from neoxconv.source.checksums import CRC32_IMPLEMENTATION

    print(f"# {os.cpu_count()} CPU(s); CRC-32 by {CRC32_IMPLEMENTATION}; fixtures in {workdir}", flush=True)
    try:
        results = [bench(workdir, hidden=hidden, heads=heads, layers=n, vocab=vocab, tp=args.tp, runs=runs)
                   for n in (args.layers or [2, 4])]
        zero = build("zero", workdir / f"zero-h{view_hidden}-tp{args.tp}", hidden=view_hidden,
                     heads=max(2 * args.tp, view_hidden // 64), layers=2, vocab=vocab, tp=args.tp)
        counters, error = bytes_read(zero, workdir / "zero-merged")
        zero_size = source_bytes(zero)
    finally:
        shutil.rmtree(workdir / "zero-merged", ignore_errors=True)
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    print(f"\nTP={args.tp} fp16, hidden {hidden}, {heads} heads, vocab {vocab}; medians of {runs} (min-max)")
    print(f"{'layers':>6} {'source':>8} | {'cp -r + sync':>22} | {'neoxconv merge':>22} | {'merge/cp':>8} | "
          f"{'CPU core-s/GB':>13} | {'peak RSS':>9} | same bytes")
    for r in results:
        print(f"{r['layers']:>6} {r['gb']:6.2f}GB | {fmt(r['cp']):>22} | {fmt(r['merge']):>22} | {r['ratio']:7.2f}x | "
              f"{r['cpu_per_gb']:13.2f} | {r['rss'] / _GIB:5.3f}GiB | {'yes' if r['identical'] else 'NO'}")
    print("targets: merge/cp <= 1.1x, CPU <= 0.6 core-s/GB, peak RSS <= 0.3 GiB flat in layers")
    if len(results) > 1:
        print("peak RSS by layer count: " + ", ".join(f"{r['layers']}: {r['rss'] / _GIB:.3f} GiB" for r in results))
    print(f"view-heavy checkpoint (ZeRO-style flat fp16 buffer, sequential layout, TP={args.tp}, hidden {view_hidden}, "
          f"2 layers): source {zero_size / 1e9:.3f} GB")
    if error:
        print(f"  the merge of the view-heavy checkpoint failed: {error}")
    if counters is not None:
        print(f"  bytes read{' before it failed' if error else ''} / source bytes: "
              f"{counters['rchar'] / zero_size:.2f} (read syscalls), "
              f"{counters['read_bytes'] / zero_size:.2f} (from storage, page cache dropped first) (target <= 1.1)")
    if not all(r["identical"] for r in results):
        raise SystemExit("merge outputs differed between runs")


if __name__ == "__main__":
    main()
