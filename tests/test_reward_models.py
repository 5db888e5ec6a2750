"""Reward models (gpt-neox ``train_impl: rm``) and ``merge --pad-token-id``.

gpt-neox's reward model ends in ``rm_linear``, a RowParallelLinear(hidden -> 1, input_is_parallel=False): each
rank holds a [1, hidden/T] block of input columns (megatron/model/transformer.py, ParallelLinear). The
checkpoints here are transformers' own ``GPTNeoXForSequenceClassification`` / ``LlamaForSequenceClassification``
split as gpt-neox lays them out, by the independent generators (``neox_checkpoints``, ``llama_checkpoints``)
and, for the readout, by that column rule written out below; never by neoxconv's rule table.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from tiny_tokenizer import write_tokenizer

from neoxconv.cli import main
from neoxconv.config import NeoXConfig
from neoxconv.output import hf_merge as convert
from neoxconv.output.hf_merge import MergeOptions, merge_checkpoint
from neoxconv.tools.synthetic import SyntheticSpec, tiny_config

from llama_checkpoints import LlamaSpec, hf_llama, neox_shards, neox_yaml
from neox_checkpoints import build_neox_checkpoint

transformers = pytest.importorskip("transformers")

PAD = 1
IDS = [5, 17, 200, 42, 9, 77, PAD, PAD]  # right-padded: the score is that of token 5 (id 77)


def _cli(*args):
    return CliRunner().invoke(main, [*map(str, args)])


def _rm_readout(score: torch.Tensor, tp: int) -> list[torch.Tensor]:
    """rm_linear's shards: RowParallelLinear keeps a block of input columns per rank."""
    return [c.clone().contiguous() for c in score.chunk(tp, dim=1)]


def _to_rm_yaml(root: Path) -> None:
    for yml in (root / "configs").glob("*.yml"):
        yml.write_text(yml.read_text().replace("{\n", '{\n  "train_impl": "rm",\n', 1))


def _replace_readout(step: Path, layout: str, idx: int, parts: list[torch.Tensor]) -> None:
    """Put ``rm_linear.weight`` where gpt-neox's reward model has it instead of ``final_linear.weight``."""
    for r, part in enumerate(parts):
        if layout == "pipeline":
            torch.save({"rm_linear.weight": part}, step / f"layer_{idx:02d}-model_{r:02d}-model_states.pt")
            continue
        path = step / f"mp_rank_{r:02d}_model_states.pt"
        state = torch.load(path, weights_only=False)
        module = state["module"]
        del module[f"sequential.{idx}.final_linear.weight"]
        module[f"sequential.{idx}.rm_linear.weight"] = part
        torch.save(state, path)


def neox_reward_model(root: Path, *, tp: int, layout: str = "pipeline", seed: int = 0):
    """A GPT-NeoX reward-model checkpoint at ``root``; returns transformers' GPTNeoXForSequenceClassification
    holding its weights (the truth)."""
    ckpt = build_neox_checkpoint(root, SyntheticSpec(tiny_config(), tp_degree=tp, layout=layout, dtype="float32",
                                                     seed=seed))
    lm = ckpt.model
    cfg = lm.config
    cfg.num_labels, cfg.pad_token_id = 1, PAD
    rm = transformers.GPTNeoXForSequenceClassification(cfg).eval()
    missing, _ = rm.load_state_dict(lm.state_dict(), strict=False)
    assert missing == ["score.weight"], missing
    with torch.no_grad():
        rm.score.weight.copy_(torch.randn(rm.score.weight.shape, generator=torch.Generator().manual_seed(seed + 7))
                              * cfg.hidden_size ** -0.5)
    step = next(root.glob("global_step*"))
    _replace_readout(step, layout, tiny_config().readout_index, _rm_readout(rm.score.weight.detach(), tp))
    _to_rm_yaml(root)
    return rm


