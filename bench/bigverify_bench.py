"""verify at any size on the CPU: peak anonymous memory, ids and speed with and without --max-memory.

    python bench/bigverify_bench.py          # hidden 2048, 16 heads, 8 layers, vocab 50432, TP=2 fp16 (~1.2 GB)
    python bench/bigverify_bench.py --hidden 64 --heads 4 --layers 2 --vocab 1024 --max-memory 64KiB   # toy

Builds the synthetic checkpoint (neoxconv/tools/synthetic.py) and merges it, then runs `neoxconv verify --device cpu
--dtype fp32 --json` in a fresh process for each of: uncapped, --max-memory CAP, and both again with
--against SRC. Each process reports its own peak RssAnon (the process's anonymous memory: weights cast to fp32,
activations, KV cache, logits; not the page cache of the memory-mapped safetensors files).
Prints, per pair: peak memory capped vs uncapped (targets: <= half and <= 1 GiB), identical generated ids,
decode tokens/s capped vs uncapped, and the bytes read per generated token (every weight of a stage on disk
is read once per forward, the embedding only its looked-up rows: computed from the device map, in the files'
dtype and after the cast to fp32) against the model's size. Sha256 checks are off (--no-check-hashes): they
are not what is measured.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build(work: Path, args) -> tuple[Path, Path]:
    from neoxconv.output.hf_merge import MergeOptions, merge_checkpoint
    from neoxconv.tools.synthetic import SyntheticSpec, tiny_config, write_checkpoint

    src, out = work / "src", work / "out"
    if not (out / "neoxconv.json").exists():
        cfg = tiny_config(hidden_size=args.hidden, num_heads=args.heads, num_layers=args.layers,
                          vocab_size=args.vocab, max_position_embeddings=2048)
        t = time.perf_counter()
        write_checkpoint(src, SyntheticSpec(cfg, tp_degree=2, dtype="float16"), keep_reference=False)
        merge_checkpoint(src, out, MergeOptions(quiet=True, force=True))
        print(f"# built and merged in {time.perf_counter() - t:.1f} s")
    return src, out


def streamed_file_bytes(out: Path, device_map: dict[str, str]) -> int:
    """Bytes of the files' tensors read per forward: every tensor of a stage on disk, except the embedding's
    (only the looked-up rows are read)."""
    from safetensors import safe_open

    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    disk = [u for u, d in device_map.items() if d == "disk" and u != "gpt_neox.embed_in"]
    total = 0
    for name, file in weight_map.items():
        if any(name == u or name.startswith(u + ".") for u in disk):
            with safe_open(str(out / file), framework="pt") as f:
                sl = f.get_slice(name)
                n = 1
                for d in sl.get_shape():
                    n *= d
                total += n * {"F16": 2, "BF16": 2, "F32": 4}[sl.get_dtype()]
    return total


def verify(out: Path, args, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "neoxconv", "verify", str(out), "--ids", args.ids, "--max-new-tokens",
           str(args.new_tokens), "--device", "cpu", "--dtype", "fp32", "--no-check-hashes", "--json", *extra]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if not proc.stdout.strip().startswith("{"):
        sys.exit(f"verify failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr}")
    report = json.loads(proc.stdout)
    report["wall_seconds"] = wall
    report["command"] = "neoxconv " + " ".join(cmd[3:])
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=50432)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--ids", default="510,347,273,181,310,253,682,273", help="prompt token ids (< --vocab)")
    ap.add_argument("--max-memory", default="256MiB")
    ap.add_argument("--no-against", action="store_true", help="skip the --against pair")
    ap.add_argument("--workdir", type=Path)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="neoxconv-bigverify-"))
    src, out = build(work, args)
    model_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))

    pairs = [("verify", ())] + ([] if args.no_against else [("verify --against SRC", ("--against", str(src)))])
    ok = True
    print(f"model: hidden {args.hidden}, {args.heads} heads, {args.layers} layers, vocab {args.vocab}, TP=2 fp16, "
          f"{model_bytes / 2**30:.2f} GiB of safetensors; verify in fp32 on the CPU, {args.new_tokens} new tokens")
    for name, extra in pairs:
        full = verify(out, args, *extra)
        capped = verify(out, args, *extra, "--max-memory", args.max_memory)
        same = full["generated_ids"] == capped["generated_ids"]
        ratio = capped["peak_memory_bytes"] / full["peak_memory_bytes"]
        under = capped["peak_memory_bytes"] <= 2**30
        ok &= same and full["ok"] and capped["ok"] and ratio <= 0.5 and under
        per_token = streamed_file_bytes(out, capped["device_map"] or {})
        print(f"\n== {name} ==")
        for label, r in (("uncapped", full), (f"--max-memory {args.max_memory}", capped)):
            print(f"  {label:<22} peak RssAnon {r['peak_memory_bytes'] / 2**20:7.0f} MiB ({r['peak_memory_kind']}), "
                  f"decode {r['tokens_per_second'] or float('nan'):6.2f} tok/s, resident weights "
                  f"{r['weight_bytes'] / 2**20:6.0f} MiB, checks {'ok' if r['ok'] else 'FAILED'}, "
                  f"wall {r['wall_seconds']:.1f} s")
            print(f"    $ {r['command']}")
        print(f"  peak capped / uncapped = {ratio:.2f} (target <= 0.50), capped peak "
              f"{capped['peak_memory_bytes'] / 2**30:.2f} GiB (target <= 1 GiB): "
              f"{'met' if ratio <= 0.5 and under else 'NOT met'}")
        print(f"  identical generated ids: {'yes' if same else 'NO'}; decode speed capped / uncapped = "
              f"{(capped['tokens_per_second'] or 0) / (full['tokens_per_second'] or float('nan')):.3f}")
        print(f"  bytes read per generated token: {per_token / 1e9:.3f} GB from the fp16 files "
              f"({per_token / model_bytes:.2f}x the model's {model_bytes / 1e9:.3f} GB; computed from the device map: "
              f"every weight of a stage on disk, only the looked-up rows of the embedding), {2 * per_token / 1e9:.3f}"
              f" GB after the cast to fp32")
        if capped["notes"]:
            print("  notes: " + "; ".join(capped["notes"]))
    print("\nall targets met" if ok else "\nSOME TARGETS NOT MET")


if __name__ == "__main__":
    main()
