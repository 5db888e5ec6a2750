"""What neoxconv prints (issue 20): decimal units everywhere, rates that count what a run did, notes said once,
quiet runs that are quiet, and mistakes that say what they are instead of looking like corruption."""

from __future__ import annotations

import inspect
import json
import re
import shutil
import subprocess
import sys
import time

import pytest

from neoxconv.output import hf_merge
from neoxconv.output.folder import OutputFolder
from neoxconv.progress import format_bytes, format_rate

from conftest import COMMITTED_FIXTURE, REPO, cli, one_line_error, subprocess_env

BINARY_UNITS = re.compile(r"\d\s?(KiB|MiB|GiB|TiB)\b")


def _neoxconv(*args, cwd=None) -> subprocess.CompletedProcess:
    """The CLI in a fresh process: what a user sees on stdout and stderr (logging set up as in real runs)."""
    return subprocess.run([sys.executable, "-m", "neoxconv", *map(str, args)], capture_output=True, text=True,
                          env=subprocess_env(), cwd=cwd, timeout=600)


class _Bars:
    """Every progress bar a run shows: (desc, total, n when closed)."""

    def __init__(self, monkeypatch):
        import neoxconv.progress as progress

        self.closed: list[tuple[str, int, int]] = []
        record = self.closed

        class Recording(progress.tqdm):
            def close(self):
                if not self.disable and not getattr(self, "_recorded", False):
                    self._recorded = True
                    record.append((self.desc, self.total, self.n))
                super().close()

        monkeypatch.setattr(progress, "tqdm", Recording)

    def by_desc(self, desc: str) -> list[tuple[int, int]]:
        return [(total, n) for d, total, n in self.closed if d == desc]


# ----- units ---------------------------------------------------------------------------------------------
def test_sizes_are_decimal_and_a_missing_rate_is_a_dash():
    assert format_bytes(2**30) == "1.07 GB" and format_bytes(10_000) == "10.00 kB" and format_bytes(512) == "512 B"
    assert "binary" not in inspect.signature(format_bytes).parameters  # one rule, no second unit system
    assert format_rate(117.25, "tokens/s") == "117.2 tokens/s"
    assert format_rate(float("nan"), "tokens/s") == "- tokens/s" and format_rate(float("inf"), "x/s") == "- x/s"


def test_verify_prints_decimal_sizes_echoes_the_cap_as_given_and_says_each_note_once(merged_fixture):
    """--max-memory 10kB below every module: the cap is echoed as 10.00 kB (not 9.77 KiB), every size in the
    report is decimal, and each placement note appears once (on stderr while running, not again at the end)."""
    r = _neoxconv("verify", merged_fixture, "--ids", "12,345", "--max-new-tokens", "1", "--max-memory", "10kB")
    assert r.returncode == 0, r.stderr
    both = r.stdout + r.stderr
    assert not BINARY_UNITS.search(both), both
    assert "memory cap (10.00 kB)" in r.stderr
    notes = [line.split("neoxconv: ", 1)[1] for line in r.stderr.splitlines() if "larger than the memory cap" in line]
    assert len(notes) >= 2  # the embedding and the readout at least
    for note in notes:
        assert both.count(note) == 1, note  # said once: not repeated as a "note:" line at the end
    assert "note: no tokenizer" in r.stdout  # notes not said before are still printed at the end
    assert re.search(r"weights [\d.]+ (B|kB|MB), peak memory [\d.]+ (kB|MB|GB)", r.stdout), r.stdout
    assert "decode - tokens/s" in r.stdout and "nan" not in r.stdout  # one token: no decode step timed

    data = json.loads(_neoxconv("verify", merged_fixture, "--ids", "12,345", "--max-new-tokens", "1",
                                "--max-memory", "10kB", "--json").stdout)
    assert sorted(data["notes"]) == sorted(notes + ["no tokenizer: generated ids are not decoded"])
    assert data["tokens_per_second"] is None and "notes_said" not in data


