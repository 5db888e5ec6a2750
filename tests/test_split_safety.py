"""Issue 9's output-folder guarantees for `split` and `reshard`, as a user meets them through the CLI: a lock on
OUT, ownership decided before deleting anything, only our own names deleted (never through a link or outside
OUT), resume after the source changed, Ctrl-C in a no-op re-run, bad surroundings and bad config values."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from neoxconv.output import writer
from neoxconv.output.hashing import hash_file, recorded_hash

from conftest import cli, one_line_error, subprocess_env
from test_split import _make_hf

MANIFEST = "neoxconv.json"


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _assert_manifest_proves(out: Path) -> None:
    """The manifest is there and every file it lists hashes as recorded (what tamper evidence relies on)."""
    state = json.loads((out / MANIFEST).read_text())
    assert state["files"] and state["layers"]
    for name, entry in {**state["layers"], **state["files"]}.items():
        algo, digest = recorded_hash(entry)
        assert hash_file(out / name, algo) == digest, name


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A sharded Hugging Face folder (several safetensors files), made by save_pretrained."""
    return _make_hf(tmp_path_factory.mktemp("hf"), seed=3, max_shard_size="100KB")


@pytest.fixture()
def hf_copy(hf, tmp_path):
    return Path(shutil.copytree(hf, tmp_path / "hf", copy_function=shutil.copy2))


@pytest.fixture(params=["split", "reshard"])
def command(request, hf, make_checkpoint):
    """(command name, source) for both writers of NeoX checkpoints."""
    if request.param == "split":
        return "split", hf
    return "reshard", make_checkpoint(2, "pipeline", "float16")[0]


# ----- one run at a time ---------------------------------------------------------------------------------
_HOLD_LOCK = textwrap.dedent("""
    import sys
    from neoxconv.output.folder import OutputLock
    with OutputLock(sys.argv[1], sys.argv[2]):
        print("locked", flush=True)
        sys.stdin.read()
""")


def test_a_second_run_into_a_locked_output_is_refused_with_the_holders_pid(command, tmp_path):
    name, src = command
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(out), name], stdin=subprocess.PIPE,
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


def test_the_lock_is_held_while_files_are_written(command, tmp_path, monkeypatch):
    from neoxconv.output import neox as neox_writer

    name, src = command
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
def test_force_deletes_only_listed_files_named_like_our_outputs_and_never_through_a_link(command, tmp_path):
    name, src = command
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
    (out / MANIFEST).write_text(json.dumps(planted))
    before = {**_tree(out), **_tree(outside)}
    one_line_error(cli(name, src, out, "--tp", "2"), 6, "different source", "--force")
    assert {**_tree(out), **_tree(outside)} == before  # refused before anything was deleted
    assert cli(name, src, out, "--tp", "2", "--force", "-q").exit_code == 0
    assert (out / "precious.txt").read_text() == "precious"
    assert (out / "configs" / "mine.yml").read_text() == "mine"
    assert (tmp_path / "outside.txt").read_text() == "outside"
    assert _tree(outside) == {"layer_00-model_00-model_states.pt": b"outside, named like ours"}
    assert (out / "global_step9").is_symlink()
    _assert_manifest_proves(out)


def test_force_over_our_own_output_of_other_options_removes_its_files(hf, tmp_path):
    out = tmp_path / "out"
    assert cli("split", hf, out, "--tp", "4", "--step", "7", "-q").exit_code == 0
    (out / "notes.txt").write_text("mine")
    one_line_error(cli("split", hf, out, "--tp", "2"), 6, "other options", "--no-resume")
    assert cli("split", hf, out, "--tp", "2", "--force", "-q").exit_code == 0
    assert not (out / "global_step7").exists()  # the old step folder emptied, then removed
    assert sorted(p.name for p in out.iterdir()) == ["configs", "global_step0", "latest", MANIFEST, "notes.txt"]


def test_a_link_where_we_write_a_folder_is_refused(hf, tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "configs").symlink_to(elsewhere)
    one_line_error(cli("split", hf, out, "--tp", "2", "--force"), 6, "configs", "symlink")
    assert list(elsewhere.iterdir()) == []


# ----- temporaries: only ours, only in an OUT that is ours ----------------------------------------------
def test_a_foreign_output_folder_loses_nothing_not_even_files_named_like_our_temporaries(command, tmp_path):
    name, src = command
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
    mine = _tree(out)
    one_line_error(cli(name, src, out, "--tp", "2"), 6, "not empty", "--force")
    assert _tree(out) == mine  # refused before anything was deleted
    assert cli(name, src, out, "--tp", "2", "--force", "-q").exit_code == 0
    assert {k: v for k, v in _tree(out).items() if k in mine} == mine  # forced: nothing of the user's deleted


