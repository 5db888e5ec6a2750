"""What neoxconv prints: text taken from input files (names in an index, a tokenizer's tokens, folder names)
can neither start a line of its own nor a terminal escape sequence; and a tokenizer.json is copied into OUT
only when the tokenizers library loads it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from neoxconv.verify import Check, VerifyReport, format_report, report_json

from conftest import COMMITTED_FIXTURE, cli, one_line_error, subprocess_env

INDEX = "model.safetensors.index.json"
# what must never reach a terminal raw: C0 (ESC, BEL, CR, LF), DEL, C1 (CSI 0x9b, OSC 0x9d, NEL 0x85, in UTF-8),
# the Unicode line/paragraph separators
RAW_CONTROL = re.compile(rb"[\x00-\x09\x0b-\x1f\x7f]|\xc2[\x80-\x9f]|\xe2\x80[\xa8\xa9]")
HOSTILE = {
    "osc title": "\x1b]0;pwned\x07",
    "osc hyperlink": "\x1b]8;;https://evil.example\x1b\\click\x1b]8;;\x1b\\",
    "csi clear": "\x1b[2J\x1b[H",
    "forged line": "\nneoxconv: all checks passed",
    "carriage return": "\rall checks passed",
    "c1 csi": "\x9b2J",
    "c1 osc": "\x9d0;pwned\x9c",
    "c1 next line": "\x85all checks passed",
    "line separator": "\u2028all checks passed\u2029",
    "del and tab": "\x7f\t",
    "lone surrogate": "\udcff",  # a JSON string that is not UTF-8
}


def assert_terminal_safe(raw: bytes) -> None:
    assert not RAW_CONTROL.search(raw.replace(b"\n", b"")), raw[:600]


def _with_index(merged_fixture: Path, dest: Path, edit) -> Path:
    shutil.copytree(merged_fixture, dest)
    index = json.loads((dest / INDEX).read_text())
    edit(index["weight_map"])
    (dest / INDEX).write_text(json.dumps(index))  # JSON escapes: the lone surrogate survives as \udcff
    return dest


# ----- the one-line error ----------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["file name", "tensor name"])
@pytest.mark.parametrize("kind", list(HOSTILE))
def test_names_from_an_index_reach_the_error_line_escaped(merged_fixture, tmp_path, kind, where):
    evil = HOSTILE[kind]

    def edit(weight_map):
        name = next(iter(weight_map))
        if where == "file name":
            weight_map[name] = f"model{evil}.safetensors"
        else:
            weight_map[f"gpt_neox.layers.0.{evil}.weight"] = weight_map[name]

    out = _with_index(merged_fixture, tmp_path / "out", edit)
    result = cli("verify", out, "--ids", "1,2", "--device", "cpu")
    line = one_line_error(result, 7, "model.safetensors.index.json")
    assert_terminal_safe(result.stderr_bytes + result.stdout_bytes)
    assert result.stderr.count("\n") == 1 and "all checks passed" not in result.stdout
    assert "\\x" in line or "\\u" in line or "\\n" in line or "\\r" in line  # named, escaped, not dropped


def test_a_forged_line_and_a_window_title_from_a_real_process_with_stderr_piped(merged_fixture, tmp_path):
    """The attack as reported: an OSC sequence set the terminal title and a newline forged 'all checks passed'."""
    out = _with_index(merged_fixture, tmp_path / "out", lambda wm: wm.__setitem__(
        next(iter(wm)), "x\x1b]0;pwned\x07.safetensors\nneoxconv: all checks passed"))
    r = subprocess.run([sys.executable, "-m", "neoxconv", "verify", str(out), "--ids", "1,2", "--device", "cpu"],
                       capture_output=True, env=subprocess_env(), check=False)
    assert r.returncode == 7, r.stderr
    assert r.stderr.count(b"\n") == 1 and r.stderr.startswith(b"neoxconv: error: ")
    assert b"\x1b" not in r.stderr and b"\x07" not in r.stderr and r.stdout == b""
    assert b"x\\x1b]0;pwned\\x07.safetensors\\nneoxconv: all checks passed" in r.stderr  # still named


@pytest.mark.parametrize("kind", ["osc title", "forged line", "c1 csi", "lone surrogate"])
def test_split_names_from_an_hf_index_escaped(merged_fixture, tmp_path, kind):
    out = _with_index(merged_fixture, tmp_path / "hf", lambda wm: wm.__setitem__(next(iter(wm)), f"m{HOSTILE[kind]}"))
    result = cli("split", "-q", "--tp", 2, out, tmp_path / "neox")
    one_line_error(result, 4, "listed in the index")
    assert_terminal_safe(result.stderr_bytes + result.stdout_bytes)


def test_log_warnings_are_escaped_like_the_error_line(tmp_path):
    """A library warning quoting a name from a file goes through the CLI's log formatter, one line per record."""
    code = textwrap.dedent("""
        import logging
        import neoxconv.output.describe as describe

        def hostile(*args, **kwargs):
            logging.getLogger("neoxconv.output.describe").warning(
                "found x\\x1b]0;pwned\\x07\\nneoxconv: all checks passed\\x9b2J")
            raise SystemExit(0)

        describe.inspect_checkpoint = hostile
        from neoxconv.cli import main
        main(["inspect", "SRC"])
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, env=subprocess_env(), cwd=tmp_path,
                       check=False)
    assert r.returncode == 0, r.stderr
    assert r.stderr == b"neoxconv: found x\\x1b]0;pwned\\x07\\nneoxconv: all checks passed\\x9b2J\n"


# ----- verify's report ----------------------------------------------------------------------------------------
def _hostile_report(ok: bool) -> VerifyReport:
    evil = "".join(HOSTILE.values())
    return VerifyReport(
        out_dir=f"/models/{evil}", device="cpu", dtype="float32", prompt_ids=[1, 2], generated_ids=[3, 4],
        text=f"tokens{evil}", checks=[Check("integrity", True, None, None, f"files {evil}"),
                                      Check("against", ok, 0.0, 1.0, f"vs forward of {evil}")],
        notes=[f"note {evil}"], device_map={f"stage{evil}": f"cpu{evil}"})


@pytest.mark.parametrize("ok", [True, False])
def test_verify_human_report_keeps_its_lines_whatever_the_text(ok):
    text = format_report(_hostile_report(ok))
    assert_terminal_safe(text.encode("utf-8", "surrogatepass"))
    lines = text.split("\n")
    # the report's own lines: 3 header lines, a blank, "checks:", 2 checks, the device map, 1 note, the verdict
    assert len(lines) == 10, lines
    assert lines[-1] == ("all checks passed" if ok else "SOME CHECKS FAILED")
    assert not any(ln.lstrip().startswith(("all checks passed", "neoxconv:")) for ln in lines[:-1])


def test_verify_json_report_is_one_valid_line_with_the_same_values():
    report = _hostile_report(True)
    text = report_json(report)
    raw = text.encode("utf-8")  # no lone surrogate is left to fail the encoding
    assert_terminal_safe(raw) and "\n" not in text
    assert json.loads(text) == report.to_json()  # the same strings, escapes decoded


def test_verify_output_of_a_tokenizer_whose_tokens_hold_escape_sequences(merged_fixture, tmp_path):
    """Generated text comes from the tokenizer's tokens: printed escaped, and exact in --json."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    evil = "\x1b]0;pwned\x07\x9b2J\u2028\nneoxconv: all checks passed"
    vocab = {f"t{i}{evil}": i for i in range(512)}
    tok = Tokenizer(WordLevel(vocab, unk_token="t0" + evil))
    tok.save(str(tmp_path / "evil.json"))
    args = ["verify", "-q", merged_fixture, "--ids", "1,2", "--max-new-tokens", 3, "--device", "cpu", "--tokenizer",
            tmp_path / "evil.json"]
    human = cli(*args)
    assert human.exit_code == 0, human.output
    assert_terminal_safe(human.stdout_bytes + human.stderr_bytes)
    assert human.stdout.splitlines()[-1] == "all checks passed"
    assert sum(ln.strip() == "all checks passed" for ln in human.stdout.splitlines()) == 1
    as_json = cli(*args, "--json")
    assert as_json.exit_code == 0, as_json.output
    assert_terminal_safe(as_json.stdout_bytes)
    report = json.loads(as_json.stdout)
    assert report["text"] == tok.decode(report["generated_ids"]) and evil in report["text"]


def test_verify_against_a_source_in_a_hostile_folder_name(merged_fixture, tmp_path):
    """A folder name from an archive ends up in a check's detail line."""
    src = tmp_path / "src\x1b]0;pwned\x07\nall checks passed"
    shutil.copytree(COMMITTED_FIXTURE, src)
    result = cli("verify", "-q", merged_fixture, "--ids", "1,2", "--max-new-tokens", 2, "--device", "cpu", "--against",
                 src)
    assert result.exit_code == 0, result.output
    assert_terminal_safe(result.stdout_bytes + result.stderr_bytes)
    assert [ln for ln in result.stdout.splitlines() if "all checks passed" in ln][-1] == "all checks passed"
    assert "src\\x1b]0;pwned\\x07\\nall checks passed" in result.stdout


# ----- names found by listing folders (inspect) ------------------------------------------------------------
_RAW_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029]")
_OSC = "\x1b]0;PWN\x07"


