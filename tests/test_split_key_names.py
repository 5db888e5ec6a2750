"""The way back into gpt-neox (issue 21): `split --key-names current|20b` writes the MLP keys each gpt-neox version's
own modules hold, reshard keeps the source's, and `--dry-run` tells the files, bytes and free disk without writing.

The expected key sets are written from gpt-neox's megatron/model/transformer.py, not from neoxconv's key table:

* ea7aefd8 (current, since 2024-09 0d4bdb96 / adbf5d6f): ``ParallelMLP`` holds ``linear1`` (ColumnParallelLinear)
  and ``linear2`` (RowParallelLinear), with biases when ``use_bias_in_mlp`` (default true); a gated activation
  (swiglu) chunks each rank's linear1 output into ``x, gate``.
* 7548a8b7 (the last commit before the rename): ``ParallelMLP`` holds ``dense_h_to_4h`` / ``dense_4h_to_h`` (4 x
  hidden, with biases); ``LLaMAParallelMLP`` (``mlp_type: llama``) holds ``w1``, ``w3`` (ColumnParallelLinear,
  ``bias=False``) and ``w2`` (RowParallelLinear, ``bias=False``) and computes ``w2(silu(w1(x)) * w3(x))``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from neoxconv.output.hf_merge import MergeOptions, merge_checkpoint
from neoxconv.output.reshard import ReshardOptions, reshard_checkpoint
from neoxconv.output.split import SplitOptions, split_model

from conftest import cli, hf_tensors, make_hf_folder, one_line_error, tensor_bits
from llama_checkpoints import LlamaSpec, hf_llama, neox_shards

CURRENT_PARALLEL_MLP = {"mlp.linear1.weight", "mlp.linear1.bias", "mlp.linear2.weight", "mlp.linear2.bias"}
OLD_PARALLEL_MLP = {"mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias", "mlp.dense_4h_to_h.weight",
                    "mlp.dense_4h_to_h.bias"}
CURRENT_GATED_MLP_NO_BIAS = {"mlp.linear1.weight", "mlp.linear2.weight"}
OLD_LLAMA_MLP = {"mlp.w1.weight", "mlp.w3.weight", "mlp.w2.weight"}

H, F = 64, 256  # GPT-NeoX: 4 x hidden, what the 20B-era ParallelMLP sizes
GQA = LlamaSpec(tp=2, heads=8, kv_heads=2, intermediate=96)


@pytest.fixture(scope="module")
def neox_hf(tmp_path_factory):
    return make_hf_folder(tmp_path_factory.mktemp("neox-hf"), dtype=torch.float16, intermediate_size=F, seed=21)


@pytest.fixture(scope="module")
def llama_hf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama-hf")
    model = hf_llama(GQA)
    model.save_pretrained(folder)
    return folder, model


def _mlp_keys(step: Path, rank: int = 0) -> set[str]:
    return {k for k in torch.load(step / f"layer_02-model_{rank:02d}-model_states.pt", weights_only=True)
            if k.startswith("mlp.")}


# ----- which keys each gpt-neox version holds -----------------------------------------------------------------
@pytest.mark.parametrize("key_names, want", [("current", CURRENT_PARALLEL_MLP), ("20b", OLD_PARALLEL_MLP)])
def test_gpt_neox_model_key_names(neox_hf, tmp_path, key_names, want):
    report = split_model(neox_hf, tmp_path / "n", SplitOptions(tp=2, quiet=True, key_names=key_names))
    step = tmp_path / "n" / "global_step0"
    assert _mlp_keys(step, 0) == _mlp_keys(step, 1) == want
    manifest = json.loads((tmp_path / "n" / "neoxconv.json").read_text())
    assert manifest["options"]["key_names"] == key_names
    merge_checkpoint(tmp_path / "n", tmp_path / "m", MergeOptions(quiet=True))  # both read back, bit for bit
    a, b = hf_tensors(neox_hf), hf_tensors(tmp_path / "m")
    assert set(a) == set(b) and all(tensor_bits(a[k]) == tensor_bits(b[k]) for k in a)
    assert report.files_written > 0


@pytest.mark.parametrize("key_names, want", [("current", CURRENT_GATED_MLP_NO_BIAS), ("20b", OLD_LLAMA_MLP)])
def test_llama_model_key_names_equal_gpt_neox_s_own_layout(llama_hf, tmp_path, key_names, want):
    folder, model = llama_hf
    split_model(folder, tmp_path / "n", SplitOptions(tp=2, quiet=True, key_names=key_names))
    step = tmp_path / "n" / "global_step0"
    assert _mlp_keys(step, 0) == want
    # every rank file equals the generator written from gpt-neox's code: w1 gate, w3 up, w2 down, and the
    # GQA rows interleaved per query head as gpt-neox laid them out while it used w1/w2/w3 (2024-02 .. 2024-09)
    spec = dataclasses.replace(GQA, mlp_keys="linear1" if key_names == "current" else "w1w2w3",
                               qkv="blocked" if key_names == "current" else "interleaved")
    for idx, shards in neox_shards(model, spec).items():
        for r, w in enumerate(shards):
            got = torch.load(step / f"layer_{idx:02d}-model_{r:02d}-model_states.pt", weights_only=True)
            assert set(got) == set(w), (idx, r)
            assert all(torch.equal(got[k], w[k]) for k in w), (idx, r)
    yml = (tmp_path / "n" / "configs" / "neox.yml").read_text()
    if key_names == "20b":  # LLaMAParallelMLP: mlp_type llama, silu, sized as is; no setting that gpt-neox lacked
        assert '"mlp_type": "llama"' in yml and '"activation": "silu"' in yml
        assert f'"intermediate_size": {GQA.intermediate},' in yml
        assert "mlp_multiple_of" not in yml and "use_bias_in_mlp" not in yml
    else:
        assert '"activation": "swiglu"' in yml and "mlp_type" not in yml
    merge_checkpoint(tmp_path / "n", tmp_path / "m", MergeOptions(quiet=True))  # auto-detects both
    a, b = hf_tensors(folder), hf_tensors(tmp_path / "m")
    assert set(a) == set(b) and all(tensor_bits(a[k]) == tensor_bits(b[k]) for k in a)


def test_reshard_keeps_the_source_s_key_names(neox_hf, llama_hf, tmp_path):
    split_model(neox_hf, tmp_path / "old", SplitOptions(tp=2, quiet=True, key_names="20b"))
    reshard_checkpoint(tmp_path / "old", tmp_path / "old4", ReshardOptions(tp=4, quiet=True))
    assert _mlp_keys(tmp_path / "old4" / "global_step0", 3) == OLD_PARALLEL_MLP
    split_model(neox_hf, tmp_path / "new", SplitOptions(tp=2, quiet=True))
    reshard_checkpoint(tmp_path / "new", tmp_path / "new1", ReshardOptions(tp=1, quiet=True))
    assert _mlp_keys(tmp_path / "new1" / "global_step0") == CURRENT_PARALLEL_MLP
    split_model(llama_hf[0], tmp_path / "llama", SplitOptions(tp=2, quiet=True, key_names="20b"))
    reshard_checkpoint(tmp_path / "llama", tmp_path / "llama1", ReshardOptions(tp=1, quiet=True))
    assert _mlp_keys(tmp_path / "llama1" / "global_step0") == OLD_LLAMA_MLP
    assert '"mlp_type": "llama"' in (tmp_path / "llama1" / "configs" / "neox.yml").read_text()


def test_what_an_old_gpt_neox_cannot_hold_is_refused_naming_the_option(tmp_path):
    wide = make_hf_folder(tmp_path / "wide", dtype=torch.float16, seed=2)  # transformers' default intermediate_size
    one_line_error(cli("split", wide, tmp_path / "o", "--tp", 2, "--key-names", "20b"), 3, "not 4 x hidden_size",
                   "--key-names current")
    biased = tmp_path / "biased"
    hf_llama(dataclasses.replace(GQA, bias=True)).save_pretrained(biased)
    one_line_error(cli("split", biased, tmp_path / "o2", "--tp", 2, "--key-names", "20b"), 3, "LLaMAParallelMLP",
                   "--key-names current")
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").rglob("*.pt"))


# ----- DeepSpeed's loader with gpt-neox's module names --------------------------------------------------------
class _MLP(nn.Module):
    """gpt-neox's MLP module of one generation (names and per-rank shapes from the commits above)."""

    def __init__(self, names: tuple[str, str], tp: int) -> None:
        super().__init__()
        setattr(self, names[0], nn.Linear(H, F // tp))  # ColumnParallelLinear
        setattr(self, names[1], nn.Linear(F // tp, H))  # RowParallelLinear


class _Block(nn.Module):
    def __init__(self, names: tuple[str, str], tp: int) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(H)
        self.attention = nn.Module()
        self.attention.query_key_value = nn.Linear(H, 3 * H // tp)
        self.attention.rotary_emb = nn.Module()  # persistent before 2024-03 (e109bf5e), then rotary_save_freqs_buffer
        self.attention.rotary_emb.register_buffer("inv_freq", torch.zeros(1), persistent=names[0] == "dense_h_to_4h")
        self.attention.dense = nn.Linear(H // tp, H)
        self.post_attention_layernorm = nn.LayerNorm(H)
        self.mlp = _MLP(names, tp)


@pytest.mark.parametrize("key_names, names", [("current", ("linear1", "linear2")),
                                              ("20b", ("dense_h_to_4h", "dense_4h_to_h"))])
def test_deepspeed_loads_each_generation_into_its_gpt_neox_modules_strictly(neox_hf, tmp_path, key_names, names):
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.pipe.module import PipelineModule
    from test_deepspeed_load import _Embedding, _Norm, _Readout

    tp = 2
    split_model(neox_hf, tmp_path / "n", SplitOptions(tp=tp, quiet=True, key_names=key_names))
    sd = hf_tensors(neox_hf)
    for rank in range(tp):
        module = PipelineModule.__new__(PipelineModule)
        nn.Module.__init__(module)
        module.forward_funcs = [_Embedding(tp), lambda x: x, _Block(names, tp), _Block(names, tp), lambda x: x,
                                _Norm(), _Readout(tp)]
        module._local_start, module.tied_comms = 0, {}
        module._grid = SimpleNamespace(get_slice_parallel_rank=lambda r=rank: r,
                                       get_slice_parallel_world_size=lambda: tp)
        module.load_state_dir(str(tmp_path / "n" / "global_step0"), checkpoint_engine=TorchCheckpointEngine(),
                              strict=True)
        up = getattr(module.forward_funcs[2].mlp, names[0]).weight
        assert torch.equal(up, sd["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"].chunk(tp)[rank])


# ----- --dry-run ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["split", "reshard"])
@pytest.mark.parametrize("layout", ["pipeline", "sequential"])
def test_dry_run_lists_exactly_the_files_and_bytes_a_run_writes_and_writes_nothing(neox_hf, tmp_path, command,
                                                                                   layout):
    src = neox_hf
    if command == "reshard":
        split_model(neox_hf, tmp_path / "src", SplitOptions(tp=2, quiet=True))
        src = tmp_path / "src"
    out = tmp_path / "out"
    args = [command, src, out, "--tp", 4, "--layout", layout]
    result = cli(*args, "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert not out.exists()  # nothing written, not even OUT
    assert plan["dry_run"] and plan["out_fits"] and plan["out_problem"] is None and plan["out_free_bytes"] > 0
    assert cli(*args, "-q").exit_code == 0
    written = {str(p.relative_to(out)): p.stat().st_size for p in out.rglob("*") if p.is_file()}
    assert {f["name"]: f["bytes"] for f in plan["files"]} == {k: v for k, v in written.items() if k != "neoxconv.json"}
    assert plan["total_bytes"] == sum(f["bytes"] for f in plan["files"])
    text = cli(*args[:2], tmp_path / "other", *args[3:], "--dry-run")
    assert text.exit_code == 0 and "nothing written" in text.output and "fits" in text.output


def test_dry_run_says_when_out_is_unusable_or_too_small(neox_hf, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    plan = json.loads(cli("split", neox_hf, tmp_path / "file", "--tp", 2, "--dry-run", "--json").stdout)
    assert "OUT is a file" in plan["out_problem"] and plan["out_fits"] is False
    from neoxconv.output import describe

    monkeypatch.setattr(describe, "free_bytes", lambda path: (Path(path), 1000))
    result = cli("split", neox_hf, tmp_path / "out", "--tp", 2, "--dry-run")
    assert result.exit_code == 0 and "NOT ENOUGH free space" in result.output and "1,000 bytes free" in result.output


# ----- tied embeddings in the pipeline layout ---------------------------------------------------------------------
def test_a_tied_model_s_pipeline_files_are_what_deepspeed_saves_and_loads(tmp_path):
    """gpt-neox (gpt2_model.py, ea7aefd8) builds a tied model's readout as ``TiedLayerSpec("embed", EmbeddingPipe,
    forward_fn=_logits_helper)``; DeepSpeed's (and DeeperSpeed's) PipelineModule._build then appends
    ``partial(forward_fn, tied_module)`` for it, which has no state_dict: ``save_state_dict`` writes no file at
    the readout's index and ``load_state_dir`` reads none (the tied module is saved once, at index 0). Run that
    code: the files it writes for the tied model are the files split writes, and it loads split's strictly."""
    pytest.importorskip("deepspeed")
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from test_deepspeed_load import _Embedding, _Norm

    tp, names = 2, ("linear1", "linear2")
    hf = make_hf_folder(tmp_path / "hf", dtype=torch.float16, intermediate_size=F, seed=31, tie_word_embeddings=True)
    split_model(hf, tmp_path / "n", SplitOptions(tp=tp, quiet=True))
    step = tmp_path / "n" / "global_step0"
    specs = [TiedLayerSpec("embed", _Embedding, tp, tied_weight_attr="word_embeddings.weight"), lambda x: x,
             LayerSpec(_Block, names, tp), LayerSpec(_Block, names, tp), lambda x: x, LayerSpec(_Norm),
             TiedLayerSpec("embed", _Embedding, tp, forward_fn=lambda emb, x: x,
                           tied_weight_attr="word_embeddings.weight")]
    sd = hf_tensors(hf)
    for rank in range(tp):
        module = PipelineModule.__new__(PipelineModule)  # no process group: what _build / save / load use
        nn.Module.__init__(module)
        module._layer_specs, module._local_start, module._local_stop, module.seed_layers = specs, 0, len(specs), False
        module.forward_funcs, module.fwd_map = [], {}
        module.tied_modules, module.tied_weight_attrs = nn.ModuleDict(), {}
        module._build()
        module.global_rank, module.checkpoint_parallel_write_pipeline, module.tied_comms = rank, False, {}
        module._grid = SimpleNamespace(
            data_parallel_id=0, data_parallel_size=1, get_slice_parallel_rank=lambda r=rank: r,
            get_slice_parallel_world_size=lambda: tp,
            _topo=SimpleNamespace(get_rank_repr=lambda rank: f"model_{rank:02d}"))
        module.save_state_dict(str(tmp_path / "ds"), checkpoint_engine=TorchCheckpointEngine())
        module.load_state_dir(str(step), checkpoint_engine=TorchCheckpointEngine(), strict=True)
        emb = module.tied_modules["embed"].word_embeddings.weight
        rows = emb.shape[0]
        assert torch.equal(emb, sd["gpt_neox.embed_in.weight"][rank * rows:(rank + 1) * rows])
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == sorted(p.name for p in step.glob("layer_*"))
    assert not list(step.glob("layer_06-*"))  # no readout file (index L + 4), as DeepSpeed writes none
    merge_checkpoint(tmp_path / "n", tmp_path / "m", MergeOptions(quiet=True))  # merge reads it back, tied
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    a, b = hf_tensors(hf), hf_tensors(tmp_path / "m")
    assert set(b) <= set(a) and all(tensor_bits(a[k]) == tensor_bits(b[k]) for k in b)


def test_an_odd_gelu_mlp_that_gpt_neox_cannot_build_is_refused(tmp_path):
    """Today's ParallelMLP rounds linear1's rows up to an even count but not linear2's inputs: an odd
    intermediate_size cannot be trained on; refused (exit 3) before anything is written."""
    odd = make_hf_folder(tmp_path / "odd", dtype=torch.float16, seed=2, intermediate_size=255)
    one_line_error(cli("split", odd, tmp_path / "o", "--tp", 1), 3, "linear1 256 rows but linear2 255 inputs")
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").rglob("*.pt"))