def test_the_hash_threshold_is_2_GB_decimal_in_code_help_and_readme(merged_fixture):
    from neoxconv.check.integrity import HASH_LIMIT_BYTES, check_output
    from neoxconv.config import load_out_config

    assert HASH_LIMIT_BYTES == 2 * 10**9 and format_bytes(HASH_LIMIT_BYTES) == "2.00 GB"
    assert inspect.signature(check_output).parameters["hash_limit_bytes"].default == HASH_LIMIT_BYTES
    readme = (REPO / "README.md").read_text()
    assert "weights < 2 GB" in readme and "2 GiB" not in readme
    assert "under 2 GB" in cli("verify", "--help").output
    report = check_output(merged_fixture, load_out_config(merged_fixture), hash_limit_bytes=1000)
    assert any("over 1.00 kB" in n for n in report.not_proven), report.not_proven


def test_a_resumed_merge_rates_only_what_it_wrote(merged_fixture, tmp_path, monkeypatch):
    """Re-checking the kept files (slowed here to 0.2 s each) is not writing: the rate is bytes written over
    the time spent writing, and the line says how long the whole run took."""
    out = tmp_path / "out"
    shutil.copytree(merged_fixture, out)
    (out / "model-00003-of-00005.safetensors").unlink()
    reusable = OutputFolder.reusable

    def slow(self, *args, **kw):
        time.sleep(0.2)
        return reusable(self, *args, **kw)

    monkeypatch.setattr(OutputFolder, "reusable", slow)
    report = hf_merge.merge_checkpoint(COMMITTED_FIXTURE, out, hf_merge.MergeOptions(quiet=True))
    assert report.files_written == 1 and report.files_reused == 4
    assert report.seconds >= 1.0 > report.write_seconds > 0
    line = report.summary()
    assert f"{format_bytes(report.bytes_written / report.write_seconds)}/s" in line, line
    assert f"{format_bytes(report.bytes_written / report.seconds)}/s" not in line
    assert "4 reused (" in line and " s in all)" in line
    assert report.to_json()["write_seconds"] == round(report.write_seconds, 3)


def test_resumed_merge_and_split_bars_recheck_then_end_at_100_percent(merged_fixture, tmp_path, monkeypatch):
    from neoxconv.output.split import SplitOptions, split_model

    bars = _Bars(monkeypatch)
    out = tmp_path / "merged"
    shutil.copytree(merged_fixture, out)
    (out / "model-00002-of-00005.safetensors").unlink()
    hf_merge.merge_checkpoint(COMMITTED_FIXTURE, out, hf_merge.MergeOptions(quiet=False))
    [(recheck_total, recheck_n)] = bars.by_desc("resume: re-check")
    [(merge_total, merge_n)] = bars.by_desc("merge")
    assert recheck_total == recheck_n > 0 and merge_total == merge_n > 0

    split = tmp_path / "split"
    split_model(merged_fixture, split, SplitOptions(tp=2, quiet=True))
    (split / "global_step0" / "layer_02-model_01-model_states.pt").unlink()
    bars.closed.clear()
    report = split_model(merged_fixture, split, SplitOptions(tp=2, quiet=False))
    assert report.files_written == 2 and report.files_reused > 0  # the layer's two rank files are redone
    [(recheck_total, recheck_n)] = bars.by_desc("resume: re-check")
    [(split_total, split_n)] = bars.by_desc("split")
    assert recheck_total == recheck_n > 0
    assert split_total == split_n > 0, (split_total, split_n)  # only what is left to write: ends at 100%


def test_verify_quiet_hides_transformers_loading_bar(merged_fixture):
    pytest.importorskip("transformers")
    args = ("verify", merged_fixture, "--ids", "12,345", "--max-new-tokens", "2", "--reference", "hf")
    loud = _neoxconv(*args)
    assert loud.returncode == 0, loud.stderr
    quiet = _neoxconv(*args, "-q")
    assert quiet.returncode == 0 and "reference_hf" in quiet.stdout, quiet.stderr
    assert "Loading" not in quiet.stderr and "it/s" not in quiet.stderr, quiet.stderr
    assert "%|" not in quiet.stderr


def test_the_llama_qkv_assumption_is_said_once_by_inspect(tmp_path):
    pytest.importorskip("transformers")
    from llama_checkpoints import LlamaSpec, write_llama_checkpoint

    write_llama_checkpoint(tmp_path / "llama", LlamaSpec())
    r = _neoxconv("inspect", tmp_path / "llama")
    assert r.returncode == 0, r.stderr
    reason = "a checkpoint trained between 2024-09 and 2024-11 needs --qkv-layout interleaved"
    assert (r.stdout + r.stderr).count(reason) == 1, r.stdout + r.stderr
    assert re.search(r"QKV layout: \S+ \(ASSUMED", r.stdout), r.stdout