def test_our_own_stale_temporaries_are_removed_and_only_those(hf, tmp_path):
    out = tmp_path / "out"
    assert cli("split", hf, out, "--tp", "2", "-q").exit_code == 0
    stale = [".latest.neoxconv-tmp", "configs/.neox.yml.neoxconv-tmp",
             "global_step0/.layer_02-model_00-model_states.pt.neoxconv-tmp",
             "global_step0/.staging.neoxconv-tmp/layer_02-model_01-model_states.pt"]
    users = [".notes.neoxconv-tmp", "configs/.mine.yml.neoxconv-tmp", "global_step0/.staging.neoxconv-tmp/notes.txt"]
    for rel in stale + users:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text("x")
    assert cli("split", hf, out, "--tp", "2", "-q").exit_code == 0
    assert not any((out / rel).exists() for rel in stale)
    assert all((out / rel).read_text() == "x" for rel in users)


# ----- resume after the source changed -------------------------------------------------------------------
def _source_layer(hf_name: str) -> int:
    """The NeoX source layer of a Hugging Face tensor in a 2-layer model (embedding 0, blocks 2-3, norm 5, readout 6)."""
    if hf_name.startswith("gpt_neox.layers."):
        return int(hf_name.split(".")[2]) + 2
    return {"gpt_neox.embed_in.weight": 0, "embed_out.weight": 6}.get(hf_name, 5)


