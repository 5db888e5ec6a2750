"""`neoxconv split` (Hugging Face -> NeoX at TP N): round trips, an independent split, the files gpt-neox reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from neoxconv.cli import main
from neoxconv.config import NeoXConfig, padded_vocab_size
from neoxconv.output.hf_merge import MergeOptions, merge_checkpoint
from neoxconv.output.neox import vocab_divisor
from neoxconv.output.split import SplitOptions, split_model

from neox_tp_split import tp_split

TINY = dict(hidden_size=64, num_attention_heads=8, num_hidden_layers=2, vocab_size=512, max_position_embeddings=64)


def _make_hf(folder: Path, *, dtype=torch.float16, seed=0, legacy_config=False, hidden_act="gelu", max_shard_size=None,
             **overrides):
    """A transformers GPTNeoXForCausalLM with every parameter random, saved by save_pretrained (safetensors)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    kw = dict(TINY, rotary_pct=0.25, use_parallel_residual=True, hidden_act=hidden_act, eos_token_id=0, bos_token_id=0)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(**kw))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    model.to(dtype).save_pretrained(folder, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    if legacy_config:  # the transformers 4.x form: rotary_pct / rotary_emb_base / torch_dtype at the top level
        cfg = json.loads((folder / "config.json").read_text())
        rope = cfg.pop("rope_parameters")
        cfg["rotary_pct"] = rope["partial_rotary_factor"]
        cfg["rotary_emb_base"] = rope["rope_theta"]
        cfg["torch_dtype"] = cfg.pop("dtype")
        (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
    cache: dict = {}

    def make(dtype=torch.float16, **kw):
        key = (dtype, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = _make_hf(tmp_path_factory.mktemp("hf"), dtype=dtype, **kw)
        return cache[key]

    return make


def _hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("layout", ["pipeline", "sequential"])
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_merge_of_split_is_the_hf_model_bit_for_bit(hf_dir, tmp_path, tp, layout, dtype):
    src = hf_dir(dtype)
    report = split_model(src, tmp_path / "neox", SplitOptions(tp=tp, layout=layout, quiet=True))
    assert (report.tp_degree, report.layout) == (tp, layout)
    merge_checkpoint(tmp_path / "neox", tmp_path / "merged", MergeOptions(quiet=True))
    want, got = _hf_tensors(src), _hf_tensors(tmp_path / "merged")
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, name
        assert _bits(got[name]) == _bits(want[name]), name


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("parallel_residual", [True, False])
def test_split_equals_an_independent_tp_split(hf_dir, tmp_path, tp, parallel_residual):
    src = hf_dir(torch.float16, use_parallel_residual=parallel_residual, intermediate_size=256)  # 4h: the 20B MLP
    split_model(src, tmp_path / "neox", SplitOptions(tp=tp, quiet=True, key_names="20b"))
    sd = _hf_tensors(src)
    expected, row_bias_sums = tp_split(sd, layers=2, heads=8, rotary_dims=2, base=10000.0, tp=tp,
                                       parallel_residual=parallel_residual)
    step = tmp_path / "neox" / "global_step0"
    assert sorted(p.name for p in step.glob("layer_*")) == sorted(
        f"layer_{i:02d}-model_{r:02d}-model_states.pt" for i in expected for r in range(tp))
    for idx, shards in expected.items():
        ranks = [torch.load(step / f"layer_{idx:02d}-model_{r:02d}-model_states.pt", weights_only=True)
                 for r in range(tp)]
        for r, (want, got) in enumerate(zip(shards, ranks)):
            assert set(got) == set(want) | {k for (i, k) in row_bias_sums if i == idx}, (idx, r)
            for key, w in want.items():
                assert got[key].dtype == w.dtype and got[key].shape == w.shape, (idx, r, key)
                assert _bits(got[key]) == _bits(w), (idx, r, key)
        for (i, key), full in row_bias_sums.items():  # the parts must sum to the bias exactly
            if i == idx:
                total = sum(rk[key].float() for rk in ranks).to(full.dtype)
                assert _bits(total) == _bits(full), (idx, key)


def test_every_file_loads_with_weights_only_and_holds_what_deepspeed_reads(hf_dir, tmp_path):
    split_model(hf_dir(torch.float16), tmp_path / "p", SplitOptions(tp=2, step=7, quiet=True))
    split_model(hf_dir(torch.float16), tmp_path / "s", SplitOptions(tp=2, layout="sequential", quiet=True))
    assert (tmp_path / "p" / "latest").read_text() == "global_step7"
    for pt in [*tmp_path.glob("*/global_step*/*.pt")]:
        torch.load(pt, weights_only=True)
    for r in range(2):
        book = torch.load(tmp_path / "p" / "global_step7" / f"mp_rank_{r:02d}_model_states.pt", weights_only=True)
        assert book["module"] is None
        assert (book["global_steps"], book["iteration"], book["skipped_steps"]) == (7, 7, 0)
        assert (book["mp_world_size"], book["dp_world_size"]) == (2, 1)
        seq = torch.load(tmp_path / "s" / "global_step0" / f"mp_rank_{r:02d}_model_states.pt", weights_only=True)
        assert "sequential.0.word_embeddings.weight" in seq["module"] and seq["mp_world_size"] == 2
        assert "sequential.2.attention.rotary_emb.inv_freq" in seq["module"]
    for name in ("p", "s"):  # every block file carries inv_freq, in the checkpoint's dtype
        block = torch.load(next((tmp_path / "p" / "global_step7").glob("layer_02-*")), weights_only=True)
        assert block["attention.rotary_emb.inv_freq"].dtype == torch.float16


def test_written_config_reads_back_and_pads_the_vocab_onto_the_embedding(hf_dir, tmp_path):
    src = hf_dir(torch.float16)
    split_model(src, tmp_path / "seq", SplitOptions(tp=4, layout="sequential", quiet=True))
    split_model(src, tmp_path / "pipe", SplitOptions(tp=4, quiet=True))
    from neoxconv.config import read_neox_yaml

    for name, pipe in (("seq", 0), ("pipe", 1)):
        raw = read_neox_yaml(tmp_path / name / "configs" / "neox.yml")
        assert raw["pipe-parallel-size"] == pipe and raw["model-parallel-size"] == 4
        assert raw["finetune"] is True and raw["rotary_save_freqs_buffer"] is True
        assert isinstance(raw["layernorm-epsilon"], float) and isinstance(raw["rotary_pct"], float)  # 1e-05 is a str
        back = NeoXConfig.from_neox_dict(raw)
        hf = NeoXConfig.from_hf_json(src / "config.json")
        assert back.with_(vocab_size=hf.vocab_size, bos_token_id=hf.bos_token_id, eos_token_id=hf.eos_token_id,
                          make_vocab_size_divisible_by=128) == hf
        # gpt-neox pads any tokenizer of up to 512 entries to the embedding's 512 rows with this divisor
        for tokens in (1, 300, 512):
            assert padded_vocab_size(tokens, divisible_by=raw["make_vocab_size_divisible_by"], tp_degree=4) == 512


def test_yaml_floats_read_back_as_floats():
    import yaml

    from neoxconv.output.neox import _yaml_float

    for x in (1e-5, 1e-12, 0.25, 1.0, 2.5e-7, 1e20, 10000.5):
        assert yaml.safe_load(_yaml_float(x)) == x and isinstance(yaml.safe_load(_yaml_float(x)), float)


def test_vocab_divisor_keeps_128_when_it_fits_and_otherwise_lands_on_the_rows():
    for tp in (1, 2, 4, 8):
        d = vocab_divisor(50432, tp, 50277)
        assert padded_vocab_size(50277, divisible_by=d, tp_degree=tp) == 50432
    assert vocab_divisor(50432, 2, 50277) == 128  # the 20B release: 50277 -> 50432 at TP 2
    assert vocab_divisor(50432, 4, 50277) == 12608  # 128 would give 50688
    assert vocab_divisor(50432, 4, None) == 12608


def test_both_hf_config_forms_give_the_same_checkpoint(hf_dir, tmp_path):
    new = hf_dir(torch.float32, seed=3, rotary_emb_base=5000.0, rotary_pct=0.5)
    old = hf_dir(torch.float32, seed=3, rotary_emb_base=5000.0, rotary_pct=0.5, legacy_config=True)
    assert "rope_parameters" in json.loads((new / "config.json").read_text())
    assert "rotary_pct" in json.loads((old / "config.json").read_text())
    for name, src in (("new", new), ("old", old)):
        split_model(src, tmp_path / name, SplitOptions(tp=2, quiet=True))
    a = NeoXConfig.from_neox_yaml(tmp_path / "new" / "configs" / "neox.yml")
    b = NeoXConfig.from_neox_yaml(tmp_path / "old" / "configs" / "neox.yml")
    assert a == b and (a.rotary_pct, a.rotary_emb_base) == (0.5, 5000.0)
    f = "global_step0/layer_02-model_01-model_states.pt"
    x, y = torch.load(tmp_path / "new" / f, weights_only=True), torch.load(tmp_path / "old" / f, weights_only=True)
    assert set(x) == set(y) and all(_bits(x[k]) == _bits(y[k]) for k in x)
    assert x["attention.rotary_emb.inv_freq"].dtype == torch.float32 and x["attention.rotary_emb.inv_freq"].numel() == 2  # head_dim 8 x 0.5 = 4 dims


def test_split_dtype_option_and_tanh_gelu(hf_dir, tmp_path):
    src = hf_dir(torch.float32, hidden_act="gelu_fast")
    split_model(src, tmp_path / "n", SplitOptions(tp=2, dtype="bf16", quiet=True))
    text = (tmp_path / "n" / "configs" / "neox.yml").read_text()
    assert '"bias-gelu-fusion": true' in text and '"precision": "bfloat16"' in text
    shard = torch.load(tmp_path / "n" / "global_step0" / "layer_00-model_01-model_states.pt", weights_only=True)
    want = _hf_tensors(src)["gpt_neox.embed_in.weight"][256:].to(torch.bfloat16)
    assert _bits(shard["word_embeddings.weight"]) == _bits(want)


def test_simulated_tp_forward_of_the_split_agrees_with_transformers(hf_dir, tmp_path):
    from transformers import GPTNeoXForCausalLM

    from neoxconv.check.tp_reference import tensor_parallel_logits

    src = hf_dir(torch.float32)
    split_model(src, tmp_path / "n", SplitOptions(tp=4, quiet=True))
    ids = [3, 141, 59, 265, 35, 89, 79, 323]
    tp_logits, _ = tensor_parallel_logits(tmp_path / "n", ids)
    model = GPTNeoXForCausalLM.from_pretrained(src, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].float()
    assert (tp_logits - ref).abs().max().item() < 1e-4


def test_verify_against_the_split_output(hf_dir, tmp_path):
    """verify needs a neoxconv output folder: the HF model as merged from a TP-4 split (bit-exact, tested above)."""
    src = hf_dir(torch.float32)
    split_model(src, tmp_path / "n", SplitOptions(tp=2, quiet=True))
    split_model(src, tmp_path / "n4", SplitOptions(tp=4, layout="sequential", quiet=True))
    merge_checkpoint(tmp_path / "n4", tmp_path / "hf", MergeOptions(quiet=True))
    result = CliRunner().invoke(main, ["verify", str(tmp_path / "hf"), "--ids", "3,141,59,26", "--max-new-tokens", "2",
                                       "--device", "cpu", "--against", str(tmp_path / "n"), "--json", "-q"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert report["ok"] and report["checks"]["against"]["passed"], report["checks"]
    assert report["checks"]["against"]["value"] < 1e-5 and "top-1 agreement 100%" in report["checks"]["against"]["detail"]


def test_not_divisible_is_exit_3_naming_the_dimension_before_writing(hf_dir, tmp_path):
    out = tmp_path / "never"
    result = CliRunner().invoke(main, ["split", str(hf_dir(torch.float16)), str(out), "--tp", "3"])
    assert result.exit_code == 3
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "num_heads 8 is not divisible by the TP degree 3" in lines[0]
    assert not out.exists()


def test_cli_json_resume_and_foreign_folder(hf_dir, tmp_path):
    src, out = hf_dir(torch.float16), tmp_path / "n"
    r1 = CliRunner().invoke(main, ["split", str(src), str(out), "--tp", "2", "--json"])
    assert r1.exit_code == 0, r1.output
    first = json.loads(r1.output)
    assert first["files_written"] == 10 and first["files_reused"] == 0 and first["tp_degree"] == 2
    victim = out / "global_step0" / "layer_03-model_01-model_states.pt"
    before = victim.read_bytes()
    victim.unlink()
    r2 = CliRunner().invoke(main, ["split", str(src), str(out), "--tp", "2", "--json"])
    second = json.loads(r2.output)
    assert (second["files_written"], second["files_reused"]) == (2, 8)  # the layer's two rank files
    assert victim.read_bytes() == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    r3 = CliRunner().invoke(main, ["split", str(src), str(other), "--tp", "2"])
    assert r3.exit_code == 6 and "not empty" in r3.output and (other / "notes.txt").read_text() == "mine"
    r4 = CliRunner().invoke(main, ["split", str(src), str(out), "--tp", "4"])
    assert r4.exit_code == 6 and "other options" in r4.output and "--no-resume" in r4.output


def test_missing_and_unknown_tensors_in_one_line(hf_dir, tmp_path):
    from safetensors.torch import save_file

    src = hf_dir(torch.float16)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((src / "config.json").read_text())
    sd = _hf_tensors(src)
    del sd["gpt_neox.layers.1.mlp.dense_4h_to_h.bias"]
    sd["gpt_neox.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(1)  # derived buffers are fine
    sd["gpt_neox.layers.0.mlp.gate.weight"] = torch.ones(2)
    save_file(sd, str(bad / "model.safetensors"))
    result = CliRunner().invoke(main, ["split", str(bad), str(tmp_path / "o"), "--tp", "2"])
    assert result.exit_code == 4
    assert "missing 'gpt_neox.layers.1.mlp.dense_4h_to_h.bias'" in result.output
    assert "'gpt_neox.layers.0.mlp.gate.weight'" in result.output and "inv_freq" not in result.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("tp,divisor", [(1, 512), (2, 128), (4, 128)])
def test_tokenizer_is_copied_and_sets_the_vocab_divisor(hf_dir, tmp_path, tp, divisor):
    """A 301-entry tokenizer with 512 embedding rows: 128 x TP pads 301 to 512 at TP 2 and 4, not at TP 1."""
    src = tmp_path / "hf"
    src.mkdir()
    for f in hf_dir(torch.float16).iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    vocab = {f"t{i}": i for i in range(300)}
    tok = {"version": "1.0", "model": {"type": "BPE", "vocab": vocab, "merges": []},
           "added_tokens": [{"id": 300, "content": "<|endoftext|>", "special": True, "single_word": False,
                             "lstrip": False, "rstrip": False, "normalized": False}]}  # as tokenizers writes it
    (src / "tokenizer.json").write_text(json.dumps(tok))
    report = split_model(src, tmp_path / "n", SplitOptions(tp=tp, quiet=True))
    assert report.make_vocab_size_divisible_by == divisor
    assert (tmp_path / "n" / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    raw = json.loads((tmp_path / "n" / "neoxconv.json").read_text())
    assert "tokenizer.json" in raw["files"] and raw["make_vocab_size_divisible_by"] == divisor
    assert padded_vocab_size(301, divisible_by=divisor, tp_degree=tp) == 512


def test_archives_are_named_as_torch_save_names_them_and_nothing_is_left_over(hf_dir, tmp_path):
    import zipfile

    split_model(hf_dir(torch.float16), tmp_path / "n", SplitOptions(tp=2, quiet=True))
    step = tmp_path / "n" / "global_step0"
    for pt in step.glob("*.pt"):
        names = zipfile.ZipFile(pt).namelist()
        assert all(n.startswith(pt.stem + "/") for n in names), (pt.name, names[:2])
    assert sorted(p.name for p in tmp_path.joinpath("n").iterdir()) == [
        "configs", "global_step0", "latest", "neoxconv.json"]
    assert not [p for p in step.iterdir() if not p.name.endswith("model_states.pt")]


def test_sigkill_mid_split_then_rerun_is_byte_identical(hf_dir, tmp_path):
    import subprocess
    import sys
    import time

    src = hf_dir(torch.float32, seed=5)
    cmd = lambda out: [sys.executable, "-m", "neoxconv", "split", str(src), str(out), "--tp", "2", "-q"]  # noqa: E731
    subprocess.run(cmd(tmp_path / "clean"), check=True, capture_output=True)
    out = tmp_path / "out"
    proc = subprocess.Popen(cmd(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < 60 and not (out / "global_step0" / "layer_02-model_01-model_states.pt").exists():
        time.sleep(0.001)
    proc.kill()
    proc.wait()
    rerun = subprocess.run(cmd(out), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    clean = {p.relative_to(tmp_path / "clean"): p.read_bytes() for p in (tmp_path / "clean").rglob("*") if p.is_file()}
    got = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert set(got) == set(clean)
    assert all(got[k] == clean[k] for k in clean), [str(k) for k in clean if got[k] != clean[k]]


def test_sharded_hf_folder(hf_dir, tmp_path):
    src = hf_dir(torch.float16, seed=9, max_shard_size="100KB")
    assert (src / "model.safetensors.index.json").is_file() and len(list(src.glob("*.safetensors"))) > 3
    split_model(src, tmp_path / "n", SplitOptions(tp=2, layout="sequential", quiet=True))
    merge_checkpoint(tmp_path / "n", tmp_path / "m", MergeOptions(quiet=True))
    want, got = _hf_tensors(src), _hf_tensors(tmp_path / "m")
    assert set(got) == set(want) and all(_bits(got[k]) == _bits(want[k]) for k in want)
