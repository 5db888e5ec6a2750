"""GPU check for Llama-style models: merge a GQA checkpoint, then verify it on CUDA in fp16 and int8.

    python bench/llama_gpu_check.py                      # Llama-2-7B width, 32/8 heads, 4 layers, TP=2 fp16, cuda
    python bench/llama_gpu_check.py --device cpu --hidden 128 --heads 8 --kv-heads 2 --intermediate 256 \\
        --layers 2 --vocab 1024 --new-tokens 4           # CPU smoke run

Builds the checkpoint with the test generator (tests/llama_checkpoints.py: a random transformers
LlamaForCausalLM split as gpt-neox's model code lays it out), merges it, and runs `verify` on the device in
fp16 with --reference hf (and --against the unmerged shards at small widths: the simulation runs on the CPU),
then with --int8. Prints every check, tokens/s, peak memory and the KV cache bytes (kv heads only).
Exit code 1 if any check fails.
"""

from __future__ import annotations

import argparse
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
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--no-int8", action="store_true")
    ap.add_argument("--workdir", type=Path)
    args = ap.parse_args()

    import torch

    sys.path.insert(0, str(REPO / "tests"))
    from neoxconv.config import load_out_config
    from neoxconv.model.kv_cache import KVCache
    from neoxconv.output.hf_merge import MergeOptions, merge_checkpoint
    from neoxconv.verify import VerifyOptions, format_report, verify_model

    from llama_checkpoints import LlamaSpec, write_llama_checkpoint

    work = args.workdir or Path(tempfile.mkdtemp(prefix="neoxconv-llama-gpu-"))
    spec = LlamaSpec(tp=2, hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads, layers=args.layers,
                     intermediate=args.intermediate, vocab=args.vocab, max_positions=2048, dtype=torch.float16)
    t = time.perf_counter()
    write_llama_checkpoint(work / "src", spec)
    # the generator writes [Q|K|V] blocks: stated, since verify --against never passes on an assumed layout
    merge_checkpoint(work / "src", work / "out", MergeOptions(quiet=True, force=True,
                     qkv_layout="blocked" if args.kv_heads != args.heads else "auto"))
    print(f"# built and merged {args.layers} layers at hidden {args.hidden} in {time.perf_counter() - t:.1f} s")

    config = load_out_config(work / "out")
    kv = KVCache(config, batch=1, max_len=32 + args.new_tokens, device="meta", dtype=torch.float16)
    print(f"# KV cache for {32 + args.new_tokens} positions: {kv.nbytes / 2**20:.1f} MiB "
          f"({config.kv_heads} kv heads of {config.num_heads})")
    prompt = tuple(range(100, 132))
    small = args.hidden <= 1024
    runs = [("fp16", dict(dtype="fp16", reference="hf", against=work / "src" if small else None))]
    if not args.no_int8:
        runs.append(("int8", dict(dtype="fp16", int8=True)))
    ok = True
    for name, extra in runs:
        report = verify_model(work / "out", VerifyOptions(ids=prompt, max_new_tokens=args.new_tokens,
                                                          device=args.device, **extra))
        print(f"\n=== verify {name} on {report.device} ===")
        print(format_report(report))
        ok &= report.ok
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
