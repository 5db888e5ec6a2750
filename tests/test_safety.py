"""Issue 9, as a user meets it through the CLI: stale resumes, concurrent merges, tampered outputs, foreign
output folders, tiny inputs that ask for huge resources, and errors that must map to their exit codes."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from neoxconv.output import writer
from neoxconv.output.hf_merge import MergeOptions, merge_checkpoint
from neoxconv.check.integrity import check_output
from neoxconv.config import load_out_config

from conftest import COMMITTED_FIXTURE, cli, one_line_error, subprocess_env

STEP = "global_step150000"
VERIFY = ("--ids", "1,2,3", "--max-new-tokens", "2", "--device", "cpu", "--quiet")


def _bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture()
def src(tmp_path):
    shutil.copytree(COMMITTED_FIXTURE, tmp_path / "src")
    return tmp_path / "src"


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    out = tmp_path_factory.mktemp("merged") / "out"
    merge_checkpoint(COMMITTED_FIXTURE, out, MergeOptions(quiet=True))
    return out


@pytest.fixture()
def copy(merged, tmp_path):
    shutil.copytree(merged, tmp_path / "copy")
    return tmp_path / "copy"


# ----- resume after the source changed -------------------------------------------------------------------
def test_resume_redoes_a_layer_file_replaced_by_a_same_size_different_one(src, tmp_path):
    out = tmp_path / "out"
    assert cli("merge", src, out).exit_code == 0
    victim = src / STEP / "layer_03-model_01-model_states.pt"
    before = victim.stat()
    d = torch.load(victim, weights_only=True)
    d["attention.dense.weight"] = d["attention.dense.weight"] * 2  # same keys, shapes, dtype: same size
    torch.save(d, victim)
    os.utime(victim, ns=(before.st_atime_ns, before.st_mtime_ns))  # even with the old mtime (cp -p, rsync -t)
    assert victim.stat().st_size == before.st_size and victim.stat().st_mtime_ns == before.st_mtime_ns

    result = cli("merge", src, out)
    assert result.exit_code == 0, result.output
    assert "1 file(s) written" in result.output and "reused" in result.output  # exactly the layer that changed
    fresh = tmp_path / "fresh"
    assert cli("merge", src, fresh).exit_code == 0
    assert _bytes(out) == _bytes(fresh)  # manifest included
    # and a touched but unchanged file is redone too (mtime is part of the proof), nothing else
    os.utime(src / STEP / "layer_05-model_00-model_states.pt")
    assert "1 file(s) written" in cli("merge", src, out).output


# ----- one merge at a time -------------------------------------------------------------------------------
_HOLD_LOCK = textwrap.dedent("""
    import sys
    from neoxconv.output.folder import OutputLock
    with OutputLock(sys.argv[1]):
        print("locked", flush=True)
        sys.stdin.read()
