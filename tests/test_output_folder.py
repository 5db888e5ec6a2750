"""The output-folder protocol, attacked (issue 18): nothing is written outside OUT or through a link, a
resume never keeps a stale or forbidden output, and split/reshard are as strict as merge on values."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from neoxconv.check.integrity import check_output
from neoxconv.cli import main
from neoxconv.config import load_out_config
from neoxconv.errors import OutputError, VerificationError
from neoxconv.output import writer
from neoxconv.output.hashing import hash_file
from neoxconv.output.hf_merge import MergeOptions, merge_checkpoint

from conftest import (
    COMMITTED_FIXTURE,
    NEOX_MANIFEST,
    REPO,
    STEP,
    VERIFY,
    assert_manifest_proves,
    cli,
    folder_bytes,
    make_hf_folder,
    model_files,
    one_line_error,
    poison_pt,
    subprocess_env,
    tree_bytes,
)

transformers = pytest.importorskip("transformers")


@pytest.fixture()
def victim(tmp_path):
    """A user's file outside OUT."""
    p = tmp_path / "precious.txt"
    p.write_text("precious")
    return p


# ----- never write outside OUT ----------------------------------------------------------------------------
@pytest.mark.parametrize("temp", [".config.json.neoxconv-tmp", ".model.safetensors.index.json.neoxconv-tmp",
                                  ".neoxconv.json.neoxconv-tmp", ".model-00002-of-00005.safetensors.neoxconv-tmp"])
def test_merge_never_writes_through_a_symlink_planted_as_its_temporary(tmp_path, victim, temp):
    out = tmp_path / "out"
    out.mkdir()
    (out / temp).symlink_to(victim)
    assert cli("merge", COMMITTED_FIXTURE, out, "-q").exit_code == 0  # an OUT holding only our temporary
    assert victim.read_text() == "precious"
    assert not any(p.is_symlink() for p in out.iterdir())
    fresh = tmp_path / "fresh"
    assert cli("merge", COMMITTED_FIXTURE, fresh, "-q").exit_code == 0
    assert tree_bytes(out) == tree_bytes(fresh)


def test_merge_force_never_writes_through_a_weight_files_temporary(tmp_path, victim):
    out = tmp_path / "out"
    assert cli("merge", COMMITTED_FIXTURE, out, "-q").exit_code == 0
    (out / "model-00003-of-00005.safetensors").unlink()
    (out / ".model-00003-of-00005.safetensors.neoxconv-tmp").symlink_to(victim)
    (out / "notes.txt").write_text("mine")
    assert cli("merge", COMMITTED_FIXTURE, out, "--force", "-q").exit_code == 0
    assert victim.read_text() == "precious"
    assert not (out / "model-00003-of-00005.safetensors").is_symlink()
    assert cli("verify", out, "--ids", "1,2", "--max-new-tokens", "1", "--check-hashes").exit_code == 0


def test_a_dangling_symlink_planted_as_a_temporary_creates_nothing_outside(tmp_path):
    out, target = tmp_path / "out", tmp_path / "elsewhere" / "created.json"
    target.parent.mkdir()
    out.mkdir()
    (out / ".config.json.neoxconv-tmp").symlink_to(target)
    assert cli("merge", COMMITTED_FIXTURE, out, "-q").exit_code == 0
    assert list(target.parent.iterdir()) == []


@pytest.mark.parametrize("temp", [".latest.neoxconv-tmp", "configs/.neox.yml.neoxconv-tmp",
                                  ".tokenizer.json.neoxconv-tmp", ".neoxconv.json.neoxconv-tmp"])
def test_split_never_writes_through_a_symlink_planted_as_its_temporary(hf_single, tmp_path, victim, temp):
    out = tmp_path / "out"
    (out / temp).parent.mkdir(parents=True)
    (out / temp).symlink_to(victim)
    assert cli("split", hf_single, out, "--tp", "2", "--force", "-q").exit_code == 0
    assert victim.read_text() == "precious"
    assert not (out / "latest").is_symlink() and (out / "latest").read_text() == "global_step0"


