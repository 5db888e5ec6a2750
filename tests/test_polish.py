"""Small defects found by adversarial review, each checked through the CLI as a user meets it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import COMMITTED_FIXTURE, cli, one_line_error


@pytest.fixture(scope="module")
def merged(tmp_path_factory) -> Path:
    """The committed fixture merged once: a real config.json and a complete output to attack."""
    out = tmp_path_factory.mktemp("merged") / "out"
    r = cli("merge", "-q", COMMITTED_FIXTURE, out)
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
    r = cli("merge", "-q", "--config", path, COMMITTED_FIXTURE, tmp_path / "out")
    one_line_error(r, 3, path.name, key, "whole number", repr(value))
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
    one_line_error(cli("merge", "-q", "--force", COMMITTED_FIXTURE, out), 6, out / "neoxconv.json", "directory")
    assert (out / "neoxconv.json" / "keep.txt").read_text() == "mine\n"


@pytest.mark.parametrize("ids", ["1,,2", "1,2,", ",1", " , "])
def test_an_empty_item_in_verify_ids_is_a_usage_error(merged, ids):
    # Before: "1,,2" was read as [1, 2] (the lost id dropped silently).
    r = cli("verify", merged, "--ids", ids)
    assert r.exit_code == 2, r.output
    assert "--ids" in r.output and "empty item" in r.output and "Traceback" not in r.output


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory) -> Path:
    from test_split import _make_hf

    return _make_hf(tmp_path_factory.mktemp("hf"))


_BROKEN_TOKENIZERS = {
    "not json": "{\"model\": {\"vocab\": ",
    "no model": json.dumps({"added_tokens": []}),
    "more tokens than rows": json.dumps({"model": {"vocab": {f"t{i}": i for i in range(600)}}}),
    "bad eos id": json.dumps({"model": {"vocab": {"a": 1}}, "added_tokens": [{"id": "0", "content": "<|endoftext|>"}]}),
}


@pytest.mark.parametrize("how", ["next to HF_DIR", "--tokenizer"])
@pytest.mark.parametrize("kind", sorted(_BROKEN_TOKENIZERS))
def test_split_and_reshard_refuse_a_broken_tokenizer_as_merge_does(tmp_path, hf_model, kind, how):
    # Before: split and reshard copied any tokenizer.json into OUT verbatim (merge refuses these with exit 4).
    tok = tmp_path / "tokenizer.json"
    tok.write_text(_BROKEN_TOKENIZERS[kind])
    if how == "--tokenizer":
        src, extra = hf_model, ("--tokenizer", tok)
    else:
        src, extra = tmp_path / "hf", ()
        shutil.copytree(hf_model, src)
        shutil.copy(tok, src / "tokenizer.json")
        tok = src / "tokenizer.json"
    out = tmp_path / "neox"
    one_line_error(cli("split", "-q", "--tp", 2, *extra, src, out), 4, tok)
    assert not (out / "configs").exists() and not (out / "tokenizer.json").exists()
    if how == "--tokenizer" and kind != "more tokens than rows":  # reshard the committed NeoX fixture (more rows)
        one_line_error(cli("reshard", "-q", "--tp", 1, "--tokenizer", tok, COMMITTED_FIXTURE, tmp_path / "re"), 4, tok)
        assert not (tmp_path / "re" / "tokenizer.json").exists()


def test_split_still_copies_a_good_tokenizer(tmp_path, hf_model):
    src = tmp_path / "hf"
    shutil.copytree(hf_model, src)
    good = {"model": {"vocab": {"<|endoftext|>": 0, "a": 1}, "unk_token": "<|endoftext|>"}}  # tokenizers loads it
    (src / "tokenizer.json").write_text(json.dumps(good))
    r = cli("split", "-q", "--tp", 2, src, tmp_path / "neox")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "neox" / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("as_json", [False, True])
def test_inspect_reports_an_out_under_a_file_as_unusable(tmp_path, as_json):
    # Before: inspect reported the free space at the file and said the merge fits; merge then failed with exit 6.
    (tmp_path / "afile").write_text("not a folder\n")
    out = tmp_path / "afile" / "sub"
    assert cli("merge", "-q", COMMITTED_FIXTURE, out).exit_code == 6
    r = cli("inspect", COMMITTED_FIXTURE, "--out", out, *(["--json"] if as_json else []))
    assert r.exit_code == 0, r.output  # inspect reports, as for too little space; merge is what refuses
    if as_json:
        info = json.loads(r.stdout)
        assert info["out_fits"] is False and "afile" in info["out_problem"] and "not a folder" in info["out_problem"]
    else:
        assert "UNUSABLE" in r.stdout and "not a folder" in r.stdout and "NOT ENOUGH" not in r.stdout
    assert not out.exists()


def test_inspect_says_a_usable_out_fits(tmp_path):
    info = json.loads(cli("inspect", COMMITTED_FIXTURE, "--out", tmp_path / "new" / "sub", "--json").stdout)
    assert info["out_problem"] is None and info["out_fits"] is True
    assert not (tmp_path / "new").exists()


def test_an_undecodable_manifest_in_out_makes_it_someone_elses_folder(tmp_path):
    # Before: merge read OUT/neoxconv.json as UTF-8 unguarded -> "internal error: UnicodeDecodeError" (split's
    # reader already treated it as no state); both now share outdir.load_state.
    out = tmp_path / "out"
    out.mkdir()
    (out / "neoxconv.json").write_bytes(b"\xff\xfe{")
    r = cli("merge", "-q", COMMITTED_FIXTURE, out)
    one_line_error(r, 6, "neoxconv.json", "not a neoxconv output", "--force")
    assert (out / "neoxconv.json").read_bytes() == b"\xff\xfe{"


@pytest.mark.parametrize("file, code", [("config.json", 3), ("model.safetensors.index.json", 4)])
def test_a_deeply_nested_json_in_the_split_source_is_named_not_an_internal_error(tmp_path, file, code):
    # Before: split's JSON reader let RecursionError escape -> "internal error" (the other readers caught it).
    from test_split import _make_hf

    hf = tmp_path / "hf"
    _make_hf(hf)
    (hf / file).write_text("[" * 100_000)
    r = cli("split", "-q", "--tp", "1", hf, tmp_path / "out")
    one_line_error(r, code, file, "not readable JSON")
