"""Resume and re-run for merge, split and reshard: what is reused, what is redone and why; the journal,
Ctrl-C, SIGKILL, disk full and outputs of older manifest formats."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from neoxconv.check.integrity import check_output
from neoxconv.cli import main
from neoxconv.config import load_out_config
from neoxconv.errors import OutputError
from neoxconv.output import writer
from neoxconv.output.hashing import hash_file
from neoxconv.output.hf_merge import MergeOptions, merge_checkpoint
from neoxconv.tools.synthetic import SyntheticSpec, tiny_config, write_checkpoint

from conftest import (
    COMMITTED_FIXTURE,
    NEOX_MANIFEST,
    STEP,
    VERIFY,
    all_bytes,
    assert_manifest_proves,
    cli,
    folder_bytes,
    make_hf_folder,
    model_files,
    one_line_error,
    poison_pt,
    tree_bytes,
)

transformers = pytest.importorskip("transformers")


def test_resume_keeps_good_layers_and_redoes_damaged_ones(make_checkpoint, tmp_path):
    root, _, _ = make_checkpoint(2, "pipeline", "float16")
    out = tmp_path / "out"
    merge_checkpoint(root, out, MergeOptions(quiet=True))
    want = all_bytes(out)
    # simulate an interrupted run: manifest and index not yet written, one layer missing, one damaged
    files = sorted(out.glob("model-*.safetensors"))
    manifest = json.loads((out / "neoxconv.json").read_text())
    (out / ".neoxconv-journal.json").write_text(json.dumps(manifest))
    for name in ("neoxconv.json", "model.safetensors.index.json"):
        (out / name).unlink()
    files[1].unlink()
    files[2].write_bytes(files[2].read_bytes()[:-7] + b"garbage")
    (out / f".{files[3].name}.neoxconv-tmp").write_bytes(b"half-written")
    report = merge_checkpoint(root, out, MergeOptions(quiet=True))
    assert (report.files_written, report.files_reused) == (2, len(files) - 2)
    assert all_bytes(out) == want


def test_rerun_over_a_complete_output_reuses_everything(make_checkpoint, tmp_path):
    root, _, _ = make_checkpoint(2, "pipeline", "float16")
    merge_checkpoint(root, tmp_path / "out", MergeOptions(quiet=True))
    report = merge_checkpoint(root, tmp_path / "out", MergeOptions(quiet=True))
    assert report.files_written == 0
    assert merge_checkpoint(root, tmp_path / "out", MergeOptions(quiet=True, resume=False)).files_reused == 0


def _force_crc32(data: bytearray, offset: int, target: int) -> None:
    """Change data[offset:offset+4] so that zlib.crc32(data) == target (GF(2) arithmetic, as forcecrc32)."""
    poly = 0x104C11DB7

    def rev(x: int) -> int:
        return int(f"{x:032b}"[::-1], 2)

    def mul(x: int, y: int) -> int:
        z = 0
        while y:
            z ^= x * (y & 1)
            y >>= 1
            x <<= 1
            if x >> 32 & 1:
                x ^= poly
        return z

    def power(x: int, y: int) -> int:
        z = 1
        while y:
            if y & 1:
                z = mul(z, x)
            x = mul(x, x)
            y >>= 1
        return z

    def divmod2(x: int, y: int) -> tuple[int, int]:
        q, deg = 0, y.bit_length() - 1
        for i in range(x.bit_length() - 1 - deg, -1, -1):
            if x >> (i + deg) & 1:
                x ^= y << i
                q |= 1 << i
        return q, x

    def inverse(y: int) -> int:
        x, a, b = poly, 0, 1
        while y:
            q, r = divmod2(x, y)
            x, y, a, b = y, r, b, a ^ mul(q, b)
        return a

    delta = rev(zlib.crc32(bytes(data))) ^ rev(target)
    delta = rev(mul(inverse(power(2, (len(data) - offset) * 8)), delta))
    for i in range(4):
        data[offset + i] ^= delta >> (8 * i) & 0xFF


def _collide(path: Path) -> None:
    """Change a storage's bytes in place keeping its CRC-32, size and mtime: only the ctime tells."""
    st = path.stat()
    with zipfile.ZipFile(path) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)  # a weight
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        start = info.header_offset + 30 + name_len + extra_len
        f.seek(start)
        data = bytearray(f.read(info.file_size))
        original = bytes(data)
        for i in range(9, 24, 2):
            data[i] ^= 0x80  # negates 8 fp16 values
        for offset in range(32, 256, 4):  # 4 bytes forced to restore the CRC: two fp16 values that stay finite
            forged = bytearray(data)
            _force_crc32(forged, offset, info.CRC)
            if np.isfinite(np.frombuffer(bytes(forged[offset:offset + 4]), np.float16)).all():
                break
        data = forged
        assert zlib.crc32(bytes(data)) == info.CRC and bytes(data) != original
        f.seek(start)
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def test_merge_resume_without_allow_nonfinite_redoes_the_nan_layer_and_fails(make_checkpoint, tmp_path):
    src = Path(shutil.copytree(make_checkpoint(2)[0], tmp_path / "src"))
    poison_pt(src / STEP / "layer_03-model_00-model_states.pt", "attention.query_key_value.weight", float("nan"))
    out = tmp_path / "out"
    first = cli("merge", src, out, "--allow-nonfinite", "--json")
    assert first.exit_code == 0 and any("non-finite" in w for w in json.loads(first.stdout)["warnings"])
    again = cli("merge", src, out, "--allow-nonfinite", "--json")  # allowed again: kept, warning kept
    assert json.loads(again.stdout)["files_written"] == 0
    assert any("non-finite" in w for w in json.loads((out / "neoxconv.json").read_text())["warnings"])
    one_line_error(cli("merge", src, out), 5, "non-finite", "--allow-nonfinite")  # as a fresh merge
    one_line_error(cli("merge", src, tmp_path / "fresh"), 5, "non-finite", "--allow-nonfinite")


