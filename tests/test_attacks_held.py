"""Attacks on main after issue 18 round 3 / issue 17 that held, kept where the suite lacked the coverage."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import COMMITTED_FIXTURE, cli, one_line_error

DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("name", ["neoxconv.json", "model.safetensors.index.json", "config.json"])
def test_verify_names_a_deeply_nested_small_file(merged_fixture_copy, name):
    """A small file of a merged OUT with JSON nested 100,000 deep (RecursionError in json.loads): a one-line
    error naming the file (exit 3, 4 or 7), never an internal error."""
    path = merged_fixture_copy / name
    raw = json.loads(path.read_text())
    path.write_text(json.dumps(raw)[:-1] + ', "zz": ' + DEEP + "}")
    result = cli("verify", merged_fixture_copy, "--ids", "1,2", "--max-new-tokens", 1)
    assert result.exit_code in (3, 4, 7), result.output
    assert "internal error" not in result.output and name in result.output


def test_a_latest_naming_a_path_with_a_nul_byte_is_one_line(tmp_path):
    """``latest`` holding ``global_step150000\\0x``: a one-line checkpoint error quoting it escaped (exit 4)."""
    src = tmp_path / "src"
    shutil.copytree(COMMITTED_FIXTURE, src)
    (src / "latest").write_bytes(b"global_step150000\0x")
    one_line_error(cli("inspect", src), 4, "latest")