def test_split_force_never_writes_through_a_symlinked_staging_folder(hf_single, tmp_path):
    """The previous version wrote every .pt into global_step0/.staging.neoxconv-tmp/ and renamed it: a link
    there sent the user's file into OUT. Now a file is written only in a fresh private folder."""
    user = tmp_path / "user"
    user.mkdir()
    (user / "layer_02-model_00-model_states.pt").write_text("the user's file")
    out = tmp_path / "out"
    (out / "global_step0").mkdir(parents=True)
    (out / "global_step0" / ".staging.neoxconv-tmp").symlink_to(user)
    assert cli("split", hf_single, out, "--tp", "2", "--force", "-q").exit_code == 0
    assert (user / "layer_02-model_00-model_states.pt").read_text() == "the user's file"
    assert (out / "global_step0" / ".staging.neoxconv-tmp").is_symlink()  # not ours: left alone
    assert torch.load(out / "global_step0" / "layer_02-model_00-model_states.pt", weights_only=True)
    # our interrupted run's private folders are removed (only our files in them)
    private = out / "global_step0" / ".neoxconv-pt-abc.neoxconv-tmp"
    private.mkdir()
    (private / "layer_02-model_00-model_states.pt").write_text("half")
    assert cli("split", hf_single, out, "--tp", "2", "-q").exit_code == 0
    assert not private.exists()


@pytest.mark.parametrize("where", ["global_step0", "configs"])
def test_a_symlinked_folder_under_out_is_refused_not_followed(hf_single, tmp_path, where):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / where).symlink_to(elsewhere)
    one_line_error(cli("split", hf_single, out, "--tp", "2", "--force"), 6, where, "symlink")
    assert list(elsewhere.iterdir()) == []


def test_a_folder_where_a_file_goes_is_refused(tmp_path):
    out = tmp_path / "out"
    (out / "config.json").mkdir(parents=True)
    (out / "config.json" / "keep.txt").write_text("mine")
    one_line_error(cli("merge", COMMITTED_FIXTURE, out, "--force"), 6, "config.json")
    assert (out / "config.json" / "keep.txt").read_text() == "mine"


