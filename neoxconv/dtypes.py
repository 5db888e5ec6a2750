"""Dtype names, casts and finiteness checks on numpy arrays (bfloat16 is carried as uint16 bits).

The merge works on numpy views of memory-mapped files, so it needs no torch. Casts follow torch exactly:
fp32 -> fp16 and fp32 -> bf16 both round to nearest even (tests compare against torch bit for bit).
"""

from __future__ import annotations

import numpy as np

# numpy dtype used to hold each dtype's bits (bfloat16 has no numpy type: its bits live in uint16)
NUMPY_DTYPES = {
    "float16": np.dtype("<f2"),
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
    "bfloat16": np.dtype("<u2"),
    "int64": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
    "int16": np.dtype("<i2"),
    "int8": np.dtype("i1"),
    "uint8": np.dtype("u1"),
    "bool": np.dtype("?"),
}
SAFETENSORS_NAMES = {
    "float16": "F16", "bfloat16": "BF16", "float32": "F32", "float64": "F64",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}
FROM_SAFETENSORS = {v: k for k, v in SAFETENSORS_NAMES.items()}
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
# machine epsilon (the spacing of values just above 1) of each float dtype, as torch.finfo(dtype).eps
FLOAT_EPS = {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float32": 2.0**-23, "float64": 2.0**-52}

# user-facing spellings -> canonical names
DTYPE_ALIASES = {
    "fp16": "float16", "float16": "float16", "half": "float16",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "fp32": "float32", "float32": "float32", "float": "float32",
}

# (exponent mask) for the bit-level "is it inf or nan" test
_EXP_MASK = {
    "float16": (np.uint16, 0x7C00),
    "bfloat16": (np.uint16, 0x7F80),
    "float32": (np.uint32, 0x7F800000),
    "float64": (np.uint64, 0x7FF0000000000000),
}


# the dtypes torch computes in here (verify's compute dtype, split/reshard's output): canonical names
TORCH_FLOAT_DTYPES = ("float16", "bfloat16", "float32")


def as_torch_dtype(name: str):
    """The ``torch.dtype`` of a canonical name in ``TORCH_FLOAT_DTYPES`` (ValueError for any other).

    torch is imported here, not at module level: the merge imports this module and never imports torch.
    """
    if name not in TORCH_FLOAT_DTYPES:
        raise ValueError(f"no torch compute dtype for {name!r}; use one of {', '.join(TORCH_FLOAT_DTYPES)}")
    import torch

    return getattr(torch, name)


def tensor_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes of a contiguous tensor of ``dtype`` and ``shape``."""
    n = NUMPY_DTYPES[dtype].itemsize
    for s in shape:
        n *= s
    return n


def canonical_dtype(name: str) -> str:
    try:
        return DTYPE_ALIASES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of fp16, bf16, fp32") from None


def to_f32(a: np.ndarray, dtype: str) -> np.ndarray:
    """The values of ``a`` (holding ``dtype``) as float32."""
    if dtype == "bfloat16":
        return (np.asarray(a, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    return np.asarray(a).astype(np.float32)


def from_f32(a: np.ndarray, dtype: str) -> np.ndarray:
    """Cast float32 values to ``dtype`` (bfloat16 as uint16 bits, round to nearest even, NaN kept NaN)."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    if dtype == "bfloat16":
        bits = a.view(np.uint32)
        rounded = (bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))) >> 16
        nan = np.isnan(a)
        if nan.any():
            rounded = np.where(nan, np.uint32(0x7FC0), rounded)  # torch's canonical NaN
        return rounded.astype(np.uint16)
    with np.errstate(over="ignore"):  # out-of-range values become inf, as in torch; the merge checks
        return a.astype(NUMPY_DTYPES[dtype])


class NonFiniteCounter:
    """Counts inf/nan in consecutive blocks of one dtype's bytes, from the exponent bits.

    An element is inf or nan exactly when its exponent bits are all ones: fp16 ``(u & 0x7c00) == 0x7c00``,
    bf16 ``(u & 0x7f80) == 0x7f80``, fp32 ``(u & 0x7f800000) == 0x7f800000``. One AND into a reused
    scratch buffer and one max per block (the block is fresh in the CPU cache when the merge checks it);
    the exact count is taken only when the max says there is something to count. ~4x less CPU than
    ``np.isfinite`` on fp16 (bench/checks_bench.py). Blocks must hold whole elements.
    """

    def __init__(self, dtype: str) -> None:
        self.dtype = dtype
        self.count = 0
        self._mask = _EXP_MASK.get(dtype)
        self._scratch: np.ndarray | None = None

    def update(self, data) -> None:
        if self._mask is None:
            return
        utype, mask = self._mask
        bits = np.frombuffer(data, dtype=utype) if not isinstance(data, np.ndarray) else \
            np.ascontiguousarray(data).reshape(-1).view(utype)
        if not bits.size:
            return
        if self._scratch is None or self._scratch.size < bits.size:
            self._scratch = np.empty(bits.size, dtype=utype)
        exponent = np.bitwise_and(bits, utype(mask), out=self._scratch[: bits.size])
        if exponent.max() == mask:
            self.count += int(np.count_nonzero(exponent == utype(mask)))


def count_nonfinite(a: np.ndarray, dtype: str) -> int:
    """How many elements are inf or nan, from the exponent bits (no float conversion needed)."""
    counter = NonFiniteCounter(dtype)
    counter.update(a)
    return counter.count
