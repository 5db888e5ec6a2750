"""The test checkpoints agree with an independent truth, and that truth would catch a wrong merge rule.

``make_checkpoint`` / ``neox_checkpoint`` (conftest) build checkpoints from a transformers GPTNeoXForCausalLM
split by ``neox_tp_split`` (gpt-neox's parallel layers, not neoxconv's rule table). Here: ``neoxconv merge``
of those checkpoints gives back the model's own state_dict bit for bit and its logits; a merge that applied a
wrong rule (row-parallel bias averaged or taken from one rank, fused QKV read as [3, heads, head_dim]) fails
that same comparison; and the committed fixture (built before by inverting the rule table) is, shard by
shard, the independent split of its reference weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from neoxconv.tools.synthetic import tiny_config

from conftest import COMMITTED_FIXTURE, REPO, cli
from hf_reference import hf_model
from neox_tp_split import tp_split

transformers = pytest.importorskip("transformers")

IDS = [3, 17, 400, 511, 0, 42, 7, 250]
COMMITTED_REFERENCE = REPO / "tests" / "fixtures" / "tiny_tp2_fp16.reference.safetensors"
# the committed fixture's model, as tests/fixtures/make_fixtures.py declares it
COMMITTED_CONFIG = tiny_config(hidden_size=32, num_heads=4, vocab_size=512, rotary_pct=0.5)


def merged_tensors(out: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def mismatches(out: Path, reference: dict[str, torch.Tensor]) -> list[str]:
    """Every tensor name whose merged bytes, dtype or shape differ from the reference (or that one side lacks)."""
    got = merged_tensors(out)
    bad = sorted(set(got) ^ set(reference))
    for name in sorted(set(got) & set(reference)):
        a, b = got[name], reference[name]
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(_bits(a), _bits(b)):
            bad.append(name)
    return bad


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def merged_logits(out: Path) -> torch.Tensor:
    """transformers' own loader on neoxconv's output folder (its config.json, its safetensors), in fp32."""
    model = transformers.GPTNeoXForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    return logits(model.eval())


def truth_logits(ckpt) -> torch.Tensor:
    """The truth model's logits in fp32: its own state_dict in a fresh fp32 model (``.float()`` of the fp16
    model would keep the rotary ``inv_freq`` buffer rounded to fp16, which no fp32 load has)."""
    return logits(hf_model(ckpt.spec.config, ckpt.model.state_dict(), torch.float32))


CASES = {
    "tp2-pipeline-fp16": dict(tp=2, layout="pipeline", dtype="float16"),
    "tp4-sequential-bf16": dict(tp=4, layout="sequential", dtype="bfloat16"),
    "tp1-pipeline-fp32": dict(tp=1, layout="pipeline", dtype="float32"),
    "tp2-sequential-residual": dict(tp=2, layout="sequential", dtype="float16",
                                    config_overrides={"parallel_residual": False, "activation": "gelu"}),
    "tp2-tied-embeddings": dict(tp=2, layout="pipeline", dtype="float32",
                                config_overrides={"tie_word_embeddings": True}),
    "tp2-replica-drift": dict(tp=2, layout="pipeline", dtype="float16", replica_noise=1e-3),
}


@pytest.fixture(scope="module")
def merged_main(neox_checkpoint, tmp_path_factory):
    """The main test checkpoint (TP 2, pipeline, fp16) and its merge by ``neoxconv merge``."""
    ckpt = neox_checkpoint(**CASES["tp2-pipeline-fp16"])
    out = tmp_path_factory.mktemp("main-merged") / "out"
    r = cli("merge", "-q", ckpt.root, out)
    assert r.exit_code == 0, r.output
    return ckpt, out


@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_gives_the_hf_models_own_state_dict_bit_for_bit_and_its_logits(neox_checkpoint, tmp_path, case):
    ckpt = neox_checkpoint(**CASES[case])
    r = cli("merge", "-q", ckpt.root, tmp_path / "out")
    assert r.exit_code == 0, r.output
    truth = ckpt.model.state_dict()  # the model itself, not a copy kept by the generator
    assert set(ckpt.reference) <= {("embed_out.weight" if k == "lm_head.weight" else k) for k in truth}
    assert mismatches(tmp_path / "out", ckpt.reference) == []
    assert torch.equal(merged_logits(tmp_path / "out"), truth_logits(ckpt))


def _layer_shards(root: Path, idx: int, tp: int) -> list[dict[str, torch.Tensor]]:
    step = root / (root / "latest").read_text().strip()
    return [torch.load(step / f"layer_{idx:02d}-model_{r:02d}-model_states.pt", weights_only=True) for r in range(tp)]


def _qkv_as_3_heads_hd(shards: list[torch.Tensor], head_dim: int) -> torch.Tensor:
    """The Megatron-style misreading: each rank's rows as [3, local heads, head_dim] and the heads concatenated."""
    rest = shards[0].shape[1:]
    return torch.cat([s.reshape(3, -1, head_dim, *rest) for s in shards], dim=1).reshape(-1, *rest)


