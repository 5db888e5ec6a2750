"""``verify --text FILE``: perplexity streamed in windows, on neoxconv's layers, the simulated tensor-parallel
forward and transformers, which must agree; a broken conversion shows as a perplexity jump.

The model is a random transformers GPTNeoXForCausalLM with a sharp readout (x8, as a trained model's predictions
are sharp), written as gpt-neox's TP=2 checkpoint by the independent generator (`neox_checkpoints`,
`neox_tp_split`: row-parallel biases as random per-rank parts). The text is the model's own greedy language:
windows of 16 tokens, each the greedy continuation of the previous one's last token, so the right model's
perplexity on it is low and a model merged wrongly pays for every token it now predicts otherwise.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from tiny_tokenizer import SPECIALS, write_tokenizer

from neoxconv.check.perplexity import Windows, model_perplexity
from neoxconv.cli import main
from neoxconv.errors import UsageError
from neoxconv.merge import Rule
from neoxconv.output import hf_merge as convert
from neoxconv.output.hf_merge import MergeOptions, merge_checkpoint
from neoxconv.runtime.loading import load_model
from neoxconv.tools.synthetic import SyntheticSpec, tiny_config

import neox_checkpoints

transformers = pytest.importorskip("transformers")

VOCAB = 64
WORDS = [f"w{i}" for i in range(VOCAB - len(SPECIALS))]  # with the specials: exactly the 64 embedding rows
MAX_POS = 48
WINDOW = 16
SHARP = 8.0


def _cli(*args):
    return CliRunner().invoke(main, [*map(str, args)])


@torch.no_grad()
def _greedy_text(model, vocab: list[str], *, runs: int = 8) -> list[int]:
    """Token ids: ``runs`` windows of WINDOW tokens, each the greedy continuation of the last token before it."""
    ids = [len(SPECIALS)]
    for _ in range(runs):
        seq = [ids[-1]]
        for _ in range(WINDOW - 1):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
        ids += seq[1:]
    return ids


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(checkpoint root, merged OUT, text file, the transformers model holding the weights)."""
    work = tmp_path_factory.mktemp("ppl")
    tok = write_tokenizer(work / "tokenizer.json", WORDS)
    config = tiny_config(vocab_size=VOCAB, max_position_embeddings=MAX_POS)
    model = neox_checkpoints.random_hf_model(config, seed=0)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(SHARP)
    mp = pytest.MonkeyPatch()
    mp.setattr(neox_checkpoints, "random_hf_model", lambda cfg, seed: model)
    try:
        ckpt = neox_checkpoints.build_neox_checkpoint(
            work / "src", SyntheticSpec(config, tp_degree=2, dtype="float32", tokenizer=tok))
    finally:
        mp.undo()
    out = work / "out"
    result = _cli("merge", ckpt.root, out, "-q")
    assert result.exit_code == 0, result.output
    from tokenizers import Tokenizer

    vocab = {i: w for w, i in Tokenizer.from_file(str(tok)).get_vocab().items()}
    text = work / "text.txt"
    text.write_text(" ".join(vocab[i] for i in _greedy_text(ckpt.model, vocab)) + "\n")
    return ckpt.root, out, text, ckpt.model