def _wordlevel_tokenizer(path: Path) -> None:
    path.write_text(json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
        "pre_tokenizer": None, "post_processor": None, "decoder": None,
        "model": {"type": "WordLevel", "vocab": {"a": 0, "b": 1}, "unk_token": "a"}}))


@pytest.mark.parametrize("where", ["config", "tokenizer"])
def test_inspect_escapes_discovered_file_names(tmp_path, where):
    """`inspect SRC` finds configs/*.yml and *tokenizer*.json next to SRC by listing folders; a file named
    with an OSC sequence (``m\\x1b]0;PWN\\x07.yml``) was printed raw in the ``config:`` / ``tokenizer:`` rows
    (it sets the terminal title). Every name from a folder listing should be escaped (`terminal_text`), as
    the error line and log lines are."""
    src = tmp_path / "src"
    shutil.copytree(COMMITTED_FIXTURE, src)
    if where == "config":
        (src / "configs" / "model.yml").rename(src / "configs" / f"m{_OSC}.yml")
    else:
        _wordlevel_tokenizer(src / f"{_OSC}tokenizer.json")
    result = cli("inspect", src)
    assert result.exit_code == 0, result.output
    assert "PWN" in result.output
    assert not _RAW_CONTROL.search(result.output), repr(result.output)



