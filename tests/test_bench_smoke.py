"""The benchmarks run end to end at toy sizes (their targets are not asserted here: CI machines are noisy)."""

import subprocess
import sys

from conftest import REPO


def _run(script, *args):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / script), *map(str, args)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_merge_bench_smoke(tmp_path):
    out = _run("merge_bench.py", "--quick", "--workdir", tmp_path)
    assert "merge/cp" in out and "CPU core-s/GB" in out and "NO" not in out.split("same bytes")[1]
    assert "peak RSS by layer count" in out and "view-heavy checkpoint" in out
    assert "bytes read" in out  # the ratio, or how far the reader got before it failed


def test_split_bench_smoke(tmp_path):
    out = _run("split_bench.py", "--quick", "--workdir", tmp_path)
    for name in ("merge", "split --tp 2", "reshard --tp 4"):
        assert f"peak RSS by layer count, {name}: 1: " in out
    assert "ratio to cp" in out and "CPU core-s/GB" in out and "NO" not in out.split("same bytes")[1]
    assert "bytes read / source bytes" in out


def test_checks_bench_smoke():
    out = _run("checks_bench.py", "--mb", 1, "--repeat", 1)
    for name in ("hashlib.sha256", "blake3, 1 thread", "zlib.crc32", "np.isfinite", "NonFiniteCounter (exponent mask"):
        assert name in out


def test_generate_bench_smoke(tmp_path):
    out = _run("generate_bench.py", "--hidden", 64, "--heads", 4, "--layers", 1, "--vocab", 1024,
               "--prompt-len", 4, "--new-tokens", 10, "--runs", 1, "--workdir", tmp_path)
    assert "same greedy ids: True" in out and "per-step latency" in out


def test_gpu_check_runs_on_cpu(tmp_path):
    out = _run("gpu_check.py", "--device", "cpu", "--hidden", 64, "--heads", 4, "--layers", 1, "--vocab", 1024,
               "--new-tokens", 4, "--workdir", tmp_path)
    assert "=== verify fp16 on cpu ===" in out and "=== verify int8 on cpu ===" in out
    assert "all checks passed" in out
    assert "fp16 --max-memory: same ids as fp16: yes" in out and "fp16 --device-map auto: same ids as fp16: yes" in out
    assert "int8 --max-memory: same ids as int8: yes" in out


def test_bigverify_bench_smoke(tmp_path):
    out = _run("bigverify_bench.py", "--hidden", 64, "--heads", 4, "--layers", 2, "--vocab", 1024,
               "--max-memory", "64KiB", "--new-tokens", 4, "--no-against", "--workdir", tmp_path)
    assert "identical generated ids: yes" in out and "bytes read per generated token" in out
    assert "peak capped / uncapped" in out


def test_llama_benches_run_at_toy_sizes(tmp_path):
    out = _run("llama_merge_bench.py", "--hidden", 128, "--heads", 8, "--kv-heads", 2, "--intermediate", 256,
               "--vocab", 512, "--layers", 1, "--runs", 1, "--workdir", tmp_path / "merge")
    assert "merge" in out and "peak RSS" in out
    out = _run("llama_gpu_check.py", "--device", "cpu", "--hidden", 128, "--heads", 8, "--kv-heads", 2,
               "--intermediate", 256, "--layers", 1, "--vocab", 512, "--new-tokens", 4, "--no-int8",
               "--workdir", tmp_path / "gpu")  # int8 on a Llama model: tests/test_llama.py
    assert "=== verify fp16 on cpu ===" in out and "all checks passed" in out and "2 kv heads of 8" in out