def test_demo_refuses_a_non_empty_workdir(tmp_path):
    work = tmp_path / "work"
    (work / "checkpoint").mkdir(parents=True)
    (work / "merged").mkdir()
    (work / "checkpoint" / "notes.txt").write_text("mine")
    before = tree_bytes(work)
    one_line_error(cli("demo", "--workdir", work), 6, str(work), "not empty")
    assert tree_bytes(work) == before
    (tmp_path / "file").write_text("x")
    assert cli("demo", "--workdir", tmp_path / "file").exit_code != 0
    assert (tmp_path / "file").read_text() == "x"


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_reshard_of_a_source_with_nan_or_inf_fails_unless_allowed(make_checkpoint, tmp_path, value):
    src = Path(shutil.copytree(make_checkpoint(2)[0], tmp_path / "src"))
    poison_pt(src / STEP / "layer_02-model_01-model_states.pt", "mlp.dense_h_to_4h.weight", value)
    one_line_error(cli("merge", src, tmp_path / "merged"), 5, "non-finite")
    one_line_error(cli("reshard", src, tmp_path / "out", "--tp", "1"), 5, "non-finite", "--allow-nonfinite")
    result = cli("reshard", src, tmp_path / "out", "--tp", "1", "--allow-nonfinite", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["warnings"]


def _merge_subprocess(src: Path, out: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "neoxconv", "merge", "-q", str(src), str(out)], env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("target", ["dangling", "existing"])
def test_a_symlink_planted_as_the_lock_is_refused_and_nothing_outside_out_is_touched(tmp_path, target):
    # Before: the lock followed the symlink (O_CREAT created the dangling target outside OUT) and then spun
    # for ever, because the file it locked was never the one at OUT/.neoxconv.lock.
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    if target == "existing":
        victim.write_text("precious\n")
    (out / ".neoxconv.lock").symlink_to(victim)
    r = _merge_subprocess(COMMITTED_FIXTURE, out)  # a hang here is the bug: the timeout fails the test
    assert r.returncode == 6, (r.returncode, r.stderr)
    assert ".neoxconv.lock" in r.stderr and "symbolic link" in r.stderr and "internal error" not in r.stderr
    if target == "existing":
        assert victim.read_text() == "precious\n"
    else:
        assert not victim.exists()
    assert sorted(p.name for p in out.iterdir()) == [".neoxconv.lock"]


def test_a_directory_planted_as_the_lock_is_named(tmp_path):
    out = tmp_path / "out"
    (out / ".neoxconv.lock").mkdir(parents=True)
    one_line_error(cli("merge", "-q", COMMITTED_FIXTURE, out), 6, ".neoxconv.lock", "is a directory")


def test_a_stale_lock_file_of_a_dead_pid_is_taken_over(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".neoxconv.lock").write_text("999999999\n")  # a SIGKILLed merge leaves it behind, unlocked
    r = cli("merge", "-q", COMMITTED_FIXTURE, out)
    assert r.exit_code == 0, r.output
    assert not (out / ".neoxconv.lock").exists() and (out / "neoxconv.json").is_file()


def test_a_foreign_non_empty_output_folder_is_refused_unless_forced(make_checkpoint, tmp_path):
    root, _, _ = make_checkpoint(2, "pipeline", "float16")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not empty"):
        merge_checkpoint(root, out, MergeOptions(quiet=True))
    merge_checkpoint(root, out, MergeOptions(quiet=True, force=True))
    assert (out / "notes.txt").read_text() == "mine"  # never deletes what it did not write
    # a neoxconv output of a different source is refused too
    other_root, _, _ = make_checkpoint(1, "pipeline", "float16", config_overrides={"num_layers": 1})
    with pytest.raises(OutputError, match="different source"):
        merge_checkpoint(other_root, out, MergeOptions(quiet=True))
    # forced: the previous output's files go (they were ours), the user's file stays
    merge_checkpoint(other_root, out, MergeOptions(quiet=True, force=True))
    assert sorted(p.name for p in out.glob("model-*")) == [f"model-{i:05d}-of-00004.safetensors" for i in (1, 2, 3, 4)]
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("algo", ["blake3", "sha256"])
def test_manifest_records_the_algorithm_and_every_files_digest(merged_both, algo):
    out = merged_both / algo
    manifest = json.loads((out / "neoxconv.json").read_text())
    assert manifest["hash"] == algo
    entries = {**manifest["layers"], **manifest["files"]}
    assert len(entries) == 8  # 5 layer files, config.json, generation_config.json, the index (no tokenizer here)
    other = {"blake3": "sha256", "sha256": "blake3"}[algo]
    for name, entry in entries.items():
        assert entry[algo] == hash_file(out / name, algo) and other not in entry
    sha = {name: entry["sha256"] for name, entry in entries.items()} if algo == "sha256" else {}
    for name, digest in sha.items():  # what Hub LFS ids are: the plain sha256 of the file
        assert digest == hashlib.sha256((out / name).read_bytes()).hexdigest()
    assert model_files(out) == model_files(merged_both / other)  # same bytes either way


@pytest.mark.parametrize("algo", ["blake3", "sha256"])
def test_tampered_output_is_detected_under_either_hash(merged_both, tmp_path, algo):
    out = tmp_path / "copy"
    shutil.copytree(merged_both / algo, out)
    victim = sorted(out.glob("model-*.safetensors"))[1]
    config = load_out_config(out)
    assert check_output(out, config, hashes=True).hashes_checked
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x04  # same size: only the hash can tell
    victim.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match=f"{victim.name}: {algo} differs from the manifest"):
        check_output(out, config, hashes=True)


def test_old_sha256_manifest_still_verifies(merged_both, tmp_path):
    """A manifest from before BLAKE3: sha256 entries and no "hash" field."""
    out = tmp_path / "old"
    shutil.copytree(merged_both / "sha256", out)
    manifest = json.loads((out / "neoxconv.json").read_text())
    del manifest["hash"]
    (out / "neoxconv.json").write_text(json.dumps(manifest))
    report = check_output(out, load_out_config(out), hashes=True)
    assert report.hashes_checked and report.files_checked >= 6  # 5 layer files and config.json at least
    victim = sorted(out.glob("model-*.safetensors"))[0]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0x01
    victim.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match="sha256 differs"):
        check_output(out, load_out_config(out), hashes=True)