# ----- every --json output -----------------------------------------------------------------------------------
_DEL_C1 = "\x7f\x9b2J\u2028"  # what json.dumps leaves raw: DEL, a C1 CSI, a line separator


def test_every_json_output_escapes_what_json_dumps_leaves_raw(merged_fixture, tmp_path):
    """merge, inspect, split (and --dry-run), reshard and synth print their --json with `terminal_json`: the same
    JSON value, but DEL, the C1 controls and the line separators escaped (json.dumps escapes only C0)."""
    src = tmp_path / f"src{_DEL_C1}"
    shutil.copytree(COMMITTED_FIXTURE, src)
    runs = {
        "merge": (["merge", "-q", src, tmp_path / f"hf{_DEL_C1}", "--json"], "out"),
        "inspect": (["inspect", src, "--json", "--summary"], None),
        "split --dry-run": (["split", merged_fixture, tmp_path / f"dry{_DEL_C1}", "--tp", 2, "--dry-run", "--json"],
                            None),
        "split": (["split", "-q", merged_fixture, tmp_path / f"sp{_DEL_C1}", "--tp", 2, "--json"], "out"),
        "reshard": (["reshard", "-q", src, tmp_path / f"rs{_DEL_C1}", "--tp", 1, "--json"], "out"),
        "synth": (["synth", tmp_path / f"syn{_DEL_C1}", "--layers", 1, "--json"], "out"),
    }
    for name, (args, key) in runs.items():
        result = cli(*args)
        assert result.exit_code == 0, (name, result.output)
        assert_terminal_safe(result.stdout_bytes)
        value = json.loads(result.stdout)
        assert _DEL_C1 in json.dumps(value, ensure_ascii=False), name  # the name itself, unchanged in the value
        if key:
            assert value[key].endswith(_DEL_C1), (name, value[key])
