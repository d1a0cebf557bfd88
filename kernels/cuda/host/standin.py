"""A host stand-in for the CuPy runtime, so that the CuPy backend runs, unchanged, on a machine without a
GPU: switched on by ``DELTAPROP_CUDA_SIM=1`` (as Numba's ``NUMBA_ENABLE_CUDASIM``), for tests only.

``stack()`` is what ``CupyBackend`` runs on in place of CuPy's (its one seam): the array module, CUDA's
runtime API, cuBLAS's API, NVRTC's version and the kernel launcher.

- Arrays are NumPy arrays of the subclass ``DeviceArray`` ("device memory"): a ufunc or NumPy function
  that mixes one with a plain NumPy array raises TypeError, as CuPy refuses implicit transfers, and a
  reduction gives a 0-d device array, as CuPy's does.
- ``RawModule``/``RawKernel`` launches run the real .cu sources in the host harness (``host.build``,
  once per dtype and cached on disk), after every argument is checked against the kernel's C signature
  as CuPy passes it (count, pointer or value, width and signedness) and every array argument is a device
  array.
- cuBLAS calls go to ``cublas_emulation`` (column-major NumPy, cuBLAS's argument rules), which reads and
  writes device memory through the addresses the backend passes (``DeviceArray.data.ptr``), each checked
  to lie inside its allocation.
- ``recording()`` logs what crosses the host/device boundary and what is launched (``Event``): a
  launch, a gemm, a host-to-device copy (``asarray``, ``array``, ``ascontiguousarray`` of host data, a
  host array assigned into a device one) and a device-to-host copy (``.get()``, ``asnumpy``,
  ``float``/``int``/``bool``/``.item()``/``.tolist()``/formatting of a device array).

What it cannot show: a transfer through ``numpy.asarray(device_array)`` (NumPy converts a subclass
without asking it), real cuBLAS and its TF32 paths, the driver and NVRTC at run time, CuPy's memory pool
and streams, timings, and races between blocks (the harness runs the blocks of a grid one after another).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import subprocess
import threading
import types
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from numpy.lib.array_utils import byte_bounds

from deltaprop.kernels.cuda.host import cublas_emulation

VARIABLE = "DELTAPROP_CUDA_SIM"
SIM_CUDA_VERSION = 13000  # what the stand-in's driver and runtime report (CUDA 13.0)
MULTIPROCESSORS = 1  # the stand-in device's: grids stay small, and grid-stride loops wrap at small sizes
DESCRIPTION = (f"CUDA simulator on the host CPU ({VARIABLE}=1): the .cu kernels in the C++ host harness,"
               " cuBLAS emulated in NumPy; no GPU")


def simulated() -> bool:
    """Whether ``DELTAPROP_CUDA_SIM`` asks for the stand-in ("1"; unset, "" or "0" do not)."""
    value = os.environ.get(VARIABLE, "")
    if value not in ("", "0", "1"):
        raise ValueError(f"environment variable {VARIABLE}: expected 1 (simulate CUDA on the host) or 0, got {value!r}")
    return value == "1"


# ---- the log ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """One thing that crossed the host/device boundary: ``kind`` is "launch", "gemm", "to_device" or
    "to_host"; ``name`` the kernel's name expression, the cuBLAS function or the operation; ``nbytes``
    the bytes copied (for a launch or a gemm: of the arrays it was passed)."""

    kind: str
    name: str
    nbytes: int


_recorders: list[list[Event]] = []
_recorders_lock = threading.Lock()


@contextlib.contextmanager
def recording() -> Iterator[list[Event]]:
    """``with recording() as log:`` appends to ``log`` every Event of the block (any thread)."""
    log: list[Event] = []
    with _recorders_lock:
        _recorders.append(log)
    try:
        yield log
    finally:
        with _recorders_lock:
            _recorders.remove(log)


def _record(kind: str, name: str, nbytes: int) -> None:
    if _recorders:
        event = Event(kind, name, int(nbytes))
        with _recorders_lock:
            for log in _recorders:
                log.append(event)


# ---- device arrays ---------------------------------------------------------------------------------------


class DeviceArray(np.ndarray):
    """A NumPy array standing for CuPy's device array (see the module docstring)."""

    __array_priority__ = 100.0

    @property
    def data(self) -> DevicePointer:
        """The device address of the first element, as CuPy's ``.data.ptr``."""
        return DevicePointer(self)

    def get(self) -> np.ndarray:
        _record("to_host", "get", self.nbytes)
        return np.array(self.view(np.ndarray))

    def item(self, *args):
        _record("to_host", "item", self.itemsize)
        return self.view(np.ndarray).item(*args)

    def tolist(self):
        _record("to_host", "tolist", self.nbytes)
        return self.view(np.ndarray).tolist()

    def _scalar(self, convert, name):
        _record("to_host", name, self.nbytes)
        return convert(self.view(np.ndarray))

    def __float__(self):
        return self._scalar(float, "float")

    def __int__(self):
        return self._scalar(int, "int")

    def __bool__(self):
        return self._scalar(bool, "bool")

    def __index__(self):
        return self._scalar(lambda x: x.__index__(), "index")

    def __format__(self, spec):
        return self._scalar(lambda x: format(x, spec), "format")

    def __getitem__(self, key):
        return _to_device(super().__getitem__(_plain(key)))

    def __setitem__(self, key, value):
        if type(value) is np.ndarray:  # CuPy uploads a host array assigned into a device one
            _record("to_device", "setitem", value.nbytes)
        super().__setitem__(_plain(key), _plain(value))

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        out = kwargs.get("out", ())
        _refuse_host(ufunc.__name__, inputs + tuple(out))
        result = getattr(ufunc, method)(*_plain(inputs), **_plain(kwargs))
        if out:
            return out[0] if len(out) == 1 else out
        return _to_device(result)

    def __array_function__(self, func, types_, args, kwargs):
        return _on_device(func, func.__name__, args, kwargs)


