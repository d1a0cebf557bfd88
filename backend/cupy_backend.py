"""The CuPy backend ("cupy"): the contract on an NVIDIA GPU, with cuBLAS GEMM and the CUDA kernels of
``deltaprop.kernels.cuda``, in float32, float64, float16 and bfloat16 (the 16-bit types compute in float32).

Arrays live on the current device (``asarray`` brings NumPy arrays and DLPack producers there). The
kernels take what the reference takes: CuPy arrays run where they are; a NumPy argument is uploaded, and
an output that is not a C-contiguous CuPy array (a NumPy array, a strided view) is written through a
device copy. Those copies are for convenience and tests; the training step passes device arrays only.
GEMM reads transposed and strided device views in place, through cuBLAS's flags and leading dimensions.

- Kernels run asynchronously on the current stream; ``synchronize`` waits for them. The loss kernels
  return the mean loss as a Python float, as the contract says: one 4- or 8-byte copy that waits for
  the GPU. The losses are accumulated in the compute type (float32, or float64 for float64).
  ``device_loss`` leaves the mean loss on the device instead (what ``fit`` reads once per epoch).
- Scratch buffers (the row losses, the bias gradient's partial sums, GEMM's host scalars) are the
  calling thread's, allocated once per shape.
- A label outside [0, C) makes its row's loss NaN in the kernel; only a NaN loss has the labels checked
  (a second sync), so a bad label raises the reference's ValueError at no cost to a good batch. With
  labels, the loss kernels write delta_out through a device copy that reaches it only once the labels
  are known good (one B x C device copy per call), so a refused call leaves it unchanged, as on the
  CPU; ``device_loss``, which reads nothing, writes in place. Non-finite logits give a NaN loss, as in the reference;
  ``check_inputs=True`` checks them before the launch instead (a sync) and raises NonFiniteInputError.
- The ensemble's kernels (``stacked_bias_act``, ``stacked_act_backward``, ``stacked_loss``,
  ``stacked_bias_grad``) are the same CUDA kernels over a (K, B, n) stack: each takes a member count and
  a member stride per array (a 2-D call is a stack of one), so the workspace's strided views and shared
  (stride-0) targets are read and written in place, and member k's results are the 2-D kernel's on its
  matrices, bit for bit. ``stacked_loss`` checks labels before its launch (a sync) instead of staging
  delta_out. The optimizer updates over (K, P) stay the base class's CuPy expressions.
- The launch geometry and template arguments of each kernel live beside the kernels
  (``kernels/cuda/launch.py``), the cuBLAS call's arithmetic in ``kernels/cuda/cublas.py``, the copies
  of outputs that are not C-contiguous device arrays in ``backend/cupy_outputs.py``.

The backend runs on a ``CudaStack`` (its one seam): CuPy's, or with ``DELTAPROP_CUDA_SIM=1`` the host
stand-in of ``kernels/cuda/host/standin.py`` (tests on machines without a GPU; never by default).

Importing this module imports no CuPy: the constructor does, and ``availability`` asks the CUDA runtime
directly, without importing CuPy.
"""

from __future__ import annotations

import importlib.util
import math
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from deltaprop.backend.base import Backend, adam_bias_corrections, check_loss_kernel
from deltaprop.backend import checks
from deltaprop.backend.cupy_outputs import Outputs, member_stride, on_device
from deltaprop.errors import NonFiniteInputError
from deltaprop.kernels.activations import get_activation
from deltaprop.kernels.cuda import launch
from deltaprop.kernels.cuda.cublas import CUBLAS_TYPES, blas_layout, cublas_gemm
from deltaprop.kernels.cuda.loader import Modules
from deltaprop.kernels.dtypes import DTYPES, accumulation_dtype

INSTALL_HINT = "pip install 'deltaprop[cuda]' (cupy-cuda13x, nvidia-cuda-nvrtc, ml_dtypes)"
NULL = np.uint64(0)  # a null pointer argument
DLPACK_CUDA_DEVICES = (2, 13)  # kDLCUDA, kDLCUDAManaged


