"""What OUT holds for the Hugging Face Hub: no private paths, a model card, a generation config.

Every file of OUT is uploaded as it is, so none may carry the machine's absolute paths (the source, OUT itself,
the temp folder, the user's home); the card is the user's to edit, and verify does not count that as tampering.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from conftest import COMMITTED_FIXTURE, cli


def _private_strings(*paths: Path) -> list[str]:
    """The absolute places that must not appear in OUT (resolved and as given)."""
    found = {str(Path.home()), str(Path(tempfile.gettempdir()).resolve()), tempfile.gettempdir()}
    for p in paths:
        found |= {str(p), str(Path(p).resolve())}
    return sorted(s for s in found if len(s) > 1)


def _leaks(out: Path, private: list[str]) -> list[str]:
    hits = []
    for p in sorted(out.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            hits += [f"{p.relative_to(out)}: {s}" for s in private if s.encode() in data]
    return hits


def test_no_absolute_path_in_any_output(tmp_path):
    """merge, split and reshard: no file of OUT names the source, OUT, the temp folder or the home folder."""
    src = tmp_path / "src"
    shutil.copytree(COMMITTED_FIXTURE, src)
    merged, split, resharded = tmp_path / "merged", tmp_path / "split", tmp_path / "resharded"
    for args in (("merge", "-q", src, merged), ("split", "-q", merged, split, "--tp", "1"),
                 ("reshard", "-q", src, resharded, "--tp", "1")):
        result = cli(*args)
        assert result.exit_code == 0, result.output
    private = _private_strings(src, merged, split, resharded, tmp_path)
    for out in (merged, split, resharded):
        assert (out / "neoxconv.json").is_file()
        assert _leaks(out, private) == []
    manifest = json.loads((merged / "neoxconv.json").read_text())
    assert manifest["source"]["step_dir"] == "global_step150000"  # the step folder's name only
    assert json.loads((split / "neoxconv.json").read_text())["source"]["hf_dir"] == "merged"


def test_source_inside_out_is_recorded_relative(tmp_path):
    out = tmp_path / "out"
    shutil.copytree(COMMITTED_FIXTURE, out / "ckpt")  # OUT/ckpt: the source inside OUT (a "foreign" file)
    result = cli("merge", "-q", "--force", out / "ckpt", out)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "neoxconv.json").read_text())["source"]["step_dir"] == "ckpt/global_step150000"


def test_old_manifest_with_absolute_source_still_resumes(tmp_path):
    """A manifest written before this fix records the absolute step folder: the same merge resumes from it
    (every layer kept, fingerprints proven), and the new manifest no longer holds the path."""
    src = tmp_path / "src"
    shutil.copytree(COMMITTED_FIXTURE, src)
    out = tmp_path / "out"
    assert cli("merge", "-q", src, out).exit_code == 0
    manifest = json.loads((out / "neoxconv.json").read_text())
    manifest["source"]["step_dir"] = str((src / "global_step150000").resolve())  # as the previous version wrote it
    (out / "neoxconv.json").write_text(json.dumps(manifest, indent=2))
    result = cli("merge", "--json", src, out)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["files_written"] == 0 and report["files_reused"] == 5
    assert _leaks(out, _private_strings(src, out)) == []
    assert cli("verify", "-q", out, "--ids", "1,2,3", "--max-new-tokens", "1").exit_code == 0
