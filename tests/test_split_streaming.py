"""`split` and `reshard` stream their archives (issue 19): torch.save's bytes, DeepSpeed reads them, every source
byte checked, inf/nan refused, a SIGKILL resumes to the same bytes, and memory flat in the layer count and width."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from neoxconv.output import writer
from neoxconv.output.reshard import ReshardOptions, reshard_checkpoint
from neoxconv.output.split import SplitOptions, split_model
from neoxconv.source.ptfile import read_pt

from conftest import cli, hf_tensors, make_hf_folder, one_line_error, subprocess_env


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def hf16(tmp_path_factory):
    return make_hf_folder(tmp_path_factory.mktemp("hf16"), dtype=torch.float16, seed=11)


@pytest.fixture(scope="module")
def hfbf16(tmp_path_factory):
    return make_hf_folder(tmp_path_factory.mktemp("hfbf16"), dtype=torch.bfloat16, seed=12, use_parallel_residual=False)


# ----- the archives are torch.save's ------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["hf16", "hfbf16"])
@pytest.mark.parametrize("layout", ["pipeline", "sequential"])
def test_every_archive_is_byte_for_byte_what_torch_save_writes_for_what_it_loads(which, layout, request, tmp_path):
    src = request.getfixturevalue(which)
    split_model(src, tmp_path / "split", SplitOptions(tp=2, layout=layout, quiet=True))
    reshard_checkpoint(tmp_path / "split", tmp_path / "re", ReshardOptions(tp=4, quiet=True))
    files = sorted([*(tmp_path / "split").rglob("*.pt"), *(tmp_path / "re").rglob("*.pt")])
    assert len(files) >= 6
    for pt in files:
        loaded = torch.load(pt, weights_only=True)
        again = tmp_path / "torch" / pt.parent.parent.name / pt.name  # torch names the records after the file
        again.parent.mkdir(parents=True, exist_ok=True)
        torch.save(loaded, again)
        assert again.read_bytes() == pt.read_bytes(), pt
    # and the values are the model's: rank r of TP 4 holds its quarter of the embedding
    sd = hf_tensors(src)
    emb = sd["gpt_neox.embed_in.weight"]
    step = tmp_path / "re" / "global_step0"
    for r in range(4):
        if layout == "pipeline":
            got = torch.load(step / f"layer_00-model_{r:02d}-model_states.pt",
                             weights_only=True)["word_embeddings.weight"]
        else:
            got = torch.load(step / f"mp_rank_{r:02d}_model_states.pt",
                             weights_only=True)["module"]["sequential.0.word_embeddings.weight"]
        rows = emb.shape[0] // 4
        assert torch.equal(got.view(torch.uint8), emb[r * rows:(r + 1) * rows].contiguous().view(torch.uint8))


def test_deepspeed_pipeline_loader_reads_a_reshard_output_strictly(tmp_path):
    pytest.importorskip("deepspeed")
    from types import SimpleNamespace

    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.pipe.module import PipelineModule
    from test_deepspeed_load import F, H, V, _stages
    from torch import nn

    hf = make_hf_folder(tmp_path / "hf", dtype=torch.float16, intermediate_size=F, seed=4)
    split_model(hf, tmp_path / "neox2", SplitOptions(tp=2, quiet=True, key_names="20b"))  # reshard keeps them
    reshard_checkpoint(tmp_path / "neox2", tmp_path / "neox4", ReshardOptions(tp=4, quiet=True))
    step = tmp_path / "neox4" / "global_step0"
    sd = hf_tensors(hf)
    for rank in range(4):
        module = PipelineModule.__new__(PipelineModule)
        nn.Module.__init__(module)
        module.forward_funcs, module._local_start, module.tied_comms = _stages(4), 0, {}
        module._grid = SimpleNamespace(get_slice_parallel_rank=lambda r=rank: r,
                                       get_slice_parallel_world_size=lambda: 4)
        module.load_state_dir(str(step), checkpoint_engine=TorchCheckpointEngine(), strict=True)
        block, readout = module.forward_funcs[2], module.forward_funcs[-1]
        cols, rows = F // 4, V // 4
        assert torch.equal(block.mlp.dense_4h_to_h.weight,
                           sd["gpt_neox.layers.0.mlp.dense_4h_to_h.weight"][:, rank * cols:(rank + 1) * cols])
        assert torch.equal(readout.final_linear.weight, sd["embed_out.weight"][rank * rows:(rank + 1) * rows])
        bias = sd["gpt_neox.layers.0.attention.dense.bias"]  # parallel residual: whole on rank 0, zeros elsewhere
        assert torch.equal(block.attention.dense.bias, bias if rank == 0 else torch.zeros_like(bias))
    assert H % 4 == 0


# ----- every source byte checked; inf/nan refused -----------------------------------------------------------
def test_a_flipped_source_byte_fails_reshard_and_leaves_nothing_written_from_it(make_checkpoint, tmp_path):
    root = Path(shutil.copytree(make_checkpoint(2, "pipeline", "float16")[0], tmp_path / "src"))
    victim = next(root.glob("global_step*")) / "layer_03-model_01-model_states.pt"
    ref = read_pt(victim).tensors()["mlp.dense_4h_to_h.weight"]
    data = bytearray(victim.read_bytes())
    data[ref.byte_offset + ref.nbytes - 3] ^= 0x20  # in the last block read
    victim.write_bytes(bytes(data))
    out = tmp_path / "out"
    line = one_line_error(cli("reshard", "-q", root, out, "--tp", 4), 4, victim.name, "CRC-32")
    assert "mlp.dense_4h_to_h.weight" in line
    step = next(out.glob("global_step*"))
    assert not list(step.glob("layer_03-*")) and not list(out.rglob("*.neoxconv-tmp"))
    assert list(step.glob("layer_02-*"))  # the layers before it were written (and resume)
    assert not (out / "neoxconv.json").exists()


def test_a_safetensors_file_changed_while_split_reads_it_is_refused(hf16, tmp_path, monkeypatch):
    import os

    from neoxconv.source import hf_folder

    src = Path(shutil.copytree(hf16, tmp_path / "hf"))
    real = hf_folder.HFRows.rows
    calls = [0]

    def rows_then_touch(self, name, start, count, dtype):
        calls[0] += 1
        if calls[0] == 3:
            f = self.model.tensors[name].file
            os.utime(f, ns=(time.time_ns(), time.time_ns() + 10**9))
        return real(self, name, start, count, dtype)

    monkeypatch.setattr(hf_folder.HFRows, "rows", rows_then_touch)
    one_line_error(cli("split", "-q", src, tmp_path / "out", "--tp", 2), 4, "model.safetensors",
                   "changed while neoxconv read it")
    step = tmp_path / "out" / "global_step0"
    assert list(step.glob("layer_00-*")) and not list(step.glob("layer_02-*"))  # read before / while it changed
    assert not list(step.glob(".*")) and not (tmp_path / "out" / "neoxconv.json").exists()


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
@pytest.mark.parametrize("name, key", [
    ("gpt_neox.layers.1.mlp.dense_4h_to_h.weight", "mlp.linear2.weight"),  # columns: copied from a row block
    ("gpt_neox.layers.1.mlp.dense_h_to_4h.weight", "mlp.linear1.weight"),  # rows: read into the staging buffer
])
def test_an_inf_or_nan_in_the_source_is_refused_unless_allowed(hf16, tmp_path, value, name, key):
    src = Path(shutil.copytree(hf16, tmp_path / "hf"))
    sd = load_file(str(src / "model.safetensors"))
    sd[name][-5, -1] = value  # the last row and column: the last rank's part either way
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    line = one_line_error(cli("split", src, out, "--tp", 2), 5, "non-finite", "--allow-nonfinite")
    assert f"layer 03 (block 1) (rank 1): '{key}'" in line
    assert not list(out.rglob("layer_03-*")) and not list(out.rglob("*.neoxconv-tmp"))
    result = cli("split", src, out, "--tp", 2, "--allow-nonfinite", "-q")
    assert result.exit_code == 0, result.output
    back = torch.load(out / "global_step0" / "layer_03-model_01-model_states.pt", weights_only=True)
    assert not torch.isfinite(back[key][-5, -1])
    assert int((~torch.isfinite(back[key])).sum()) == 1


# ----- SIGKILL mid-write ----------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["split", "reshard"])
def test_sigkill_mid_write_then_rerun_is_byte_identical(command, make_checkpoint, tmp_path):
    if command == "split":
        src = make_hf_folder(tmp_path / "hf", dtype=torch.float32, seed=6, hidden_size=256, num_attention_heads=8,
                       vocab_size=2048)
        args = ["--tp", "2", "--layout", "sequential"]
    else:
        src = make_checkpoint(2, "pipeline", "float32", config_overrides={"hidden_size": 256, "num_heads": 8})[0]
        args = ["--tp", "4"]
    cmd = lambda out: [sys.executable, "-m", "neoxconv", command, str(src), str(out), *args, "-q"]  # noqa: E731
    subprocess.run(cmd(tmp_path / "clean"), check=True, capture_output=True, env=subprocess_env())
    out = tmp_path / "out"
    proc = subprocess.Popen(cmd(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=subprocess_env())
    seen = False
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < 60:
        if any(p.name.endswith(".pt.neoxconv-tmp") for p in out.glob("global_step*/.*")):
            seen = True
            break
        time.sleep(0.001)
    proc.kill()
    proc.wait()
    if not seen:
        pytest.skip("the run ended before a temporary was seen (machine too fast for this size)")
    rerun = subprocess.run(cmd(out), capture_output=True, text=True, env=subprocess_env())
    assert rerun.returncode == 0, rerun.stderr
    assert _tree(out) == _tree(tmp_path / "clean")


# ----- memory flat in the layer count and the width ------------------------------------------------------------
def _peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _deeper(hf: Path, out: Path, layers: int) -> Path:
    """``hf`` (2 layers) with its blocks repeated to ``layers`` blocks (config.json and weights)."""
    import json

    out.mkdir()
    sd = load_file(str(hf / "model.safetensors"))
    for name in [n for n in sd if n.startswith("gpt_neox.layers.")]:
        block = int(name.split(".")[2])
        for i in range(block + 2, layers, 2):
            sd[name.replace(f"layers.{block}.", f"layers.{i}.")] = sd[name].clone()
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((hf / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "num_hidden_layers": layers}))
    return out


def test_peak_memory_is_flat_in_the_layer_count_and_below_one_layer(tmp_path):
    # hidden 512, fp32: one block layer is 12.6 MB (the old writer held it, then each rank's shard)
    two = make_hf_folder(tmp_path / "hf2", dtype=torch.float32, seed=1, hidden_size=512, num_attention_heads=8,
                   vocab_size=1024)
    peaks = {}
    for layers, hf in ((2, two), (5, _deeper(two, tmp_path / "hf5", 5))):
        s, r, q = (tmp_path / f"{x}{layers}" for x in "srq")
        peaks["split", layers] = _peak(lambda hf=hf, s=s: split_model(hf, s, SplitOptions(tp=2, quiet=True)))
        peaks["reshard", layers] = _peak(lambda s=s, r=r: reshard_checkpoint(s, r, ReshardOptions(tp=4, quiet=True)))
        peaks["sequential", layers] = _peak(lambda hf=hf, q=q: split_model(
            hf, q, SplitOptions(tp=2, layout="sequential", quiet=True)))
    for (what, layers), peak in peaks.items():
        assert peak < 6e6, (what, layers, peak)  # below half a layer (12.6 MB): a few 1 MB blocks
        assert peak < 1.3 * peaks[what, 2] + 1e6, (what, layers, peak, peaks[what, 2])  # flat in the layer count


# ----- 2. split/reshard's fill path -------------------------------------------------------------------------------
def _pt_tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.pt"))}


def test_fill_views_straddling_tiny_staging_buffers_give_the_same_bytes(tmp_path, monkeypatch):
    """Held: with 8 KiB staging buffers and 1000-byte fill views, rows of 80 (fp16), 96 (bf16 Llama GQA, SPLIT_ROWS)
    bytes straddle every buffer (the bounce path); split and reshard still write what torch.save writes for what
    torch.load reads, byte for byte the same as with the default buffers."""
    from llama_checkpoints import LlamaSpec, hf_llama

    neox = make_hf_folder(tmp_path / "neox", dtype=torch.float16, seed=3, hidden_size=40, num_attention_heads=4,
                          rotary_pct=0.2, vocab_size=520, intermediate_size=168)
    hf_llama(LlamaSpec(hidden=48, heads=6, kv_heads=2, intermediate=72, vocab=260)).to(torch.bfloat16) \
        .save_pretrained(tmp_path / "llama")

    def run(tag: str) -> dict[str, bytes]:
        out = {}
        for name, tp_back in (("neox", 4), ("llama", 1)):
            src = neox if name == "neox" else tmp_path / "llama"
            split_model(src, tmp_path / tag / name, SplitOptions(tp=2, quiet=True))
            reshard_checkpoint(tmp_path / tag / name, tmp_path / tag / f"{name}-re", ReshardOptions(tp=tp_back,
                                                                                                     quiet=True))
            for sub in (name, f"{name}-re"):
                out.update({f"{sub}/{k}": v for k, v in _pt_tree(tmp_path / tag / sub).items()})
        return out

    default = run("default")
    monkeypatch.setattr(writer, "_STAGE_BYTES", 8192)
    monkeypatch.setattr(writer, "_FILL_BYTES", 1000)
    tiny = run("tiny")
    assert default == tiny
    for rel in tiny:
        pt = tmp_path / "tiny" / rel
        again = tmp_path / "again" / pt.parent.parent.name / pt.name  # torch names the records after the file
        again.parent.mkdir(parents=True, exist_ok=True)
        torch.save(torch.load(pt, weights_only=True), again)
        assert again.read_bytes() == tiny[rel], rel
