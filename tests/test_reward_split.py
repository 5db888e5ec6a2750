"""The way back for reward models (issue 21): `split` and `reshard` of gpt-neox ``train_impl: rm`` models, and two
combinations tested nowhere else: a Mistral-style reward model, and a reward model verified under --max-memory.

References, none of them neoxconv's rule table:

* the models are transformers' own ``GPTNeoXForSequenceClassification``, ``LlamaForSequenceClassification`` (GQA)
  and ``MistralForSequenceClassification`` (a sliding window shorter than the prompt), saved by save_pretrained;
* the rank files expected are the independent generators' (`neox_tp_split.tp_split` for GPT-NeoX,
  `llama_checkpoints.neox_shards` for Llama-style models), plus ``rm_linear`` as gpt-neox's
  RowParallelLinear(hidden -> 1, input_is_parallel=False) holds it: a block of input columns per rank;
* DeepSpeed's loaders read them (`SDLoaderFactory` on the mp_rank files, as the engine does, then
  `DeepSpeedEngine.load_module_state_dict`, strict) into modules named and shaped as those generators say;
* the scores are transformers' (the score of the last non-pad token).

gpt-neox trains reward models with pipe-parallel-size 0 only (megatron/training.py ``get_batch_pipe`` asserts
``train_impl not in [kto, dpo, rm]``), so they are written in the sequential layout: ``mp_rank_XX`` files whose
``module`` holds ``sequential.{idx}.{key}``; and only untied (``ParallelLinear`` builds ``rm_linear`` only in the
untied readout stage).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from neoxconv.merge import RULES, LayerKind, Rule
from neoxconv.tools.synthetic import tiny_config

from conftest import cli, hf_tensors, one_line_error, tensor_bits
from llama_checkpoints import LlamaSpec, hf_llama, neox_shards
from neox_checkpoints import random_hf_model
from neox_tp_split import tp_split
from test_reward_models import IDS, PAD, _pooled, _rm_readout, llama_reward_model, neox_reward_model

transformers = pytest.importorskip("transformers")
deepspeed = pytest.importorskip("deepspeed")

from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine  # noqa: E402
from deepspeed.runtime.engine import DeepSpeedEngine  # noqa: E402
from deepspeed.runtime.state_dict_factory import SDLoaderFactory  # noqa: E402

W = 3  # gpt-neox sliding_window_width: a query sees itself and the 3 keys before it (transformers: W + 1)
GQA = LlamaSpec(tp=2, heads=8, kv_heads=2)
NEOX = tiny_config(vocab_size=512)
CURRENT_MLP = {"mlp.dense_h_to_4h": "mlp.linear1", "mlp.dense_4h_to_h": "mlp.linear2"}  # gpt-neox since 2024-09


# ----- transformers' reward models ------------------------------------------------------------------------------
def _with_score(model, seed: int):
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        model.score.weight.copy_(torch.randn(model.score.weight.shape, generator=g) * model.config.hidden_size ** -0.5)
    return model.eval()


def _reward_model(kind: str):
    """transformers' *ForSequenceClassification (one label, pad PAD) with random weights."""
    if kind == "gpt_neox":
        lm = random_hf_model(NEOX, seed=5)
        cfg = lm.config
        cfg.num_labels, cfg.pad_token_id = 1, PAD
        model = transformers.GPTNeoXForSequenceClassification(cfg)
    else:
        lm = hf_llama(GQA)
        skip = ("model_type", "architectures", "transformers_version", "id2label", "label2id")
        d = {k: v for k, v in lm.config.to_dict().items() if k not in skip}
        d.update(num_labels=1, pad_token_id=PAD)
        if kind == "mistral":
            cfg = transformers.MistralConfig(**d, sliding_window=W + 1)
            cfg._attn_implementation = "eager"
            model = transformers.MistralForSequenceClassification(cfg)
        else:
            cfg = transformers.LlamaConfig(**d)
            cfg._attn_implementation = "eager"
            model = transformers.LlamaForSequenceClassification(cfg)
    missing, _ = model.load_state_dict(lm.state_dict(), strict=False)
    assert missing == ["score.weight"], missing
    return _with_score(model, seed=11)


