"""A second process swapping a folder under OUT while neoxconv writes (issue 21).

Between the check of a folder under OUT (``global_step0/``, ``configs/``, OUT itself) and the first write into it,
another process replaces it with a symlink to a folder outside OUT: removed first, or renamed away first (then
the folder neoxconv checked still exists, elsewhere). Deterministic: the swap runs inside the function that creates
a hidden temporary, right before it creates one. Whatever the moment, nothing outside OUT is created, renamed,
truncated or deleted (the outside folder's listing and bytes are compared before and after, with files there
named like every file neoxconv writes, its lock, journal, manifest and temporaries included); the run ends with a
one-line OutputError (exit 6), and what it wrote is in the folder it checked, byte for byte what a clean run
writes. On main (paths re-resolved at every call) each of these wrote or deleted through the link.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from neoxconv.output import writer

from conftest import COMMITTED_FIXTURE, cli, one_line_error, tree_bytes

# files named like neoxconv's own, in the folder the link points to: none may change or go
_OUTSIDE = ["latest", "neox.yml", "tokenizer.json", "config.json", "tokenizer_config.json", "README.md",
            "generation_config.json", "model.safetensors.index.json", "model-00001-of-00005.safetensors",
            "layer_00-model_00-model_states.pt", "layer_02-model_01-model_states.pt", "mp_rank_00_model_states.pt",
            "neoxconv.json", ".neoxconv-journal.json", ".neoxconv.lock", ".latest.neoxconv-tmp",
            ".neox.yml.neoxconv-tmp", ".config.json.neoxconv-tmp", ".neoxconv-journal.json.neoxconv-tmp",
            ".layer_00-model_00-model_states.pt.neoxconv-tmp"]


def _outside(tmp_path: Path) -> Path:
    """A user's folder outside OUT, holding files (and folders) named like everything neoxconv writes."""
    outside = tmp_path / "outside"
    for folder in (outside, outside / "configs", outside / "global_step0"):
        folder.mkdir(parents=True)
        for name in _OUTSIDE:
            (folder / name).write_bytes(f"the user's {name}".encode())
    return outside


