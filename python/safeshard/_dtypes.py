"""safetensors dtype names -> torch / numpy dtypes (views of the same bytes, bit-exact).

Sub-byte types (F4, F6_*) and, for numpy without ``ml_dtypes``, the types numpy lacks
(BF16, F8_*) come back as packed ``uint8``: the last dimension holds the tensor's bytes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# name -> (bits per element, torch attribute, numpy dtype name or ml_dtypes attribute)
_TABLE: dict[str, tuple[int, str | None, str | None]] = {
    "BOOL": (8, "bool", "bool"),
    "U8": (8, "uint8", "uint8"),
    "I8": (8, "int8", "int8"),
    "I16": (16, "int16", "int16"),
    "U16": (16, "uint16", "uint16"),
    "I32": (32, "int32", "int32"),
    "U32": (32, "uint32", "uint32"),
    "I64": (64, "int64", "int64"),
    "U64": (64, "uint64", "uint64"),
    "F16": (16, "float16", "float16"),
    "F32": (32, "float32", "float32"),
    "F64": (64, "float64", "float64"),
    "C64": (64, "complex64", "complex64"),
    "BF16": (16, "bfloat16", "ml:bfloat16"),
    "F8_E4M3": (8, "float8_e4m3fn", "ml:float8_e4m3fn"),
    "F8_E5M2": (8, "float8_e5m2", "ml:float8_e5m2"),
    "F8_E8M0": (8, "float8_e8m0fnu", "ml:float8_e8m0fnu"),
    "F8_E4M3FNUZ": (8, "float8_e4m3fnuz", "ml:float8_e4m3fnuz"),
    "F8_E5M2FNUZ": (8, "float8_e5m2fnuz", "ml:float8_e5m2fnuz"),
    "F4": (4, None, None),
    "F6_E2M3": (6, None, None),
    "F6_E3M2": (6, None, None),
}

DTYPES: tuple[str, ...] = tuple(_TABLE)


def bits(name: str) -> int:
    """Bits per element of a safetensors dtype."""
    return _TABLE[name][0]


def packed_shape(name: str, shape: tuple[int, ...], nbytes: int) -> tuple[int, ...]:
    """Shape of the raw-byte view: the last dimension counts bytes instead of elements
    (when a row is whole bytes), else one flat dimension of ``nbytes``."""
    b = bits(name)
    if shape and (shape[-1] * b) % 8 == 0:
        return (*shape[:-1], shape[-1] * b // 8)
    return (nbytes,)


def torch_dtype(name: str) -> Any | None:
    """The torch dtype of ``name``, or ``None`` when torch has none (packed bytes then)."""
    import torch

    attr = _TABLE[name][1]
    return getattr(torch, attr, None) if attr else None


def numpy_dtype(name: str) -> np.dtype[Any] | None:
    """The numpy dtype of ``name`` (``ml_dtypes`` for BF16 and F8), or ``None``."""
    spec = _TABLE[name][2]
    if spec is None:
        return None
    if spec.startswith("ml:"):
        try:
            import ml_dtypes
        except ImportError:
            return None
        t = getattr(ml_dtypes, spec[3:], None)
        return None if t is None else np.dtype(t)
    return np.dtype(spec)