@pytest.fixture(scope="module")
def hf_rm(tmp_path_factory):
    cache = {}

    def make(kind: str):
        if kind not in cache:
            folder = tmp_path_factory.mktemp(f"hf-{kind}")
            model = _reward_model(kind)
            model.save_pretrained(folder)
            cache[kind] = folder, model
        return cache[kind]

    return make


# ----- what gpt-neox's modules hold, and DeepSpeed reading it ----------------------------------------------------
def expected_shards(kind: str, model, tp: int, key_names: str = "current"):
    """({pipeline index: [rank dicts]}, {(index, key): full row-parallel bias}) from the independent generators,
    with rm_linear as RowParallelLinear holds it."""
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    if kind == "gpt_neox":
        c = NEOX
        shards, row_biases = tp_split(sd, layers=c.num_layers, heads=c.num_heads, rotary_dims=c.rotary_dims,
                                      base=c.rotary_emb_base, tp=tp, parallel_residual=c.parallel_residual)
        if key_names == "current":
            rename = lambda k: next((k.replace(a, b) for a, b in CURRENT_MLP.items() if k.startswith(a)), k)  # noqa: E731
            # current gpt-neox keeps inv_freq out of its checkpoints (rotary_save_freqs_buffer false since 2024-03)
            shards = {i: [{rename(k): v for k, v in s.items() if not k.endswith("inv_freq")} for s in ranks]
                      for i, ranks in shards.items()}
            row_biases = {(i, rename(k)): v for (i, k), v in row_biases.items()}
        layers = c.num_layers
    else:  # tied=True only leaves out lm_head (a classifier has none); 20b: w1/w2/w3, GQA rows per query head
        spec = dataclasses.replace(GQA, tp=tp, tied=True, mlp_keys="linear1" if key_names == "current" else "w1w2w3",
                                   qkv="blocked" if key_names == "current" else "interleaved")
        shards, row_biases, layers = neox_shards(model, spec), {}, spec.layers
    shards[layers + 4] = [{"rm_linear.weight": p} for p in _rm_readout(sd["score.weight"], tp)]
    return shards, row_biases


def _stand_in(shards: dict[int, dict[str, torch.Tensor]]) -> nn.Module:
    """gpt-neox's sequential model on one rank, as far as its state dict goes: ``sequential.{idx}.{key}``."""
    root = nn.Module()
    root.sequential = nn.Module()
    for idx, d in shards.items():
        for key, t in d.items():
            mod = root.sequential
            for part in [str(idx), *key.split(".")[:-1]]:
                if not hasattr(mod, part):
                    mod.add_module(part, nn.Module())
                mod = getattr(mod, part)
            mod.register_parameter(key.rsplit(".", 1)[-1], nn.Parameter(torch.zeros_like(t), requires_grad=False))
    return root


def deepspeed_reads(step: Path, tp: int, expected, row_biases) -> None:
    """DeepSpeed loads every rank (strict) into gpt-neox-shaped modules; each tensor is the generator's."""
    mp_files = sorted(str(p) for p in step.glob("mp_rank_*_model_states.pt"))
    assert len(mp_files) == tp and not list(step.glob("layer_*")), "a reward model is written sequential"
    engine = TorchCheckpointEngine()
    bias_sums: dict[tuple[int, str], torch.Tensor] = {}
    for rank in range(tp):
        _, checkpoint, _ = SDLoaderFactory.get_sd_loader(mp_files, checkpoint_engine=engine).load(tp, rank)
        assert checkpoint["mp_world_size"] == tp
        want = {i: dict(ranks[rank]) for i, ranks in expected.items()}
        for (i, key), full in row_biases.items():
            want[i][key] = full
        model = _stand_in(want)
        DeepSpeedEngine.load_module_state_dict(SimpleNamespace(module=model), checkpoint=checkpoint, strict=True)
        got = dict(model.named_parameters())
        for i, d in want.items():
            for key, t in d.items():
                value = got[f"sequential.{i}.{key}"]
                if (i, key) in row_biases:  # parts that sum to the bias (gpt_j_residual)
                    bias_sums[i, key] = bias_sums.get((i, key), 0) + value
                else:
                    assert torch.equal(value, t), (rank, i, key)
    for k, full in row_biases.items():
        assert torch.equal(bias_sums[k], full), k


