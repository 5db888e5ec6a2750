"""GPU check: verify a 20B-width synthetic model on CUDA in fp16 and int8, and report speed and memory.

    python bench/gpu_check.py                                  # hidden 6144, 64 heads, 4 layers, TP=2 fp16, cuda
    python bench/gpu_check.py --device cpu --hidden 256 --heads 8 --layers 2 --new-tokens 8   # CPU smoke run

Builds the checkpoint in the 20B file layout (TP=2, fp16), merges it, then runs `verify` on the device in
fp16 (with --against the unmerged shards for the smallest sizes only: the simulation runs on the CPU) and
with --int8 (bitsandbytes), then the same with a cap (--max-memory = --cap-fraction of the fp16 weights: the
rest streamed from the safetensors files) and with --device-map auto (the cap on the device, the rest in CPU
RAM: accelerate moves it to the device per use). Prints tokens/s, peak GPU memory, every check, the decode
time per token per layer against (that layer's weight bytes / --bandwidth), the int8/fp16 weight-memory
ratio, and whether the capped and mapped runs generated the same ids as the resident ones.
Exit code 1 if any check fails or a capped/mapped run generates other ids.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=6144)
    ap.add_argument("--heads", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=50432)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--bandwidth", type=float, default=4.0e12, help="memory bandwidth, bytes/s (H200: ~4.0e12)")
    ap.add_argument("--no-int8", action="store_true")
    ap.add_argument("--cap-fraction", type=float, default=0.5, help="--max-memory as a fraction of the fp16 weights")
    ap.add_argument("--workdir", type=Path)
    args = ap.parse_args()

    from neoxconv.output.hf_merge import MergeOptions, merge_checkpoint
    from neoxconv.tools.synthetic import SyntheticSpec, tiny_config, write_checkpoint
    from neoxconv.verify import VerifyOptions, format_report, verify_model

    work = args.workdir or Path(tempfile.mkdtemp(prefix="neoxconv-gpu-"))
    cfg = tiny_config(hidden_size=args.hidden, num_heads=args.heads, num_layers=args.layers, vocab_size=args.vocab,
                      max_position_embeddings=2048)
    t = time.perf_counter()
    write_checkpoint(work / "src", SyntheticSpec(cfg, tp_degree=2, dtype="float16"), keep_reference=False)
    merge_checkpoint(work / "src", work / "out", MergeOptions(quiet=True, force=True))
    print(f"# built and merged {args.layers} layers at hidden {args.hidden} in {time.perf_counter() - t:.1f} s")

    prompt = tuple(range(100, 132))
    small = args.hidden <= 1024
    results = {}
    ok = True
    model_bytes = sum(p.stat().st_size for p in (work / "out").glob("*.safetensors"))
    cap = int(model_bytes * args.cap_fraction)
    main_dev = "cpu" if args.device == "cpu" else 0
    runs = [("fp16", dict(dtype="fp16", against=work / "src" if small else None))]
    if not args.no_int8:
        runs.append(("int8", dict(dtype="fp16", int8=True)))
    runs.append(("fp16 --max-memory", dict(dtype="fp16", max_memory=cap)))
    runs.append(("fp16 --device-map auto", dict(dtype="fp16", device_map="auto",
                                                max_memory={main_dev: cap} if main_dev != "cpu" else cap)))
    if not args.no_int8:
        runs.append(("int8 --max-memory", dict(dtype="fp16", int8=True, max_memory=cap)))
    for name, extra in runs:
        report = verify_model(work / "out", VerifyOptions(ids=prompt, max_new_tokens=args.new_tokens,
                                                          device=args.device, **extra))
        print(f"\n=== verify {name} on {report.device} ===")
        print(format_report(report))
        ok &= report.ok
        results[name] = report.to_json()

    print(f"\n=== placement (cap {cap / 2**20:.0f} MiB of {model_bytes / 2**20:.0f} MiB) ===")
    for name in [n for n in results if " --" in n]:
        base = results[name.split(" ")[0]]
        r = results[name]
        same = r["generated_ids"] == base["generated_ids"]
        ok &= same
        print(f"{name}: same ids as {name.split(' ')[0]}: {'yes' if same else 'NO'}; {r['tokens_per_second'] or 0:.1f} "
              f"tokens/s vs {base['tokens_per_second'] or 0:.1f}; peak memory {r['peak_memory_bytes'] / 2**30:.2f} GiB "
              f"vs {base['peak_memory_bytes'] / 2**30:.2f} GiB; offloaded {r['offloaded_bytes'] / 2**20:.1f} MiB; "
              f"map {sorted(set((r['device_map'] or {}).values()))}")
        if r.get("int8"):
            print(f"  int8 top-1 agreement {r['int8']['top1_agreement']:.0%} vs "
                  f"{base['int8']['top1_agreement']:.0%} resident")
    fp16 = results["fp16"]
    layer_bytes = (4 * args.hidden * args.hidden + 2 * 4 * args.hidden * args.hidden) * 2  # qkv+dense+mlp, fp16
    head_bytes = 2 * args.vocab * args.hidden * 2  # embedding row lookups are tiny; the readout is read fully
    tok_s = fp16["tokens_per_second"] or float("nan")
    per_token = 1.0 / tok_s
    ideal_layer = layer_bytes / args.bandwidth
    ideal_readout = head_bytes / 2 / args.bandwidth
    per_layer = (per_token - ideal_readout) / args.layers
    print("\n=== summary ===")
    print(f"fp16: {tok_s:.1f} tokens/s, {per_token * 1e3:.3f} ms/token, peak memory "
          f"{fp16['peak_memory_bytes'] / 2**30:.2f} GiB")
    print(f"decode per token per layer ~{per_layer * 1e6:.1f} us vs weight bytes / bandwidth "
          f"{ideal_layer * 1e6:.1f} us = {per_layer / ideal_layer:.2f}x (target <= 1.5x)")
    if "int8" in results:
        i8 = results["int8"]["int8"]
        print(f"int8: weights {i8['weight_bytes_after'] / 2**30:.2f} GiB vs fp16 "
              f"{i8['weight_bytes_before'] / 2**30:.2f} GiB"
              f" = {i8['memory_ratio']:.2f}x (target <= 0.55x incl. embedding/readout kept in fp16); "
              f"top-1 agreement {i8['top1_agreement']:.0%}, {i8['tokens_per_second']:.1f} tokens/s")
    (work / "gpu_check.json").write_text(json.dumps(results, indent=2))
    print(f"# full reports: {work / 'gpu_check.json'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
