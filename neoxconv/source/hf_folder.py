"""A Hugging Face model folder as `split` reads it: config.json and safetensors (one file or an index of
shards), every header checked as safetensors checks it, never a pickle. What the folder must hold is planned
by `neoxconv.plan.plan.plan_hf_folder` through the key table; this module only reads."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from neoxconv.config import NeoXConfig
from neoxconv.dtypes import FROM_SAFETENSORS, NUMPY_DTYPES, from_f32, tensor_nbytes, to_f32
from neoxconv.errors import CheckpointError, ConfigError, NeoXConvError
from neoxconv.smallfile import read_json_object
from neoxconv.source.safetensors import (
    FileState,
    check_unchanged,
    checked_safetensors_header,
    file_state,
    read_header,
)
from neoxconv.source.storage import cached_fd, pread_exactly


@dataclass
class HFTensor:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int = 0  # where its data starts in ``file``


class HFModel:
    """A Hugging Face GPT-NeoX, Llama or Mistral folder (``*ForCausalLM``, or ``*ForSequenceClassification`` with one
    label: a reward model, `NeoXConfig` reads which): config.json and safetensors (one file or an index of shards)."""

    def __init__(self, folder: Path, *, tokenizer_path: Path | None = None) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"{self.folder}: expected a Hugging Face model folder")
        cfg = self.folder / "config.json"
        if not cfg.is_file():
            raise ConfigError(f"{self.folder}: no config.json (a Hugging Face GPT-NeoX folder has one)")
        raw = read_json_object(cfg, ConfigError, what="config.json")
        if raw.get("model_type") not in (None, "gpt_neox", "llama", "mistral"):
            raise ConfigError(f"{cfg}: model_type {raw.get('model_type')!r}: split writes GPT-NeoX, Llama and Mistral "
                              "models")
        if raw.get("model_type") in (None, "gpt_neox") and raw.get("attention_bias") is False:
            raise ConfigError(f"{cfg}: attention_bias is false; GPT-NeoX checkpoints have attention biases")
        self.config = NeoXConfig.from_hf_json(cfg)
        self.tensors = self._scan()
        self.tokenizer = self._find_tokenizer(tokenizer_path)

    def _scan(self) -> dict[str, HFTensor]:
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            files = sorted({self.folder / f for f in read_weight_map(index, CheckpointError).values()})
        else:
            files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            pickles = sorted(p.name for p in self.folder.glob("*.bin"))
            hint = (f" (found {', '.join(pickles)}: neoxconv never unpickles; save the model with "
                    "safe_serialization=True)") if pickles else ""
            raise CheckpointError(f"{self.folder}: no *.safetensors weights{hint}")
        tensors: dict[str, HFTensor] = {}
        self.states: dict[Path, FileState] = {}  # as each file was when its header was checked
        for f in files:
            if not f.is_file() or f.parent.resolve() != self.folder.resolve():
                raise CheckpointError(f"{f}: listed in the index but not a file in {self.folder}")
            self.states[f] = file_state(f)
            try:
                header, data_len = read_header(f)
                header = checked_safetensors_header(f)
            except (OSError, ValueError) as e:
                raise CheckpointError(f"{f}: not a readable safetensors file: {e}") from None
            data_start = self.states[f].size - data_len
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if name in tensors:  # which copy a loader takes depends on the loader: refuse
                    raise CheckpointError(f"{f}: holds {name!r}, which {tensors[name].file.name} holds too")
                dtype = FROM_SAFETENSORS.get(str(info.get("dtype")))
                if dtype is None:
                    raise CheckpointError(f"{f}: {name!r} has dtype {info.get('dtype')!r}, "
                                          "which neoxconv does not read")
                tensors[name] = HFTensor(f, dtype, tuple(int(s) for s in info.get("shape", [])),
                                         data_start + int(info["data_offsets"][0]))
        return tensors

    def _find_tokenizer(self, explicit: Path | None) -> Path | None:
        if explicit is not None:
            if not Path(explicit).is_file():
                raise CheckpointError(f"{explicit}: no such tokenizer file")
            return Path(explicit)
        p = self.folder / "tokenizer.json"
        return p if p.is_file() else None

    def open_rows(self) -> HFRows:
        """A reader of row blocks (``with hf.open_rows() as rows: rows.rows(name, start, count, dtype)``)."""
        return HFRows(self)

    def same_values(self, a: str, b: str, *, block_bytes: int = 64 << 20) -> bool:
        """True when tensors ``a`` and ``b`` hold the same dtype, shape and bits (compared as raw bits, a block of
        rows at a time: -0.0 != 0.0, a NaN equals the same NaN)."""
        ta, tb = self.tensors[a], self.tensors[b]
        if (ta.dtype, ta.shape) != (tb.dtype, tb.shape):
            return False
        rows = ta.shape[0] if ta.shape else 1
        step = max(1, block_bytes // max(1, tensor_nbytes(ta.dtype, ta.shape[1:])))
        with self.open_rows() as reader:
            for i in range(0, rows, step):
                n = min(step, rows - i)
                if reader.rows(a, i, n, ta.dtype).tobytes() != reader.rows(b, i, n, tb.dtype).tobytes():
                    return False
            reader.check_unchanged()
        return True



class HFRows:
    """Row blocks of the model's tensors, read with ``os.preadv`` straight from the safetensors files at the
    offsets their checked headers give (no torch, no memory map: memory is the block asked for), cast with
    torch's rounding (`neoxconv.dtypes.from_f32`). `check_unchanged` then proves every file read is still as
    its header was checked (else the bytes used might not be the ones it describes)."""

    def __init__(self, model: HFModel) -> None:
        self.model = model
        self._fds: dict[Path, int] = {}

    def __enter__(self) -> HFRows:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def rows(self, name: str, start: int, count: int, dtype: str) -> np.ndarray:
        """Rows ``start .. start + count`` of tensor ``name`` (elements of a vector), as ``dtype`` (numpy bits)."""
        t = self.model.tensors[name]
        row = math.prod(t.shape[1:])
        out = np.empty((count, *t.shape[1:]) if t.shape else (), dtype=NUMPY_DTYPES[t.dtype])
        fd = cached_fd(self._fds, t.file)
        itemsize = NUMPY_DTYPES[t.dtype].itemsize
        pread_exactly(fd, memoryview(out.reshape(-1)).cast("B"), t.offset + start * row * itemsize, t.file,
                      f"ends inside the data of {name!r} (truncated?)")
        return out if t.dtype == dtype else from_f32(to_f32(out, t.dtype), dtype).reshape(out.shape)

    def read_into(self, name: str, offset: int, view: memoryview) -> None:
        """Bytes ``offset .. offset + len(view)`` of tensor ``name``'s data, into the caller's buffer (split reads
        straight into the output's staging buffer this way)."""
        t = self.model.tensors[name]
        if offset < 0 or offset + len(view) > tensor_nbytes(t.dtype, t.shape):
            raise ValueError(f"{t.file}: bytes {offset}+{len(view)} are not inside {name!r}")
        pread_exactly(cached_fd(self._fds, t.file), view, t.offset + offset, t.file,
                      f"ends inside the data of {name!r} (truncated?)")

    def check_unchanged(self) -> None:
        """Every file read so far is as it was when its header was checked (else a CheckpointError naming it)."""
        for f in self._fds:
            check_unchanged(f, self.model.states[f])


def read_weight_map(index: Path, error: type[NeoXConvError]) -> dict[str, str]:
    """A ``model.safetensors.index.json``'s tensor name -> file table (the one reader of indexes: split, verify,
    the loader); ``error`` naming the index when it is unreadable or its ``weight_map`` is not such a table."""
    weight_map = read_json_object(index, error, what="safetensors index").get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise error(f"{index}: its 'weight_map' is not a {{tensor: file}} table")
    outside = sorted({v for v in weight_map.values() if not plain_file_name(v)})
    if outside:  # the index names files of its own folder, never a path elsewhere
        raise error(f"{index}: its 'weight_map' names {', '.join(repr(v[:80]) for v in outside[:3])}, not file names "
                    "in its folder")
    return weight_map


def plain_file_name(name: str) -> bool:
    """A file name inside one folder: no folder part, not absolute, not '.' or '..', no NUL."""
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0")