def merged_back(sp: Path, out: Path, src: Path, model, *extra) -> None:
    """``merge`` reads the split back: every tensor bit for bit the source's, the score transformers'."""
    result = cli("merge", sp, out, "-q", "--pad-token-id", PAD, *extra)
    assert result.exit_code == 0, result.output
    a, b = hf_tensors(src), hf_tensors(out)
    assert set(a) == set(b)
    assert all(tensor_bits(a[k]) == tensor_bits(b[k]) for k in a)
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(out, attn_implementation="eager")
    assert type(loaded) is type(model)
    assert torch.equal(_pooled(loaded), _pooled(model))


# ----- split ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, key_names", [("gpt_neox", "current"), ("gpt_neox", "20b"), ("llama", "current"),
                                             ("llama", "20b"), ("mistral", "current")])
def test_split_reward_model_reads_in_deepspeed_and_merges_back(hf_rm, tmp_path, kind, key_names):
    src, model = hf_rm(kind)
    sp = tmp_path / "sp"
    result = cli("split", src, sp, "--tp", 2, "-q", "--key-names", key_names)
    assert result.exit_code == 0, result.output
    neox = yaml.safe_load((sp / "configs" / "neox.yml").read_text())  # as gpt-neox reads it
    assert neox["train_impl"] == "rm" and neox["pipe-parallel-size"] == 0 and neox["no-weight-tying"] is True
    assert neox.get("sliding_window_width") == (W if kind == "mistral" else None)
    assert f"Pad token: id {PAD}" in (sp / "configs" / "neox.yml").read_text()
    manifest = json.loads((sp / "neoxconv.json").read_text())
    assert manifest["options"]["layout"] == "sequential" and manifest["options"]["key_names"] == key_names
    deepspeed_reads(sp / "global_step0", 2, *expected_shards(kind, model, 2, key_names))
    qkv = () if kind == "gpt_neox" else ("--qkv-layout", "blocked" if key_names == "current" else "interleaved")
    merged_back(sp, tmp_path / "hf", src, model, *qkv)


def test_the_window_matters_for_the_mistral_reward_model(hf_rm):
    """The Mistral prompt is longer than the window, so a split that lost it could not merge back to the score."""
    _, mistral = hf_rm("mistral")
    _, llama = hf_rm("llama")  # the same weights, no window
    assert mistral.config.sliding_window == W + 1 < IDS.index(PAD)
    assert (_pooled(mistral) - _pooled(llama)).abs().max() > 1e-3


def test_a_wrong_rm_rule_is_caught_by_deepspeed(hf_rm, tmp_path, monkeypatch):
    """rm_linear split as if replicated (a one-output head looks replicable): DeepSpeed's strict load refuses it."""
    src, model = hf_rm("gpt_neox")
    row = RULES[LayerKind.READOUT]["rm_linear.weight"]
    monkeypatch.setitem(RULES[LayerKind.READOUT], "rm_linear.weight", dataclasses.replace(row, rule=Rule.REPLICATED))
    assert cli("split", src, tmp_path / "sp", "--tp", 2, "-q").exit_code == 0
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="rm_linear.weight"):
        deepspeed_reads(tmp_path / "sp" / "global_step0", 2, *expected_shards("gpt_neox", model, 2))