def test_unknown_hash_is_refused():
    result = CliRunner().invoke(main, ["merge", str(COMMITTED_FIXTURE), "x", "--hash", "md5"])
    assert result.exit_code == 2 and "md5" in result.output
    with pytest.raises(ValueError, match="unknown hash 'md5'"):
        merge_checkpoint(COMMITTED_FIXTURE, "x", MergeOptions(hash="md5"))


@pytest.mark.parametrize("before", ["empty", "merged"])
def test_a_directory_in_place_of_the_manifest_is_an_output_error(tmp_path, merged_fixture, before):
    # Before: merge --force unlinked it with Path.unlink -> "internal error: IsADirectoryError".
    out = tmp_path / "out"
    if before == "merged":
        shutil.copytree(merged_fixture, out)
        (out / "neoxconv.json").unlink()
    (out / "neoxconv.json").mkdir(parents=True)
    (out / "neoxconv.json" / "keep.txt").write_text("mine\n")
    one_line_error(cli("merge", "-q", "--force", COMMITTED_FIXTURE, out), 6, out / "neoxconv.json", "directory")
    assert (out / "neoxconv.json" / "keep.txt").read_text() == "mine\n"


def test_an_undecodable_manifest_in_out_makes_it_someone_elses_folder(tmp_path):
    # Before: merge read OUT/neoxconv.json as UTF-8 unguarded -> "internal error: UnicodeDecodeError" (split's
    # reader already treated it as no state); both now share outdir.load_state.
    out = tmp_path / "out"
    out.mkdir()
    (out / "neoxconv.json").write_bytes(b"\xff\xfe{")
    r = cli("merge", "-q", COMMITTED_FIXTURE, out)
    one_line_error(r, 6, "neoxconv.json", "not a neoxconv output", "--force")
    assert (out / "neoxconv.json").read_bytes() == b"\xff\xfe{"


def test_not_enough_disk_is_refused_up_front(tmp_path, monkeypatch):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(OutputError, match="GB is free"):
        merge_checkpoint(COMMITTED_FIXTURE, tmp_path / "out", MergeOptions(quiet=True))
    assert not list((tmp_path / "out").glob("model-*"))


# ----- one merge at a time -------------------------------------------------------------------------------
_HOLD_MERGE_LOCK = textwrap.dedent("""
    import sys
    from neoxconv.output.folder import OutputLock
    with OutputLock(sys.argv[1]):
        print("locked", flush=True)
        sys.stdin.read()
""")


# The first merge, through the real CLI, stops once its first weight file is open (header written, a temporary in
# OUT) until its stdin gets a line: the second merge always meets a merge in progress, on any machine's speed.
_PAUSED_MERGE = textwrap.dedent("""
    import sys
    from neoxconv.output import writer
    from neoxconv.cli import main
    real_enter, paused = writer.SafetensorsWriter.__enter__, []
    def enter(self):
        entered = real_enter(self)
        if not paused:
            paused.append(self.path)
            print("paused", flush=True)
            sys.stdin.readline()
        return entered
    writer.SafetensorsWriter.__enter__ = enter
    main(sys.argv[1:], prog_name="neoxconv")
""")


