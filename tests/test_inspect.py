"""`neoxconv inspect`: the plan, JSON, missing files and whether OUT can be written."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file

from neoxconv.cli import main

from conftest import COMMITTED_FIXTURE, REPO, cli


def test_inspect_json(tmp_path):
    result = CliRunner().invoke(main, ["inspect", str(COMMITTED_FIXTURE), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert (info["tp_degree"], info["num_layers"], info["hidden_size"], info["num_heads"]) == (2, 2, 32, 4)
    assert info["vocab_size"] == 512 and info["dtype"] == "float16" and info["layout"] == "pipeline"
    reference = load_file(str(REPO / "tests" / "fixtures" / "tiny_tp2_fp16.reference.safetensors"))
    assert info["parameters"] == sum(t.numel() for t in reference.values())
    assert len(info["files_found"]) == 10 and info["files_missing"] == []


def test_inspect_reports_missing_files(tmp_path):
    shutil.copytree(COMMITTED_FIXTURE, tmp_path / "src")
    (tmp_path / "src" / "global_step150000" / "layer_02-model_01-model_states.pt").unlink()
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "src"), "--json"])
    assert result.exit_code == 4, result.output  # like merge: the checkpoint is incomplete
    assert json.loads(result.stdout)["files_missing"] == ["layer_02-model_01-model_states.pt"]
    assert "layer_02-model_01-model_states.pt" in result.stderr and result.stderr.startswith("neoxconv: error:")


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


def test_inspect_with_a_rank_file_missing_lists_it_and_exits_4(tmp_path):
    shutil.copytree(COMMITTED_FIXTURE, tmp_path / "src")
    (tmp_path / "src" / "global_step150000" / "layer_03-model_00-model_states.pt").unlink()
    result = cli("inspect", tmp_path / "src")
    assert result.exit_code == 4
    assert "None" not in result.stdout and "files missing: layer_03-model_00-model_states.pt" in result.stdout
    assert re.match(r"neoxconv: error: .*1 rank file\(s\) missing: layer_03-model_00-model_states\.pt", result.stderr)


# ----- inspect shows the plan ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["auto", "bf16"])
def test_inspect_plan_matches_what_merge_writes(tmp_path, dtype):
    info = json.loads(cli("inspect", COMMITTED_FIXTURE, "--json", "--dtype", dtype, "--out", tmp_path / "new").stdout)
    assert cli("merge", COMMITTED_FIXTURE, tmp_path / "new", "--dtype", dtype, "-q").exit_code == 0
    index = json.loads((tmp_path / "new" / "model.safetensors.index.json").read_text())
    assert info["output_bytes"] == index["metadata"]["total_size"]
    manifest = json.loads((tmp_path / "new" / "neoxconv.json").read_text())
    written = {name: meta for layer in manifest["layers"].values() for name, meta in layer["tensors"].items()}
    assert [t["name"] for t in info["tensors"]] == list(written)
    for t in info["tensors"]:
        assert {k: t[k] for k in ("shape", "dtype", "rule")} == {k: written[t["name"]][k] for k in ("shape", "dtype",
                                                                                                    "rule")}
        assert index["weight_map"][t["name"]] == t["file"]
    assert info["out_free_bytes"] > 0 and info["out_fits"] is True


def test_inspect_text_shows_thousands_separators_and_the_plan(tmp_path):
    result = cli("inspect", COMMITTED_FIXTURE, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert "parameters: 58,240" in result.stdout and "output bytes: 116,480" in result.stdout
    assert "free at OUT:" in result.stdout and "plan: 28 tensors" in result.stdout
    assert re.search(r"sum +float16 +32 +gpt_neox\.layers\.0\.attention\.dense\.bias <- attention\.dense\.bias",
                     result.stdout)
