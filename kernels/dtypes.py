"""The dtype table: which element types each kind of device computes in, and how each spells them.

``ctype`` is the CUDA C++ storage type, ``accum_ctype`` the type a CUDA kernel computes and accumulates
in (float for the 16-bit types), ``devices`` the kinds of backend device that support the dtype, and
``tolerance`` the relative error (``reference.relative_error``) that a kernel's result may have against
the float64 reference on the same inputs: the one bound the tests and ``deltaprop check`` hold every
backend to (the 16-bit types compute in float32 but store 8 to 11 bits).
bfloat16 has no NumPy type of its own: ``ml_dtypes`` registers one (CuPy 14 stores bfloat16 arrays with it),
imported only when bfloat16 is asked for.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DType:
    name: str
    numpy: np.dtype | None  # None where NumPy has no native type: ``extension`` registers it
    ctype: str
    accum_ctype: str
    devices: tuple[str, ...]
    tolerance: float
    extension: str | None = None  # the module that registers the NumPy type where NumPy has none

    def numpy_dtype(self) -> np.dtype | None:
        """The NumPy dtype, registering it through ``extension`` if needed; None where that is not installed."""
        if self.numpy is not None:
            return self.numpy
        try:
            importlib.import_module(self.extension)
        except ImportError:
            return None
        return np.dtype(self.name)


DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        DType("float32", np.dtype(np.float32), "float", "float", ("cpu", "cuda"), 1e-5),
        DType("float64", np.dtype(np.float64), "double", "double", ("cpu", "cuda"), 1e-12),
        DType("float16", np.dtype(np.float16), "__half", "float", ("cuda",), 1e-2),
        DType("bfloat16", None, "__nv_bfloat16", "float", ("cuda",), 1e-2, extension="ml_dtypes"),
    )
}


def dtypes_for(device: str) -> tuple[str, ...]:
    """Names of the dtypes a device of kind ``device`` ("cpu" or "cuda") computes in."""
    return tuple(name for name, d in DTYPES.items() if device in d.devices)


def _supported(device: str) -> dict:
    """{numpy dtype: numpy dtype} of what ``device`` computes in (a dict for a hashable, fast lookup)."""
    return {DTYPES[name].numpy: DTYPES[name].numpy for name in dtypes_for(device) if DTYPES[name].numpy is not None}


# device kind -> the NumPy dtypes it computes in, for the argument checks every kernel call makes
SUPPORTED = {device: _supported(device) for device in ("cpu", "cuda")}


def resolve_dtype(dtype, device: str = "cpu", argument: str = "dtype") -> np.dtype:
    """``dtype`` (a name, NumPy dtype or type) as a NumPy dtype that ``device`` supports, else TypeError."""
    supported = SUPPORTED[device]
    found = supported.get(dtype) if isinstance(dtype, np.dtype) else None
    if found is not None:  # the hot path: kernels check their arguments' dtypes on every call
        return found
    try:
        found = supported.get(np.dtype(dtype)) if dtype is not None else None
    except TypeError:
        found = None
    if found is None:
        raise TypeError(f"{argument}: expected one of {list(dtypes_for(device))} on {device}, got {_name(dtype)}")
    return found


def tolerance(dtype) -> float:
    """The dtype table's relative-error bound for ``dtype`` (a name, NumPy dtype or type)."""
    return DTYPES[_name(dtype)].tolerance


def _name(dtype) -> str:
    if isinstance(dtype, str):
        return dtype
    try:
        return np.dtype(dtype).name if dtype is not None else "None"
    except TypeError:
        return repr(dtype)