def _cuda_version(encoded: int) -> str:
    """CUDA's 1000 * major + 10 * minor as "major.minor"."""
    return f"{encoded // 1000}.{encoded % 1000 // 10}"


def cuda_usability(driver: int, linked: int, count: int) -> tuple[bool, str]:
    """(usable, why not) from the driver's CUDA version, that of the runtime CuPy links statically (both
    encoded as 1000 * major + 10 * minor) and the number of visible devices.

    CUDA's minor-version compatibility runs a runtime on any driver of its major version or newer (a
    13.2 runtime on a 13.0 driver), so only the majors are compared."""
    major = linked // 1000
    if driver == 0:
        return False, (
            "no NVIDIA driver is installed (CUDA reports driver version 0): install an NVIDIA driver for"
            f" CUDA {major}.0 or newer, and a GPU"
        )
    if driver // 1000 < major:
        return False, (
            f"the NVIDIA driver supports CUDA {_cuda_version(driver)}; CuPy's CUDA {_cuda_version(linked)} runtime"
            f" needs a driver for CUDA {major}.0 or newer: update the driver, or install the"
            f" cupy-cuda{driver // 1000}x wheel"
        )
    if count == 0:
        return False, "no CUDA device is visible (is CUDA_VISIBLE_DEVICES empty?)"
    return True, ""


@dataclass(frozen=True)
class CudaStack:
    """What the backend runs on: the array module (cupy), CUDA's runtime API, cuBLAS's API, NVRTC (its
    version) and the kernel launcher (a loader.Modules); ``simulated``: the host stand-in's."""

    cupy: Any
    runtime: Any
    cublas: Any
    nvrtc: Any
    modules: Modules
    simulated: bool = False


def cuda_stack() -> CudaStack:
    """CuPy's stack, or the host stand-in's where DELTAPROP_CUDA_SIM=1 asks for it (imports CuPy or the harness)."""
    from deltaprop.kernels.cuda.host import standin

    if standin.simulated():
        return CudaStack(standin.xp, standin.runtime, standin.cublas, standin.nvrtc, standin.modules(), True)
    import cupy
    from cupy_backends.cuda.api import runtime
    from cupy_backends.cuda.libs import cublas, nvrtc

    return CudaStack(cupy, runtime, cublas, nvrtc, Modules())


def _accum_scalar(dtype) -> type:
    return accumulation_dtype(dtype).type


def _numpy_dtype(dtype):
    """``dtype`` as a NumPy dtype; a name of the dtype table (bfloat16 included) or anything NumPy reads."""
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype].numpy_dtype()
    return np.dtype(dtype)