""")


def test_a_second_merge_into_a_locked_output_is_refused_with_the_holders_pid(src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = subprocess.run([sys.executable, "-m", "neoxconv", "merge", str(src), str(out), "--quiet"],
                                capture_output=True, text=True, env=subprocess_env())
        assert second.returncode == 6, second.stderr
        assert f"another neoxconv merge (pid {holder.pid}) is writing into this folder" in second.stderr
        assert "Traceback" not in second.stderr
        assert sorted(p.name for p in out.iterdir()) == [".neoxconv.lock"]  # the refused merge wrote nothing
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert not out.joinpath(".neoxconv.lock").exists()  # released and removed
    again = subprocess.run([sys.executable, "-m", "neoxconv", "merge", str(src), str(out), "--quiet"],
                           capture_output=True, text=True, env=subprocess_env())
    assert again.returncode == 0, again.stderr
    assert not out.joinpath(".neoxconv.lock").exists()


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


def test_two_real_merges_into_one_output(src, tmp_path):
    clean = tmp_path / "clean"
    merge_checkpoint(src, clean, MergeOptions(quiet=True))
    out = tmp_path / "out"
    args = ["merge", str(src), str(out), "--quiet"]
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
    assert _bytes(out) == _bytes(clean)  # the first merge's output is whole, untouched by the refused one


# ----- tamper evidence -----------------------------------------------------------------------------------
def test_verify_hashes_the_index_an_index_redirected_to_an_added_file_fails(copy):
    index = json.loads((copy / "model.safetensors.index.json").read_text())
    name = "gpt_neox.layers.0.attention.dense.weight"
    victim = index["weight_map"][name]
    from safetensors.torch import load_file, save_file

    tensors = load_file(copy / victim)
    tensors[name] = tensors[name] * 0  # changed weights in an added file
    save_file(tensors, copy / "model-00099-of-00099.safetensors", metadata={"format": "pt"})
    for t in tensors:
        index["weight_map"][t] = "model-00099-of-00099.safetensors"
    redirected = json.dumps(index, indent=2) + "\n"  # same size as before: only a hash can tell
    assert len(redirected) == (copy / "model.safetensors.index.json").stat().st_size
    (copy / "model.safetensors.index.json").write_text(redirected)
    one_line_error(cli("verify", copy, *VERIFY), 7, "model.safetensors.index.json: blake3 differs",
                    "model-00099-of-00099.safetensors, which the manifest does not list")


def test_a_folder_without_manifest_fails_integrity_unless_no_manifest(copy):
    (copy / "neoxconv.json").unlink()
    one_line_error(cli("verify", copy, *VERIFY), 7, "no neoxconv.json", "--no-manifest")
    (copy / ".neoxconv-journal.json").write_text("{}")  # an interrupted merge says so
    one_line_error(cli("verify", copy, *VERIFY), 7, "the merge was interrupted; re-run it")
    (copy / ".neoxconv-journal.json").unlink()
    result = cli("verify", copy, *VERIFY, "--no-manifest")
    assert result.exit_code == 0, result.output
    assert "NOT proven: file contents" in result.output  # the report says what was not proven


def test_small_files_are_hashed_even_above_the_weight_hashing_threshold(copy):
    report = check_output(copy, load_out_config(copy), hashes=False)  # as above the 2 GB threshold
    assert "small files' hashes" in report.summary() and "NOT proven: the" in report.summary()
    text = (copy / "config.json").read_text()  # rotary base 10000 -> 10, the file keeps its size
    (copy / "config.json").write_text(text.replace('"rotary_emb_base": 10000.0', '"rotary_emb_base": 10.0000'))
    one_line_error(cli("verify", copy, *VERIFY, "--no-check-hashes"), 7, "config.json: blake3 differs")


@pytest.mark.parametrize("where", ["check", "write"])
def test_ctrl_c_in_a_no_op_rerun_never_leaves_the_output_without_its_manifest(copy, monkeypatch, where):
    """A Ctrl-C at each point where a no-op re-run can stop (each guard check, each file write)."""
    from neoxconv.interrupt import InterruptGuard

    original = writer._AtomicFile.__enter__ if where == "write" else InterruptGuard.check
    for k in range(1, 12):
        calls = {"n": 0}

        def interrupted(self, *args, _k=k, _original=original):
            calls["n"] += 1
            if calls["n"] == _k:
                raise KeyboardInterrupt
            return _original(self, *args)

        target = (writer._AtomicFile, "__enter__") if where == "write" else (InterruptGuard, "check")
        monkeypatch.setattr(*target, interrupted)
        try:
            merge_checkpoint(COMMITTED_FIXTURE, copy, MergeOptions(quiet=True))
            stopped = False
        except KeyboardInterrupt:
            stopped = True
        monkeypatch.undo()
        assert (copy / "neoxconv.json").is_file(), (where, k)
        check_output(copy, load_out_config(copy), hashes=True)  # the folder still proves itself
        if not stopped:
            break
    assert cli("verify", copy, *VERIFY).exit_code == 0


# ----- output folder safety ------------------------------------------------------------------------------
def test_a_foreign_output_folder_loses_nothing_not_even_files_named_like_our_temporaries(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    mine = {"notes.txt": b"mine", ".draft.neoxconv-tmp": b"my draft", ".neoxconv-tmp": b"also mine"}
    for name, data in mine.items():
        (out / name).write_bytes(data)
    one_line_error(cli("merge", COMMITTED_FIXTURE, out), 6, "not empty", "--force")
    assert _bytes(out) == mine  # refused before anything was deleted
    assert cli("merge", COMMITTED_FIXTURE, out, "--force").exit_code == 0
    assert {k: _bytes(out)[k] for k in mine} == mine


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


# ----- resource bounds -----------------------------------------------------------------------------------
@pytest.mark.parametrize("num_layers, code", [(9000, None), (1_000_000, 3), (100_000_000, 3)])
def test_a_config_with_absurd_num_layers_is_fast_and_its_errors_short(src, num_layers, code):
    yml = src / "configs" / "model.yml"
    yml.write_text(yml.read_text().replace('"num-layers": 2,', f'"num-layers": {num_layers},'))
    t0 = time.perf_counter()
    inspect = cli("inspect", src, "--json")
    merge = cli("merge", src, src.parent / "out")
    assert time.perf_counter() - t0 < 10
    if code is None:  # plausible but wrong: inspect lists a few missing files and a count; merge names a few
        info = json.loads(inspect.stdout)
        assert info["files_missing_count"] == 2 * (num_layers + 3) - 10  # expected files minus the 10 there
        assert len(info["files_missing"]) <= 20
        one_line_error(inspect, 4, f"{info['files_missing_count']} rank file(s) missing", "more")
        line = one_line_error(merge, 4, "missing layer_04-model_00-model_states.pt", "more")
    else:
        one_line_error(inspect, 3, "num_layers", "implausible")
        line = one_line_error(merge, 3, "num_layers", "implausible")
    assert len(line) < 1000


def test_huge_max_position_embeddings_does_not_allocate_huge_rope_tables(src, tmp_path):
    config = {"model_type": "gpt_neox", "num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
              "vocab_size": 512, "intermediate_size": 128, "rotary_pct": 0.5, "max_position_embeddings": 200_000_000,
              "use_parallel_residual": True, "hidden_act": "gelu_fast", "layer_norm_eps": 1e-5}
    (tmp_path / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert cli("merge", src, out, "--config", tmp_path / "config.json").exit_code == 0
    result = subprocess.run([sys.executable, "-m", "neoxconv", "verify", str(out), *VERIFY, "--json"],
                            capture_output=True, text=True, env=subprocess_env())
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["peak_memory_bytes"] < 3 << 30  # the old tables alone: 2e8 x 4 x 4 B x 2 = 6.4 GB
    from neoxconv.runtime.loading import load_model

    model = load_model(out, device="cpu", dtype="fp32").model
    assert model.rotary.cos.shape[0] == 0  # nothing until a position is used
    model(torch.tensor([[1, 2, 3]]))
    assert model.rotary.cos.shape[0] == 4096


# ----- errors that used to escape as internal errors -----------------------------------------------------
def test_out_is_a_file(tmp_path):
    (tmp_path / "out").write_text("a file")
    one_line_error(cli("merge", COMMITTED_FIXTURE, tmp_path / "out"), 6, "OUT is a file, not a folder")


def test_out_is_a_dangling_symlink(tmp_path):
    (tmp_path / "out").symlink_to(tmp_path / "nowhere")
    one_line_error(cli("merge", COMMITTED_FIXTURE, tmp_path / "out"), 6, "dangling symlink", "nowhere")


def test_out_on_a_read_only_filesystem(tmp_path, monkeypatch):
    """Really read-only where the machine lets an unprivileged user namespace mount one; simulated else."""
    ro = tmp_path / "ro"
    ro.mkdir()
    script = (f"mount -t tmpfs -o ro tmpfs {ro} && exec {sys.executable} -m neoxconv merge "
              f"{COMMITTED_FIXTURE} {ro}/out")
    probe = ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o ro tmpfs {ro}"]
    real = shutil.which("unshare") and subprocess.run(probe, capture_output=True).returncode == 0
    if real:
        result = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=subprocess_env())
        assert result.returncode == 6, result.stderr
        assert f"{ro}/out" in result.stderr and "Read-only file system" in result.stderr
        assert "internal error" not in result.stderr
    # simulated: the folder exists, but nothing can be created in it
    import errno

    (ro / "out").mkdir()
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if str(path).startswith(str(ro)) and flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    one_line_error(cli("merge", COMMITTED_FIXTURE, ro / "out"), 6, ro / "out", "Read-only file system")


def _deep(n):
    return "[" * n + "]" * n


@pytest.mark.parametrize("content", [
    '{"model": {}, "added_tokens": ' + _deep(100_000) + "}",
    '{"model": {}, "added_tokens": [1, "x", null]}',
    '{"model": {}, "added_tokens": [{"content": "<|endoftext|>", "id": "zero"}]}',
    '{"model": {}, "added_tokens": [{"content": "<|endoftext|>", "id": 1e400}]}',
    '{"model": {"vocab": {"<|endoftext|>": -1}}}',
    '{"model": "bpe", "added_tokens": {"a": 1}}',
    b'{"model": {"vocab": {"\xff": 0}}}',
    "[]",
], ids=["deep", "not-dicts", "str-id", "inf-id", "negative-id", "odd-types", "not-utf8", "list"])
def test_hostile_tokenizer_json(tmp_path, content):
    tok = tmp_path / "tokenizer.json"
    tok.write_bytes(content if isinstance(content, bytes) else content.encode())
    one_line_error(cli("merge", COMMITTED_FIXTURE, tmp_path / "out", "--tokenizer", tok), 4, tok)


@pytest.mark.parametrize("change, words", [
    ({"num_attention_heads": 0}, ["num_heads must be positive"]),
    ({"layer_norm_eps": float("nan")}, ["layernorm_eps must be positive (and finite)", "nan"]),
    ({"layer_norm_eps": -1e-5}, ["layernorm_eps"]),
    ({"rotary_emb_base": float("inf")}, ["rotary_emb_base", "inf"]),
    ({"rotary_pct": float("nan")}, ["rotary_pct"]),
    ({"hidden_size": -32}, ["hidden_size must be positive"]),
    ({"max_position_embeddings": float("inf")}, ["bad value"]),
    ({"rope_scaling": "linear", "rotary_pct": None}, ["bad value"]),
])
def test_bad_config_values_are_config_errors(tmp_path, merged, change, words):
    config = json.loads((merged / "config.json").read_text())
    config.update(change)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))  # Python writes NaN / Infinity, as a careless tool would
    one_line_error(cli("merge", COMMITTED_FIXTURE, tmp_path / "out", "--config", path), 3, path, *words)
    out = tmp_path / "copy"  # the same config.json inside a merged folder: verify says exit 3 too
    shutil.copytree(merged, out)
    shutil.copy(path, out / "config.json")
    one_line_error(cli("verify", out, *VERIFY), 3, "config.json", *words)


def test_nan_in_a_neox_yaml_is_a_config_error(src):
    yml = src / "configs" / "model.yml"
    yml.write_text(yml.read_text().replace('"layernorm-epsilon": 1e-05,', '"layernorm-epsilon": .nan,'))
    one_line_error(cli("merge", src, src.parent / "out"), 3, "model.yml", "layernorm_eps")


@pytest.mark.parametrize("tolerance", ["nan", "inf", "-1"])
def test_a_non_finite_replica_tolerance_is_a_usage_error(tmp_path, tolerance):
    one_line_error(cli("merge", COMMITTED_FIXTURE, tmp_path / "out", "--replica-tolerance", tolerance), 2,
                    "--replica-tolerance")
    assert not (tmp_path / "out").exists()


def test_written_json_is_strict(merged):
    def refuse(name):
        raise ValueError(f"{name} in a written JSON file")

    for name in ("config.json", "model.safetensors.index.json", "neoxconv.json", "tokenizer_config.json"):
        if (merged / name).exists():
            json.loads((merged / name).read_text(), parse_constant=refuse)
    with pytest.raises(ValueError):
        writer.atomic_write_json(merged.parent / "x.json", {"rotary_emb_base": math.nan})
    assert not (merged.parent / "x.json").exists()


def test_overlapping_safetensors_offsets_are_a_verification_error(copy):
    from neoxconv.source.safetensors import read_safetensors_header

    victim = sorted(copy.glob("model-*.safetensors"))[1]
    raw = victim.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = read_safetensors_header(victim)
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    a, b = header[names[0]], header[names[1]]
    size_b = b["data_offsets"][1] - b["data_offsets"][0]
    b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + size_b]  # b now overlaps a
    new = json.dumps(header, separators=(",", ":")).encode()
    new += b" " * (n - len(new))
    assert len(new) == n
    victim.write_bytes(raw[:8] + new + raw[8 + n:])
    (copy / "neoxconv.json").unlink()  # headers only: the layout check itself must catch it
    one_line_error(cli("verify", copy, *VERIFY, "--no-manifest"), 7, victim.name, "overlaps")


def test_an_output_of_the_previous_manifest_format_is_redone_not_refused(tmp_path):
    """Manifests without per-layer fingerprints (files listed with sizes) prove nothing: every layer is redone."""
    out = tmp_path / "out"
    assert cli("merge", COMMITTED_FIXTURE, out).exit_code == 0
    want = _bytes(out)
    manifest = json.loads((out / "neoxconv.json").read_text())
    manifest["source"]["files"] = [{"name": n, "size": 1} for n in manifest["source"]["files"]]
    for entry in manifest["layers"].values():
        del entry["source_fingerprint"]
    (out / "neoxconv.json").write_text(json.dumps(manifest))
    result = cli("merge", COMMITTED_FIXTURE, out)
    assert result.exit_code == 0, result.output
    assert f"{len(manifest['layers'])} file(s) written" in result.output
    assert _bytes(out) == want
