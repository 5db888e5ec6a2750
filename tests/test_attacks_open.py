"""Attacks on main after issue 18 round 3 / issue 17 that still succeed (each xfail strict: it flips when fixed).

Each test's docstring says what happened and what should happen.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from conftest import COMMITTED_FIXTURE, cli

RAW_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029]")
OSC = "\x1b]0;PWN\x07"


def _tiny_tokenizer(path: Path) -> None:
    path.write_text(json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
        "pre_tokenizer": None, "post_processor": None, "decoder": None,
        "model": {"type": "WordLevel", "vocab": {"a": 0, "b": 1}, "unk_token": "a"}}))


@pytest.mark.xfail(strict=True, reason="inspect prints discovered file names raw (format_inspect not escaped)")
@pytest.mark.parametrize("where", ["config", "tokenizer"])
def test_inspect_escapes_discovered_file_names(tmp_path, where):
    """`inspect SRC` finds configs/*.yml and *tokenizer*.json next to SRC by listing folders; a file named
    with an OSC sequence (``m\\x1b]0;PWN\\x07.yml``) was printed raw in the ``config:`` / ``tokenizer:`` rows
    (it sets the terminal title). Every name from a folder listing should be escaped (`terminal_text`), as
    the error line and log lines are."""
    src = tmp_path / "src"
    shutil.copytree(COMMITTED_FIXTURE, src)
    if where == "config":
        (src / "configs" / "model.yml").rename(src / "configs" / f"m{OSC}.yml")
    else:
        _tiny_tokenizer(src / f"{OSC}tokenizer.json")
    result = cli("inspect", src)
    assert result.exit_code == 0, result.output
    assert "PWN" in result.output
    assert not RAW_CONTROL.search(result.output), repr(result.output)


@pytest.mark.xfail(strict=True, reason="synth into a dangling symlink: internal error FileExistsError")
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