def test_split_dry_run_lists_the_reward_model_files(hf_rm, tmp_path):
    src, _ = hf_rm("gpt_neox")
    sp = tmp_path / "sp"
    result = cli("split", src, sp, "--tp", 2, "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["train_impl"] == "rm" and plan["layout"] == "sequential" and not sp.exists()
    human = cli("split", src, sp, "--tp", 2, "--dry-run")
    assert "reward model (train_impl rm)" in human.output and "mp_rank_01_model_states.pt" in human.output
    assert cli("split", src, sp, "--tp", 2, "-q").exit_code == 0
    written = {str(p.relative_to(sp)): p.stat().st_size for p in sp.rglob("*")
               if p.is_file() and not p.name.startswith(("neoxconv", "."))}
    assert {f["name"]: f["bytes"] for f in plan["files"]} == written
    module = torch.load(sp / "global_step0" / "mp_rank_01_model_states.pt", weights_only=True)["module"]
    assert f"sequential.{NEOX.num_layers + 4}.rm_linear.weight" in module


def test_split_refuses_what_gpt_neox_cannot_hold_naming_the_folder(hf_rm, tmp_path):
    src, _ = hf_rm("gpt_neox")
    # the pipeline layout: gpt-neox cannot train a reward model so
    result = cli("split", src, tmp_path / "p", "--tp", 2, "--layout", "pipeline")
    one_line_error(result, 3, src / "config.json", "train_impl rm", "--layout sequential")
    assert not (tmp_path / "p").exists()
    # a score with a bias: rm_linear has none
    biased = tmp_path / "biased"
    biased.mkdir()
    (biased / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(str(src / "model.safetensors"))
    save_file({**tensors, "score.bias": torch.zeros(1)}, str(biased / "model.safetensors"), metadata={"format": "pt"})
    one_line_error(cli("split", biased, tmp_path / "b", "--tp", 2), 4, biased, "'score.bias'", "rm_linear")
    # several labels: gpt-neox's reward head has one output
    two = tmp_path / "two"
    cfg = random_hf_model(NEOX, seed=1).config
    cfg.num_labels, cfg.pad_token_id = 2, PAD
    transformers.GPTNeoXForSequenceClassification(cfg).save_pretrained(two)
    one_line_error(cli("split", two, tmp_path / "t", "--tp", 2), 3, two / "config.json", "2 labels")


def test_a_classifier_s_tie_word_embeddings_ties_nothing(hf_rm, tmp_path):
    """A reward model fine-tuned from a tied base (Llama 3.2) keeps tie_word_embeddings: true in config.json;
    transformers' classifier has no vocabulary readout to tie, so the score is its own tensor: split as untied."""
    src, model = hf_rm("llama")
    tied = tmp_path / "tied"
    tied.mkdir()
    (tied / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    cfg = json.loads((src / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(tied, attn_implementation="eager")
    assert torch.equal(_pooled(theirs), _pooled(model))  # transformers ties nothing either
    result = cli("split", tied, tmp_path / "sp", "--tp", 2, "-q")
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((tmp_path / "sp" / "configs" / "neox.yml").read_text())["no-weight-tying"] is True
    merged_back(tmp_path / "sp", tmp_path / "hf", src, model, "--qkv-layout", "blocked")


def test_split_of_a_mistral_causal_lm_keeps_its_window(tmp_path):
    """Not a reward model: MistralForCausalLM folders split too, with sliding_window_width = transformers' - 1."""
    llama = hf_llama(GQA)
    skip = ("model_type", "architectures", "transformers_version")
    cfg = transformers.MistralConfig(**{k: v for k, v in llama.config.to_dict().items() if k not in skip},
                                     sliding_window=W + 1)
    cfg._attn_implementation = "eager"
    model = transformers.MistralForCausalLM(cfg).eval()
    model.load_state_dict(llama.state_dict())
    model.save_pretrained(tmp_path / "src")
    result = cli("split", tmp_path / "src", tmp_path / "sp", "--tp", 2, "-q")
    assert result.exit_code == 0, result.output
    neox = yaml.safe_load((tmp_path / "sp" / "configs" / "neox.yml").read_text())
    assert neox["sliding_window_width"] == W and neox["pipe-parallel-size"] == 1 and "train_impl" not in neox
    result = cli("merge", tmp_path / "sp", tmp_path / "hf", "-q", "--qkv-layout", "blocked")
    assert result.exit_code == 0, result.output
    a, b = hf_tensors(tmp_path / "src"), hf_tensors(tmp_path / "hf")
    assert set(a) == set(b) and all(tensor_bits(a[k]) == tensor_bits(b[k]) for k in a)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["sliding_window"] == W + 1


# ----- reshard ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tp, layout", [(1, "pipeline"), (4, "sequential")])
def test_reshard_reward_model_gives_the_same_scores(tmp_path, tp, layout):
    root = tmp_path / "src"
    rm = neox_reward_model(root, tp=2, layout=layout)
    assert cli("merge", root, tmp_path / "direct", "-q", "--pad-token-id", PAD).exit_code == 0
    dry = json.loads(cli("reshard", root, tmp_path / "rs", "--tp", tp, "--dry-run", "--json").stdout)
    assert dry["train_impl"] == "rm" and dry["layout"] == "sequential"
    result = cli("reshard", root, tmp_path / "rs", "--tp", tp, "-q")
    assert result.exit_code == 0, result.output
    neox = yaml.safe_load((tmp_path / "rs" / "configs" / "neox.yml").read_text())
    assert neox["train_impl"] == "rm" and neox["pipe-parallel-size"] == 0 and neox["model-parallel-size"] == tp
    step = tmp_path / "rs" / (tmp_path / "rs" / "latest").read_text()
    deepspeed_reads(step, tp, *expected_shards("gpt_neox", rm, tp, "20b"))  # the source's key names, kept
    result = cli("merge", tmp_path / "rs", tmp_path / "back", "-q", "--pad-token-id", PAD)
    assert result.exit_code == 0, result.output
    a, b = hf_tensors(tmp_path / "direct"), hf_tensors(tmp_path / "back")
    assert set(a) == set(b) and all(tensor_bits(a[k]) == tensor_bits(b[k]) for k in a)
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "back")
    assert torch.allclose(_pooled(loaded), _pooled(rm), rtol=0, atol=1e-6)
    result = cli("reshard", root, tmp_path / "p", "--tp", tp, "--layout", "pipeline")
    one_line_error(result, 3, "train_impl rm", "--layout sequential")


# ----- a Mistral-style reward model, merged from gpt-neox ---------------------------------------------------------
def test_mistral_style_reward_model_merges_and_verifies(tmp_path):
    root = tmp_path / "src"
    rm = llama_reward_model(root, GQA)
    yml = root / "configs" / "model.yml"
    yml.write_text(yml.read_text().replace("{\n", f'{{\n  "sliding_window_width": {W},\n', 1))
    skip = ("model_type", "architectures", "transformers_version", "id2label", "label2id")
    d = {k: v for k, v in rm.config.to_dict().items() if k not in skip}
    cfg = transformers.MistralConfig(**{**d, "num_labels": 1, "sliding_window": W + 1})
    cfg._attn_implementation = "eager"
    truth = transformers.MistralForSequenceClassification(cfg).eval()
    truth.load_state_dict(rm.state_dict())
    assert (_pooled(truth) - _pooled(rm)).abs().max() > 1e-3  # the window is shorter than the prompt: it matters
    out = tmp_path / "out"
    result = cli("merge", root, out, "-q", "--pad-token-id", PAD, "--qkv-layout", "blocked")
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MistralForSequenceClassification"] and config["sliding_window"] == W + 1
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(out, attn_implementation="eager")
    assert torch.allclose(_pooled(loaded), _pooled(truth), rtol=0, atol=1e-5)
    ids = ",".join(map(str, IDS))
    result = cli("verify", out, "--ids", ids, "--against", root, "--reference", "hf", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] and {"against", "reference_hf"} <= set(report["checks"])
    assert "MistralForSequenceClassification" in report["checks"]["reference_hf"]["detail"]
    assert report["score"] == pytest.approx(float(_pooled(truth)[0]), abs=1e-4)
    # a wrong window (one key more) in the simulated gpt-neox forward is caught
    wrong = tmp_path / "wrong.yml"
    wrong.write_text(yml.read_text().replace(f'"sliding_window_width": {W}', f'"sliding_window_width": {W + 1}'))
    result = cli("verify", out, "--ids", ids, "--against", root / "global_step10", "--against-config", wrong, "--json")
    assert result.exit_code == 7, result.output
    assert json.loads(result.stdout)["checks"]["against"]["passed"] is False


# ----- a reward model verified under --max-memory ----------------------------------------------------------------
def test_reward_model_verified_under_max_memory_with_reference_hf(tmp_path):
    root = tmp_path / "src"
    rm = neox_reward_model(root, tp=2, layout="sequential")
    out = tmp_path / "out"
    assert cli("merge", root, out, "-q", "--pad-token-id", PAD).exit_code == 0
    ids = ",".join(map(str, IDS))
    layer = 12 * 64 * 64 * 4 + 13 * 64 * 4  # one fp32 block at hidden 64
    common = ("verify", out, "--ids", ids, "--device", "cpu", "--against", root, "--reference", "hf", "--json")
    resident = json.loads(cli(*common).stdout)
    result = cli(*common, "--max-memory", layer + layer // 2)
    assert result.exit_code == 0, result.output
    capped = json.loads(result.stdout)
    assert capped["ok"] and {"against", "reference_hf"} <= set(capped["checks"])
    assert "disk" in capped["device_map"].values() and capped["offloaded_bytes"] > 0
    assert capped["score"] == pytest.approx(resident["score"], abs=1e-6)
    assert capped["score"] == pytest.approx(float(_pooled(rm)[0]), abs=1e-4)
