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
