"""The one reader of source bytes (`neoxconv.source.storage`): every byte it serves is CRC-checked, exactly
once per pass, whatever the caller does; and the bytes used are the bytes checked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from neoxconv.errors import CheckpointError
from neoxconv.source.ptfile import read_pt
from neoxconv.source.storage import SourceReader, read_tensors


def _flat_buffer_file(path: Path, n_views: int = 8, width: int = 64) -> dict[str, torch.Tensor]:
    """A ZeRO-style file: ``n_views`` fp16 views into one flat buffer with padding between them."""
    flat = torch.randn(n_views * (width + 8) + 32).half()
    views = {f"w{i}": flat[i * (width + 8): i * (width + 8) + width].view(8, width // 8) for i in range(n_views)}
    torch.save(views, path)
    return {k: v.clone() for k, v in views.items()}


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def test_a_scope_checks_what_it_served_when_it_closes(tmp_path):
    path = tmp_path / "flat.pt"
    want = _flat_buffer_file(path)
    refs = read_pt(path).tensors()
    with SourceReader() as reader:
        with reader.scope() as reads:
            got = {k: reads.read(r) for k, r in refs.items()}
            assert not reader.verified(refs.values())  # served, not checked yet
        assert reader.verified(refs.values())
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v.numpy())
    assert reader.bytes_read == refs["w0"].storage_nbytes  # the views, then the padding once


def test_padding_no_tensor_reads_is_checked_too(tmp_path):
    path = tmp_path / "flat.pt"
    _flat_buffer_file(path)
    refs = read_pt(path).tensors()
    r = refs["w0"]
    _flip(path, r.data_offset + r.storage_nbytes - 4)  # the tail padding of the flat buffer
    with pytest.raises(CheckpointError, match=r"flat\.pt: the storage holding 'w0'.* fails its CRC-32 check"):
        with SourceReader() as reader, reader.scope() as reads:
            reads.read(r)


def test_a_planned_later_scope_defers_the_check_and_a_missing_one_cannot_skip_it(tmp_path):
    """With a plan, a storage shared by scopes 0 and 1 is checked as scope 1 closes (read once in all); a
    plan naming a scope that never opens only moves the check to the reader's end, never skips it."""
    path = tmp_path / "flat.pt"
    _flat_buffer_file(path)
    refs = list(read_pt(path).tensors().values())
    first, second = refs[:4], refs[4:]
    with SourceReader(plan=[first, second]) as reader:
        with reader.scope() as reads:
            for r in first:
                reads.read(r)
        assert not reader.verified(first)  # scope 1 reads the same storage: checked with it
        with reader.scope() as reads:
            for r in second:
                reads.read(r)
        assert reader.verified(refs)
    assert reader.bytes_read == refs[0].storage_nbytes

    _flip(path, refs[0].data_offset + 2)
    with pytest.raises(CheckpointError, match="CRC-32"):
        with SourceReader(plan=[first, second, second]) as reader:
            with reader.scope() as reads:
                for r in first:
                    reads.read(r)
            # the planned scopes 1 and 2 never open: the reader's own end checks what was served


def test_read_tensors_checks_before_returning(tmp_path):
    path = tmp_path / "flat.pt"
    want = _flat_buffer_file(path)
    refs = read_pt(path).tensors()
    got = read_tensors(refs)
    np.testing.assert_array_equal(got["w3"], want["w3"].numpy())
    _flip(path, refs["w5"].data_offset + 5)
    with pytest.raises(CheckpointError, match="CRC-32"):
        read_tensors({"w0": refs["w0"]})  # its storage holds w5 too: checked whole


def test_strided_views_far_apart_are_read_exactly_and_checked(tmp_path):
    """A column slice at a high TP degree (rows far apart) and a transposed view: same values as torch."""
    path = tmp_path / "views.pt"
    full = torch.randn(64, 512).half()
    torch.save({"cols": full[:, 8:16], "t": full.t(), "expanded": torch.ones(1, 4).half().expand(4096, 4)}, path)
    refs = read_pt(path).tensors()
    with SourceReader(chunk_bytes=256) as reader, reader.scope() as reads:
        for key in ("cols", "t", "expanded"):
            want = torch.load(path, weights_only=True)[key]
            np.testing.assert_array_equal(reads.read(refs[key]), want.numpy())
            np.testing.assert_array_equal(reads.rows(refs[key], 3, 5), want[3:8].numpy())


def test_bytes_read_twice_in_one_pass_are_compared(tmp_path):
    """Overlapping views (the same bytes served twice): the first reading is checked before the second."""
    path = tmp_path / "overlap.pt"
    base = torch.randn(256).half()
    torch.save({"a": base[:200], "b": base[100:]}, path)
    refs = read_pt(path).tensors()
    with SourceReader() as reader, reader.scope() as reads:
        np.testing.assert_array_equal(reads.read(refs["a"]), base[:200].numpy())
        np.testing.assert_array_equal(reads.read(refs["b"]), base[100:].numpy())
        assert reads.same([refs["a"], refs["a"]])
    assert reader.verified(refs.values())


def test_the_reader_has_one_way_in(tmp_path):
    """No counting protocol is left to get wrong."""
    for name in ("expect", "done", "vouch", "check_whole"):
        assert not hasattr(SourceReader, name)
