"""Checkpoints as DeepSpeed and gpt-neox really write them (see real_writers.py) merge like torch.load sees them.

Each variant is merged by neoxconv and, independently, by ``torch.load(map_location="cpu",
weights_only=False)`` + torch.cat / fp32 sums written here; the outputs must be bit-identical, and
transformers' GPTNeoXForCausalLM on the output must give the reference model's logits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from neoxconv.output.describe import inspect_checkpoint
from neoxconv.output.hf_merge import MergeOptions, merge_checkpoint

from hf_reference import hf_logits, hf_model
from real_writers import WriterSpec, write_real_checkpoint

transformers = pytest.importorskip("transformers")
IDS = [5, 100, 13, 50, 7, 3, 511, 0]

VARIANTS = {
    # name: (spec, what it stands for)
    "seq-zero-cuda-tp2": WriterSpec(tp=2, layout="sequential"),
    "seq-zero-cuda-tp1": WriterSpec(tp=1, layout="sequential"),
    "seq-zero-linear12-tp4": WriterSpec(tp=4, layout="sequential", linear12=True),
    "seq-plain-state-dict": WriterSpec(tp=2, layout="sequential", zero_views=False, cuda_tag=False),
    "seq-hf-converter": WriterSpec(tp=2, layout="sequential", zero_views=False, hf_converter=True,
                                   hidden_size=256, num_layers=1),
    "pipe-views-pre-2021": WriterSpec(tp=2, layout="pipeline", clone="none"),
    "pipe-gpu-clone-2021-2023": WriterSpec(tp=2, layout="pipeline", clone="gpu"),
    "pipe-cpu-clone-since-2023": WriterSpec(tp=2, layout="pipeline", clone="cpu", cuda_tag=False),
    "pipe-linear12": WriterSpec(tp=2, layout="pipeline", clone="gpu", linear12=True),
}

# gpt-neox's tensor-parallel layout, written here independently of neoxconv's rule table
_COLUMN = ("attention.query_key_value.weight", "attention.query_key_value.bias", "mlp.{up}.weight", "mlp.{up}.bias")
_ROW_W = ("attention.dense.weight", "mlp.{down}.weight")
_ROW_B = ("attention.dense.bias", "mlp.{down}.bias")
_REPL = ("input_layernorm.weight", "input_layernorm.bias", "post_attention_layernorm.weight",
         "post_attention_layernorm.bias")


def torch_load_merge(root: Path, spec: WriterSpec, cfg) -> dict[str, torch.Tensor]:
    """The merged model in Hugging Face names, from torch.load of every file (full unpickling)."""
    step = root / f"global_step{spec.step}"
    up, down = ("linear1", "linear2") if spec.linear12 else ("dense_h_to_4h", "dense_4h_to_h")

    def load(p):
        return torch.load(p, map_location="cpu", weights_only=False)

    if spec.layout == "sequential":
        mods = [load(step / f"mp_rank_{r:02d}_model_states.pt")["module"] for r in range(spec.tp)]

        def layer(idx):
            pre = f"sequential.{idx}."
            return [{k[len(pre):]: v for k, v in m.items() if k.startswith(pre)} for m in mods]
    else:
        def layer(idx):
            return [load(step / f"layer_{idx:02d}-model_{r:02d}-model_states.pt") for r in range(spec.tp)]

    out: dict[str, torch.Tensor] = {}
    out["gpt_neox.embed_in.weight"] = torch.cat([s["word_embeddings.weight"] for s in layer(0)])
    for b in range(cfg.num_layers):
        shards, p = layer(2 + b), f"gpt_neox.layers.{b}."
        for k in _COLUMN:
            k = k.format(up=up)
            out[p + k.replace(up, "dense_h_to_4h")] = torch.cat([s[k] for s in shards])
        for k in _ROW_W:
            k = k.format(down=down)
            out[p + k.replace(down, "dense_4h_to_h")] = torch.cat([s[k] for s in shards], dim=1)
        for k in _ROW_B:
            k = k.format(down=down)
            out[p + k.replace(down, "dense_4h_to_h")] = sum(s[k].float() for s in shards).half()
        for k in _REPL:
            assert all(torch.equal(s[k], shards[0][k]) for s in shards)
            out[p + k] = shards[0][k]
    final = layer(cfg.num_layers + 3)
    out["gpt_neox.final_layer_norm.weight"] = final[0]["norm.weight"]
    out["gpt_neox.final_layer_norm.bias"] = final[0]["norm.bias"]
    out["embed_out.weight"] = torch.cat([s["final_linear.weight"] for s in layer(cfg.num_layers + 4)])
    return out


def _output(out: Path) -> dict[str, torch.Tensor]:
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = {}
    for name, file in index["weight_map"].items():
        with safe_open(out / file, framework="pt") as f:
            tensors[name] = f.get_tensor(name)
    return tensors


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            root = tmp_path_factory.mktemp(name)
            cache[name] = (root, *write_real_checkpoint(root, VARIANTS[name]))
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(VARIANTS))
def test_real_writer_variant_merges_like_torch_load(written, tmp_path, name):
    spec = VARIANTS[name]
    root, reference, cfg = written(name)
    report = merge_checkpoint(root, tmp_path / "out", MergeOptions(quiet=True))
    assert (report.layout, report.tp_degree) == (spec.layout, spec.tp)
    got = _output(tmp_path / "out")
    want = torch_load_merge(root, spec, cfg)
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    # and the model computes what the reference model computes
    merged = transformers.GPTNeoXForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    torch.testing.assert_close(hf_logits(merged, IDS), hf_logits(hf_model(cfg, reference), IDS), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,generation", [("seq-zero-cuda-tp2", "dense_h_to_4h/dense_4h_to_h"),
                                             ("pipe-linear12", "linear1/linear2")])
def test_inspect_reports_the_key_generation(written, name, generation):
    root, _, _ = written(name)
    info = inspect_checkpoint(root)
    assert info["key_generation"] == generation
    assert info["layout"] == VARIANTS[name].layout


def test_inspect_cli_says_which_key_generation_it_found(written):
    from click.testing import CliRunner

    from neoxconv.cli import main

    root, _, _ = written("pipe-linear12")
    result = CliRunner().invoke(main, ["inspect", str(root), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["key_generation"] == "linear1/linear2"
    human = CliRunner().invoke(main, ["inspect", str(root)])
    assert "key names: linear1/linear2" in human.output


def test_cuda_tags_and_metadata_are_really_in_the_files(written):
    """The fixtures hold what real files hold (so the tests above test something)."""
    root, _, _ = written("seq-zero-cuda-tp2")
    path = root / "global_step1000" / "mp_rank_01_model_states.pt"
    with zipfile.ZipFile(path) as zf:
        pkl = next(zf.read(n) for n in zf.namelist() if n.endswith("data.pkl"))
    assert b"cuda:1" in pkl and b"_metadata" in pkl and b"argparse" in pkl and b"NeoXArgs" in pkl
    sd = torch.load(path, map_location="cpu", weights_only=False)["module"]
    assert hasattr(sd, "_metadata")
    storages = {t.untyped_storage().data_ptr() for k, t in sd.items() if not k.endswith("inv_freq")}
    assert len(storages) == 1  # every parameter of the rank views the one flat ZeRO buffer
    w = sd["sequential.2.attention.dense.weight"]
    assert w.untyped_storage().nbytes() > 10 * w.nbytes  # a view into the rank's flat buffer


def test_views_are_read_once_per_storage(written, tmp_path):
    """A merge reads each source byte at most about once, however many tensors view one storage."""
    from neoxconv.merge import Rule
    from neoxconv.plan.plan import plan_checkpoint
    from neoxconv.source.checkpoint import open_checkpoint
    from neoxconv.source.storage import SourceReader

    root, _, _ = written("pipe-views-pre-2021")
    ckpt = open_checkpoint(root)
    _, plans = plan_checkpoint(ckpt, row_bias=Rule.SUM, out_dtype=None)
    refs = [r for p in plans for t in [*p.tensors, *p.dropped] for r in t.shards]
    storages = {(r.path, r.data_offset): r.storage_nbytes for r in refs}
    assert len(storages) < len(refs) / 3  # view-heavy: many tensors per storage
    with SourceReader() as reader:
        with reader.scope() as reads:
            for r in refs:
                reads.read(r)
            assert not reader.verified(refs)  # served, checked as the scope closes
        assert reader.verified(refs)
    assert reader.bytes_read <= sum(storages.values())


BYTES_READ_SCRIPT = r"""
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from neoxconv.output.hf_merge import MergeOptions, merge_checkpoint

