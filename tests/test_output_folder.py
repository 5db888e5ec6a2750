"""The output-folder protocol, attacked (issue 18): nothing is written outside OUT or through a link, a
resume never keeps a stale or forbidden output, and split/reshard are as strict as merge on values."""

from __future__ import annotations

import json
import os
import shutil
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import COMMITTED_FIXTURE, cli, one_line_error
from test_split import _make_hf

STEP = "global_step150000"  # the step folder of make_checkpoint's synthetic checkpoints


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def victim(tmp_path):
    """A user's file outside OUT."""
    p = tmp_path / "precious.txt"
    p.write_text("precious")
    return p


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return _make_hf(tmp_path_factory.mktemp("hf"), seed=4)


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
    assert _tree(out) == _tree(fresh)


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
def test_split_never_writes_through_a_symlink_planted_as_its_temporary(hf, tmp_path, victim, temp):
    out = tmp_path / "out"
    (out / temp).parent.mkdir(parents=True)
    (out / temp).symlink_to(victim)
    assert cli("split", hf, out, "--tp", "2", "--force", "-q").exit_code == 0
    assert victim.read_text() == "precious"
    assert not (out / "latest").is_symlink() and (out / "latest").read_text() == "global_step0"


def test_split_force_never_writes_through_a_symlinked_staging_folder(hf, tmp_path):
    """The previous version wrote every .pt into global_step0/.staging.neoxconv-tmp/ and renamed it: a link
    there sent the user's file into OUT. Now a file is written only in a fresh private folder."""
    user = tmp_path / "user"
    user.mkdir()
    (user / "layer_02-model_00-model_states.pt").write_text("the user's file")
    out = tmp_path / "out"
    (out / "global_step0").mkdir(parents=True)
    (out / "global_step0" / ".staging.neoxconv-tmp").symlink_to(user)
    assert cli("split", hf, out, "--tp", "2", "--force", "-q").exit_code == 0
    assert (user / "layer_02-model_00-model_states.pt").read_text() == "the user's file"
    assert (out / "global_step0" / ".staging.neoxconv-tmp").is_symlink()  # not ours: left alone
    assert torch.load(out / "global_step0" / "layer_02-model_00-model_states.pt", weights_only=True)
    # our interrupted run's private folders are removed (only our files in them)
    private = out / "global_step0" / ".neoxconv-pt-abc.neoxconv-tmp"
    private.mkdir()
    (private / "layer_02-model_00-model_states.pt").write_text("half")
    assert cli("split", hf, out, "--tp", "2", "-q").exit_code == 0
    assert not private.exists()


@pytest.mark.parametrize("where", ["global_step0", "configs"])
def test_a_symlinked_folder_under_out_is_refused_not_followed(hf, tmp_path, where):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / where).symlink_to(elsewhere)
    one_line_error(cli("split", hf, out, "--tp", "2", "--force"), 6, where, "symlink")
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
    before = _tree(work)
    one_line_error(cli("demo", "--workdir", work), 6, str(work), "not empty")
    assert _tree(work) == before
    (tmp_path / "file").write_text("x")
    assert cli("demo", "--workdir", tmp_path / "file").exit_code != 0
    assert (tmp_path / "file").read_text() == "x"


# ----- resume never keeps a stale or forbidden output -----------------------------------------------------
def _poison(path: Path, key: str, value: float) -> None:
    d = torch.load(path, weights_only=True)
    d[key].view(-1)[3] = value
    torch.save(d, path)


def test_merge_resume_without_allow_nonfinite_redoes_the_nan_layer_and_fails(make_checkpoint, tmp_path):
    src = Path(shutil.copytree(make_checkpoint(2)[0], tmp_path / "src"))
    _poison(src / STEP / "layer_03-model_00-model_states.pt", "attention.query_key_value.weight", float("nan"))
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
    assert {k: v for k, v in _tree(out).items() if k != "neoxconv.json"} == \
        {k: v for k, v in _tree(fresh).items() if k != "neoxconv.json"}


def test_split_resume_redoes_a_file_of_a_config_changed_in_place(hf, tmp_path):
    src = Path(shutil.copytree(hf, tmp_path / "hf"))
    out = tmp_path / "out"
    assert cli("split", src, out, "--tp", "2", "-q").exit_code == 0
    cfg = json.loads((src / "config.json").read_text())
    cfg["layer_norm_eps"] = 1e-3  # what the model computes, not any weight
    (src / "config.json").write_text(json.dumps(cfg))
    result = cli("split", src, out, "--tp", "2", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["files_written"] == 10
    assert "1.0e-03" in (out / "configs" / "neox.yml").read_text() or "0.001" in (out / "configs" / "neox.yml").read_text()


# ----- split / reshard as strict as merge on values ---------------------------------------------------------
def test_split_fp16_overflow_fails_unless_allowed_and_a_resume_does_not_keep_it(tmp_path):
    src = _make_hf(tmp_path / "hf", dtype=torch.float32, seed=6)
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


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_reshard_of_a_source_with_nan_or_inf_fails_unless_allowed(make_checkpoint, tmp_path, value):
    src = Path(shutil.copytree(make_checkpoint(2)[0], tmp_path / "src"))
    _poison(src / STEP / "layer_02-model_01-model_states.pt", "mlp.dense_h_to_4h.weight", value)
    one_line_error(cli("merge", src, tmp_path / "merged"), 5, "non-finite")
    one_line_error(cli("reshard", src, tmp_path / "out", "--tp", "1"), 5, "non-finite", "--allow-nonfinite")
    result = cli("reshard", src, tmp_path / "out", "--tp", "1", "--allow-nonfinite", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["warnings"]


@pytest.mark.parametrize("name", ["latest", "neoxconv-neox.json", "neoxconv.json", "neox.yml"])
def test_split_and_reshard_write_the_tokenizer_under_its_own_name_whatever_it_is_called(hf, make_checkpoint,
                                                                                         tmp_path, name):
    tok = tmp_path / "tok" / name
    tok.parent.mkdir()
    tok.write_text(json.dumps({"model": {"vocab": {"<|endoftext|>": 0, "a": 1}, "unk_token": "<|endoftext|>"}}))
    for command, src in (("split", hf), ("reshard", make_checkpoint(2)[0])):
        out = tmp_path / command
        assert cli(command, src, out, "--tp", "2", "--tokenizer", tok, "-q").exit_code == 0
        assert (out / "tokenizer.json").read_bytes() == tok.read_bytes()
        assert (out / "latest").read_text().startswith("global_step")
        assert cli(command, src, out, "--tp", "2", "--tokenizer", tok, "-q").exit_code == 0  # a no-op re-run


# ----- folders of the previous version still resume -----------------------------------------------------------
def test_a_split_output_with_the_previous_manifest_name_resumes(hf, tmp_path):
    out = tmp_path / "out"
    assert cli("split", hf, out, "--tp", "2", "-q").exit_code == 0
    state = json.loads((out / "neoxconv.json").read_text())  # rewritten as the previous version wrote it
    files = {**state.pop("layers"), **state["files"]}
    state.update(format=2, files={n: {"sha256": __import__("hashlib").sha256((out / n).read_bytes()).hexdigest(),
                                      "size": e["size"], **({"source_fingerprint": e["source_fingerprint"]}
                                                            if "source_fingerprint" in e else {})}
                                  for n, e in files.items()})
    (out / "neoxconv.json").unlink()
    (out / "neoxconv-neox.json").write_text(json.dumps(state))
    result = cli("split", hf, out, "--tp", "2", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["files_reused"] == 10
    assert not (out / "neoxconv-neox.json").exists() and (out / "neoxconv.json").is_file()
