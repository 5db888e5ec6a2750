import argparse
import os

import numpy as np
import pytest
import torch

from neoxconv.errors import CheckpointError, UnsafePickleError
from neoxconv.source.ptfile import read_pt


def _np(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    return t.view(torch.uint16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def test_tensors_read_without_torch_equal_torch_load(tmp_path):
    tensors = {
        "half": torch.randn(3, 4).half(),
        "bf16": torch.randn(5, dtype=torch.bfloat16),
        "fp32_view": torch.randn(4, 6)[:, 1:3],  # non-contiguous view into a larger storage
        "offset_view": torch.randn(10)[4:],
        "param": torch.nn.Parameter(torch.randn(2, 2)),
    }
    torch.save(tensors, tmp_path / "t.pt")
    refs = read_pt(tmp_path / "t.pt").tensors()
    assert set(refs) == set(tensors)
    for k, ref in refs.items():
        np.testing.assert_array_equal(np.asarray(ref.array()), _np(tensors[k]))
        assert ref.shape == tuple(tensors[k].shape)
    assert refs["half"].covers_storage and not refs["fp32_view"].covers_storage


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_hostile_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "payload-ran"
    torch.save({"x": torch.zeros(2), "evil": _Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(UnsafePickleError, match="evil.pt.*posix.mkdir|evil.pt.*mkdir"):
        read_pt(tmp_path / "evil.pt")
    assert not marker.exists()


def test_lenient_mode_keeps_payloads_inert(tmp_path):
    marker = tmp_path / "payload-ran"
    torch.save({"module": {"w": torch.ones(2)}, "args": argparse.Namespace(a=1), "evil": _Payload(marker)},
               tmp_path / "mp_rank_00_model_states.pt")
    archive = read_pt(tmp_path / "mp_rank_00_model_states.pt", lenient=True)
    assert set(archive.tensors(("module",))) == {"w"}
    assert "argparse.Namespace" in archive.refused_globals
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["empty", "text", "truncated"])
def test_broken_files_name_the_file(tmp_path, damage):
    p = tmp_path / "layer_00-model_00-model_states.pt"
    torch.save({"w": torch.randn(64, 64)}, p)
    data = p.read_bytes()
    p.write_bytes({"empty": b"", "text": b"hello, not a checkpoint", "truncated": data[: len(data) // 2]}[damage])
    with pytest.raises(CheckpointError, match="layer_00-model_00-model_states.pt"):
        read_pt(p)
