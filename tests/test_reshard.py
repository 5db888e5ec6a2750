"""`neoxconv reshard` (NeoX TP T -> TP M): merge(reshard(SRC, M)) == merge(SRC), bit for bit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from neoxconv.cli import main
from neoxconv.config import read_neox_yaml
from neoxconv.errors import ConfigError
from neoxconv.output.hf_merge import MergeOptions, merge_checkpoint
from neoxconv.output.reshard import ReshardOptions, reshard_checkpoint

from conftest import COMMITTED_FIXTURE, cli, one_line_error


def _merged(src: Path, out: Path, **kw) -> dict[str, torch.Tensor]:
    merge_checkpoint(src, out, MergeOptions(quiet=True, **kw))
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].contiguous().view(torch.uint8).equal(b[k].contiguous().view(torch.uint8)), k


@pytest.mark.parametrize("T,M,src_layout,out_layout,dtype", [
    (2, 1, "pipeline", None, "float16"),
    (2, 4, "pipeline", None, "float16"),
    (1, 2, "pipeline", "sequential", "float32"),
    (4, 2, "sequential", "pipeline", "bfloat16"),
    (4, 4, "pipeline", None, "float32"),
])
def test_merge_of_reshard_equals_merge_of_source(make_checkpoint, tmp_path, T, M, src_layout, out_layout, dtype):
    # per-rank noise on the layer norms: the merge averages them, the reshard must keep that average exactly
    root, _, spec = make_checkpoint(T, src_layout, dtype, replica_noise=1e-3 if T > 1 else 0.0)
    report = reshard_checkpoint(root, tmp_path / "re", ReshardOptions(tp=M, layout=out_layout, quiet=True))
    assert (report.tp_degree, report.layout, report.step) == (M, out_layout or src_layout, spec.step)
    raw = read_neox_yaml(tmp_path / "re" / "configs" / "neox.yml")
    assert raw["model-parallel-size"] == M
    assert raw["pipe-parallel-size"] == (1 if (out_layout or src_layout) == "pipeline" else 0)
    _same(_merged(root, tmp_path / "a"), _merged(tmp_path / "re", tmp_path / "b"))
    for pt in (tmp_path / "re").glob("global_step*/*.pt"):
        torch.load(pt, weights_only=True)


def test_reshard_of_old_style_full_row_biases(make_checkpoint, tmp_path):
    """A source converted by older tools (full bias on every rank) reshards with --row-bias replicated."""
    root, _, _ = make_checkpoint(2, "pipeline", "float16", full_row_bias_on_every_rank=True)
    reshard_checkpoint(root, tmp_path / "re", ReshardOptions(tp=4, row_bias="replicated", quiet=True))
    a = _merged(root, tmp_path / "a", row_bias="replicated")
    b = _merged(tmp_path / "re", tmp_path / "b")  # the output follows the config: parts that sum
    _same(a, b)


def test_reshard_cli_errors_and_json(make_checkpoint, tmp_path):
    root, _, _ = make_checkpoint(2, "pipeline", "float16")
    bad = CliRunner().invoke(main, ["reshard", str(root), str(tmp_path / "x"), "--tp", "3"])
    assert bad.exit_code == 3 and len(bad.output.strip().splitlines()) == 1
    assert "num_heads 4 is not divisible by the TP degree 3" in bad.output and not (tmp_path / "x").exists()
    same = CliRunner().invoke(main, ["reshard", str(root), str(root), "--tp", "1"])
    assert same.exit_code == 6, same.output
    ok = CliRunner().invoke(main, ["reshard", str(root), str(tmp_path / "o"), "--tp", "1", "--step", "5", "--json"])
    assert ok.exit_code == 0, ok.output
    info = json.loads(ok.output)
    assert info["tp_degree"] == 1 and info["step"] == 5 and info["files_written"] == 5
    assert (tmp_path / "o" / "latest").read_text() == "global_step5"
    assert (tmp_path / "o" / "global_step5" / "mp_rank_00_model_states.pt").is_file()


def test_reshard_refuses_diverging_replicas_beyond_tolerance(make_checkpoint, tmp_path):
    root, _, _ = make_checkpoint(2, "pipeline", "float16", replica_noise=0.5)
    result = CliRunner().invoke(main, ["reshard", str(root), str(tmp_path / "o"), "--tp", "4"])
    assert result.exit_code == 5 and "--replica-tolerance" in result.output
    assert not (tmp_path / "o").exists()  # found in the preflight, before anything was written


def _view_heavy(tmp_path, layers=12):
    from real_writers import WriterSpec, write_real_checkpoint

    root = tmp_path / "src"
    write_real_checkpoint(root, WriterSpec(tp=2, layout="sequential", num_layers=layers, clone="none"))
    return root, sorted(next(root.glob("global_step*")).glob("mp_rank_*.pt"))


def test_reshard_of_a_view_heavy_checkpoint_reads_each_shared_storage_once(tmp_path, monkeypatch):
    # Before: every tensor was read with a fresh SourceReader, whose CRC check re-read the whole ZeRO flat
    # buffer (the gaps) per tensor: 182x the source for 12 layers, quadratic in the layer count.
    from neoxconv.source import storage

    root, files = _view_heavy(tmp_path)
    read = [0]
    pread = storage.SourceReader._pread

    def counting(self, st, start, view):
        read[0] += len(view)
        return pread(self, st, start, view)

    monkeypatch.setattr(storage.SourceReader, "_pread", counting)
    r = cli("reshard", "-q", root, tmp_path / "out", "--tp", 1)
    assert r.exit_code == 0, r.output
    source = sum(p.stat().st_size for p in files)
    assert read[0] <= 2.2 * source, f"read {read[0]} bytes for {source} ({read[0] / source:.1f}x)"
    # and the result is the merge of the source, bit for bit
    assert cli("merge", "-q", root, tmp_path / "m1").exit_code == 0
    assert cli("merge", "-q", tmp_path / "out", tmp_path / "m2").exit_code == 0
    for f in sorted((tmp_path / "m1").glob("*.safetensors")):
        assert f.read_bytes() == (tmp_path / "m2" / f.name).read_bytes(), f.name


def test_reshard_of_a_corrupt_flat_buffer_fails_before_writing(tmp_path):
    root, files = _view_heavy(tmp_path, layers=2)
    data = bytearray(files[1].read_bytes())
    data[len(data) // 2] ^= 0x10  # inside rank 1's flat buffer
    files[1].write_bytes(bytes(data))
    one_line_error(cli("reshard", "-q", root, tmp_path / "out", "--tp", 1), 4, files[1].name, "CRC-32")
    out = tmp_path / "out"
    assert not out.exists() or not any(out.rglob("*.pt"))


def test_reshard_of_a_tied_config_with_a_readout_file_does_not_drop_it_silently(tmp_path):
    """The same source (tied in the YAML, readout files present and different from the embedding): `reshard
    --tp 1` exited 0 without a word and wrote no readout layer file, so ``merge(reshard(SRC))`` differs from
    ``merge(SRC)`` (which keeps ``embed_out.weight``), against reshard's own promise. It should refuse the
    ambiguous source as split does (exit 3/4, naming the YAML and the readout files)."""
    src = tmp_path / "src"
    shutil.copytree(COMMITTED_FIXTURE, src)
    yml = src / "configs" / "model.yml"
    yml.write_text(yml.read_text().replace('"no-weight-tying": true', '"no-weight-tying": false'))
    result = cli("reshard", "-q", src, tmp_path / "out", "--tp", 1)
    assert result.exit_code in (3, 4), result.output


# ----- derived buffers: the source's own, kept ------------------------------------------------------------------
_INV = "attention.rotary_emb.inv_freq"


def _block_buffers(step: Path) -> dict[str, torch.Tensor]:
    """The rotary buffer of every block file (layers 02, 03) in ``step``."""
    out = {}
    for p in sorted(step.glob("layer_0[23]-*")):
        sd = torch.load(p, weights_only=True)
        if _INV in sd:
            out[p.name] = sd[_INV]
    return out


def test_reshard_keeps_the_source_s_rotary_buffers_byte_for_byte(make_checkpoint, tmp_path):
    """A reshard copies the source's inv_freq (checked identical on every rank), it does not recompute it: a
    buffer planted one ulp off gpt-neox's formula survives; a --dtype change computes it in the new dtype; a
    source without the buffer (gpt-neox since 2024-03 by default) gives none, and the config says so."""
    root, _, spec = make_checkpoint(2, "pipeline", "float16")
    src = tmp_path / "src"
    shutil.copytree(root, src)
    step = src / f"global_step{spec.step}"
    planted = None
    for p in sorted(step.glob("layer_0[23]-*")):
        sd = torch.load(p, weights_only=True)
        inv = sd[_INV].clone()
        inv[0] = torch.nextafter(inv[0], torch.tensor(2.0, dtype=inv.dtype))  # one ulp up, on every rank
        planted = inv
        sd[_INV] = inv
        torch.save(sd, p)
    reshard_checkpoint(src, tmp_path / "re", ReshardOptions(tp=4, quiet=True))
    got = _block_buffers(tmp_path / "re" / f"global_step{spec.step}")
    assert len(got) == 2 * 4
    for name, value in got.items():
        assert value.dtype == torch.float16 and torch.equal(value.view(torch.int16), planted.view(torch.int16)), name
    assert read_neox_yaml(tmp_path / "re" / "configs" / "neox.yml")["rotary_save_freqs_buffer"] is True

    reshard_checkpoint(src, tmp_path / "fp32", ReshardOptions(tp=1, dtype="fp32", quiet=True))
    d = spec.config.rotary_dims
    want = 1.0 / (spec.config.rotary_emb_base ** (torch.arange(0, d, 2).float() / d))  # gpt-neox's, in fp32
    for name, value in _block_buffers(tmp_path / "fp32" / f"global_step{spec.step}").items():
        assert value.dtype == torch.float32 and torch.equal(value, want), name

    # an fp32 buffer beside fp16 weights (a buffer registered after .half()): kept in fp32 (one ulp off gpt-neox's
    # values, so a recomputation would show), counted as fp32
    fp32 = torch.nextafter(want, torch.full_like(want, 2.0))
    for p in sorted(step.glob("layer_0[23]-*")):
        sd = torch.load(p, weights_only=True)
        sd[_INV] = fp32
        torch.save(sd, p)
    reshard_checkpoint(src, tmp_path / "mixed", ReshardOptions(tp=4, quiet=True))
    for name, value in _block_buffers(tmp_path / "mixed" / f"global_step{spec.step}").items():
        assert value.dtype == torch.float32 and torch.equal(value, fp32), name
    # one the config does not give (another base) is refused, not carried on
    for p in sorted(step.glob("layer_0[23]-*")):
        sd = torch.load(p, weights_only=True)
        sd[_INV] = want * 3
        torch.save(sd, p)
    with pytest.raises(ConfigError, match="rotary frequencies"):
        reshard_checkpoint(src, tmp_path / "refused", ReshardOptions(tp=4, quiet=True))

    bare, _, bare_spec = make_checkpoint(2, "pipeline", "float16", with_inv_freq=False)
    reshard_checkpoint(bare, tmp_path / "bare", ReshardOptions(tp=1, quiet=True))
    assert _block_buffers(tmp_path / "bare" / f"global_step{bare_spec.step}") == {}
    assert read_neox_yaml(tmp_path / "bare" / "configs" / "neox.yml")["rotary_save_freqs_buffer"] is False
    _same(_merged(bare, tmp_path / "m1"), _merged(tmp_path / "bare", tmp_path / "m2"))


_NO_TORCH = """
import sys
from neoxconv.cli import main
try:
    main(sys.argv[1:], standalone_mode=False)
finally:
    print("torch imported:", "torch" in sys.modules)
"""


def test_split_and_reshard_never_import_torch(make_checkpoint, merged_fp32, tmp_path):
    """The data path is numpy and the .pt writer is torch-free: importing torch alone costs more CPU than
    a split of a small model. (A split for the 20B-era gpt-neox computes inv_freq with torch: not here.)"""
    import subprocess
    import sys

    root, _, _ = make_checkpoint(2, "pipeline", "float16")
    for args in (["reshard", str(root), str(tmp_path / "re"), "--tp", "1", "--quiet"],
                 ["split", str(merged_fp32[1]), str(tmp_path / "sp"), "--tp", "2", "--quiet"]):
        run = subprocess.run([sys.executable, "-c", _NO_TORCH, *args], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        assert "torch imported: False" in run.stdout, (args[0], run.stdout)