def test_a_second_merge_into_a_locked_output_is_refused_with_the_holders_pid(src_copy, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_MERGE_LOCK, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = subprocess.run([sys.executable, "-m", "neoxconv", "merge", str(src_copy), str(out), "--quiet"],
                                capture_output=True, text=True, env=subprocess_env())
        assert second.returncode == 6, second.stderr
        assert f"another neoxconv merge (pid {holder.pid}) is writing into this folder" in second.stderr
        assert "Traceback" not in second.stderr
        assert sorted(p.name for p in out.iterdir()) == [".neoxconv.lock"]  # the refused merge wrote nothing
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert not out.joinpath(".neoxconv.lock").exists()  # released and removed
    again = subprocess.run([sys.executable, "-m", "neoxconv", "merge", str(src_copy), str(out), "--quiet"],
                           capture_output=True, text=True, env=subprocess_env())
    assert again.returncode == 0, again.stderr
    assert not out.joinpath(".neoxconv.lock").exists()


def test_two_real_merges_into_one_output(src_copy, tmp_path):
    clean = tmp_path / "clean"
    merge_checkpoint(src_copy, clean, MergeOptions(quiet=True))
    out = tmp_path / "out"
    args = ["merge", str(src_copy), str(out), "--quiet"]
    first = subprocess.Popen([sys.executable, "-c", _PAUSED_MERGE, *args], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        assert first.stdout.readline().strip() == "paused", "the first merge never reached its first weight file"
        assert any(p.name.endswith(".safetensors.neoxconv-tmp") for p in out.iterdir())  # mid-merge
        second = subprocess.run([sys.executable, "-m", "neoxconv", *args], capture_output=True, text=True,
                                env=subprocess_env(), timeout=60)
        assert second.returncode == 6 and f"(pid {first.pid})" in second.stderr, second.stderr
    finally:
        first_out, first_err = first.communicate("go\n", timeout=60)
    assert first.returncode == 0, first_err
    assert folder_bytes(out) == folder_bytes(clean)  # the first merge's output is whole, untouched by the refused one


# ----- output folder safety ------------------------------------------------------------------------------
def test_a_foreign_output_folder_loses_nothing_to_merge(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    mine = {"notes.txt": b"mine", ".draft.neoxconv-tmp": b"my draft", ".neoxconv-tmp": b"also mine"}
    for name, data in mine.items():
        (out / name).write_bytes(data)
    one_line_error(cli("merge", COMMITTED_FIXTURE, out), 6, "not empty", "--force")
    assert folder_bytes(out) == mine  # refused before anything was deleted
    assert cli("merge", COMMITTED_FIXTURE, out, "--force").exit_code == 0
    assert {k: folder_bytes(out)[k] for k in mine} == mine


def test_force_deletes_only_listed_files_named_like_neoxconvs_outputs(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("precious")
    (tmp_path / "outside.txt").write_text("outside")
    (out / "model-00001-of-00009.safetensors.bak").write_text("backup")
    planted = {"tool": "neoxconv", "source": {"step_dir": "/elsewhere"}, "options": {},
               "layers": {"precious.txt": {}, "../outside.txt": {}, "model-00001-of-00009.safetensors.bak": {}},
               "files": {"precious.txt": {}, "/etc/hostname": {}}}
    (out / "neoxconv.json").write_text(json.dumps(planted))
    one_line_error(cli("merge", COMMITTED_FIXTURE, out), 6, "different source", "--force")
    assert cli("merge", COMMITTED_FIXTURE, out, "--force").exit_code == 0
    assert (out / "precious.txt").read_text() == "precious"
    assert (tmp_path / "outside.txt").read_text() == "outside"
    assert (out / "model-00001-of-00009.safetensors.bak").read_text() == "backup"
    assert cli("verify", out, *VERIFY).exit_code == 0


# ----- errors that used to escape as internal errors -----------------------------------------------------
def test_merge_out_is_a_file(tmp_path):
    (tmp_path / "out").write_text("a file")
    one_line_error(cli("merge", COMMITTED_FIXTURE, tmp_path / "out"), 6, "OUT is a file, not a folder")


def test_merge_out_is_a_dangling_symlink(tmp_path):
    (tmp_path / "out").symlink_to(tmp_path / "nowhere")
    one_line_error(cli("merge", COMMITTED_FIXTURE, tmp_path / "out"), 6, "dangling symlink", "nowhere")


def _simulate_read_only(monkeypatch, root: Path) -> None:
    """Nothing can be created under ``root`` (EROFS), whether opened by path or relative to a folder's fd."""

    real_open = os.open

    def read_only(path, flags, *args, dir_fd=None, **kwargs):
        where = str(path) if dir_fd is None else os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
        if where.startswith(str(root)) and flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system", where)
        return real_open(path, flags, *args, dir_fd=dir_fd, **kwargs)

    monkeypatch.setattr(os, "open", read_only)


def test_merge_out_on_a_read_only_filesystem(tmp_path, monkeypatch):
    """Really read-only where the machine lets an unprivileged user namespace mount one; simulated else."""
    ro = tmp_path / "ro"
    ro.mkdir()
    script = (f"mount -t tmpfs -o ro tmpfs {ro} && exec {sys.executable} -m neoxconv merge "
              f"{COMMITTED_FIXTURE} {ro}/out")
    probe = ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o ro tmpfs {ro}"]
    real = shutil.which("unshare") and subprocess.run(probe, capture_output=True).returncode == 0
    if real:
        result = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True,
                                env=subprocess_env())
        assert result.returncode == 6, result.stderr
        assert f"{ro}/out" in result.stderr and "Read-only file system" in result.stderr
        assert "internal error" not in result.stderr
    # simulated: the folder exists, but nothing can be created in it

    (ro / "out").mkdir()
    _simulate_read_only(monkeypatch, ro)
    one_line_error(cli("merge", COMMITTED_FIXTURE, ro / "out"), 6, ro / "out", "Read-only file system")


def test_written_json_is_strict(merged_fixture):
    def refuse(name):
        raise ValueError(f"{name} in a written JSON file")

    for name in ("config.json", "model.safetensors.index.json", "neoxconv.json", "tokenizer_config.json"):
        if (merged_fixture / name).exists():
            json.loads((merged_fixture / name).read_text(), parse_constant=refuse)
    with pytest.raises(ValueError):
        writer.atomic_write_json(merged_fixture.parent / "x.json", {"rotary_emb_base": math.nan})
    assert not (merged_fixture.parent / "x.json").exists()


# ----- one run at a time ---------------------------------------------------------------------------------
_HOLD_NEOX_LOCK = textwrap.dedent("""
    import sys
    from neoxconv.output.folder import OutputLock
    with OutputLock(sys.argv[1], sys.argv[2]):
        print("locked", flush=True)
        sys.stdin.read()
""")


def test_a_second_run_into_a_locked_output_is_refused_with_the_holders_pid(writer_command, tmp_path):
    name, src = writer_command
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_NEOX_LOCK, str(out), name], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = subprocess.run([sys.executable, "-m", "neoxconv", name, str(src), str(out), "--tp", "2", "-q"],
                                capture_output=True, text=True, env=subprocess_env())
        assert second.returncode == 6, second.stderr
        assert f"another neoxconv {name} (pid {holder.pid}) is writing into this folder" in second.stderr
        assert "Traceback" not in second.stderr
        assert sorted(p.name for p in out.iterdir()) == [".neoxconv.lock"]  # the refused run wrote nothing
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert cli(name, src, out, "--tp", "2", "-q").exit_code == 0
    assert not (out / ".neoxconv.lock").exists()  # released and removed


def test_the_lock_is_held_while_files_are_written(writer_command, tmp_path, monkeypatch):
    from neoxconv.output import neox as neox_writer

    name, src = writer_command
    out = tmp_path / "out"
    seen = []
    real = neox_writer.save_pt

    def save_pt(path, obj, **kwargs):
        seen.append((out / ".neoxconv.lock").read_text().split())
        return real(path, obj, **kwargs)

    monkeypatch.setattr(neox_writer, "save_pt", save_pt)
    assert cli(name, src, out, "--tp", "2", "-q").exit_code == 0
    assert seen and all(s == [str(os.getpid()), name] for s in seen)
    assert not (out / ".neoxconv.lock").exists()


# ----- what --force may delete ---------------------------------------------------------------------------
def test_force_deletes_only_listed_files_named_like_our_outputs_and_never_through_a_link(writer_command, tmp_path):
    name, src = writer_command
    out, outside = tmp_path / "out", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    (out / "precious.txt").write_text("precious")
    (out / "configs").mkdir()
    (out / "configs" / "mine.yml").write_text("mine")
    (tmp_path / "outside.txt").write_text("outside")
    (outside / "layer_00-model_00-model_states.pt").write_text("outside, named like ours")
    (out / "global_step9").symlink_to(outside)  # a link named like our step folder, to another folder
    planted = {"tool": "neoxconv", "kind": "neox", "format": 2, "source": {"hf_dir": "/elsewhere"}, "options": {},
               "files": {n: {} for n in ["precious.txt", "../outside.txt", str(tmp_path / "outside.txt"),
                                         "configs/mine.yml", "configs/../precious.txt",
                                         "global_step9/layer_00-model_00-model_states.pt"]}}
    (out / NEOX_MANIFEST).write_text(json.dumps(planted))
    before = {**tree_bytes(out), **tree_bytes(outside)}
    one_line_error(cli(name, src, out, "--tp", "2"), 6, "different source", "--force")
    assert {**tree_bytes(out), **tree_bytes(outside)} == before  # refused before anything was deleted
    assert cli(name, src, out, "--tp", "2", "--force", "-q").exit_code == 0
    assert (out / "precious.txt").read_text() == "precious"
    assert (out / "configs" / "mine.yml").read_text() == "mine"
    assert (tmp_path / "outside.txt").read_text() == "outside"
    assert tree_bytes(outside) == {"layer_00-model_00-model_states.pt": b"outside, named like ours"}
    assert (out / "global_step9").is_symlink()
    assert_manifest_proves(out)


def test_force_over_our_own_output_of_other_options_removes_its_files(hf_sharded, tmp_path):
    out = tmp_path / "out"
    assert cli("split", hf_sharded, out, "--tp", "4", "--step", "7", "-q").exit_code == 0
    (out / "notes.txt").write_text("mine")
    one_line_error(cli("split", hf_sharded, out, "--tp", "2"), 6, "other options", "--no-resume")
    assert cli("split", hf_sharded, out, "--tp", "2", "--force", "-q").exit_code == 0
    assert not (out / "global_step7").exists()  # the old step folder emptied, then removed
    assert sorted(p.name for p in out.iterdir()) == ["configs", "global_step0", "latest", NEOX_MANIFEST, "notes.txt"]


def test_a_link_where_we_write_a_folder_is_refused(hf_sharded, tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "configs").symlink_to(elsewhere)
    one_line_error(cli("split", hf_sharded, out, "--tp", "2", "--force"), 6, "configs", "symlink")
    assert list(elsewhere.iterdir()) == []


# ----- temporaries: only ours, only in an OUT that is ours ----------------------------------------------
def test_a_foreign_output_folder_loses_nothing_to_split_or_reshard(writer_command, tmp_path):
    name, src = writer_command
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / ".draft.neoxconv-tmp").mkdir()  # the old writer rmtree'd this
    (out / ".draft.neoxconv-tmp" / "work.txt").write_text("my work")
    (out / ".neoxconv-tmp").write_text("also mine")
    step = "global_step0" if name == "split" else "global_step150000"
    (out / step / ".staging.neoxconv-tmp").mkdir(parents=True)
    (out / step / ".staging.neoxconv-tmp" / "notes.txt").write_text("in a folder named like our staging")
    (out / step / ".mine.neoxconv-tmp").write_text("mine too")
    mine = tree_bytes(out)
    one_line_error(cli(name, src, out, "--tp", "2"), 6, "not empty", "--force")
    assert tree_bytes(out) == mine  # refused before anything was deleted
    assert cli(name, src, out, "--tp", "2", "--force", "-q").exit_code == 0
    assert {k: v for k, v in tree_bytes(out).items() if k in mine} == mine  # forced: nothing of the user's deleted


def test_our_own_stale_temporaries_are_removed_and_only_those(hf_sharded, tmp_path):
    out = tmp_path / "out"
    assert cli("split", hf_sharded, out, "--tp", "2", "-q").exit_code == 0
    stale = [".latest.neoxconv-tmp", "configs/.neox.yml.neoxconv-tmp",
             "global_step0/.layer_02-model_00-model_states.pt.neoxconv-tmp",
             "global_step0/.staging.neoxconv-tmp/layer_02-model_01-model_states.pt"]
    users = [".notes.neoxconv-tmp", "configs/.mine.yml.neoxconv-tmp", "global_step0/.staging.neoxconv-tmp/notes.txt"]
    for rel in stale + users:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text("x")
    assert cli("split", hf_sharded, out, "--tp", "2", "-q").exit_code == 0
    assert not any((out / rel).exists() for rel in stale)
    assert all((out / rel).read_text() == "x" for rel in users)


# ----- bad surroundings and bad config values ------------------------------------------------------------
def test_split_reshard_out_is_a_file(writer_command, tmp_path):
    name, src = writer_command
    (tmp_path / "out").write_text("a file")
    one_line_error(cli(name, src, tmp_path / "out", "--tp", "2"), 6, "OUT is a file, not a folder")


def test_split_reshard_out_is_a_dangling_symlink(writer_command, tmp_path):
    name, src = writer_command
    (tmp_path / "out").symlink_to(tmp_path / "nowhere")
    one_line_error(cli(name, src, tmp_path / "out", "--tp", "2"), 6, "dangling symlink", "nowhere")


def test_split_reshard_out_on_a_read_only_filesystem(writer_command, tmp_path, monkeypatch):
    """Really read-only where the machine lets an unprivileged user namespace mount one; simulated else."""
    name, src = writer_command
    ro = tmp_path / "ro"
    ro.mkdir()
    probe = ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o ro tmpfs {ro}"]
    if shutil.which("unshare") and subprocess.run(probe, capture_output=True).returncode == 0:
        script = f"mount -t tmpfs -o ro tmpfs {ro} && exec {sys.executable} -m neoxconv {name} {src} {ro}/out --tp 2"
        result = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True,
                                env=subprocess_env())
        assert result.returncode == 6, result.stderr
        assert f"{ro}/out" in result.stderr and "Read-only file system" in result.stderr
        assert "internal error" not in result.stderr
    (ro / "out").mkdir()  # simulated: the folder exists, but nothing can be created in it
    _simulate_read_only(monkeypatch, ro)
    one_line_error(cli(name, src, ro / "out", "--tp", "2"), 6, ro / "out", "Read-only file system")


