"""The CLI contract through click's runner: exit codes, one-line errors, --json."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from neoxconv import verify
from neoxconv.cli import main

from conftest import COMMITTED_FIXTURE, REPO, cli, one_line_error


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
    result = CliRunner().invoke(main,
                                ["merge", str(COMMITTED_FIXTURE / "global_step150000"), str(tmp_path / "o"), "-q"])
    assert result.exit_code == 0 and result.output == ""


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


def test_synth_of_a_size_that_does_not_fit_on_disk_is_refused_before_writing(tmp_path):
    # Before: torch tried to allocate 512 GB and the CLI printed "internal error: RuntimeError".
    out = tmp_path / "ckpt"
    one_line_error(cli("synth", out, "--hidden", 1_000_000_000, "--heads", 4, "--vocab", 128, "--layers", 1),
                    6, str(out), "free")
    assert not out.exists()


def test_synth_of_a_size_that_does_not_fit_in_memory_is_refused_before_writing(tmp_path, monkeypatch):
    monkeypatch.setattr("neoxconv.runtime.placement.meminfo", lambda key: 1 << 20)  # 1 MiB available
    out = tmp_path / "ckpt"
    one_line_error(cli("synth", out, "--hidden", 256, "--heads", 4, "--vocab", 1024, "--layers", 1,
                         "--layout", "sequential"), 2, "memory", "--layout pipeline")
    assert not out.exists()


def test_synth_heads_zero_is_an_error_not_the_default(tmp_path):
    # Before: --heads 0 was read as "not given" and the error talked about "--heads 1".
    one_line_error(cli("synth", tmp_path / "c", "--hidden", 64, "--heads", 0), 2, "num_heads", "got 0")


@pytest.mark.parametrize("tolerance", ["nan", "inf", "-1"])
def test_a_non_finite_replica_tolerance_is_a_usage_error(tmp_path, tolerance):
    one_line_error(cli("merge", COMMITTED_FIXTURE, tmp_path / "out", "--replica-tolerance", tolerance), 2,
                    "--replica-tolerance")
    assert not (tmp_path / "out").exists()


IDS = "12,345,67,8"


@pytest.mark.parametrize("option, module, hint", [
    (("--reference", "hf"), "transformers", "pip install 'neoxconv[hf]'"),
    (("--int8",), "bitsandbytes", "pip install 'neoxconv[int8]'"),
])
def test_missing_optional_dependency_is_refused_up_front(merged_fixture, monkeypatch, option, module, hint):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the dependency check")

    monkeypatch.setattr(verify, "load_model", no_model)
    result = cli("verify", merged_fixture, "--ids", IDS, *option)
    assert result.exit_code == 2, result.output
    assert hint in result.stderr and option[0] in result.stderr


# ----- merge --json and the summary ----------------------------------------------------------------------
def test_merge_json_is_one_object_on_stdout(tmp_path):
    result = cli("merge", COMMITTED_FIXTURE, tmp_path / "out", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # the whole of stdout is one JSON object
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    files = sorted((tmp_path / "out").glob("model-*.safetensors"))
    assert report["out"] == str(tmp_path / "out")
    assert (report["files_written"], report["files_reused"]) == (len(files), 0)
    assert report["bytes_written"] == sum(f.stat().st_size for f in files)
    assert report["total_size"] == index["metadata"]["total_size"]
    assert (report["dtype"], report["tp_degree"], report["num_layers"], report["row_bias"]) == ("float16", 2, 2, "sum")
    assert report["seconds"] > 0 and report["max_replica_divergence"] == 0.0
    assert "merge" in result.stderr  # the progress bar stays on stderr
    again = json.loads(cli("merge", COMMITTED_FIXTURE, tmp_path / "out", "--json").stdout)
    assert (again["files_written"], again["files_reused"], again["bytes_written"]) == (0, len(files), 0)


def test_summary_says_time_rate_and_dtype_in_the_progress_bars_units(tmp_path):
    result = cli("merge", COMMITTED_FIXTURE, tmp_path / "out", "--dtype", "bf16")
    assert result.exit_code == 0, result.output
    summary = result.stdout.strip()
    m = re.search(r"5 file\(s\) written \(([\d.]+) (kB) bfloat16 in ([\d.]+) s, ([\d.]+) (kB|MB)/s\)", summary)
    assert m, summary
    bar_totals = re.findall(r"B/[\d.]+([kMG]?i?B) \[", result.stderr)  # "0.00B/116kB [00:00<?, ?B/s]"
    assert bar_totals and set(bar_totals) == {m.group(2)}, result.stderr  # decimal kB in the bar and the summary


# ----- demo and synth ---------------------------------------------------------------------------------------
def test_demo_says_where_its_files_are(monkeypatch):
    from neoxconv.tools import demo

    seen = []
    monkeypatch.setattr(demo, "_demo", lambda work, *a: seen.append(work))  # the flow itself: test_cli.py
    result = cli("demo")
    assert result.exit_code == 0
    (work,) = seen
    assert f"working in {work}" in result.output and "--workdir DIR" in result.output
    assert not work.exists()


def test_demo_with_workdir_says_what_it_kept(tmp_path, monkeypatch):
    from neoxconv.tools import demo

    monkeypatch.setattr(demo, "_demo", lambda work, *a: None)
    result = cli("demo", "--workdir", tmp_path / "d")
    assert f"files kept in {tmp_path / 'd'}" in result.output and str(tmp_path / "d" / "merged") in result.output


def test_synth_writes_a_checkpoint_of_the_chosen_size(tmp_path):
    from neoxconv.config import NeoXConfig
    from neoxconv.tools.synthetic import parameter_count

    result = cli("synth", tmp_path / "ck", "--tp", 2, "--layers", 3, "--hidden", 64, "--heads", 4, "--vocab", 512,
                  "--dtype", "bf16")
    assert result.exit_code == 0, result.output
    want = parameter_count(NeoXConfig(num_layers=3, hidden_size=64, num_heads=4, vocab_size=512))
    assert f"{want:,} parameters" in result.stdout
    info = json.loads(cli("inspect", tmp_path / "ck", "--json").stdout)
    assert (info["tp_degree"], info["num_layers"], info["hidden_size"], info["num_heads"], info["vocab_size"],
            info["dtype"], info["parameters"]) == (2, 3, 64, 4, 512, "bfloat16", want)
    assert cli("merge", tmp_path / "ck", tmp_path / "m", "-q").exit_code == 0
    assert cli("verify", tmp_path / "m", "--against", tmp_path / "ck", "--ids", IDS, "--max-new-tokens",
               2).exit_code == 0
    # refusals: a non-empty OUT (6), a size the TP split cannot hold (2)
    assert cli("synth", tmp_path / "ck", "--hidden", 64, "--heads", 4, "--vocab", 512).exit_code == 6
    result = cli("synth", tmp_path / "x", "--tp", 3, "--hidden", 64, "--heads", 4, "--vocab", 512)
    assert result.exit_code == 2 and "--heads 4 is not divisible by --tp 3" in result.stderr


@pytest.mark.parametrize("tp", ["0", "-1", "3"])
def test_demo_with_a_tp_its_model_cannot_take_is_a_usage_error(tp, tmp_path):
    result = cli("demo", "--tp", tp, "--workdir", tmp_path / "w")
    assert result.exit_code == 2 and "cannot split this model" in result.output, result.output
    assert not (tmp_path / "w").exists()  # refused before anything is written


def test_synth_into_a_dangling_symlink_is_a_one_line_output_error(tmp_path):
    """`neoxconv synth LINK` where LINK is a dangling symlink: ``internal error: FileExistsError`` (exit 1).
    It should be refused as merge refuses it (`check_out_path`: exit 6, 'OUT is a dangling symlink'), and
    nothing created at the link's target."""
    link = tmp_path / "dl"
    link.symlink_to(tmp_path / "nowhere")
    result = cli("synth", link, "--layers", 1, "--hidden", 32, "--heads", 4, "--vocab", 64)
    assert result.exit_code == 6, result.output
    assert "internal error" not in result.output
    assert not (tmp_path / "nowhere").exists()