# ----- inspect -------------------------------------------------------------------------------------------------
def test_inspect_escapes_names_read_from_the_source(src_copy):
    """A step folder named with an OSC escape sequence (a window title) in ``latest``: inspect prints it escaped."""
    evil = "global_step1\x1b]0;pwned\x07"
    (src_copy / "global_step150000").rename(src_copy / evil)
    (src_copy / "latest").write_text(evil)
    r = cli("inspect", src_copy)
    assert r.exit_code == 0, r.output
    assert "\x1b" not in r.output and "\x07" not in r.output
    assert "global_step1\\x1b]0;pwned\\x07" in r.output


def test_inspect_summary_is_one_line_per_layer_kind_with_counts_and_bytes():
    full = json.loads(cli("inspect", COMMITTED_FIXTURE, "--json").stdout)
    r = cli("inspect", COMMITTED_FIXTURE, "--summary")
    assert r.exit_code == 0, r.output
    plan = r.output.split("\nplan: ", 1)[1].splitlines()
    assert plan[0].startswith(f"{len(full['tensors'])} tensors in 5 files, {format_bytes(full['output_bytes'])}")
    assert [line.split()[0] for line in plan[1:]] == ["embedding", "block", "final_norm", "readout"]
    assert re.match(r"\s+block\s+2 layer\(s\)\s+24 tensors", plan[2]), plan[2]
    assert len(r.output.splitlines()) < len(cli("inspect", COMMITTED_FIXTURE).output.splitlines()) - 20
    summary = {k["kind"]: k for k in full["plan_summary"]}
    assert sum(k["bytes"] for k in summary.values()) == full["output_bytes"]
    assert sum(k["tensors"] for k in summary.values()) == len(full["tensors"])
    assert summary["block"]["rules"] == {"replicated": 8, "concat_dim0": 8, "concat_dim1": 4, "sum": 4}
    short = json.loads(cli("inspect", COMMITTED_FIXTURE, "--json", "--summary").output)
    assert "tensors" not in short and short["plan_summary"] == full["plan_summary"]


# ----- mistakes that looked like corruption ------------------------------------------------------------------
def test_verify_against_another_models_checkpoint_names_the_config_difference(merged_fixture, make_checkpoint):
    other, _, _ = make_checkpoint(2, "pipeline", "float16", config_overrides={"num_layers": 3})  # hidden 64
    line = one_line_error(cli("verify", merged_fixture, "--ids", "12,345", "--against", other), 3,
                          "does not match OUT's", "layers 3 vs 2", "hidden 64 vs 32", str(other))
    assert "agreement" not in line and "another model" in line


def test_merge_or_inspect_of_a_hugging_face_folder_suggests_verify_and_split(merged_fixture, tmp_path):
    for command in (("merge", merged_fixture, tmp_path / "out"), ("inspect", merged_fixture)):
        line = one_line_error(cli(*command), 4, "Hugging Face model folder", f"neoxconv verify {merged_fixture}",
                              f"neoxconv split {merged_fixture} OUT --tp N")
        assert "no checkpoint here" not in line
    assert not (tmp_path / "out").exists()
    (tmp_path / "empty").mkdir()
    one_line_error(cli("merge", tmp_path / "empty", tmp_path / "out"), 4, "no checkpoint here")


def test_split_refuses_to_resume_over_other_options_naming_what_differs(merged_fixture, tmp_path):
    out = tmp_path / "split"
    assert cli("split", merged_fixture, out, "--tp", 2, "-q").exit_code == 0
    line = one_line_error(cli("split", merged_fixture, out, "--tp", 1, "--layout", "sequential"), 6)
    assert line.endswith(f"{out}: holds a neoxconv split made with other options: layout: pipeline before, "
                         "sequential now; tp: 2 before, 1 now; use --no-resume or another OUT"), line
    assert "{" not in line


