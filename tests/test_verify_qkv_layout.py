"""`verify --against` never passes on a QKV layout the merge only assumed, and uses the layout it recorded.

Llama-style GQA checkpoints with ``mlp.linear1`` keys were written with [Q|K|V] blocks per rank (gpt-neox since
2024-11) or rows interleaved per query head (2024-02..2024-11); nothing in the files says which. Before (issue 18):
`merge --qkv-layout auto` assumed blocked for an interleaved source (exit 0, a wrong model) and `verify --against`
passed, because its simulation made the same guess; and a correct `merge --qkv-layout interleaved` failed
`verify --against` (exit 7), because verify guessed again instead of reading the manifest.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import cli
from llama_checkpoints import LlamaSpec, write_llama_checkpoint

pytest.importorskip("transformers")

IDS = [1, 5, 9, 100, 3, 7, 42, 200]


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    cache = {}

    def make(spec: LlamaSpec):
        if spec not in cache:
            root = tmp_path_factory.mktemp("src") / "src"
            cache[spec] = (root, write_llama_checkpoint(root, spec))
        return cache[spec]

    return make


def _against(out, src, ids, *extra) -> tuple[int, dict]:
    result = cli("verify", out, "--ids", ",".join(map(str, ids)), "--max-new-tokens", 1, "--device", "cpu",
                 "--against", src, "--json", *extra)
    assert "internal error" not in result.output, result.output
    return result.exit_code, json.loads(result.stdout)["checks"]["against"]


def _merge(src, out, *extra) -> dict:
    result = cli("merge", "-q", src, out, *extra)
    assert result.exit_code == 0, result.output
    return json.loads((out / "neoxconv.json").read_text())["qkv_layout"]


@pytest.mark.parametrize("rows", ["interleaved", "blocked"])
def test_an_assumed_layout_the_source_cannot_confirm_is_not_a_pass(build, tmp_path, rows):
    """A random model predicts no prompt better under one layout than the other: verify cannot tell."""
    src, _ = build(LlamaSpec(tp=2, heads=8, kv_heads=2, qkv=rows))
    recorded = _merge(src, tmp_path / "out")  # auto: assumes blocked, with a warning
    assert recorded["split"] == "qkv_gqa_blocks" and recorded["assumed"]
    code, against = _against(tmp_path / "out", src, IDS)
    assert code == 7 and not against["passed"], against  # before: passed for the interleaved source
    assert "ASSUMED" in against["detail"] and "cannot tell" in against["detail"]
    assert "--qkv-layout" in against["detail"]
    # a prompt of one token cannot tell either
    code, against = _against(tmp_path / "out", src, IDS[:1])
    assert code == 7 and "cannot tell" in against["detail"]


@pytest.mark.parametrize("rows", ["interleaved", "blocked"])
def test_a_stated_layout_is_read_from_the_manifest(build, tmp_path, rows):
    src, _ = build(LlamaSpec(tp=2, heads=8, kv_heads=2, qkv=rows))
    recorded = _merge(src, tmp_path / "out", "--qkv-layout", rows)
    assert not recorded["assumed"]
    code, against = _against(tmp_path / "out", src, IDS)  # no --qkv-layout: before, re-guessed blocked (exit 7)
    assert code == 0 and against["passed"], against
    assert f"QKV layout {rows} as the merge recorded it" in against["detail"]


def _sharp(build, rows):
    """A source whose predictions are sharp (as a trained model's are) and a prompt it predicts well: its own
    greedy continuation, under its true layout."""
    src, hf = build(LlamaSpec(tp=2, heads=8, kv_heads=2, qkv=rows, readout_scale=30.0))
    with torch.no_grad():
        ids = hf.generate(torch.tensor([[1]]), max_new_tokens=9, do_sample=False)[0].tolist()
    return src, ids


def test_an_assumed_layout_the_source_does_not_fit_fails_and_names_the_right_one(build, tmp_path):
    src, ids = _sharp(build, "interleaved")
    _merge(src, tmp_path / "out")  # assumes blocked: wrong for this source
    code, against = _against(tmp_path / "out", src, ids)
    assert code == 7 and not against["passed"], against
    assert "fits interleaved" in against["detail"] and "re-merge with --qkv-layout interleaved" in against["detail"]
    # re-merged as it says, it verifies
    _merge(src, tmp_path / "right", "--qkv-layout", "interleaved")
    code, against = _against(tmp_path / "right", src, ids)
    assert code == 0 and against["passed"], against


def test_an_assumed_layout_the_source_fits_passes_and_says_so(build, tmp_path):
    src, ids = _sharp(build, "blocked")
    _merge(src, tmp_path / "out")
    code, against = _against(tmp_path / "out", src, ids)
    assert code == 0 and against["passed"], against
    assert "assumed by the merge; the source fits it" in against["detail"]


def test_a_layout_stated_to_verify_is_used_as_stated(build, tmp_path):
    src, _ = build(LlamaSpec(tp=2, heads=8, kv_heads=2, qkv="interleaved"))
    _merge(src, tmp_path / "out")  # blocked, assumed (wrong)
    code, against = _against(tmp_path / "out", src, IDS, "--qkv-layout", "interleaved")  # the user knows better
    assert code == 7 and not against["passed"]  # the merged model is not the interleaved source's model
    assert "as --qkv-layout states (the merge recorded blocked)" in against["detail"]
    code, against = _against(tmp_path / "out", src, IDS, "--qkv-layout", "blocked")  # a statement, not a guess
    assert code == 0 and against["passed"], against