def llama_reward_model(root: Path, spec: LlamaSpec):
    """A Llama-style reward-model checkpoint (pipeline layout); returns transformers'
    LlamaForSequenceClassification holding its weights."""
    lm = hf_llama(spec)
    cfg = lm.config
    cfg.num_labels, cfg.pad_token_id = 1, PAD
    rm = transformers.LlamaForSequenceClassification(cfg).eval()
    missing, _ = rm.load_state_dict(lm.state_dict(), strict=False)
    assert missing == ["score.weight"], missing
    with torch.no_grad():
        rm.score.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    shards = neox_shards(lm, spec)
    shards[spec.layers + 4] = [{"rm_linear.weight": p} for p in _rm_readout(rm.score.weight.detach(), spec.tp)]
    step = root / "global_step10"
    step.mkdir(parents=True)
    (root / "latest").write_text(step.name)
    (root / "configs").mkdir()
    (root / "configs" / "model.yml").write_text(neox_yaml(spec))
    _to_rm_yaml(root)
    for idx, ranks in shards.items():
        for r, d in enumerate(ranks):
            torch.save({k: v.clone().contiguous() for k, v in d.items()},
                       step / f"layer_{idx:02d}-model_{r:02d}-model_states.pt")
    return rm


@torch.no_grad()
def _pooled(model, ids=IDS) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0].float()  # (1,): the score of the last non-pad token


@pytest.fixture(scope="module")
def neox_rm(tmp_path_factory):
    cache = {}

    def make(tp: int, layout: str):
        if (tp, layout) not in cache:
            root = tmp_path_factory.mktemp("rm") / "src"
            rm = neox_reward_model(root, tp=tp, layout=layout)
            out = root.parent / "out"
            result = _cli("merge", root, out, "-q", "--pad-token-id", PAD)
            assert result.exit_code == 0, result.output
            cache[tp, layout] = (root, out, rm)
        return cache[tp, layout]

    return make


def test_the_rm_readout_was_refused_before_and_needs_pad_token_id(tmp_path):
    root = tmp_path / "src"
    neox_reward_model(root, tp=2)
    out = tmp_path / "out"
    result = _cli("merge", root, out, "-q")
    assert result.exit_code == 2, result.output
    assert "--pad-token-id" in result.output and "reward model" in result.output
    assert not out.exists() or not any(out.iterdir())
    # without train_impl: rm the readout's key is unknown to a language model's table (exit 4, named)
    for yml in (root / "configs").glob("*.yml"):
        yml.write_text(yml.read_text().replace('  "train_impl": "rm",\n', ""))
    result = _cli("merge", root, out, "-q", "--pad-token-id", PAD)
    assert result.exit_code == 4 and "rm_linear.weight" in result.output, result.output


@pytest.mark.parametrize("tp, layout", [(2, "pipeline"), (4, "sequential"), (1, "pipeline")])
def test_neox_reward_model_merges_into_gpt_neox_for_sequence_classification(neox_rm, tp, layout):
    root, out, rm = neox_rm(tp, layout)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["GPTNeoXForSequenceClassification"]
    assert cfg["pad_token_id"] == PAD and cfg["id2label"] == {"0": "LABEL_0"}
    loaded, info = transformers.AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert type(loaded).__name__ == "GPTNeoXForSequenceClassification"
    assert loaded.config.num_labels == 1 and loaded.config.pad_token_id == PAD
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    truth = rm.state_dict()
    for name, tensor in loaded.state_dict().items():
        if name in truth:
            assert torch.equal(tensor, truth[name]), name  # fp32: bit for bit
    assert torch.equal(loaded.score.weight, rm.score.weight)
    assert torch.allclose(_pooled(loaded), _pooled(rm), rtol=0, atol=1e-6)


def test_verify_scores_the_last_non_pad_token_against_tp_and_transformers(neox_rm):
    root, out, rm = neox_rm(2, "pipeline")
    result = _cli("verify", out, "--ids", ",".join(map(str, IDS)), "--against", root, "--reference", "hf", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] and report["generated_ids"] == []
    assert set(report["checks"]) >= {"kv_cache", "sanity", "against", "reference_hf"}
    assert report["score_position"] == 5
    assert report["score"] == pytest.approx(float(_pooled(rm)[0]), abs=1e-4)
    assert "score (reward model, token 5)" in _cli("verify", out, "--ids", ",".join(map(str, IDS))).output