def _snapshot(folder: Path) -> tuple[list[str], dict[str, bytes]]:
    """Every entry under ``folder`` (files, folders, links) and every file's bytes."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")), tree_bytes(folder)


def _swap_before_first_temporary(monkeypatch, place: Path, outside: Path, mode: str, when) -> list[Path]:
    """Right before the first hidden temporary for which ``when(final path)`` holds is created, swap ``place``
    for a symlink to ``outside``: ``replace`` removes the folder first, ``move`` renames it to ``*.moved`` first.
    Returns [the folder as it was checked, now] once swapped (``move``), [None] (``replace``)."""
    real = writer._AtomicFile._create
    swapped: list[Path | None] = []

    def create(self):
        if not swapped and when(Path(self.path)):
            if mode == "replace":
                shutil.rmtree(place)
                swapped.append(None)
            else:
                moved = place.with_name(place.name + ".moved")
                place.rename(moved)
                swapped.append(moved)
            place.symlink_to(outside, target_is_directory=True)
        return real(self)

    monkeypatch.setattr(writer._AtomicFile, "_create", create)
    return swapped


def _check_outcome(result, place: Path, checked: Path | None, clean: Path) -> None:
    """Either a one-line OutputError (exit 6) naming the swapped folder, with what the run wrote and kept (files
    from source reads not yet confirmed are removed on a failure) in the folder it checked, each file as a clean
    run writes it; or (the swap came after the last check: before the manifest's temporary) exit 0 with every
    file in the folder it checked. No temporary is left either way."""
    if result.exit_code == 0:
        assert checked is not None, "finished although the folder it checked was removed"
        done = tree_bytes(checked)
        assert "neoxconv.json" in done and ".neoxconv-journal.json" not in done
        assert {n: b for n, b in done.items() if n != "neoxconv.json"} == \
               {n: b for n, b in tree_bytes(clean).items() if n != "neoxconv.json"}
        return
    one_line_error(result, 6, place, "another process")
    if checked is not None:
        assert not [p for p in checked.rglob("*") if p.name.endswith(".neoxconv-tmp")]
        written = {n: b for n, b in tree_bytes(checked).items() if Path(n).name != ".neoxconv-journal.json"}
        expected = tree_bytes(clean)
        assert {n: expected.get(n) for n in written} == written


@pytest.fixture(scope="module")
def clean_outputs(tmp_path_factory):
    """{command: a clean run's OUT}, made once (split and reshard as `writer_command` gives their sources)."""
    return {}


def _clean(clean_outputs, tmp_path_factory, name, src) -> Path:
    if name not in clean_outputs:
        out = tmp_path_factory.mktemp("clean") / name
        extra = [] if name == "merge" else ["--tp", "2"]
        assert cli(name, src, out, *extra, "-q").exit_code == 0
        clean_outputs[name] = out
    return clean_outputs[name]


def _step(out: Path) -> str:
    (step,) = [p.name for p in out.glob("global_step*")]
    return step


# ----- split and reshard: OUT/global_stepN, OUT/configs, OUT itself ---------------------------------------------
@pytest.mark.parametrize("mode", ["replace", "move"])
@pytest.mark.parametrize("where", ["step", "configs", "out"])
def test_a_folder_swapped_for_a_link_after_its_check_is_never_written_through(
        writer_command, tmp_path, tmp_path_factory, monkeypatch, clean_outputs, where, mode):
    name, src = writer_command
    clean = _clean(clean_outputs, tmp_path_factory, name, src)
    rel = {"step": _step(clean), "configs": "configs", "out": ""}[where]
    outside = _outside(tmp_path)
    before = _snapshot(outside)
    out = tmp_path / "out"
    place = out / rel if rel else out
    # OUT itself: the first temporary of the run (the journal); a folder: the first temporary inside it
    when = (lambda p: True) if not rel else (lambda p: p.parent.name == rel)
    swapped = _swap_before_first_temporary(monkeypatch, place, outside, mode, when)

    result = cli(name, src, out, "--tp", "2", "-q")

    assert swapped, "the swap never ran"
    assert _snapshot(outside) == before  # nothing created, renamed, truncated or deleted outside OUT
    _check_outcome(result, place, swapped[0], clean / rel)


# ----- merge: its files go into OUT itself ---------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["replace", "move"])
@pytest.mark.parametrize("first", ["journal", "config.json", "model-00001-of-00005.safetensors",
                                   "model.safetensors.index.json", "neoxconv.json"])
def test_merge_out_swapped_for_a_link_is_never_written_through(tmp_path, tmp_path_factory, monkeypatch, clean_outputs,
                                                               first, mode):
    """OUT swapped before the journal, a weight file, the small files or the manifest is created."""
    clean = _clean(clean_outputs, tmp_path_factory, "merge", COMMITTED_FIXTURE)
    outside = _outside(tmp_path)
    before = _snapshot(outside)
    out = tmp_path / "out"
    when = (lambda p: True) if first == "journal" else (lambda p: p.name == first)
    swapped = _swap_before_first_temporary(monkeypatch, out, outside, mode, when)

    result = cli("merge", COMMITTED_FIXTURE, out, "-q")

    assert swapped, "the swap never ran"
    assert _snapshot(outside) == before
    _check_outcome(result, out, swapped[0], clean)


# ----- the clean-up of a previous run's temporaries ---------------------------------------------------------------
@pytest.mark.parametrize("mode", ["replace", "move"])
def test_a_step_folder_swapped_before_the_clean_up_of_stale_temporaries_loses_nothing_outside(
        hf_sharded, tmp_path, tmp_path_factory, monkeypatch, clean_outputs, mode):
    """A re-run over its own interrupted output removes its stale temporaries: the step folder swapped for a link
    right before that clean-up (after its check) makes it remove nothing outside OUT."""
    from neoxconv.output.folder import OutputFolder

    clean = _clean(clean_outputs, tmp_path_factory, "split", hf_sharded)
    out = tmp_path / "out"
    assert cli("split", hf_sharded, out, "--tp", "2", "-q").exit_code == 0
    stale = out / "global_step0" / ".layer_00-model_00-model_states.pt.neoxconv-tmp"
    stale.write_bytes(b"half-written by an interrupted run")
    outside = _outside(tmp_path)
    before = _snapshot(outside)
    real = OutputFolder._remove_stale
    swapped: list[Path | None] = []

    def remove_stale(self):
        place = out / "global_step0"
        if mode == "replace":
            shutil.rmtree(place)
            swapped.append(None)
        else:
            swapped.append(place.with_name("global_step0.moved"))
            place.rename(swapped[0])
        place.symlink_to(outside, target_is_directory=True)
        return real(self)

    monkeypatch.setattr(OutputFolder, "_remove_stale", remove_stale)
    result = cli("split", hf_sharded, out, "--tp", "2", "-q")

    assert swapped, "the swap never ran"
    assert _snapshot(outside) == before
    one_line_error(result, 6, out / "global_step0", "another process")
    if mode == "move":  # the stale temporary went from the folder that was checked; the rank files are intact
        assert tree_bytes(swapped[0]) == tree_bytes(clean / "global_step0")
