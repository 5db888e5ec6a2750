"""Every command that reads a source, over every key generation of both architectures and both layouts.

The sources are written by the independent test generators (tests/real_writers.py for GPT-NeoX, with the
20B ``mlp.dense_h_to_4h/dense_4h_to_h`` or the 2024-09 ``mlp.linear1/linear2`` names; tests/llama_checkpoints.py
for Llama-style models, ``mlp.linear1/linear2`` or ``mlp.w1/w2/w3``), never from neoxconv's key table, so a
path that spells a key itself (as `verify --against` and `reshard` did: internal KeyError
'mlp.dense_h_to_4h.weight' on linear1/linear2 sources) fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import cli
from llama_checkpoints import LlamaSpec, write_llama_checkpoint
from real_writers import WriterSpec, write_real_checkpoint

pytest.importorskip("transformers")  # the Llama generator builds a transformers model

IDS = "5,100,13,50,7,3"
GENERATIONS = {
    # name: (generator spec, the key generation inspect must report, extra merge options)
    "neox-dense-pipeline": (WriterSpec(tp=2, layout="pipeline", clone="gpu"), "dense_h_to_4h/dense_4h_to_h", ()),
    "neox-dense-sequential": (WriterSpec(tp=2, layout="sequential"), "dense_h_to_4h/dense_4h_to_h", ()),
    "neox-linear12-pipeline": (WriterSpec(tp=2, layout="pipeline", clone="gpu", linear12=True), "linear1/linear2",
                               ()),
    "neox-linear12-sequential": (WriterSpec(tp=2, layout="sequential", linear12=True), "linear1/linear2", ()),
    # GQA, [Q|K|V] blocks (gpt-neox since 2024-11): the layout is stated, auto would only assume it
    "llama-linear1-pipeline": (LlamaSpec(tp=2, heads=8, kv_heads=4, qkv="blocked", layout="pipeline"),
                               "linear1/linear2", ("--qkv-layout", "blocked")),
    "llama-linear1-sequential": (LlamaSpec(tp=2, heads=8, kv_heads=4, qkv="blocked", layout="sequential"),
                                 "linear1/linear2", ("--qkv-layout", "blocked")),
    # GQA with w1/w2/w3 (2024-02..2024-09): rows interleaved per query head, known from the key names
    "llama-w1w2w3-pipeline": (LlamaSpec(tp=2, heads=8, kv_heads=4, qkv="interleaved", mlp_keys="w1w2w3",
                                        layout="pipeline"), "w1/w2/w3", ()),
    "llama-w1w2w3-sequential": (LlamaSpec(tp=2, heads=8, kv_heads=4, qkv="interleaved", mlp_keys="w1w2w3",
                                          layout="sequential"), "w1/w2/w3", ()),
}


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _ok(result) -> None:
    assert result.exit_code == 0, result.output
    assert "internal error" not in result.output


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """(root, expected merged tensors in Hugging Face names, merged OUT) per generation, built once."""
    cache: dict[str, tuple[Path, dict[str, torch.Tensor], Path]] = {}

    def get(name: str):
        if name not in cache:
            spec, _, options = GENERATIONS[name]
            base = tmp_path_factory.mktemp(name.replace("/", "-"))
            if isinstance(spec, WriterSpec):
                want, _ = write_real_checkpoint(base / "src", spec)
            else:
                want = {k: v for k, v in write_llama_checkpoint(base / "src", spec).state_dict().items()
                        if "rotary_emb" not in k}
            _ok(cli("merge", base / "src", base / "out", "--quiet", *options))
            cache[name] = (base / "src", want, base / "out")
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(GENERATIONS))
def test_merge_writes_what_the_generator_wrote(source, name):
    _, want, out = source(name)
    got = _tensors(out)
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("name", list(GENERATIONS))
def test_inspect_names_the_key_generation(source, name):
    root, want, _ = source(name)
    spec, generation, options = GENERATIONS[name]
    result = cli("inspect", root, "--json", *options)
    _ok(result)
    info = json.loads(result.stdout)
    assert info["key_generation"] == generation and info["layout"] == spec.layout and info["tp_degree"] == spec.tp
    assert {t["name"] for t in info["tensors"]} == set(want)
    sources = {t["source"] for t in info["tensors"]}
    mlp_keys = {"dense_h_to_4h/dense_4h_to_h": "mlp.dense_h_to_4h.weight", "linear1/linear2": "mlp.linear1.weight",
                "w1/w2/w3": "mlp.w1.weight"}
    assert mlp_keys[generation] in sources  # the source's own spelling, as the manifest records it


@pytest.mark.parametrize("name", list(GENERATIONS))
def test_verify_against_the_source(source, name):
    root, _, out = source(name)
    result = cli("verify", out, "--ids", IDS, "--max-new-tokens", "2", "--device", "cpu", "--against", root, "--json")
    _ok(result)
    report = json.loads(result.stdout)
    assert report["ok"] and report["checks"]["against"]["passed"], report["checks"]["against"]


@pytest.mark.parametrize("name", list(GENERATIONS))
def test_reshard_keeps_the_key_names_and_merges_back_the_same(source, name, tmp_path):
    root, _, out = source(name)
    spec, generation, options = GENERATIONS[name]
    _ok(cli("reshard", root, tmp_path / "re", "--tp", 4, "--quiet", *options))
    info = json.loads(cli("inspect", tmp_path / "re", "--json", *options).stdout)
    assert (info["key_generation"], info["tp_degree"], info["layout"]) == (generation, 4, spec.layout)
    _ok(cli("merge", tmp_path / "re", tmp_path / "back", "--quiet", *options))
    a, b = _tensors(out), _tensors(tmp_path / "back")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", list(GENERATIONS))
def test_split_output_merges_back_the_same(source, name, tmp_path):
    _, _, out = source(name)
    spec, _, options = GENERATIONS[name]
    _ok(cli("split", out, tmp_path / "neox", "--tp", 2, "--layout", spec.layout, "--quiet"))
    _ok(cli("merge", tmp_path / "neox", tmp_path / "back", "--quiet", *options))
    a, b = _tensors(out), _tensors(tmp_path / "back")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_the_one_table_spells_each_generation():
    from neoxconv.config import NeoXConfig
    from neoxconv.merge import key_table
    from neoxconv.source.checkpoint import LayerKind

    neox = NeoXConfig(num_layers=2, hidden_size=64, num_heads=4, vocab_size=512)
    old, new = (key_table(neox, LayerKind.BLOCK, g) for g in ("dense_h_to_4h/dense_4h_to_h", "linear1/linear2"))
    assert new["mlp.linear1.weight"].key == "mlp.dense_h_to_4h.weight" and "mlp.dense_h_to_4h.weight" not in new
    assert new["mlp.linear2.bias"].hf_name == old["mlp.dense_4h_to_h.bias"].hf_name
    assert {k for k, s in old.items() if s.optional} == {"attention.rotary_emb.inv_freq", "attention.bias",
                                                          "attention.masked_bias"}
    llama = NeoXConfig(num_layers=2, hidden_size=64, num_heads=8, num_kv_heads=4, vocab_size=256, norm="rmsnorm",
                       activation="swiglu", intermediate_size=96, parallel_residual=False, rotary_pct=1.0,
                       attention_bias=False, mlp_bias=False)
    gated, w123 = (key_table(llama, LayerKind.BLOCK, g) for g in ("linear1/linear2", "w1/w2/w3"))
    assert "mlp.linear1.weight" in gated and not any(k.startswith("mlp.w") for k in gated)
    assert {"mlp.w1.weight", "mlp.w2.weight", "mlp.w3.weight"} <= set(w123) and "mlp.linear1.weight" not in w123
    assert "mlp.linear2.bias" not in gated and "attention.dense.bias" not in gated  # config-conditional rows
    biased = key_table(llama.with_(mlp_bias=True, attention_bias=True), LayerKind.BLOCK, "linear1/linear2")
    assert {"mlp.linear2.bias", "attention.dense.bias", "attention.query_key_value.bias"} <= set(biased)


@pytest.mark.parametrize("old,new", [("neox-dense-pipeline", "neox-linear12-pipeline"),
                                     ("llama-w1w2w3-pipeline", "llama-linear1-pipeline")])
def test_ranks_of_different_key_generations_in_one_layer_are_refused(source, old, new, tmp_path):
    import shutil

    from conftest import one_line_error

    shutil.copytree(source(old)[0], tmp_path / "mixed")
    step = next((tmp_path / "mixed").glob("global_step*"))
    name = "layer_02-model_01-model_states.pt"
    shutil.copyfile(next(source(new)[0].glob("global_step*")) / name, step / name)
    for cmd in (("merge", "-q", tmp_path / "mixed", tmp_path / "out"), ("inspect", tmp_path / "mixed"),
                ("reshard", "-q", tmp_path / "mixed", tmp_path / "re", "--tp", 1)):
        one_line_error(cli(*cmd), 4, "layer 02", "generations mixed", "layer_02-model_00", "layer_02-model_01")


# ----- issue 18: a sequential key that aliases a real one (torch.load keeps them apart) -------------------
@pytest.mark.parametrize("alias", ["sequential.2.attention.dense.weight\n",  # the bytes
                                   "sequential.02.attention.dense.weight",  # a leading zero
                                   "sequential.\u0662.attention.dense.weight",  # Arabic-Indic two
                                   "sequential.\uff12.attention.dense.weight",  # fullwidth two
                                   "sequential.2.attention.dense.weight ",  # trailing space
                                   "sequential.+2.attention.dense.weight",  # int() accepts a sign
                                   "sequential.2_0.attention.dense.weight"])  # and underscores
@pytest.mark.parametrize("rank", [0, 1])
def test_a_sequential_key_that_aliases_a_real_one_is_refused(alias, rank, tmp_path):
    from conftest import one_line_error

    write_llama_checkpoint(tmp_path / "src", LlamaSpec(tp=2, heads=8, kv_heads=4, qkv="blocked", layout="sequential"))
    path = tmp_path / "src" / "global_step10" / f"mp_rank_{rank:02d}_model_states.pt"
    state = torch.load(path, weights_only=True)
    real = state["module"]["sequential.2.attention.dense.weight"]
    state["module"][alias] = -real  # before: it replaced the real tensor; merge exit 0, a negated projection
    torch.save(state, path)
    assert set(torch.load(path, weights_only=True)["module"]) >= {alias, "sequential.2.attention.dense.weight"}
    for cmd in (("merge", "-q", "--qkv-layout", "blocked", tmp_path / "src", tmp_path / "out"),
                ("inspect", "--qkv-layout", "blocked", tmp_path / "src"),
                ("reshard", "-q", "--qkv-layout", "blocked", tmp_path / "src", tmp_path / "re", "--tp", 1)):
        line = one_line_error(cli(*cmd), 4, path.name, repr(alias))
        assert "\n" not in line and alias not in line.replace(repr(alias), "")  # escaped, never raw
    assert not any((tmp_path / "out").glob("*.safetensors")) if (tmp_path / "out").exists() else True