def _nll_by_hand(model, ids: list[int], window: int) -> float:
    """The rule written out for the default stride: windows [k(W-1), k(W-1)+W) share one token; every token but
    the first is predicted once from the tokens before it in its window."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, window - 1):
            chunk = torch.tensor([ids[start:start + window]])
            logp = torch.log_softmax(model(chunk).logits[0].float(), -1)
            targets = chunk[0, 1:]
            total -= float(logp[torch.arange(len(targets)), targets].sum())
            count += len(targets)
    assert count == len(ids) - 1
    return total / count


def test_windows_score_every_token_but_the_first_once():
    cfg = tiny_config(max_position_embeddings=MAX_POS)
    for window, stride, n in ((16, None, 100), (16, 5, 100), (MAX_POS, None, 30), (2, None, 7), (10, 1, 23)):
        rule = Windows.for_model(cfg, window=window, stride=stride)
        scored = []
        for start, end, first in rule.spans(n):
            assert end - start <= window and start < first <= end
            scored += range(first, end)
        assert scored == list(range(1, n)), (window, stride)
    assert Windows.for_model(cfg) == Windows(MAX_POS, MAX_POS - 1)
    for bad in ({"window": MAX_POS + 1}, {"window": 1}, {"window": 8, "stride": 8}):
        with pytest.raises(UsageError):
            Windows.for_model(cfg, **bad)


def test_the_three_perplexities_agree_and_match_the_rule(trained):
    root, out, text, model = trained
    result = _cli("verify", out, "--text", text, "--window", WINDOW, "--against", root, "--reference", "hf", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    pp = report["perplexity"]
    assert pp["window"] == WINDOW and pp["stride"] == WINDOW - 1 and pp["scored"] == pp["tokens"] - 1 > 3 * WINDOW
    for check in ("perplexity_against", "perplexity_hf"):
        assert report["checks"][check]["passed"], report["checks"][check]
        assert report["checks"][check]["value"] < 1e-4
    ids = _text_ids(out, text)
    assert math.log(pp["ours"]) == pytest.approx(_nll_by_hand(model, ids, WINDOW), abs=1e-4)
    assert pp["against"] == pytest.approx(pp["ours"], rel=1e-4) and pp["reference_hf"] == pytest.approx(pp["ours"],
                                                                                                        rel=1e-4)
    assert pp["ours"] < 3.0  # far below chance (64 tokens): the model's own greedy language
    assert report["prompt_ids"] == ids[:32]  # no --prompt: the text's first tokens
    assert "perplexity of" in _cli("verify", out, "--text", text).output


def _text_ids(out, text) -> list[int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(out / "tokenizer.json")).encode(text.read_text()).ids


def test_the_kv_cache_is_reused_inside_a_window(trained):
    """Feeding each window a few positions at a time through its cache gives the same perplexity as one chunk."""
    _, out, text, model = trained
    loaded = load_model(out, device="cpu", dtype="fp32")
    ids = _text_ids(out, text)
    rule = Windows.for_model(loaded.config, window=WINDOW, stride=5)
    whole = model_perplexity(loaded.model, ids, rule, devices=loaded.devices, dtype=torch.float32)
    small = model_perplexity(loaded.model, ids, rule, devices=loaded.devices, dtype=torch.float32, chunk=3)
    assert whole.tokens == small.tokens == len(ids) - 1
    assert small.mean_nll == pytest.approx(whole.mean_nll, abs=1e-5)
    disjoint = model_perplexity(loaded.model, ids, Windows.for_model(loaded.config, window=WINDOW),
                                devices=loaded.devices, dtype=torch.float32, chunk=4)
    assert disjoint.mean_nll == pytest.approx(_nll_by_hand(model, ids, WINDOW), abs=1e-4)  # the rule, by hand


def test_a_broken_conversion_is_a_perplexity_jump_that_still_generates(trained, tmp_path, monkeypatch):
    """Row-parallel biases taken from one rank: the model still generates words of the language (sanity and
    kv_cache pass) but its perplexity jumps above the simulated tensor-parallel forward's, and the check fails."""
    root, _, text, _ = trained
    real = convert.merge_tensor
    monkeypatch.setattr(convert, "streams_direct", lambda plan: False)
    monkeypatch.setattr(convert, "merge_tensor",
                        lambda rule, shards, **kw: real(Rule.DROP if rule is Rule.SUM else rule, shards, **kw))
    merge_checkpoint(root, tmp_path / "bad", MergeOptions(quiet=True))
    monkeypatch.undo()
    result = _cli("verify", tmp_path / "bad", "--text", text, "--window", WINDOW, "--against", root, "--json")
    assert result.exit_code == 7, result.output
    report = json.loads(result.stdout)
    assert report["checks"]["sanity"]["passed"] and report["checks"]["kv_cache"]["passed"]
    assert report["generated_ids"] and set(report["text"].split()) <= set(WORDS) | set(SPECIALS)
    assert report["checks"]["perplexity_against"]["passed"] is False
    pp = report["perplexity"]
    assert pp["ours"] > 2 * pp["against"], pp  # measured: 1.20 -> 11.0


def test_text_is_refused_for_a_reward_model_and_an_unusable_text(trained, tmp_path):
    _, out, _, _ = trained
    empty = tmp_path / "empty.txt"
    empty.write_text("the")
    result = _cli("verify", out, "--text", empty)
    assert result.exit_code == 2 and "at least 2" in result.output, result.output
    result = _cli("verify", out, "--text", empty, "--window", MAX_POS + 1)
    assert result.exit_code == 2 and "--window" in result.output, result.output