def rchar():
    return int(dict(l.split(": ") for l in Path("/proc/self/io").read_text().splitlines())["rchar"])

# a first merge imports every module the merge uses (reading .py files counts in rchar too)
merge_checkpoint(Path(sys.argv[1]), Path(sys.argv[2] + "-warmup"), MergeOptions(quiet=True))
before = rchar()
merge_checkpoint(Path(sys.argv[1]), Path(sys.argv[2]), MergeOptions(quiet=True))
print(json.dumps({"rchar": rchar() - before}))
"""


def measure_bytes_read(root: Path, out: Path) -> tuple[int, int]:
    """(bytes a merge reads (``rchar``: every read syscall, page cache or not; nothing is memory-mapped),
    total size of the source files the merge reads)."""
    res = subprocess.run([sys.executable, "-c", BYTES_READ_SCRIPT, str(root), str(out), str(Path(__file__).parent)],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert res.returncode == 0, res.stderr
    read = json.loads(res.stdout.strip().splitlines()[-1])["rchar"]
    step = next(root.glob("global_step*"))
    weights = sorted(step.glob("layer_*.pt")) or sorted(step.glob("mp_rank_*.pt"))  # what the merge reads
    source = sum(p.stat().st_size for p in weights)
    return read, source


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs /proc/self/io")
@pytest.mark.parametrize("layout", ["sequential", "pipeline"])
def test_bytes_read_by_a_merge_of_a_view_heavy_checkpoint(tmp_path, layout):
    """12 layers, ZeRO views of one flat buffer per rank: read <= 1.1x the source files (was 283x at 24)."""
    root = tmp_path / "src"
    write_real_checkpoint(root, WriterSpec(tp=2, layout=layout, num_layers=12, clone="none"))
    read, source = measure_bytes_read(root, tmp_path / "out")
    assert read <= 1.1 * source, f"read {read} bytes for {source} bytes of source files ({read / source:.2f}x)"


def test_a_storage_bigger_than_the_chunk_budget_is_streamed(written):
    """Reading every tensor of a flat ZeRO buffer with a 4 KiB budget: peak memory stays near the budget."""
    import tracemalloc

    from neoxconv.merge import Rule
    from neoxconv.output.streaming import iter_merged_chunks
    from neoxconv.plan.plan import plan_checkpoint
    from neoxconv.source.checkpoint import open_checkpoint
    from neoxconv.source.storage import SourceReader

    root, _, _ = written("seq-zero-cuda-tp2")
    _, plans = plan_checkpoint(open_checkpoint(root), row_bias=Rule.SUM, out_dtype=None)
    streamed = [t for p in plans for t in p.tensors if t.rule in (Rule.CONCAT_ROWS, Rule.CONCAT_COLS)]
    refs = [r for t in streamed for r in t.shards]
    biggest = max(r.storage_nbytes for r in refs)
    assert biggest > 40 * 4096
    with SourceReader(chunk_bytes=4096) as reader:
        tracemalloc.start()
        with reader.scope() as reads:  # its check (as it closes) is inside the measurement too
            for t in streamed:
                for chunk in iter_merged_chunks(t, chunk_bytes=4096, reader=reads):
                    assert chunk.nbytes <= 4096 or chunk.shape[0] == 1
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert reader.verified(refs)
    assert peak < biggest / 3, (peak, biggest)


@pytest.mark.parametrize("where", ["padding", "tensor"])
def test_corrupt_shared_storage_fails_and_leaves_no_unconfirmed_layer(written, tmp_path, where):
    """A flipped byte in a rank's flat buffer (in a tensor, or in padding no tensor reads) is a CRC error
    naming the file; layers merged from that buffer before the check are not left under their names."""
    import shutil

    from neoxconv.errors import CheckpointError
    from neoxconv.source.ptfile import read_pt

    root, _, _ = written("seq-zero-cuda-tp2")
    src = tmp_path / "src"
    shutil.copytree(root, src)
    victim = src / "global_step1000" / "mp_rank_01_model_states.pt"
    refs = read_pt(victim, lenient=True).tensors(("module",))
    flat = refs["sequential.2.attention.dense.weight"]
    if where == "tensor":
        pos = flat.byte_offset + 3
    else:  # the 16 bytes of padding at the start of the flat buffer
        pos = flat.data_offset + 2
        assert all(r.storage_offset * r.itemsize > 2 for r in refs.values() if r.data_offset == flat.data_offset)
    data = bytearray(victim.read_bytes())
    data[pos] ^= 0x40
    victim.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="mp_rank_01_model_states.pt.*CRC-32"):
        merge_checkpoint(src, tmp_path / "out", MergeOptions(quiet=True))
    left = sorted(p.name for p in (tmp_path / "out").glob("model-*.safetensors"))
    journal = tmp_path / "out" / ".neoxconv-journal.json"
    journaled = set(json.loads(journal.read_text())["layers"]) if journal.exists() else set()
    assert set(left) <= journaled  # whatever is left under a final name was confirmed
    assert not (tmp_path / "out" / "neoxconv.json").exists()


def test_hf_converter_files_hold_strided_views_of_full_tensors(written):
    from neoxconv.source.ptfile import read_pt

    root, _, _ = written("seq-hf-converter")
    refs = read_pt(root / "global_step1000" / "mp_rank_01_model_states.pt", lenient=True).tensors(("module",))
    row = refs["sequential.2.attention.dense.weight"]  # v[:, n:2n] of the full [H, H] weight
    assert not row.is_contiguous and row.storage_offset == row.shape[1] and row.storage_nbytes == 2 * row.nbytes
    col = refs["sequential.2.mlp.dense_h_to_4h.weight"]  # v[n:2n] of the full [F, H] weight
    assert col.is_contiguous and col.storage_offset == col.numel
