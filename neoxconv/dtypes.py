"""Dtype names, casts and finiteness checks on numpy arrays (bfloat16 is carried as uint16 bits).

The merge works on numpy views of memory-mapped files, so it needs no torch. Casts follow torch exactly:
fp32 -> fp16 and fp32 -> bf16 both round to nearest even (tests compare against torch bit for bit).
"""

from __future__ import annotations

import numpy as np

from neoxconv.ptfile import NUMPY_DTYPES

SAFETENSORS_NAMES = {
    "float16": "F16", "bfloat16": "BF16", "float32": "F32", "float64": "F64",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}
FROM_SAFETENSORS = {v: k for k, v in SAFETENSORS_NAMES.items()}
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")

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


def cast(a: np.ndarray, src: str, dst: str) -> np.ndarray:
    """Convert an array of ``src`` values to ``dst`` (returns ``a`` itself when they are the same)."""
    if src == dst:
        return a
    return from_f32(to_f32(a, src), dst)


def count_nonfinite(a: np.ndarray, dtype: str) -> int:
    """How many elements are inf or nan, from the exponent bits (no float conversion needed)."""
    if dtype not in _EXP_MASK:
        return 0
    utype, mask = _EXP_MASK[dtype]
    bits = np.ascontiguousarray(a).view(utype)
    exponent = np.bitwise_and(bits, utype(mask))
    if not bits.size or exponent.max() != mask:  # fast path: one pass, one reduction
        return 0
    return int(np.count_nonzero(exponent == utype(mask)))