def test_split_resume_redoes_what_a_same_size_replaced_safetensors_file_feeds(hf_copy, tmp_path):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "out"
    assert cli("split", hf_copy, out, "--tp", "2", "-q").exit_code == 0
    # the shard holding layer 1's MLP output weight (and maybe a few other tensors)
    index = json.loads((hf_copy / "model.safetensors.index.json").read_text())["weight_map"]
    shard = index["gpt_neox.layers.1.mlp.dense_4h_to_h.weight"]
    victim = hf_copy / shard
    before = victim.stat()
    tensors = load_file(str(victim))
    save_file({k: v * 2 for k, v in tensors.items()}, str(victim), metadata={"format": "pt"})
    os.utime(victim, ns=(before.st_atime_ns, before.st_mtime_ns))  # even with the old mtime (cp -p, rsync -t)
    assert victim.stat().st_size == before.st_size and victim.stat().st_mtime_ns == before.st_mtime_ns
    result = cli("split", hf_copy, out, "--tp", "2", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    layers = {_source_layer(n) for n in tensors}
    assert 0 < report["files_written"] < 10 and report["files_written"] == 2 * len(layers)  # those layers only
    fresh = tmp_path / "fresh"
    assert cli("split", hf_copy, fresh, "--tp", "2", "-q").exit_code == 0
    assert _tree(out) == _tree(fresh)  # byte-identical to a fresh split, manifest included


def test_reshard_resume_redoes_a_layer_file_replaced_by_a_same_size_different_one(make_checkpoint, tmp_path):
    root = tmp_path / "src"
    shutil.copytree(make_checkpoint(2, "pipeline", "float16")[0], root)
    out = tmp_path / "out"
    assert cli("reshard", root, out, "--tp", "1", "-q").exit_code == 0
    victim = next(root.glob("global_step*/layer_03-model_01-model_states.pt"))
    before = victim.stat()
    d = torch.load(victim, weights_only=True)
    d["attention.dense.weight"] = d["attention.dense.weight"] * 2  # same keys, shapes, dtype: same size
    torch.save(d, victim)
    os.utime(victim, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert victim.stat().st_size == before.st_size
    result = cli("reshard", root, out, "--tp", "1", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["files_written"] == 1  # layer 3's one rank file
    fresh = tmp_path / "fresh"
    assert cli("reshard", root, fresh, "--tp", "1", "-q").exit_code == 0
    assert _tree(out) == _tree(fresh)


def test_an_output_of_the_previous_manifest_format_is_redone_not_refused(hf, tmp_path):
    out = tmp_path / "out"
    assert cli("split", hf, out, "--tp", "2", "-q").exit_code == 0
    state = json.loads((out / MANIFEST).read_text())
    files = sorted({p for p in hf.glob("*.safetensors")} | {hf / "config.json"})
    state.pop("format")
    state["source"] = {"files": [{"path": str(p.resolve()), "size": p.stat().st_size} for p in files]}
    for entry in state["files"].values():
        entry.pop("source_fingerprint", None)
    (out / MANIFEST).write_text(json.dumps(state))
    result = cli("split", hf, out, "--tp", "2", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["files_written"] == 10  # nothing of it can be proven: all redone
    _assert_manifest_proves(out)


# ----- Ctrl-C in a no-op re-run --------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["check", "write"])
def test_ctrl_c_in_a_no_op_rerun_never_leaves_the_output_without_its_manifest(command, tmp_path, monkeypatch,
                                                                              where):
    """A Ctrl-C at each point where a no-op re-run can stop (each guard check, each file write)."""
    from neoxconv.interrupt import InterruptGuard

    name, src = command
    out = tmp_path / "out"
    assert cli(name, src, out, "--tp", "2", "-q").exit_code == 0
    target = (writer._AtomicFile, "__enter__") if where == "write" else (InterruptGuard, "check")
    original = getattr(*target)
    for k in range(1, 40):
        calls = {"n": 0}

        def interrupted(self, *args, _k=k):
            calls["n"] += 1
            if calls["n"] == _k:
                raise KeyboardInterrupt
            return original(self, *args)

        monkeypatch.setattr(*target, interrupted)
        result = cli(name, src, out, "--tp", "2", "-q")
        monkeypatch.undo()
        assert result.exit_code in (0, 130), result.output
        _assert_manifest_proves(out)
        if result.exit_code == 0:
            break
    else:
        pytest.fail("the re-run never finished")
    assert k > 1  # it was interrupted at least once


# ----- bad surroundings and bad config values ------------------------------------------------------------
def test_out_is_a_file(command, tmp_path):
    name, src = command
    (tmp_path / "out").write_text("a file")
    one_line_error(cli(name, src, tmp_path / "out", "--tp", "2"), 6, "OUT is a file, not a folder")


def test_out_is_a_dangling_symlink(command, tmp_path):
    name, src = command
    (tmp_path / "out").symlink_to(tmp_path / "nowhere")
    one_line_error(cli(name, src, tmp_path / "out", "--tp", "2"), 6, "dangling symlink", "nowhere")


def test_out_on_a_read_only_filesystem(command, tmp_path, monkeypatch):
    """Really read-only where the machine lets an unprivileged user namespace mount one; simulated else."""
    name, src = command
    ro = tmp_path / "ro"
    ro.mkdir()
    probe = ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o ro tmpfs {ro}"]
    if shutil.which("unshare") and subprocess.run(probe, capture_output=True).returncode == 0:
        script = f"mount -t tmpfs -o ro tmpfs {ro} && exec {sys.executable} -m neoxconv {name} {src} {ro}/out --tp 2"
        result = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=subprocess_env())
        assert result.returncode == 6, result.stderr
        assert f"{ro}/out" in result.stderr and "Read-only file system" in result.stderr
        assert "internal error" not in result.stderr
    (ro / "out").mkdir()  # simulated: the folder exists, but nothing can be created in it
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if str(path).startswith(str(ro)) and flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    one_line_error(cli(name, src, ro / "out", "--tp", "2"), 6, ro / "out", "Read-only file system")


@pytest.mark.parametrize("change, words", [
    ({"layer_norm_eps": float("nan")}, ["layernorm_eps must be positive (and finite)", "nan"]),
    ({"layer_norm_eps": -1e-5}, ["layernorm_eps"]),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": float("inf"), "partial_rotary_factor": 0.25}},
     ["rotary_emb_base", "inf"]),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": float("nan")}},
     ["rotary_pct"]),
    ({"hidden_size": -64}, ["hidden_size must be positive"]),
    ({"max_position_embeddings": float("inf")}, ["bad value"]),
    ({"num_attention_heads": 0}, ["num_heads must be positive"]),
])
def test_bad_hf_config_values_are_config_errors(hf, tmp_path, change, words):
    src = Path(shutil.copytree(hf, tmp_path / "hf"))
    config = json.loads((src / "config.json").read_text())
    config.update(change)
    (src / "config.json").write_text(json.dumps(config))  # Python writes NaN / Infinity, as a careless tool would
    one_line_error(cli("split", src, tmp_path / "out", "--tp", "2"), 3, src / "config.json", *words)
    assert not (tmp_path / "out").exists()