WRONG_RULES = {
    # name: (NeoX key, Hugging Face key under gpt_neox.layers.{b}., wrong merge of the ranks' shards)
    "row-bias-averaged": ("attention.dense.bias", "attention.dense.bias",
                          lambda parts, hd: torch.stack([p.float() for p in parts]).mean(0).to(parts[0].dtype)),
    "row-bias-from-rank-0": ("mlp.dense_4h_to_h.bias", "mlp.dense_4h_to_h.bias", lambda parts, hd: parts[0]),
    "qkv-weight-as-3-heads-hd": ("attention.query_key_value.weight", "attention.query_key_value.weight",
                                 _qkv_as_3_heads_hd),
    "qkv-bias-as-3-heads-hd": ("attention.query_key_value.bias", "attention.query_key_value.bias",
                               _qkv_as_3_heads_hd),
}


@pytest.mark.parametrize("wrong", sorted(WRONG_RULES))
def test_a_wrong_rule_fails_the_same_comparison(merged_main, tmp_path, wrong):
    """Rewrite the merged output as a merge with one wrong rule would have written it, from the source shards
    themselves: the comparison above names exactly those tensors, and the logits move."""
    ckpt, out = merged_main
    key, hf_key, rule = WRONG_RULES[wrong]
    config = ckpt.spec.config
    bad = Path(shutil.copytree(out, tmp_path / "bad"))
    weight_map = json.loads((bad / "model.safetensors.index.json").read_text())["weight_map"]
    changed = []
    for b in range(config.num_layers):
        name = f"gpt_neox.layers.{b}.{hf_key}"
        parts = [s[key] for s in _layer_shards(ckpt.root, b + 2, ckpt.spec.tp_degree)]
        file = bad / weight_map[name]
        with safe_open(str(file), "pt") as f:
            metadata = f.metadata()
        tensors = load_file(str(file))
        tensors[name] = rule(parts, config.hidden_size // config.num_heads).contiguous()
        save_file(tensors, str(file), metadata=metadata)
        changed.append(name)
    assert mismatches(out, ckpt.reference) == []  # the right merge passes ...
    assert mismatches(bad, ckpt.reference) == sorted(changed)  # ... the wrong one is named, tensor by tensor
    gap = (merged_logits(bad) - truth_logits(ckpt)).abs().max().item()
    assert gap > 1e-2, gap


def test_the_committed_fixture_is_the_independent_split_of_its_reference():
    """tiny_tp2_fp16 was written by inverting neoxconv's rule table; check every shard against gpt-neox's
    layout (neox_tp_split), so a rule that is wrong both ways cannot hide in it."""
    reference = load_file(str(COMMITTED_REFERENCE))
    cfg = COMMITTED_CONFIG
    tp = 2
    expected, row_biases = tp_split(reference, layers=cfg.num_layers, heads=cfg.num_heads, rotary_dims=cfg.rotary_dims,
                                    base=cfg.rotary_emb_base, tp=tp, parallel_residual=cfg.parallel_residual)
    step = COMMITTED_FIXTURE / (COMMITTED_FIXTURE / "latest").read_text().strip()
    on_disk = sorted(int(p.name[6:8]) for p in step.glob("layer_*-model_00-model_states.pt"))
    assert on_disk == sorted(expected)
    for idx, ranks in expected.items():
        shards = _layer_shards(COMMITTED_FIXTURE, idx, tp)
        for r, (want, got) in enumerate(zip(ranks, shards)):
            split_keys = {k for (i, k) in row_biases if i == idx}
            assert set(got) == set(want) | split_keys, (idx, r)
            for k, v in want.items():
                if k.endswith("inv_freq"):  # gpt-neox's formula, in fp32 here (the 20B release has it in fp16)
                    R = cfg.rotary_dims
                    formula = 1.0 / (cfg.rotary_emb_base ** (torch.arange(0, R, 2).float() / R))
                    assert torch.equal(got[k], formula.to(got[k].dtype)), (idx, r, k)
                else:
                    assert got[k].dtype == v.dtype and torch.equal(_bits(got[k]), _bits(v)), (idx, r, k)
    for (idx, k), full in row_biases.items():  # each rank adds its part: the parts sum (fp32) to the bias
        parts = [s[k] for s in _layer_shards(COMMITTED_FIXTURE, idx, tp)]
        assert torch.equal(_bits(torch.stack([p.float() for p in parts]).sum(0).to(full.dtype)), _bits(full)), k
        assert not torch.equal(parts[0], parts[1])  # real parts, not one bias copied (that would hide a mean)


def test_the_committed_fixture_merges_to_its_reference_and_the_hf_models_logits(merged_fixture):
    reference = load_file(str(COMMITTED_REFERENCE))
    assert mismatches(merged_fixture, reference) == []
    want = logits(hf_model(COMMITTED_CONFIG, reference, torch.float32))
    assert torch.equal(merged_logits(merged_fixture), want)
