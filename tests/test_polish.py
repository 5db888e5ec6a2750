"""Small defects found by adversarial review, each checked through the CLI as a user meets it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from neoxconv.cli import main

from conftest import COMMITTED_FIXTURE


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_line_error(result, code, *words):
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = [ln for ln in result.output.splitlines() if ln.startswith("neoxconv: ")]
    assert len(lines) == 1 and lines[0].startswith("neoxconv: error: "), result.output
    assert "internal error" not in result.output and "Traceback" not in result.output
    for w in words:
        assert str(w) in lines[0], (w, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def merged(tmp_path_factory) -> Path:
    """The committed fixture merged once: a real config.json and a complete output to attack."""
    out = tmp_path_factory.mktemp("merged") / "out"
    r = _cli("merge", "-q", COMMITTED_FIXTURE, out)
    assert r.exit_code == 0, r.output
    return out


@pytest.mark.parametrize("model_type", ["gpt_neox", "llama"])
@pytest.mark.parametrize("key, value", [("num_hidden_layers", 1.5), ("hidden_size", 256.7),
                                        ("num_attention_heads", True), ("vocab_size", 100.5)])
def test_a_non_whole_number_in_a_hugging_face_config_is_a_config_error(tmp_path, merged, model_type, key, value):
    # Before: from_hf_dict truncated them with int() (1.5 layers -> 1, true heads -> 1); the NeoX YAML refused.
    cfg = json.loads((merged / "config.json").read_text())
    if model_type == "llama":
        cfg = {**cfg, "model_type": "llama", "hidden_act": "silu"}
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**cfg, key: value}))
    r = _cli("merge", "-q", "--config", path, COMMITTED_FIXTURE, tmp_path / "out")
    _one_line_error(r, 3, path.name, key, "whole number", repr(value))
    assert not (tmp_path / "out" / "neoxconv.json").exists()


@pytest.mark.parametrize("before", ["empty", "merged"])
def test_a_directory_in_place_of_the_manifest_is_an_output_error(tmp_path, merged, before):
    # Before: merge --force unlinked it with Path.unlink -> "internal error: IsADirectoryError".
    out = tmp_path / "out"
    if before == "merged":
        shutil.copytree(merged, out)
        (out / "neoxconv.json").unlink()
    (out / "neoxconv.json").mkdir(parents=True)
    (out / "neoxconv.json" / "keep.txt").write_text("mine\n")
    _one_line_error(_cli("merge", "-q", "--force", COMMITTED_FIXTURE, out), 6, out / "neoxconv.json", "directory")
    assert (out / "neoxconv.json" / "keep.txt").read_text() == "mine\n"


@pytest.mark.parametrize("ids", ["1,,2", "1,2,", ",1", " , "])
def test_an_empty_item_in_verify_ids_is_a_usage_error(merged, ids):
    # Before: "1,,2" was read as [1, 2] (the lost id dropped silently).
    r = _cli("verify", merged, "--ids", ids)
    assert r.exit_code == 2, r.output
    assert "--ids" in r.output and "empty item" in r.output and "Traceback" not in r.output
