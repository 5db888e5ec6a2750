"""Hostile and broken input, crashes mid-merge, disk full: outcomes are a correct merge or a clean error."""

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from neoxconv.output import writer
from neoxconv.output.hf_merge import MergeOptions, merge_checkpoint
from neoxconv.errors import MergeError, NeoXConvError, OutputError

from conftest import COMMITTED_FIXTURE

STEP = "global_step150000"


def _bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def clean_merge(tmp_path_factory):
    work = tmp_path_factory.mktemp("clean")
    shutil.copytree(COMMITTED_FIXTURE, work / "src")
    merge_checkpoint(work / "src", work / "out", MergeOptions(quiet=True))
    return work / "src", _bytes(work / "out")


def _layer_bytes(files):
    return {k: v for k, v in files.items() if k.startswith("model-")}


def test_fuzz_truncations_and_byte_flips(tmp_path, clean_merge):
    """Random damage to layer files: every run is a bit-identical merge or a NeoXConvError, never a crash."""
    _, clean = clean_merge
    rng = random.Random(1234)
    originals = sorted((COMMITTED_FIXTURE / STEP).glob("layer_*.pt"))
    outcomes = {"merged": 0, "error": 0}
    for trial in range(60):
        src = tmp_path / f"src{trial}"
        shutil.copytree(COMMITTED_FIXTURE, src)
        victim = src / STEP / rng.choice(originals).name
        data = bytearray(victim.read_bytes())
        if trial % 3 == 0:
            data = data[: rng.randrange(len(data))]
        else:
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        victim.write_bytes(bytes(data))
        out = tmp_path / f"out{trial}"
        try:
            merge_checkpoint(src, out, MergeOptions(quiet=True))
        except NeoXConvError as e:
            assert victim.name in str(e) or "layer" in str(e), str(e)
            outcomes["error"] += 1
        else:
            # accepted: then it must be exactly the clean merge (the damage hit bytes nothing reads)
            assert _layer_bytes(_bytes(out)) == _layer_bytes(clean), f"trial {trial}: silent corruption of {victim.name}"
            outcomes["merged"] += 1
        shutil.rmtree(src)
    assert outcomes["error"] > 30, outcomes


def test_flipped_tensor_byte_is_caught_by_crc(tmp_path):
    shutil.copytree(COMMITTED_FIXTURE, tmp_path / "src")
    victim = tmp_path / "src" / STEP / "layer_02-model_01-model_states.pt"
    from neoxconv.source.ptfile import read_pt

    ref = read_pt(victim).tensors()["mlp.dense_4h_to_h.weight"]
    data = bytearray(victim.read_bytes())
    data[ref.byte_offset + 5] ^= 0x10
    victim.write_bytes(bytes(data))
    with pytest.raises(NeoXConvError, match="layer_02-model_01.*mlp.dense_4h_to_h.weight.*CRC"):
        merge_checkpoint(tmp_path / "src", tmp_path / "out", MergeOptions(quiet=True))


def _payload_file(path, marker, module):
    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    torch.save({"module": module, "args": Payload(), "iteration": 1}, path)


def test_bookkeeping_files_never_run_code(tmp_path, make_checkpoint):
    marker = tmp_path / "payload-ran"
    # pipeline layout: the mp_rank files are not even opened
    shutil.copytree(COMMITTED_FIXTURE, tmp_path / "pipe")
    _payload_file(tmp_path / "pipe" / STEP / "mp_rank_00_model_states.pt", marker, None)
    merge_checkpoint(tmp_path / "pipe", tmp_path / "out1", MergeOptions(quiet=True))
    # sequential layout: the weights live in them; everything but the tensors is inert
    root, _, _ = make_checkpoint(2, "sequential", "float16")
    shutil.copytree(root, tmp_path / "seq")
    path = tmp_path / "seq" / STEP / "mp_rank_01_model_states.pt"
    module = torch.load(path, weights_only=False)["module"]  # our own fixture, written by this test session
    _payload_file(path, marker, module)
    merge_checkpoint(tmp_path / "seq", tmp_path / "out2", MergeOptions(quiet=True))
    assert not marker.exists()


def test_bad_last_layer_fails_before_anything_is_written(tmp_path):
    shutil.copytree(COMMITTED_FIXTURE, tmp_path / "src")
    path = tmp_path / "src" / STEP / "layer_06-model_01-model_states.pt"
    d = torch.load(path, weights_only=True)
    d["final_linear.weight"] = d["final_linear.weight"][:, :-1].contiguous()
    torch.save(d, path)
    with pytest.raises(MergeError, match="final_linear.weight"):
        merge_checkpoint(tmp_path / "src", tmp_path / "out", MergeOptions(quiet=True))
    assert not (tmp_path / "out").exists()


def test_not_enough_disk_is_refused_up_front(tmp_path, monkeypatch):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(OutputError, match="GB is free"):
        merge_checkpoint(COMMITTED_FIXTURE, tmp_path / "out", MergeOptions(quiet=True))
    assert not list((tmp_path / "out").glob("model-*"))


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
    assert _bytes(tmp_path / "out") == clean


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
    return root, _bytes(out)


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
    assert _bytes(out) == clean


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
    assert _bytes(out) == clean