def _on_device(func, name, args, kwargs):
    """NumPy's ``func`` as CuPy's: no host array among the arguments, device arrays back (or ``out``)."""
    _refuse_host(name, args, kwargs)
    result = func(*_plain(args), **_plain(kwargs))
    return kwargs["out"] if kwargs.get("out") is not None else _to_device(result)


def _plain(value):
    """``value`` with every DeviceArray in it (one level of tuples, lists and dicts) as a plain ndarray."""
    if isinstance(value, DeviceArray):
        return value.view(np.ndarray)
    if isinstance(value, (tuple, list)):
        return type(value)(_plain(v) if isinstance(v, (DeviceArray, tuple, list)) else v for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _to_device(result):
    """A NumPy result as what CuPy returns: arrays and scalars as device arrays (0-d for a scalar)."""
    if isinstance(result, tuple):
        return tuple(_to_device(r) for r in result)
    if isinstance(result, np.ndarray):
        return result if isinstance(result, DeviceArray) else result.view(DeviceArray)
    if isinstance(result, np.generic):
        return np.asarray(result).view(DeviceArray)
    return result


def _refuse_host(name, args, kwargs=None):
    """TypeError where a plain NumPy array meets a device array, as CuPy refuses an implicit transfer."""
    values = list(args) + list((kwargs or {}).values())
    for value in values:
        items = value if isinstance(value, (tuple, list)) else (value,)
        if any(type(item) is np.ndarray for item in items):
            raise TypeError(f"{name}: a NumPy (host) array and a device array in one call: CuPy refuses an"
                            " implicit transfer (copy it with cupy.asarray, or bring the result back with .get())")


def _is_device(x) -> bool:
    return isinstance(x, DeviceArray)


def _upload(x, dtype=None, order="K", name="asarray") -> DeviceArray:
    host = np.array(x, dtype=dtype, order=order)
    _record("to_device", name, host.nbytes)
    return host.view(DeviceArray)


# ---- allocations, for the addresses cuBLAS is passed -----------------------------------------------------

_allocations: dict[int, weakref.ref] = {}  # start address -> the array that owns the memory
_allocations_lock = threading.Lock()


def _owner(array: np.ndarray) -> np.ndarray:
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array


class DevicePointer:
    """CuPy's MemoryPointer, as far as the backend reads it: ``ptr``, the address of the first element.
    Taking it records the allocation, so that cuBLAS's emulation can find the memory behind it."""

    def __init__(self, array: DeviceArray):
        self.ptr = array.__array_interface__["data"][0]
        owner = _owner(array)
        start, end = byte_bounds(owner)
        if end - start == owner.nbytes:  # one block of memory (a view of part of a buffer is not)
            with _allocations_lock:
                _allocations[start] = weakref.ref(owner)


def _resolve(address: int, nbytes: int, what: str) -> tuple[np.ndarray, int]:
    """(the allocation's bytes as a flat uint8 array, the offset of ``address`` in it); CublasError when
    ``nbytes`` from ``address`` do not lie inside one allocation (a device would read out of bounds)."""
    with _allocations_lock:
        for start, ref in list(_allocations.items()):
            owner = ref()
            if owner is None:
                del _allocations[start]
            elif start <= address < start + owner.nbytes:
                if address + nbytes > start + owner.nbytes:
                    raise cublas_emulation.invalid(
                        f"{what}: {nbytes} bytes from its address leave its allocation of {owner.nbytes} bytes"
                        f" {address - start} bytes further on (an out-of-bounds access on the device)")
                memory = np.frombuffer((ctypes.c_char * owner.nbytes).from_address(start), np.uint8)
                return memory, address - start
    raise cublas_emulation.invalid(f"{what}: address {address:#x} is in no device allocation")


# ---- the array module: cupy --------------------------------------------------------------------------------


def asarray(x, dtype=None, order="K"):
    if _is_device(x):
        return x if dtype is None or x.dtype == np.dtype(dtype) else x.astype(dtype)
    return _upload(x, dtype, order)


def array(x, dtype=None, copy=True, order="K"):
    if _is_device(x):
        return np.array(x.view(np.ndarray), dtype=dtype, copy=copy, order=order).view(DeviceArray)
    return _upload(x, dtype, order, "array")


def ascontiguousarray(x, dtype=None):
    """As NumPy's and CuPy's: at least 1-D; a device array that already is one, as it is."""
    if _is_device(x):
        if x.flags.c_contiguous and x.ndim and (dtype is None or x.dtype == np.dtype(dtype)):
            return x
        return np.ascontiguousarray(x.view(np.ndarray), dtype=dtype).view(DeviceArray)
    return _upload(np.ascontiguousarray(x, dtype=dtype), name="ascontiguousarray")


def asnumpy(x) -> np.ndarray:
    return x.get() if _is_device(x) else np.asarray(x)


def from_dlpack(x):
    return _upload(np.from_dlpack(x), name="from_dlpack")


def get_array_module(*args):
    return xp if any(_is_device(a) for a in args) else np


class _Device:
    """cupy.cuda.Device(): the one stand-in device."""

    id = 0
    compute_capability = "host"
    attributes = {"MultiProcessorCount": MULTIPROCESSORS}

    def __init__(self, device=0):
        if device != 0:
            raise ValueError(f"the CUDA stand-in has one device, 0; got {device!r}")

    def synchronize(self) -> None:
        """Kernels run to completion when launched: nothing to wait for."""


class _ArrayModule(types.ModuleType):
    """The stand-in's ``cupy``: the functions above, and every other NumPy function taking and giving
    device arrays (a host array among its arguments is refused)."""

    def __getattr__(self, name):
        found = getattr(np, name)
        if isinstance(found, (type, types.ModuleType)) or not callable(found):
            return found

        @functools.wraps(found)
        def on_device(*args, **kwargs):
            return _on_device(found, name, args, kwargs)

        return on_device


xp = _ArrayModule("cupy (deltaprop's host stand-in)")
xp.__version__ = "stand-in"
xp.ndarray = DeviceArray
for _function in (asarray, array, ascontiguousarray, asnumpy, from_dlpack, get_array_module):
    setattr(xp, _function.__name__, _function)
_cublas_handle = 1
xp.cuda = types.SimpleNamespace(Device=_Device, device=types.SimpleNamespace(get_cublas_handle=lambda: _cublas_handle))


# ---- CUDA's runtime API, cuBLAS's, NVRTC's version ----------------------------------------------------------


def _device_properties(device: int) -> dict:
    _Device(device)
    return {"name": DESCRIPTION.encode(), "multiProcessorCount": MULTIPROCESSORS, "totalGlobalMem": 0}


runtime = types.SimpleNamespace(
    driverGetVersion=lambda: SIM_CUDA_VERSION, runtimeGetVersion=lambda: SIM_CUDA_VERSION,
    getDeviceCount=lambda: 1, getDeviceProperties=_device_properties, CUDARuntimeError=RuntimeError,
    **{f"CUDA_R_{name}": code for name, code in (("32F", 0), ("64F", 1), ("16F", 2), ("16BF", 14))},
)


class _Cublas:
    """The part of cupy_backends.cuda.libs.cublas the backend calls."""

    CUBLAS_POINTER_MODE_HOST = 0
    CUBLAS_COMPUTE_32F, CUBLAS_COMPUTE_64F = 68, 70
    CUBLAS_GEMM_DEFAULT = cublas_emulation.GEMM_DEFAULT

    def _check_handle(self, handle):
        if handle != _cublas_handle:
            raise cublas_emulation.CublasError("CUBLAS_STATUS_NOT_INITIALIZED", f"handle {handle!r} is not a handle")

    def setPointerMode(self, handle, mode) -> None:  # noqa: N802 (cuBLAS's name)
        self._check_handle(handle)
        if mode != self.CUBLAS_POINTER_MODE_HOST:
            raise cublas_emulation.invalid(f"pointer mode {mode!r}: the emulation reads alpha and beta from host"
                                           " memory only (CUBLAS_POINTER_MODE_HOST, 0)")

    def gemmStridedBatchedEx(self, handle, *args) -> None:  # noqa: N802 (cuBLAS's name)
        self._check_handle(handle)
        cublas_emulation.gemm_strided_batched_ex(_resolve, *args)
        _, _, m, n, _, _, _, data_type, *_, batch, _, _ = args
        _record("gemm", "gemmStridedBatchedEx", m * n * batch * cublas_emulation.storage(data_type).itemsize)


cublas = _Cublas()


@functools.cache
def compiler_version() -> str:
    from deltaprop.kernels.cuda import host

    found = subprocess.run([host.compiler_path(), "-dumpfullversion", "-dumpversion"], capture_output=True, text=True)
    return f"none: the host harness compiles with {host.COMPILER} {found.stdout.strip()}"


nvrtc = types.SimpleNamespace(getVersion=lambda: (compiler_version(),))


# ---- the launcher ------------------------------------------------------------------------------------------


@functools.cache
def program(dtype: str):
    """The project's modules of ``dtype`` in the host harness, built once (and cached on disk)."""
    from deltaprop.kernels.cuda import host

    return host.build(host.project_units([dtype]))


class RawKernel:
    """One instantiation, launched as cupy.RawKernel: ``kernel(grid, block, args, shared_mem=0)``."""

    def __init__(self, dtype: str, expression: str):
        self.dtype, self.expression = dtype, expression

    def __call__(self, grid, block, args, shared_mem=0):
        args = tuple(args)
        for index, arg in enumerate(args):
            if type(arg) is np.ndarray:
                raise TypeError(f"{self.expression}: argument {index}: a NumPy (host) array; a kernel takes device"
                                " arrays (CuPy refuses a numpy.ndarray here)")
        program(self.dtype).launch(self.expression, grid, block, args, shared_mem=shared_mem)
        _record("launch", self.expression, sum(a.nbytes for a in args if isinstance(a, np.ndarray)))


def modules():
    """The stand-in's ``loader.Modules``: each kernel a harness instantiation."""
    from deltaprop.kernels.cuda import loader

    class HarnessModules(loader.Modules):
        def _get_function(self, source, dtype, expression):
            program(dtype)  # builds now, as RawModule compiles on the first fetch
            return RawKernel(dtype, expression)

    return HarnessModules()


# ---- the seam ------------------------------------------------------------------------------------------------


def availability() -> tuple[bool, str]:
    """(usable, a note): the stand-in needs a C++17 compiler for the harness."""
    from deltaprop.kernels.cuda import host

    try:
        host.compiler_path()
    except host.HarnessUnavailable as error:
        return False, f"{VARIABLE}=1, but {error}"
    return True, DESCRIPTION