def test_demo_workdir_of_an_earlier_demo_says_what_to_do(tmp_path):
    work = tmp_path / "work"
    (work / "checkpoint" / "global_step150000").mkdir(parents=True)
    (work / "merged").mkdir()
    line = one_line_error(cli("demo", "--workdir", work, "--tp", 4), 6, "earlier demo",
                          f"rm -r {work / 'checkpoint'} {work / 'merged'}", "another --workdir")
    assert "--tp" in line
    (work / "mine.txt").write_text("x")
    one_line_error(cli("demo", "--workdir", work), 6, "not empty", "choose another --workdir")


# ----- synth and the --json field names -----------------------------------------------------------------------
def test_synth_default_heads_follow_the_released_models_head_widths():
    from neoxconv.tools.synthetic import default_heads

    # GPT-NeoX-20B: 6144 = 64 heads of 96; Pythia 70M/160M/410M: 64-wide heads; Pythia 1.4B/2.8B/6.9B/12B: 128
    assert default_heads(6144) == 64
    assert [default_heads(h) for h in (512, 768, 1024)] == [8, 12, 16]
    assert [default_heads(h) for h in (2048, 2560, 4096, 5120)] == [16, 20, 32, 40]
    assert default_heads(2112) == 33 and default_heads(32) == 1  # 128 does not divide 2112: 64-wide heads


def test_synth_json_describes_what_was_written(tmp_path):
    r = cli("synth", tmp_path / "ck", "--tp", 2, "--layers", 1, "--hidden", 128, "--vocab", 256, "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    files = [p for p in (tmp_path / "ck").rglob("*") if p.is_file()]
    assert info["out"] == str(tmp_path / "ck") and info["files"] == len(files)
    assert info["bytes"] == sum(p.stat().st_size for p in files)
    assert {k: info[k] for k in ("tp_degree", "num_layers", "hidden_size", "num_heads", "vocab_size", "layout")} == \
        {"tp_degree": 2, "num_layers": 1, "hidden_size": 128, "num_heads": 2, "vocab_size": 256, "layout": "pipeline"}
    inspected = json.loads(cli("inspect", tmp_path / "ck", "--json").stdout)
    assert inspected["parameters"] == info["parameters"] and inspected["step_dir"] == info["step_dir"]


def test_json_outputs_name_the_output_folder_out(merged_fixture, tmp_path):
    """merge, split, reshard, synth and verify all say ``out``; verify keeps ``out_dir`` (its old name) too."""
    merged = json.loads(cli("merge", COMMITTED_FIXTURE, tmp_path / "m", "--json").stdout)
    verified = json.loads(cli("verify", merged_fixture, "--ids", "12,345", "--max-new-tokens", "1", "--json").stdout)
    split = json.loads(cli("split", merged_fixture, tmp_path / "s", "--tp", 1, "--json").stdout)
    assert merged["out"] == str(tmp_path / "m") and split["out"] == str(tmp_path / "s")
    assert verified["out"] == verified["out_dir"] == str(merged_fixture)


def test_every_limit_is_stated_in_decimal_units(tmp_path):
    """The refusals of oversized inputs name their limits in the units every printed size uses (decimal): the
    small-file cap, the tokenizer cap, the safetensors header cap and the `latest` file's."""
    from neoxconv.errors import ConfigError
    from neoxconv.smallfile import SMALL_FILE_LIMIT, read_small_text
    from neoxconv.source.safetensors import MAX_HEADER_BYTES, read_header

    big = tmp_path / "config.json"
    with open(big, "wb") as f:
        f.truncate(SMALL_FILE_LIMIT + 1)
    with pytest.raises(ConfigError) as e:
        read_small_text(big, ConfigError)
    assert "64 MB" in str(e.value) and not BINARY_UNITS.search(str(e.value))
    header = tmp_path / "h.safetensors"
    header.write_bytes((MAX_HEADER_BYTES + 1).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError) as e:
        read_header(header)
    assert "16 MB" in str(e.value) and not BINARY_UNITS.search(str(e.value))
    src = tmp_path / "ckpt"
    (src / "global_step1").mkdir(parents=True)
    (src / "latest").write_bytes(b"x" * 5000)
    line = one_line_error(cli("merge", src, tmp_path / "out"), 4, "4096 bytes")
    assert not BINARY_UNITS.search(line)
