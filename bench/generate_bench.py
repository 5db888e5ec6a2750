"""Generation benchmark: neoxconv's layers vs transformers' GPTNeoXForCausalLM on the same merged weights.

    python bench/generate_bench.py                       # hidden 512, 8 heads, 6 layers, vocab 50432, fp32, CPU
    python bench/generate_bench.py --hidden 128 --layers 2 --new-tokens 16 --runs 1     # smoke run

Measured side by side in one run, alternating, medians of --runs:
* greedy generation of --new-tokens after a --prompt-len prompt: end-to-end tokens/s (prefill included) and
  decode-only tokens/s for neoxconv (eager and sdpa attention) and for transformers' generate (use_cache on);
* per-step decode latency at a few steps (a flat curve means the KV cache costs O(length) and no copying);
* decode against its memory bound: each token reads every weight once, so tokens/s <= copy rate / weight bytes;
* load time of the merged folder vs reading its bytes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch


def build(workdir: Path, args) -> Path:
    from neoxconv.output.hf_merge import MergeOptions, merge_checkpoint
    from neoxconv.tools.synthetic import SyntheticSpec, tiny_config, write_checkpoint

    out = workdir / "merged"
    if not (out / "neoxconv.json").exists():
        cfg = tiny_config(hidden_size=args.hidden, num_heads=args.heads, num_layers=args.layers,
                          vocab_size=args.vocab, max_position_embeddings=2048)
        write_checkpoint(workdir / "src", SyntheticSpec(cfg, tp_degree=1, dtype=args.dtype), keep_reference=False)
        merge_checkpoint(workdir / "src", out, MergeOptions(quiet=True, force=True))
    return out


def read_rate(nbytes: int = 512 << 20) -> float:
    """Bytes/s at which torch can stream a large fp32 tensor from memory (a sum reads each byte once)."""
    a = torch.ones(nbytes // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t)
    return nbytes / best


def read_bytes_seconds(folder: Path) -> float:
    t = time.perf_counter()
    for p in folder.glob("*.safetensors"):
        with open(p, "rb") as f:
            while f.read(64 << 20):
                pass
    return time.perf_counter() - t


def run_ours(model, prompt: list[int], new_tokens: int):
    from neoxconv.model.generation import generate

    t = time.perf_counter()
    gen = generate(model, prompt, max_new_tokens=new_tokens, eos_id=None)
    total = time.perf_counter() - t
    return total, gen


def run_hf(hf, prompt: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        t = time.perf_counter()
        hf(ids)  # prefill alone, for the decode-only figure
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        out = hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          use_cache=True, pad_token_id=0)
        total = time.perf_counter() - t
    return total, prefill, out[0, len(prompt):].tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=50432)
    ap.add_argument("--dtype", default="float32", choices=["float32"])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--workdir", type=Path)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="neoxconv-genbench-"))
    out = build(workdir, args)

    from transformers import GPTNeoXForCausalLM

    from neoxconv.runtime.loading import load_model

    read_s = min(read_bytes_seconds(out) for _ in range(3))
    loads = []
    for _ in range(3):
        loaded = load_model(out, device="cpu", dtype="fp32")
        loads.append(loaded.load_seconds)
    model = loaded.model
    hf = GPTNeoXForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, args.vocab, (args.prompt_len,), generator=g).tolist()

    rows: dict[str, list[float]] = {k: [] for k in ("ours_e2e", "ours_decode", "ours_prefill", "sdpa_e2e",
                                                    "sdpa_decode", "hf_e2e", "hf_decode", "hf_prefill")}
    steps: list[list[float]] = []
    same_ids = True
    run_ours(model, prompt, 4)
    run_hf(hf, prompt, 4)  # warm-up
    for _ in range(args.runs):
        model.set_attention("eager")
        total, gen = run_ours(model, prompt, args.new_tokens)
        rows["ours_e2e"].append(args.new_tokens / total)
        rows["ours_decode"].append(gen.decode_tokens_per_second)
        rows["ours_prefill"].append(gen.prefill_seconds)
        steps.append(gen.step_seconds)
        model.set_attention("sdpa")
        total_s, gen_s = run_ours(model, prompt, args.new_tokens)
        rows["sdpa_e2e"].append(args.new_tokens / total_s)
        rows["sdpa_decode"].append(gen_s.decode_tokens_per_second)
        model.set_attention("eager")
        total_h, prefill_h, ids_h = run_hf(hf, prompt, args.new_tokens)
        rows["hf_e2e"].append(args.new_tokens / total_h)
        rows["hf_decode"].append((args.new_tokens - 1) / max(1e-9, total_h - prefill_h))
        rows["hf_prefill"].append(prefill_h)
        same_ids &= ids_h == gen.generated_ids
    med = {k: statistics.median(v) for k, v in rows.items()}
    wbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.gpt_neox.embed_in.weight
    # each decode step reads every weight once, except the embedding (one row) unless it is tied
    read_bytes = wbytes - (0 if model.config.tie_word_embeddings else emb.numel() * emb.element_size())
    rate = read_rate()
    bound = rate / read_bytes
    step_med = [statistics.median(s[i] for s in steps) for i in range(len(steps[0]))]
    probe = [i for i in (7, 31, 63, 126) if i < len(step_med)]

    print(f"model: hidden {args.hidden}, {args.heads} heads, {args.layers} layers, vocab {args.vocab}, {args.dtype}, "
          f"{wbytes / 2**20:.0f} MiB of weights; prompt {args.prompt_len}, {args.new_tokens} new tokens; "
          f"torch threads {torch.get_num_threads()}; medians of {args.runs} runs")
    print(f"  transformers generate   {med['hf_e2e']:7.1f} tok/s end-to-end, {med['hf_decode']:7.1f} tok/s decode, "
          f"prefill {med['hf_prefill'] * 1e3:.1f} ms")
    print(f"  neoxconv (eager)        {med['ours_e2e']:7.1f} tok/s end-to-end, {med['ours_decode']:7.1f} tok/s decode, "
          f"prefill {med['ours_prefill'] * 1e3:.1f} ms")
    print(f"  neoxconv (sdpa)         {med['sdpa_e2e']:7.1f} tok/s end-to-end, {med['sdpa_decode']:7.1f} tok/s decode")
    print(f"  ratio neoxconv/transformers: end-to-end {med['ours_e2e'] / med['hf_e2e']:.2f}x, "
          f"decode {med['ours_decode'] / med['hf_decode']:.2f}x (target >= 1.1x); same greedy ids: {same_ids}")
    print(f"  memory bound: read rate {rate / 1e9:.1f} GB/s / {read_bytes / 1e9:.3f} GB read per token = "
          f"{bound:.1f} tok/s; "
          f"neoxconv decode reaches {med['ours_decode'] / bound:.0%} of it")
    print("  per-step latency (ms): " + ", ".join(f"step {i + 1}: {step_med[i] * 1e3:.2f}" for i in probe)
          + (f"; last/step 8 = {step_med[probe[-1]] / step_med[probe[0]]:.2f}x (target <= 1.2x)"
             if len(probe) > 1 else ""))
    print(f"  load: {statistics.median(loads):.3f} s vs reading the bytes {read_s:.3f} s = "
          f"{statistics.median(loads) / read_s:.2f}x (target <= 1.5x)")


if __name__ == "__main__":
    main()