@pytest.mark.parametrize("command", ["merge", "split"])
def test_a_hard_link_planted_as_the_lock_never_changes_the_file_outside_out(merged_fixture, tmp_path, command):
    """``OUT/.neoxconv.lock`` a hard link to ``victim.txt`` outside OUT (OUT holds nothing else, so it counts as
    empty): `OutputLock` opens it O_RDWR (O_NOFOLLOW stops symlinks only), ``ftruncate``s it and writes
    "PID merge" into it: the victim's contents were replaced, exit 0. The lock should refuse (or unlink and
    recreate) a lock file with ``st_nlink > 1`` before writing to it, so nothing outside OUT changes."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious data\n")
    out = tmp_path / "out"
    out.mkdir()
    os.link(victim, out / ".neoxconv.lock")
    if command == "merge":
        cli("merge", "-q", COMMITTED_FIXTURE, out)
    else:
        cli("split", "-q", merged_fixture, out, "--tp", 1)
    assert victim.read_text() == "precious data\n"


# ----- 5. folder descriptors --------------------------------------------------------------------------------------
def test_no_descriptor_is_left_open_by_runs_that_finish_resume_or_are_refused(tmp_path):
    """Held: merge (written, no-op resume, refused for other options, refused over a foreign folder), split and
    reshard, in-process: /proc/self/fd counts the same after each round."""
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("no /proc/self/fd")
    hf_single = make_hf_folder(tmp_path / "hf", dtype=torch.float16, seed=1)

    def round_() -> list[int]:
        return [cli(*a).exit_code for a in (
            ("merge", "-q", COMMITTED_FIXTURE, tmp_path / "m"),
            ("merge", "-q", COMMITTED_FIXTURE, tmp_path / "m", "--dtype", "fp32"),
            ("merge", "-q", COMMITTED_FIXTURE, tmp_path / "hf"),
            ("split", "-q", hf_single, tmp_path / "s", "--tp", 2),
            ("split", "-q", hf_single, tmp_path / "m", "--tp", 2),
            ("reshard", "-q", tmp_path / "s", tmp_path / "r", "--tp", 1),
        )]

    first = round_()
    assert first[0] == 0 and first[3] == 0 and first[5] == 0 and 0 not in (first[1], first[2], first[4]), first
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        assert round_() == first
    assert len(os.listdir("/proc/self/fd")) == before