class CupyBackend(Backend):
    """The contract on CuPy arrays: cuBLAS GEMM and fused CUDA kernels (see the module docstring)."""

    name = "cupy"
    device = "cuda"
    results_on_host = False

    def __init__(self, check_inputs: bool = False):
        self._stack = cuda_stack()
        self._cupy = self._stack.cupy
        self.check_inputs = check_inputs
        self._scratch = threading.local()  # buffers reused by the calling thread's launches (per shape)
        self._modules = self._stack.modules
        self.max_blocks = launch.max_blocks(self._cupy.cuda.Device().attributes["MultiProcessorCount"])

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        """(usable here, why not): CuPy installed, a driver of CuPy's CUDA major version or newer, a device;
        with DELTAPROP_CUDA_SIM=1, a C++ compiler for the host stand-in (then the note says so)."""
        from deltaprop.kernels.cuda.host import standin

        try:
            if standin.simulated():
                return standin.availability()
        except ValueError as error:
            return False, str(error)
        if importlib.util.find_spec("cupy") is None:
            return False, f"CuPy is not installed: {INSTALL_HINT}"
        try:
            from cupy_backends.cuda.api import runtime  # the CUDA runtime only: no `import cupy`

            driver, linked = runtime.driverGetVersion(), runtime.runtimeGetVersion()
            try:
                count = runtime.getDeviceCount()
            except runtime.CUDARuntimeError:
                count = 0  # no driver, or one too old: the versions say which
        except Exception as error:  # a broken install or a refusing driver: report it, never raise
            return False, f"CuPy cannot reach a CUDA device ({type(error).__name__}: {error}); {INSTALL_HINT}"
        return cuda_usability(driver, linked, count)

    # ---- lifecycle and arrays ----

    @property
    def xp(self):
        return self._cupy

    def asarray(self, x, dtype=None):
        """``x`` (NumPy, CuPy, a DLPack producer or a nested sequence) as a C-contiguous CuPy array.

        CUDA DLPack producers (torch, jax) come in without a copy; host data is converted on the host
        (fewer bytes to move, and NumPy casts to bfloat16 through ml_dtypes) and copied once.
        """
        cp = self._cupy
        dtype = None if dtype is None else _numpy_dtype(dtype)
        if not isinstance(x, (cp.ndarray, np.ndarray)) and hasattr(x, "__dlpack__"):
            on_cuda = hasattr(x, "__dlpack_device__") and x.__dlpack_device__()[0] in DLPACK_CUDA_DEVICES
            x = cp.from_dlpack(x) if on_cuda else np.from_dlpack(x)
        if not isinstance(x, cp.ndarray):
            x = np.asarray(x, dtype=dtype)
        return cp.ascontiguousarray(x, dtype=dtype)

    def to_numpy(self, x) -> np.ndarray:
        return self._cupy.asnumpy(x)

    def empty(self, shape, dtype):
        return self._cupy.empty(shape, dtype=_numpy_dtype(dtype))

    def synchronize(self) -> None:
        self._cupy.cuda.Device().synchronize()

    def warmup(self, dtypes=None, activations=("relu",), losses=("softmax_xent",), batches=None, uses=None,
               progress=None) -> float:
        """Compiles every kernel module for ``dtypes`` (whatever the other choices: a module holds every
        activation and loss) and creates the cuBLAS handle; returns seconds spent. No progress is reported."""
        dtypes = [d.name for d in checks.check_warmup(self, dtypes, activations, losses, batches, uses)[0]]
        start = time.perf_counter()
        self._modules.compile_all(dtypes)
        self._cupy.cuda.device.get_cublas_handle()
        self.synchronize()
        return time.perf_counter() - start

    def describe(self) -> dict:
        runtime, nvrtc = self._stack.runtime, self._stack.nvrtc
        device = self._cupy.cuda.Device()
        properties = runtime.getDeviceProperties(device.id)
        return {
            **super().describe(),
            "gpu": properties["name"].decode(),
            "compute_capability": device.compute_capability,
            "multiprocessors": properties["multiProcessorCount"],
            "memory_gib": round(properties["totalGlobalMem"] / 2**30, 1),
            "driver_cuda": _cuda_version(runtime.driverGetVersion()),
            "cupy_cuda_runtime": _cuda_version(runtime.runtimeGetVersion()),  # linked into CuPy
            "nvrtc": ".".join(str(v) for v in nvrtc.getVersion()),
            "cupy": self._cupy.__version__,
            "simulated": self._stack.simulated,
        }

    # ---- argument plumbing ----

    def _device(self, kernel, name, x):
        return on_device(self._cupy, kernel, name, x)

    def _input(self, kernel, name, x, stacked=False):
        """An input as a C-contiguous device array, or with ``stacked`` a stack (K, ...) whose members are
        each C-contiguous at any member stride (copied only if it is not one)."""
        x = self._device(kernel, name, x)
        return x if stacked and member_stride(x) is not None else self._cupy.ascontiguousarray(x)

    @staticmethod
    def _members(stacked, *arrays):
        """(the kernel's pointer arguments, their member strides as np.int64) for ``arrays``: of a 2-D call,
        each as it is with stride 0; of a stack, each at its ``member_stride``, passed by its device address
        where it is not C-contiguous (CuPy passes an array as its address either way; the stand-in checks
        the dtype of a C-contiguous one)."""
        if not stacked:
            return arrays, (np.int64(0),) * len(arrays)
        pointers = tuple(x if x.flags.c_contiguous else np.uint64(x.data.ptr) for x in arrays)
        return pointers, tuple(np.int64(member_stride(x)) for x in arrays)

    def _reused(self, key, make):
        """The calling thread's buffers for ``key``, made by ``make()`` on first use, then reused: a
        launch allocates nothing after the first at a shape, and no thread writes another's buffers."""
        held = self._scratch.__dict__
        buffers = held.get(key)
        if buffers is None:
            buffers = held[key] = make()
        return buffers

    def _outputs(self, kernel):
        """The calling thread's Outputs for ``kernel``, made once and emptied for each call."""
        outputs = self._reused(("outputs", kernel), lambda: Outputs(self.xp, kernel))
        outputs.clear()
        return outputs

    def _launch(self, kernel, dtype, variant, geometry: launch.Launch, args):
        function = self._modules.function(kernel, dtype.name, *variant)
        function(geometry.grid, geometry.block, args, shared_mem=geometry.shared_mem)

    def _flat_launch(self, n, dtype):
        return launch.flat_launch(n, dtype.itemsize, self.max_blocks)

    def _launch_rows(self, kernel, variant, dtype, rows, cols, args, caches_row=False):
        """Launch a row-wise kernel with the team that suits rows of ``cols``; ``caches_row`` kernels take
        a last argument saying whether a block keeps its row in shared memory."""
        accum_itemsize = np.dtype(_accum_scalar(dtype)).itemsize
        team, geometry, cache = launch.rows_launch(rows, cols, accum_itemsize, self.max_blocks, caches_row)
        tail = (np.int32(cache),) if caches_row else ()
        self._launch(kernel, dtype, variant + (team,), geometry, args + tail)

    # ---- kernels ----

    def gemm(self, a, b, out=None, trans_a=False, trans_b=False, alpha=1.0, beta=0.0):
        """cuBLAS (gemmStridedBatchedEx; a 2-D product is a stack of one). Transposed and other strided
        views on the device are read in place through cuBLAS's transpose flags and leading dimensions."""
        shape = checks.check_gemm(a, b, out, trans_a, trans_b, self.device)
        a, b = self._device("gemm", "a", a), self._device("gemm", "b", b)
        outputs = self._outputs("gemm")
        if out is None:
            out, beta = self._cupy.empty(shape, dtype=a.dtype), 0.0
        writable = out if self._gemm_writes_in_place(out) else outputs.buffer("out", out, read=beta != 0.0)
        self._cublas_gemm(a, b, writable, bool(trans_a), bool(trans_b), alpha, beta)
        outputs.write_back()
        return out

    def _gemm_writes_in_place(self, out):
        return isinstance(out, self._cupy.ndarray) and blas_layout(out.shape, out.strides, out.itemsize) is not None

    def _cublas_gemm(self, a, b, out, trans_a, trans_b, alpha, beta):
        runtime, cublas = self._stack.runtime, self._stack.cublas
        # an operand no leading dimension describes (e.g. a broadcast) is copied once
        a, b = (x if blas_layout(x.shape, x.strides, x.itemsize) else self._cupy.ascontiguousarray(x) for x in (a, b))
        call = cublas_gemm(a, b, out, trans_a, trans_b)
        first, second = (a, b) if call.first_is_a else (b, a)
        data_type_name, compute_type_name = CUBLAS_TYPES[a.dtype.name]
        data_type, compute_type = getattr(runtime, data_type_name), getattr(cublas, compute_type_name)
        accum = _accum_scalar(a.dtype)
        # cuBLAS reads host-mode scalars before the call returns: the next call may overwrite them
        scalars = self._reused(("gemm scalars", accum), lambda: np.empty(2, dtype=accum))
        scalars[0], scalars[1] = alpha, beta
        handle = self._cupy.cuda.device.get_cublas_handle()
        cublas.setPointerMode(handle, cublas.CUBLAS_POINTER_MODE_HOST)
        cublas.gemmStridedBatchedEx(
            handle, int(call.trans_first), int(call.trans_second), call.m, call.n, call.k,
            scalars.ctypes.data,
            first.data.ptr, data_type, call.ld_first, call.stride_first,
            second.data.ptr, data_type, call.ld_second, call.stride_second,
            scalars.ctypes.data + scalars.itemsize,
            out.data.ptr, data_type, call.ld_out, call.stride_out,
            call.batch, compute_type, cublas.CUBLAS_GEMM_DEFAULT,
        )

    def bias_act(self, acc, b, act, z_out=None, a_out=None):
        dtype = checks.check_rows("bias_act", self.device, b, acc=acc, z_out=z_out, a_out=a_out)
        return self._bias_act("bias_act", dtype, acc, b, act, z_out, a_out, stacked=False)

    def stacked_bias_act(self, acc, b, act, z_out=None, a_out=None):
        dtype = checks.check_stacked("stacked_bias_act", self.device, b, acc=acc, z_out=z_out, a_out=a_out)
        return self._bias_act("stacked_bias_act", dtype, acc, b, act, z_out, a_out, stacked=True)

    def _bias_act(self, kernel, dtype, acc, b, act, z_out, a_out, stacked):
        """bias_act on acc (B, n) and b (n,), or with ``stacked`` on a (K, B, n) stack and b (K, n)."""
        get_activation(act)
        acc, b = self._input(kernel, "acc", acc, stacked), self._input(kernel, "b", b, stacked)
        outputs = self._outputs(kernel)
        z_out, z = outputs.output("z_out", z_out, acc.shape, dtype, stacked)
        a_out, a = outputs.output("a_out", a_out, acc.shape, dtype, stacked)
        members, rows, cols = acc.shape if stacked else (1, *acc.shape)
        pointers, strides = self._members(stacked, acc, b, z, a)
        self._launch("bias_act", dtype, (launch.activation_functor(act),),
                     launch.bias_act_launch(members, rows, cols, self.max_blocks),
                     (*pointers, np.int64(members), np.int64(rows), np.int64(cols), *strides))
        outputs.write_back()
        return z_out, a_out

    def act_backward(self, g, z, act, out=None):
        dtype = checks.check_rows("act_backward", self.device, g=g, z=z, out=out)
        return self._act_backward("act_backward", dtype, g, z, act, out, stacked=False)

    def stacked_act_backward(self, g, z, act, out=None):
        dtype = checks.check_stacked("stacked_act_backward", self.device, g=g, z=z, out=out)
        return self._act_backward("stacked_act_backward", dtype, g, z, act, out, stacked=True)

    def _act_backward(self, kernel, dtype, g, z, act, out, stacked):
        """act_backward on (B, n) matrices, or with ``stacked`` on (K, B, n) stacks."""
        get_activation(act)
        g, z = self._input(kernel, "g", g, stacked), self._input(kernel, "z", z, stacked)
        outputs = self._outputs(kernel)
        out, result = outputs.output("out", out, g.shape, dtype, stacked)
        members = g.shape[0] if stacked else 1
        pointers, strides = self._members(stacked, g, z, result)
        self._launch("act_backward", dtype, (launch.activation_functor(act),),
                     launch.act_backward_launch(members, g.size // members, dtype.itemsize, self.max_blocks),
                     (*pointers, np.int64(members), np.int64(g.size // members), *strides))
        outputs.write_back()
        return out

    def softmax(self, z, out=None):
        dtype = checks.check_rows("softmax", self.device, z=z, out=out)
        z = self._input("softmax", "z", z)
        outputs = self._outputs("softmax")
        out, result = outputs.output("out", out, z.shape, dtype)
        rows, cols = z.shape
        pointers, strides = self._members(False, z, NULL, result)
        args = (*pointers, NULL, np.int64(1), np.int64(rows), np.int64(cols), *strides, _accum_scalar(dtype)(1))
        self._launch_rows("softmax", (launch.NO_TARGETS,), dtype, rows, cols, args, caches_row=True)
        outputs.write_back()
        return out

    def bias_grad(self, delta, out=None):
        dtype = checks.check_bias_grad(self.device, delta, out)
        return self._bias_grad("bias_grad", dtype, delta, out, stacked=False)

    def stacked_bias_grad(self, delta, out=None):
        dtype = checks.check_stacked_bias_grad(self.device, delta, out)
        return self._bias_grad("stacked_bias_grad", dtype, delta, out, stacked=True)

    def _bias_grad(self, kernel, dtype, delta, out, stacked):
        """Column sums of delta (B, n) into (n,), or with ``stacked`` of each member of (K, B, n) into (K, n)."""
        delta = self._input(kernel, "delta", delta, stacked)
        members, rows, cols = delta.shape if stacked else (1, *delta.shape)
        outputs = self._outputs(kernel)
        out, result = outputs.output("out", out, delta.shape[::2] if stacked else (cols,), dtype, stacked)
        geometry = launch.column_sums_launch(members, rows, cols, self.max_blocks)
        accum = _accum_scalar(dtype)
        partial = NULL if geometry.second is None else self._reused(
            ("column sums", members, geometry.chunks, cols, accum),
            lambda: self._cupy.empty((members, geometry.chunks, cols), accum))
        (delta, result), (delta_stride, out_stride) = self._members(stacked, delta, result)
        self._launch("bias_grad", dtype, (), geometry.first,
                     (delta, result, partial, np.int64(members), np.int64(rows), np.int64(cols),
                      np.int64(geometry.chunk_rows), delta_stride, out_stride))
        if geometry.second is not None:
            self._launch("column_sums_of_partials", dtype, (), geometry.second,
                         (partial, result, np.int64(members), np.int64(geometry.chunks), np.int64(cols), out_stride))
        outputs.write_back()
        return out

    def sgd_update(self, params, grads, lr, weight_decay=0.0):
        dtype = checks.check_flat("sgd_update", self.device, params=params, grads=grads)
        scalar = _accum_scalar(dtype)
        outputs = self._outputs("sgd_update")
        p = outputs.buffer("params", params, read=True)
        grads = self._input("sgd_update", "grads", grads)
        self._launch("sgd_update", dtype, (), self._flat_launch(p.size, dtype),
                     (p, grads, np.int64(p.size), scalar(lr), scalar(weight_decay)))
        outputs.write_back()

    def momentum_update(self, params, grads, velocity, lr, momentum=0.9, nesterov=False, weight_decay=0.0):
        dtype = checks.check_flat("momentum_update", self.device, params=params, grads=grads, velocity=velocity)
        scalar = _accum_scalar(dtype)
        outputs = self._outputs("momentum_update")
        p, v = outputs.buffer("params", params, read=True), outputs.buffer("velocity", velocity, read=True)
        grads = self._input("momentum_update", "grads", grads)
        self._launch("momentum_update", dtype, (), self._flat_launch(p.size, dtype),
                     (p, grads, v, np.int64(p.size), scalar(lr), scalar(momentum), scalar(weight_decay),
                      np.int32(bool(nesterov))))
        outputs.write_back()

    def adam_update(self, params, grads, m, v, step, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                    weight_decay=0.0, decoupled=False):
        dtype = checks.check_adam(self.device, params, grads, m, v, step)
        scalar = _accum_scalar(dtype)
        outputs = self._outputs("adam_update")
        p = outputs.buffer("params", params, read=True)
        m, v = outputs.buffer("m", m, read=True), outputs.buffer("v", v, read=True)
        grads = self._input("adam_update", "grads", grads)
        bias1, bias2 = adam_bias_corrections(step, beta1, beta2)
        self._launch("adam_update", dtype, (), self._flat_launch(p.size, dtype),
                     (p, grads, m, v, np.int64(p.size), scalar(lr), scalar(beta1), scalar(beta2),
                      scalar(1 - float(beta1)), scalar(1 - float(beta2)), scalar(eps), scalar(weight_decay),
                      scalar(bias1), scalar(bias2), np.int32(bool(decoupled))))
        outputs.write_back()

    # ---- the loss kernels ----

    def _loss(self, kernel, z, targets, delta_out, scale, z_name="z"):
        """Launch a loss kernel (one loss per row), then reduce the rows; returns the mean loss.

        The label range is checked only after a NaN loss (see the module docstring), finiteness only
        with ``check_inputs``."""
        loss, targets, outputs = self._queued_loss(kernel, z, targets, delta_out, scale, z_name, staged=True)
        value = float(loss)
        if math.isnan(value) and targets.ndim == 1:
            checks.check_label_range(kernel, targets, z.shape[1], self._cupy)
        outputs.write_back()  # after the label check: a bad label leaves a delta_out written through a copy as it was
        return value

    def device_loss(self, kernel, z, targets, delta_out=None):
        loss, _, outputs = self._queued_loss(check_loss_kernel("device_loss", kernel), z, targets, delta_out, None, "z")
        outputs.write_back()  # no label check without a read: a bad label is found where the loss is read
        return loss

    def _queued_loss(self, kernel, z, targets, delta_out, scale, z_name, staged=False):
        """(the mean loss as a 0-d device array of the accumulation dtype, the targets on the device, the
        outputs still to write back) of the launches of ``_loss``, which nothing has read yet; the array is the calling thread's for
        this batch size and accumulation dtype, reused by its next loss of that shape."""
        kind, scale = checks.check_loss(kernel, self.device, z, targets, delta_out, scale, z_name)
        if self.check_inputs and not bool(self._cupy.get_array_module(z).isfinite(z).all()):
            raise NonFiniteInputError(f"{kernel}: {z_name}: expected finite values, got NaN or infinity")
        dtype = z.dtype
        z = self._input(kernel, z_name, z)
        if kind == "labels":
            targets = self._device(kernel, "labels", targets).astype(np.int64, copy=False)
        targets = self._input(kernel, "targets", targets)
        outputs = self._outputs(kernel)
        # staged: labels are checked after the read, and a bad one must leave delta_out as it was
        delta = NULL if delta_out is None else outputs.buffer("delta_out", delta_out, staged=staged and kind == "labels")
        loss = self._launch_loss(kernel, kind, dtype, z, targets, delta, scale, stacked=False)[1]
        return loss, targets, outputs

    def stacked_loss(self, kernel, z, targets, delta_out):
        """The loss kernels over the (K, B, C) stack in place (any member strides; shared targets at
        stride 0). Labels are checked before the launch (a sync), so a bad one leaves delta_out as it was
        without a staged copy."""
        dtype = checks.check_stacked(check_loss_kernel("stacked_loss", kernel), self.device, z=z, delta_out=delta_out)
        kind = checks.check_stacked_targets(kernel, z, targets)
        z = self._input(kernel, "z", z, stacked=True)
        if kind == "labels":
            targets = self._device(kernel, "labels", targets).astype(np.int64, copy=False)
            checks.check_label_range(kernel, targets, z.shape[2], self._cupy)
        targets = self._input(kernel, "targets", targets, stacked=True)
        outputs = self._outputs("stacked_loss")
        delta = outputs.buffer("delta_out", delta_out, stacked=True)
        means = self._launch_loss(kernel, kind, dtype, z, targets, delta, 1.0 / z.shape[1], stacked=True)[0]
        outputs.write_back()
        return means.astype(np.float64)

    def _launch_loss(self, kernel, kind, dtype, z, targets, delta, scale, stacked):
        """Launch loss ``kernel`` on z (B, C), or with ``stacked`` on a (K, B, C) stack (one loss per row),
        then each member's mean of its rows; returns (the (K,) means in the accumulation dtype, a 0-d view of
        member 0's: a 2-D call's loss, K = 1), the calling thread's buffers for this shape, reused by its
        next loss of that shape."""
        members, rows, cols = z.shape if stacked else (1, *z.shape)
        accum = _accum_scalar(dtype)

        def buffers():
            means = self._cupy.empty(members, dtype=accum)
            return self._cupy.empty(members * rows, dtype=accum), means, means[:1].reshape(())

        row_loss, means, first = self._reused(("loss", members, rows, accum), buffers)
        pointers, strides = self._members(stacked, z, targets, delta)
        args = (*pointers, row_loss, np.int64(members), np.int64(rows), np.int64(cols), *strides, accum(scale))
        self._launch_rows(kernel, launch.LOSS_VARIANTS[kernel] + (launch.TARGETS[kind],), dtype, members * rows, cols,
                          args, caches_row=kernel == "softmax_xent")
        self._launch("mean_of_rows", dtype, (), launch.mean_launch(members, self.max_blocks),
                     (row_loss, np.int64(members), np.int64(rows), means))
        return means, first
