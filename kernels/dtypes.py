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

import functools
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

    @functools.cache
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


# accum_ctype -> its NumPy dtype
ACCUMULATION = {"float": np.dtype(np.float32), "double": np.dtype(np.float64)}


def accumulation_dtype(dtype) -> np.dtype:
    """The NumPy dtype a kernel computes ``dtype`` (a name or NumPy dtype of the table) in: float32 for the
    16-bit types. Optimizer state is kept in it, as mixed-precision training does (an fp16 Adam ``v``
    underflows, a bf16 one stops decaying)."""
    return ACCUMULATION[DTYPES[_name(dtype)].accum_ctype]


def dtypes_for(device: str) -> tuple[str, ...]:
    """Names of the dtypes a device of kind ``device`` ("cpu" or "cuda") computes in."""
    return tuple(name for name, d in DTYPES.items() if device in d.devices)


def floating(dtype) -> DType | None:
    """The table's entry for an array's dtype (a NumPy dtype), or None where it is not one of the table's
    floating dtypes: the one test of "a floating dtype of ours" (bfloat16, whose NumPy kind is 'V',
    included: an array can have it only once ml_dtypes is imported)."""
    entry = DTYPES.get(getattr(dtype, "name", None))
    return entry if entry is not None and entry.numpy_dtype() == dtype else None


def supports(device: str, dtype) -> bool:
    """Whether a device of kind ``device`` computes in the array dtype ``dtype`` (the kernels' check)."""
    entry = floating(dtype)
    return entry is not None and device in entry.devices


def resolve_dtype(dtype, device: str = "cpu", argument: str = "dtype") -> np.dtype:
    """``dtype`` (a name of the table, NumPy dtype or type) as a NumPy dtype that ``device`` supports, else
    TypeError (naming ml_dtypes where bfloat16 is asked for without it)."""
    entry = DTYPES.get(dtype) if isinstance(dtype, str) and dtype in DTYPES else floating(_as_numpy(dtype))
    if entry is None or device not in entry.devices:
        raise TypeError(f"{argument}: expected one of {list(dtypes_for(device))} on {device}, got {_name(dtype)}")
    found = entry.numpy_dtype()
    if found is None:
        raise TypeError(f"{argument}: {entry.name} needs the {entry.extension} package: pip install {entry.extension}")
    return found


def _as_numpy(dtype) -> np.dtype | None:
    try:
        return np.dtype(dtype) if dtype is not None else None
    except TypeError:
        return None


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