def test_a_wrong_rm_rule_is_caught_by_verify_against(neox_rm, tmp_path, monkeypatch):
    """rm_linear merged as if it were final_linear's rows in the wrong order (ranks swapped): the merged score
    differs from transformers' truth, and verify --against says so."""
    root, _, rm = neox_rm(2, "pipeline")
    real = convert.iter_merged_chunks
    monkeypatch.setattr(convert, "streams_direct", lambda plan: False)

    def swapped(plan, **kw):
        if plan.key == "rm_linear.weight":
            plan.shards.reverse()
        yield from real(plan, **kw)

    monkeypatch.setattr(convert, "iter_merged_chunks", swapped)
    merge_checkpoint(root, tmp_path / "bad", MergeOptions(quiet=True, pad_token_id=PAD))
    monkeypatch.undo()
    bad = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "bad")
    assert (_pooled(bad) - _pooled(rm)).abs().max() > 1e-2
    result = _cli("verify", tmp_path / "bad", "--ids", ",".join(map(str, IDS)), "--against", root, "--json")
    assert result.exit_code == 7, result.output
    assert json.loads(result.stdout)["checks"]["against"]["passed"] is False


def test_llama_reward_model_gqa_tp2(tmp_path):
    spec = LlamaSpec(tp=2, heads=8, kv_heads=2)
    rm = llama_reward_model(tmp_path / "src", spec)
    out = tmp_path / "out"
    # the GQA row layout is stated (a reward model's scores cannot tell the two 2024 layouts apart)
    result = _cli("merge", tmp_path / "src", out, "-q", "--pad-token-id", PAD, "--qkv-layout", "blocked")
    assert result.exit_code == 0, result.output
    loaded, info = transformers.AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert type(loaded).__name__ == "LlamaForSequenceClassification"
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert torch.allclose(_pooled(loaded), _pooled(rm), rtol=0, atol=1e-5)
    result = _cli("verify", out, "--ids", ",".join(map(str, IDS)), "--against", tmp_path / "src", "--reference", "hf",
                  "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["score"] == pytest.approx(float(_pooled(rm)[0]), abs=1e-4)


def test_a_tied_reward_model_is_a_config_error():
    from neoxconv.errors import ConfigError

    with pytest.raises(ConfigError, match="train_impl rm with tied embeddings"):
        NeoXConfig.from_neox_dict({"num-layers": 2, "hidden-size": 64, "num-attention-heads": 4,
                                   "train_impl": "rm", "no-weight-tying": False})


# ----- --pad-token-id for any architecture ------------------------------------------------------------------
def test_pad_token_id_goes_to_config_and_tokenizer_config(make_checkpoint, tmp_path):
    root, _, _ = make_checkpoint(2, "pipeline", "float32")
    tok = write_tokenizer(tmp_path / "tokenizer.json", ["the", "cat", "sat"])
    out = tmp_path / "out"
    result = _cli("merge", root, out, "-q", "--tokenizer", tok, "--pad-token-id", PAD)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["pad_token_id"] == PAD
    assert json.loads((out / "tokenizer_config.json").read_text())["pad_token"] == "<|padding|>"
    assert transformers.AutoTokenizer.from_pretrained(out).pad_token_id == PAD
    assert transformers.AutoConfig.from_pretrained(out).pad_token_id == PAD
    # without the option nothing changes: no pad_token_id key at all
    plain = tmp_path / "plain"
    assert _cli("merge", root, plain, "-q", "--tokenizer", tok).exit_code == 0
    assert "pad_token_id" not in json.loads((plain / "config.json").read_text())
    assert "pad_token" not in json.loads((plain / "tokenizer_config.json").read_text())


def test_pad_token_id_outside_the_vocabulary_or_the_tokenizer_is_refused(make_checkpoint, tmp_path):
    root, _, _ = make_checkpoint(2, "pipeline", "float32")
    result = _cli("merge", root, tmp_path / "a", "-q", "--pad-token-id", 10**6)
    assert result.exit_code == 2 and "outside the vocabulary" in result.output, result.output
    tok = write_tokenizer(tmp_path / "tokenizer.json", ["the", "cat"])
    result = _cli("merge", root, tmp_path / "b", "-q", "--tokenizer", tok, "--pad-token-id", 4000)
    assert result.exit_code == 4 and "no token with id 4000" in result.output, result.output
