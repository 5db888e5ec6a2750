"""The CLI contract through click's runner: exit codes, one-line errors, --json."""

import json
import shutil

import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from neoxconv.cli import main

from conftest import COMMITTED_FIXTURE, REPO


def test_merge_the_committed_fixture(tmp_path):
    result = CliRunner().invoke(main, ["merge", str(COMMITTED_FIXTURE), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "merged TP=2 (pipeline)" in result.output
    reference = load_file(str(REPO / "tests" / "fixtures" / "tiny_tp2_fp16.reference.safetensors"))
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    for name, file in index["weight_map"].items():
        assert torch.equal(load_file(str(tmp_path / "out" / file))[name], reference[name]), name
    assert set(index["weight_map"]) == set(reference)


def test_merge_accepts_the_step_folder_and_quiet(tmp_path):
    result = CliRunner().invoke(main, ["merge", str(COMMITTED_FIXTURE / "global_step150000"), str(tmp_path / "o"), "-q"])
    assert result.exit_code == 0 and result.output == ""


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


def test_errors_are_one_line_with_an_exit_code(tmp_path):
    result = CliRunner().invoke(main, ["merge", str(tmp_path / "nowhere"), str(tmp_path / "out")])
    assert result.exit_code == 4
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("neoxconv: error:") and "nowhere" in lines[0]


def test_help_explains_the_options():
    result = CliRunner().invoke(main, ["merge", "--help"])
    assert result.exit_code == 0
    for option in ("--dtype", "--row-bias", "--replica-tolerance", "--config", "--tokenizer", "--no-resume", "--force"):
        assert option in result.output


def test_demo_runs_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("NEOXCONV_TOKENIZER", str(tmp_path / "absent.json"))  # exercise the fallback
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["demo", "--workdir", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    assert "no GPT-NeoX tokenizer found" in result.output
    assert "equal the reference" in result.output
    assert "all checks passed" in result.output and "✓ against" in result.output


def test_merge_path_does_not_import_torch():
    """The merge parses .pt archives itself: no torch import (3 s saved), no torch.load of untrusted pickles."""
    import subprocess
    import sys

    code = ("import sys, neoxconv.cli, neoxconv.output.hf_merge, neoxconv.output.describe; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