def test_merge_resume_with_a_lower_replica_tolerance_redoes_the_layer_and_fails(make_checkpoint, tmp_path):
    src = Path(shutil.copytree(make_checkpoint(2)[0], tmp_path / "src"))
    path = src / STEP / "layer_05-model_01-model_states.pt"
    d = torch.load(path, weights_only=True)
    d["norm.weight"].add_(0.5)
    torch.save(d, path)
    out = tmp_path / "out"
    assert cli("merge", src, out, "--replica-tolerance", "1", "-q").exit_code == 0
    result = cli("merge", src, out, "--replica-tolerance", "0.6", "--json")  # still within: kept
    assert result.exit_code == 0 and json.loads(result.stdout)["files_written"] == 0
    one_line_error(cli("merge", src, out), 5, "norm.weight", "--replica-tolerance")


def test_merge_resume_after_the_config_changed_redoes_every_layer(tmp_path):
    out = tmp_path / "out"
    assert cli("merge", COMMITTED_FIXTURE, out, "-q").exit_code == 0
    yml = next((COMMITTED_FIXTURE / "configs").glob("*.yml"))
    fixed = tmp_path / "fixed.yml"  # a setting fixed after the first merge (for a Llama-style model a head
    text = yml.read_text()  # count changes how QKV rows are merged): every layer is redone
    assert '"layernorm-epsilon": 1e-05' in text
    fixed.write_text(text.replace('"layernorm-epsilon": 1e-05', '"layernorm-epsilon": 1e-06'))
    result = cli("merge", COMMITTED_FIXTURE, out, "--config", fixed, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["files_written"] == 5
    assert json.loads((out / "config.json").read_text())["layer_norm_eps"] == 1e-06
    again = cli("merge", COMMITTED_FIXTURE, out, "--config", fixed, "--json")
    assert json.loads(again.stdout)["files_written"] == 0


@pytest.mark.parametrize("command", ["merge", "reshard"])
def test_resume_after_a_crc32_collision_with_the_mtime_restored_redoes_the_layer(make_checkpoint, tmp_path, command):
    src = Path(shutil.copytree(make_checkpoint(2)[0], tmp_path / "src"))
    args = ["--tp", "1"] if command == "reshard" else []
    out = tmp_path / "out"
    assert cli(command, src, out, *args, "-q").exit_code == 0
    _collide(src / STEP / "layer_03-model_01-model_states.pt")
    result = cli(command, src, out, *args, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["files_written"] >= 1
    fresh = tmp_path / "fresh"
    assert cli(command, src, fresh, *args, "-q").exit_code == 0
    assert {k: v for k, v in tree_bytes(out).items() if k != "neoxconv.json"} == \
        {k: v for k, v in tree_bytes(fresh).items() if k != "neoxconv.json"}


def test_split_resume_redoes_a_file_of_a_config_changed_in_place(hf_single, tmp_path):
    src = Path(shutil.copytree(hf_single, tmp_path / "hf"))
    out = tmp_path / "out"
    assert cli("split", src, out, "--tp", "2", "-q").exit_code == 0
    cfg = json.loads((src / "config.json").read_text())
    cfg["layer_norm_eps"] = 1e-3  # what the model computes, not any weight
    (src / "config.json").write_text(json.dumps(cfg))
    result = cli("split", src, out, "--tp", "2", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["files_written"] == 10
    yml = (out / "configs" / "neox.yml").read_text()
    assert "1.0e-03" in yml or "0.001" in yml


# ----- split / reshard as strict as merge on values ---------------------------------------------------------
def test_split_fp16_overflow_fails_unless_allowed_and_a_resume_does_not_keep_it(tmp_path):
    src = make_hf_folder(tmp_path / "hf", dtype=torch.float32, seed=6)
    from safetensors.torch import load_file, save_file

    f = next(src.glob("*.safetensors"))
    tensors = load_file(str(f))
    tensors["gpt_neox.layers.1.mlp.dense_4h_to_h.weight"][0, 0] = 1e6  # no fp16 holds it
    save_file(tensors, str(f), metadata={"format": "pt"})
    out = tmp_path / "out"
    one_line_error(cli("split", src, out, "--tp", "2", "--dtype", "fp16"), 5, "non-finite", "float16",
                   "mlp.linear2.weight", "--allow-nonfinite")
    result = cli("split", src, out, "--tp", "2", "--dtype", "fp16", "--allow-nonfinite", "--json")
    assert result.exit_code == 0, result.output
    assert any("non-finite" in w for w in json.loads(result.stdout)["warnings"])
    one_line_error(cli("split", src, out, "--tp", "2", "--dtype", "fp16"), 5, "non-finite", "--allow-nonfinite")
    assert cli("split", src, tmp_path / "fp32", "--tp", "2", "-q").exit_code == 0  # fp32 holds it


# ----- folders of the previous version still resume -----------------------------------------------------------
def test_a_split_output_with_the_previous_manifest_name_resumes(hf_single, tmp_path):
    out = tmp_path / "out"
    assert cli("split", hf_single, out, "--tp", "2", "-q").exit_code == 0
    state = json.loads((out / "neoxconv.json").read_text())  # rewritten as the previous version wrote it
    files = {**state.pop("layers"), **state["files"]}
    state.update(format=2, files={n: {"sha256": __import__("hashlib").sha256((out / n).read_bytes()).hexdigest(),
                                      "size": e["size"], **({"source_fingerprint": e["source_fingerprint"]}
                                                            if "source_fingerprint" in e else {})}
                                  for n, e in files.items()})
    (out / "neoxconv.json").unlink()
    (out / "neoxconv-neox.json").write_text(json.dumps(state))
    result = cli("split", hf_single, out, "--tp", "2", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["files_reused"] == 10
    assert not (out / "neoxconv-neox.json").exists() and (out / "neoxconv.json").is_file()


def test_resume_under_another_hash_reuses_layers_and_rehashes_them(merged_both, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(merged_both / "sha256", out)
    before = model_files(out)
    report = merge_checkpoint(COMMITTED_FIXTURE, out, MergeOptions(quiet=True))  # default: blake3
    assert report.files_reused == len(before) and report.files_written == 0
    manifest = json.loads((out / "neoxconv.json").read_text())
    assert manifest["hash"] == "blake3"
    for name, entry in {**manifest["layers"], **manifest["files"]}.items():
        assert entry["blake3"] == hash_file(out / name, "blake3") and "sha256" not in entry
    assert model_files(out) == before


def _big_checkpoint(tmp_path_factory):
    from neoxconv.tools.synthetic import SyntheticSpec, tiny_config, write_checkpoint

    root = tmp_path_factory.mktemp("big")
    write_checkpoint(root, SyntheticSpec(tiny_config(hidden_size=256, num_heads=8, num_layers=6), tp_degree=2))
    return root


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    root = _big_checkpoint(tmp_path_factory)
    out = tmp_path_factory.mktemp("bigclean") / "out"
    merge_checkpoint(root, out, MergeOptions(quiet=True))
    return root, folder_bytes(out)


def _merge_cmd(src, out):
    return [sys.executable, "-m", "neoxconv", "merge", str(src), str(out), "--quiet"]


def _wait_for(out, condition, proc, timeout=60):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            return False
        try:
            if condition(out):
                return True
        except (OSError, ValueError):
            pass
        time.sleep(0.0005)
    return False


def _journal_layers(out):
    p = out / ".neoxconv-journal.json"
    return len(json.loads(p.read_text())["layers"]) if p.is_file() else 0


KILL_POINTS = {
    "folder_created": lambda out: out.is_dir(),
    "mid_layer": lambda out: any(p.name.endswith(".neoxconv-tmp") for p in out.iterdir()),
    "after_two_layers": lambda out: _journal_layers(out) >= 2,
    "late": lambda out: _journal_layers(out) >= 7,
}


def test_disk_full_mid_merge_is_clear_and_resumable(tmp_path, monkeypatch, clean_merge):
    src, clean = clean_merge
    real_enter = writer._AtomicFile.__enter__
    opened = []

    class FullDisk:
        """The temp file of the third layer: the device fills up after 100 bytes."""

        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, data):
            self.n += len(data)
            if self.n > 100:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

    def enter(self):
        real_enter(self)
        if self.path.name.startswith("model-"):
            opened.append(self.path.name)
            if len(opened) == 3:
                self._f = FullDisk(self._f)
        return self

    monkeypatch.setattr(writer._AtomicFile, "__enter__", enter)
    with pytest.raises(OutputError, match="no space left.*re-run"):
        merge_checkpoint(src, tmp_path / "out", MergeOptions(quiet=True))
    monkeypatch.undo()
    assert not list((tmp_path / "out").glob(".*neoxconv-tmp"))
    report = merge_checkpoint(src, tmp_path / "out", MergeOptions(quiet=True))
    assert report.files_reused >= 1
    assert folder_bytes(tmp_path / "out") == clean


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_at_any_point_then_rerun_is_byte_identical(tmp_path, big, point):
    src, clean = big
    out = tmp_path / "out"
    proc = subprocess.Popen(_merge_cmd(src, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for(out, KILL_POINTS[point], proc)
    proc.kill()
    proc.wait()
    if out.is_dir():  # every file under a final name is complete
        for p in out.glob("model-*.safetensors"):
            assert p.read_bytes() == clean[p.name], p.name
        if (out / "model.safetensors.index.json").exists():
            assert (out / "model.safetensors.index.json").read_bytes() == clean["model.safetensors.index.json"]
    rerun = subprocess.run(_merge_cmd(src, out), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert folder_bytes(out) == clean


def test_ctrl_c_stops_cleanly_and_says_how_to_resume(tmp_path, big):
    src, clean = big
    out = tmp_path / "out"
    proc = subprocess.Popen(_merge_cmd(src, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not _wait_for(out, KILL_POINTS["mid_layer"], proc):
        pytest.skip("the merge finished before it could be interrupted")
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "re-run the same command to resume" in stderr and "Traceback" not in stderr
    assert not list(out.glob(".*neoxconv-tmp"))
    subprocess.run(_merge_cmd(src, out), check=True, capture_output=True)
    assert folder_bytes(out) == clean


# ----- resume after the source changed -------------------------------------------------------------------
def test_resume_redoes_a_layer_file_replaced_by_a_same_size_different_one(src_copy, tmp_path):
    out = tmp_path / "out"
    assert cli("merge", src_copy, out).exit_code == 0
    victim = src_copy / STEP / "layer_03-model_01-model_states.pt"
    before = victim.stat()
    d = torch.load(victim, weights_only=True)
    d["attention.dense.weight"] = d["attention.dense.weight"] * 2  # same keys, shapes, dtype: same size
    torch.save(d, victim)
    os.utime(victim, ns=(before.st_atime_ns, before.st_mtime_ns))  # even with the old mtime (cp -p, rsync -t)
    assert victim.stat().st_size == before.st_size and victim.stat().st_mtime_ns == before.st_mtime_ns

    result = cli("merge", src_copy, out)
    assert result.exit_code == 0, result.output
    assert "1 file(s) written" in result.output and "reused" in result.output  # exactly the layer that changed
    fresh = tmp_path / "fresh"
    assert cli("merge", src_copy, fresh).exit_code == 0
    assert folder_bytes(out) == folder_bytes(fresh)  # manifest included
    # and a touched but unchanged file is redone too (mtime is part of the proof), nothing else
    os.utime(src_copy / STEP / "layer_05-model_00-model_states.pt")
    assert "1 file(s) written" in cli("merge", src_copy, out).output


@pytest.mark.parametrize("where", ["check", "write"])
def test_ctrl_c_in_a_no_op_merge_rerun_never_leaves_the_output_without_its_manifest(merged_fixture_copy, monkeypatch,
                                                                                    where):
    """A Ctrl-C at each point where a no-op re-run can stop (each guard check, each file write)."""
    from neoxconv.interrupt import InterruptGuard

    original = writer._AtomicFile.__enter__ if where == "write" else InterruptGuard.check
    for k in range(1, 12):
        calls = {"n": 0}

        def interrupted(self, *args, _k=k, _original=original, _calls=calls):
            _calls["n"] += 1
            if _calls["n"] == _k:
                raise KeyboardInterrupt
            return _original(self, *args)

        target = (writer._AtomicFile, "__enter__") if where == "write" else (InterruptGuard, "check")
        monkeypatch.setattr(*target, interrupted)
        try:
            merge_checkpoint(COMMITTED_FIXTURE, merged_fixture_copy, MergeOptions(quiet=True))
            stopped = False
        except KeyboardInterrupt:
            stopped = True
        monkeypatch.undo()
        assert (merged_fixture_copy / "neoxconv.json").is_file(), (where, k)
        check_output(merged_fixture_copy, load_out_config(merged_fixture_copy),
                     hashes=True)  # the folder still proves itself
        if not stopped:
            break
    assert cli("verify", merged_fixture_copy, *VERIFY).exit_code == 0


def test_a_merge_output_of_the_previous_manifest_format_is_redone_not_refused(tmp_path):
    """Manifests without per-layer fingerprints (files listed with sizes) prove nothing: every layer is redone."""
    out = tmp_path / "out"
    assert cli("merge", COMMITTED_FIXTURE, out).exit_code == 0
    want = folder_bytes(out)
    manifest = json.loads((out / "neoxconv.json").read_text())
    manifest["source"]["files"] = [{"name": n, "size": 1} for n in manifest["source"]["files"]]
    for entry in manifest["layers"].values():
        del entry["source_fingerprint"]
    (out / "neoxconv.json").write_text(json.dumps(manifest))
    result = cli("merge", COMMITTED_FIXTURE, out)
    assert result.exit_code == 0, result.output
    assert f"{len(manifest['layers'])} file(s) written" in result.output
    assert folder_bytes(out) == want


def test_cli_json_resume_and_foreign_folder(hf_dir, tmp_path):
    src, out = hf_dir(torch.float16), tmp_path / "n"
    r1 = CliRunner().invoke(main, ["split", str(src), str(out), "--tp", "2", "--json"])
    assert r1.exit_code == 0, r1.output
    first = json.loads(r1.output)
    assert first["files_written"] == 10 and first["files_reused"] == 0 and first["tp_degree"] == 2
    victim = out / "global_step0" / "layer_03-model_01-model_states.pt"
    before = victim.read_bytes()
    victim.unlink()
    r2 = CliRunner().invoke(main, ["split", str(src), str(out), "--tp", "2", "--json"])
    second = json.loads(r2.output)
    assert (second["files_written"], second["files_reused"]) == (2, 8)  # the layer's two rank files
    assert victim.read_bytes() == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    r3 = CliRunner().invoke(main, ["split", str(src), str(other), "--tp", "2"])
    assert r3.exit_code == 6 and "not empty" in r3.output and (other / "notes.txt").read_text() == "mine"
    r4 = CliRunner().invoke(main, ["split", str(src), str(out), "--tp", "4"])
    assert r4.exit_code == 6 and "other options" in r4.output and "--no-resume" in r4.output


def test_sigkill_mid_split_then_rerun_is_byte_identical(hf_dir, tmp_path):
    import subprocess
    import sys
    import time

    src = hf_dir(torch.float32, seed=5)
    cmd = lambda out: [sys.executable, "-m", "neoxconv", "split", str(src), str(out), "--tp", "2", "-q"]  # noqa: E731
    subprocess.run(cmd(tmp_path / "clean"), check=True, capture_output=True)
    out = tmp_path / "out"
    proc = subprocess.Popen(cmd(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    t0 = time.time()
    last = out / "global_step0" / "layer_02-model_01-model_states.pt"
    while proc.poll() is None and time.time() - t0 < 60 and not last.exists():
        time.sleep(0.001)
    proc.kill()
    proc.wait()
    rerun = subprocess.run(cmd(out), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    clean = {p.relative_to(tmp_path / "clean"): p.read_bytes() for p in (tmp_path / "clean").rglob("*") if p.is_file()}
    got = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert set(got) == set(clean)
    assert all(got[k] == clean[k] for k in clean), [str(k) for k in clean if got[k] != clean[k]]


# ----- resume after the source changed -------------------------------------------------------------------
def _source_layer(hf_name: str) -> int:
    """The NeoX source layer of a Hugging Face tensor in a 2-layer model (embedding 0, blocks 2-3, norm 5,
    readout 6)."""
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
    assert tree_bytes(out) == tree_bytes(fresh)  # byte-identical to a fresh split, manifest included


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
    assert tree_bytes(out) == tree_bytes(fresh)


def test_a_split_or_reshard_output_of_the_previous_manifest_format_is_redone_not_refused(hf_sharded, tmp_path):
    out = tmp_path / "out"
    assert cli("split", hf_sharded, out, "--tp", "2", "-q").exit_code == 0
    state = json.loads((out / NEOX_MANIFEST).read_text())
    files = sorted({p for p in hf_sharded.glob("*.safetensors")} | {hf_sharded / "config.json"})
    state.pop("format")
    state["source"] = {"files": [{"path": str(p.resolve()), "size": p.stat().st_size} for p in files]}
    for entry in state["files"].values():
        entry.pop("source_fingerprint", None)
    (out / NEOX_MANIFEST).write_text(json.dumps(state))
    result = cli("split", hf_sharded, out, "--tp", "2", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["files_written"] == 10  # nothing of it can be proven: all redone
    assert_manifest_proves(out)


# ----- Ctrl-C in a no-op re-run --------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["check", "write"])
def test_ctrl_c_in_a_no_op_split_or_reshard_rerun_never_leaves_the_output_without_its_manifest(writer_command, tmp_path,
                                                                                               monkeypatch,
                                                                              where):
    """A Ctrl-C at each point where a no-op re-run can stop (each guard check, each file write)."""
    from neoxconv.interrupt import InterruptGuard

    name, src = writer_command
    out = tmp_path / "out"
    assert cli(name, src, out, "--tp", "2", "-q").exit_code == 0
    target = (writer._AtomicFile, "__enter__") if where == "write" else (InterruptGuard, "check")
    original = getattr(*target)
    for k in range(1, 40):
        calls = {"n": 0}

        def interrupted(self, *args, _k=k, _calls=calls):
            _calls["n"] += 1
            if _calls["n"] == _k:
                raise KeyboardInterrupt
            return original(self, *args)

        monkeypatch.setattr(*target, interrupted)
        result = cli(name, src, out, "--tp", "2", "-q")
        monkeypatch.undo()
        assert result.exit_code in (0, 130), result.output
        assert_manifest_proves(out)
        if result.exit_code == 0:
            break
    else:
        pytest.fail("the re-run never finished")
    assert k > 1  # it was interrupted at least once


# ----- resume and re-merge ---------------------------------------------------------------------------------
def test_resume_shows_that_it_rechecks_finished_files(tmp_path):
    assert cli("merge", COMMITTED_FIXTURE, tmp_path / "out", "-q").exit_code == 0
    result = cli("merge", COMMITTED_FIXTURE, tmp_path / "out")
    assert result.exit_code == 0
    assert "resume: re-check" in result.stderr and "0 file(s) written" in result.stdout and "5 reused" in result.stdout


def test_remerge_with_other_options_names_the_difference(tmp_path):
    out = tmp_path / "out"
    assert cli("merge", COMMITTED_FIXTURE, out, "--dtype", "fp16", "-q").exit_code == 0
    result = cli("merge", COMMITTED_FIXTURE, out, "--dtype", "fp32", "--row-bias", "replicated")
    assert result.exit_code == 6
    assert result.stderr.strip() == (f"neoxconv: error: {out}: holds a neoxconv merge made with other options: "
                                     "dtype: fp16 before, fp32 now; row-bias: sum before, replicated now; "
                                     "use --no-resume or another OUT")
    result = cli("merge", COMMITTED_FIXTURE, out, "--dtype", "fp32", "--no-resume", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["dtype"] == "float32"
    auto = tmp_path / "auto"
    assert cli("merge", COMMITTED_FIXTURE, auto, "-q").exit_code == 0
    result = cli("merge", COMMITTED_FIXTURE, auto, "--dtype", "bf16")
    assert result.exit_code == 6 and "dtype: auto (float16) before, bf16 now; use --no-resume" in result.stderr


_LAYER = "model-00003-of-00005.safetensors"


@pytest.mark.parametrize("edit", ["tensor entry a string", "tensors null", "tensors a list", "extra field NaN"])
def test_resume_over_a_hand_edited_manifest_is_never_an_internal_error(merged_fixture_copy, edit):
    """One layer's entry in OUT/neoxconv.json hand-edited (its file and hash untouched), then the same merge
    re-run: the layer is kept (`_allowed` skips what it cannot read) and `_merge`'s summary then calls
    ``.get``/``.values()`` on what the manifest holds (``internal error: AttributeError``), or the new
    manifest cannot be written strictly (a NaN carried over in the entry's meta: ``internal error:
    ValueError: Out of range float values``). A layer whose recorded metadata is not what merge writes
    should be redone (or the metadata rebuilt from the plan), never carried over; exit 0 with a manifest
    equal to a fresh merge's."""
    out = merged_fixture_copy
    raw = json.loads((out / "neoxconv.json").read_text())
    fresh = json.loads(json.dumps(raw))
    entry = raw["layers"][_LAYER]
    if edit == "tensor entry a string":
        entry["tensors"][next(iter(entry["tensors"]))] = "x"
    elif edit == "tensors null":
        entry["tensors"] = None
    elif edit == "tensors a list":
        entry["tensors"] = []
    else:
        entry["note"] = float("nan")
    (out / "neoxconv.json").write_text(json.dumps(raw))
    result = cli("merge", "-q", COMMITTED_FIXTURE, out)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "neoxconv.json").read_text())["layers"][_LAYER] == fresh["layers"][_LAYER]


SYNTH_STEP = 10


# ----- 3. te_layernorm_mlp out of the config digest ----------------------------------------------------------
def test_a_resume_under_another_activation_or_te_flag_does_not_keep_stale_output(tmp_path):
    """Merge with bias-gelu-fusion (gelu_fast); then the same OUT under te_layernorm_mlp: true over files without
    TE keys (refused, OUT untouched); then bias-gelu-fusion false: config.json and the manifest say exact gelu."""
    config = tiny_config(vocab_size=512, parallel_residual=False)
    write_checkpoint(tmp_path / "src", SyntheticSpec(config=config, tp_degree=2, dtype="float32", step=SYNTH_STEP))
    yml = tmp_path / "src" / "configs" / "model.yml"
    text = yml.read_text()
    assert '"bias-gelu-fusion": true,' in text
    out = tmp_path / "out"
    assert cli("merge", "-q", tmp_path / "src", out).exit_code == 0
    before = (out / "config.json").read_bytes()
    yml.write_text(text.replace('"bias-gelu-fusion": true,', '"bias-gelu-fusion": true, "te_layernorm_mlp": true,'))
    one_line_error(cli("merge", "-q", tmp_path / "src", out), 3, "te_layernorm_mlp")
    assert (out / "config.json").read_bytes() == before
    yml.write_text(text.replace('"bias-gelu-fusion": true,', '"bias-gelu-fusion": false,'))
    assert cli("merge", "-q", tmp_path / "src", out).exit_code == 0
    assert json.loads((out / "config.json").read_text())["hidden_act"] == "gelu"
    assert json.loads((out / "neoxconv.json").read_text())["config"]["activation"] == "gelu"
