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
- A label outside [0, C) makes its row's loss NaN in the kernel; only a NaN loss has the labels checked
  (a second sync), so a bad label raises the reference's ValueError at no cost to a good batch (after
  delta_out was written). Non-finite logits give a NaN loss, as in the reference; ``check_inputs=True``
  checks them before the launch instead (a sync) and raises a ValueError.

Importing this module imports no CuPy: the constructor does, and ``availability`` asks the CUDA runtime
directly, without importing CuPy.
"""

from __future__ import annotations

import importlib.util
import math
import time
from dataclasses import dataclass

import numpy as np

from deltaprop.backend.base import (
    Backend,
    check_dtypes,
    check_flat,
    check_gemm,
    check_label_range,
    check_matrix,
    check_rows,
    check_shape,
    check_targets,
    warmup_selection,
)
from deltaprop.kernels.activations import get_activation
from deltaprop.kernels.cuda.loader import Modules, row_team
from deltaprop.kernels.dtypes import DTYPES

INSTALL_HINT = "pip install 'deltaprop[cuda]' (cupy-cuda13x, nvidia-cuda-nvrtc, ml_dtypes)"
THREADS = 256  # threads per block of the 1-D and row-wise launches
BLOCKS_PER_SM = 16  # grid-stride loops: at most this many blocks per multiprocessor
MAX_GRID_Y = 65535
ROW_CACHE_BYTES = 40 * 1024  # a block-per-row softmax keeps its row in shared memory up to this size
MEAN_THREADS = 1024  # the one block that reduces the per-row losses
VECTOR_BYTES = 16  # a thread of a flat kernel takes chunks of 16 bytes (common.cuh: vector_width)
NULL = np.uint64(0)  # a null pointer argument
ACCUM_SCALAR = {"float": np.float32, "double": np.float64}  # NumPy scalar of each accum_ctype
# dtype -> (cudaDataType of the matrices, cuBLAS compute type); the 16-bit types compute in float32
CUBLAS_TYPES = {
    "float32": ("CUDA_R_32F", "CUBLAS_COMPUTE_32F"),
    "float64": ("CUDA_R_64F", "CUBLAS_COMPUTE_64F"),
    "float16": ("CUDA_R_16F", "CUBLAS_COMPUTE_32F"),
    "bfloat16": ("CUDA_R_16BF", "CUBLAS_COMPUTE_32F"),
}
TARGET_KINDS = {"labels": "LabelTargets<{T}>", "matrix": "MatrixTargets<{T}>"}
DLPACK_CUDA_DEVICES = (2, 13)  # kDLCUDA, kDLCUDAManaged


def _cuda_version(encoded: int) -> str:
    """CUDA's 1000 * major + 10 * minor as "major.minor"."""
    return f"{encoded // 1000}.{encoded % 1000 // 10}"


def _blocks(count: int, per_block: int) -> int:
    return -(-count // per_block)


def _accum_scalar(dtype) -> type:
    return ACCUM_SCALAR[DTYPES[dtype.name].accum_ctype]


def _numpy_dtype(dtype):
    """``dtype`` as a NumPy dtype; a name of the dtype table (bfloat16 included) or anything NumPy reads."""
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype].numpy_dtype()
    return np.dtype(dtype)


def on_device(cp, kernel, name, x):
    """An array argument on the device in its own layout: CuPy arrays as they are, NumPy arrays uploaded."""
    if isinstance(x, cp.ndarray):
        return x
    if isinstance(x, np.ndarray):
        return cp.asarray(x)
    raise TypeError(f"{kernel}: {name}: expected a CuPy or NumPy array, got {type(x).__module__}.{type(x).__name__}")


def blas_layout(shape, strides, itemsize):
    """How cuBLAS (column-major) reads a matrix, or a stack of them, of this layout without a copy.

    shape, strides: of a 2-D (rows, cols) or 3-D (stack, rows, cols) array, strides in bytes.
    Returns (transposed, leading dimension, stack stride) in elements, where ``transposed`` means cuBLAS
    sees the transpose (a row-major matrix); None where no leading dimension fits (then copy).
    """
    if any(s < 0 or s % itemsize for s in strides):
        return None
    rows, cols = shape[-2:]
    row_step, col_step = strides[-2] // itemsize, strides[-1] // itemsize
    stack_step = strides[0] // itemsize if len(shape) == 3 else 0
    if col_step == 1 or cols == 1:  # rows are contiguous: the transpose of a column-major matrix
        lead = row_step if rows > 1 else cols
        if lead >= cols:
            return True, lead, stack_step
    if row_step == 1 or rows == 1:  # columns are contiguous: column-major
        lead = col_step if cols > 1 else rows
        if lead >= rows:
            return False, lead, stack_step
    return None


@dataclass(frozen=True)
class GemmPlan:
    """One column-major cuBLAS call, for each of ``batch`` products: C = op(first) @ op(second), where
    C (m, n) is ``out`` or, when cuBLAS must write out's transpose, out.T = op(b).T @ op(a).T."""

    first_is_a: bool
    trans_first: bool
    ld_first: int
    stride_first: int
    trans_second: bool
    ld_second: int
    stride_second: int
    ld_out: int
    stride_out: int
    m: int
    n: int
    k: int
    batch: int


def gemm_plan(a, b, out, trans_a, trans_b) -> GemmPlan:
    """The cuBLAS call for out = op(a) @ op(b) on arrays that ``blas_layout`` describes (2-D or 3-D).

    cuBLAS reads a matrix X either as stored (column-major) or transposed (row-major); its op flag is
    then "X is transposed" xor "op transposes X". A row-major ``out`` is written as out.T instead.
    """
    (a_t, lda, stride_a), (b_t, ldb, stride_b), (out_t, ldc, stride_c) = (
        blas_layout(x.shape, x.strides, x.itemsize) for x in (a, b, out)
    )
    m, n = out.shape[-2:]
    k = a.shape[-2] if trans_a else a.shape[-1]
    batch = out.shape[0] if out.ndim == 3 else 1
    op_a, op_b = a_t != trans_a, b_t != trans_b
    if out_t:
        return GemmPlan(False, not op_b, ldb, stride_b, not op_a, lda, stride_a, ldc, stride_c, n, m, k, batch)
    return GemmPlan(True, op_a, lda, stride_a, op_b, ldb, stride_b, ldc, stride_c, m, n, k, batch)


class CupyBackend(Backend):
    """The contract on CuPy arrays: cuBLAS GEMM and fused CUDA kernels (see the module docstring)."""

    name = "cupy"
    device = "cuda"

    def __init__(self, check_inputs: bool = False):
        import cupy

        self._cupy = cupy
        self.check_inputs = check_inputs
        self._modules = Modules()
        self.max_blocks = cupy.cuda.Device().attributes["MultiProcessorCount"] * BLOCKS_PER_SM

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        """(usable here, why not): CuPy installed, a driver new enough for its CUDA runtime, a device."""
        if importlib.util.find_spec("cupy") is None:
            return False, f"CuPy is not installed: {INSTALL_HINT}"
        try:
            from cupy_backends.cuda.api import runtime  # the CUDA runtime only: no `import cupy`

            driver, needed = runtime.driverGetVersion(), runtime.runtimeGetVersion()
            if driver == 0:
                return False, (
                    "no NVIDIA driver is installed (CUDA reports driver version 0): install the NVIDIA driver"
                    f" for CUDA {_cuda_version(needed)} or newer, and a GPU"
                )
            if driver < needed:
                return False, (
                    f"the NVIDIA driver supports CUDA {_cuda_version(driver)}, CuPy needs {_cuda_version(needed)}:"
                    f" update the driver, or install the cupy-cuda{driver // 1000}x wheel"
                )
            count = runtime.getDeviceCount()
        except Exception as error:  # a broken install or a refusing driver: report it, never raise
            return False, f"CuPy cannot reach a CUDA device ({type(error).__name__}: {error}); {INSTALL_HINT}"
        if count == 0:
            return False, "no CUDA device is visible (is CUDA_VISIBLE_DEVICES empty?)"
        return True, ""

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

    def zeros(self, shape, dtype):
        return self._cupy.zeros(shape, dtype=_numpy_dtype(dtype))

    def synchronize(self) -> None:
        self._cupy.cuda.Device().synchronize()

    def warmup(self, dtypes=None, activations=("relu",), losses=("softmax_xent",), batches=None, uses=None,
               progress=None) -> float:
        """Compiles every kernel module for ``dtypes`` (whatever the other choices: a module holds every
        activation and loss) and creates the cuBLAS handle; returns seconds spent. No progress is reported."""
        dtypes = [d.name for d in warmup_selection(self, dtypes, activations, losses, batches, uses)[0]]
        start = time.perf_counter()
        self._modules.compile_all(dtypes)
        self._cupy.cuda.device.get_cublas_handle()
        self.synchronize()
        return time.perf_counter() - start

    def describe(self) -> dict:
        from cupy_backends.cuda.api import runtime
        from cupy_backends.cuda.libs import nvrtc

        device = self._cupy.cuda.Device()
        properties = runtime.getDeviceProperties(device.id)
        return {
            **super().describe(),
            "gpu": properties["name"].decode(),
            "compute_capability": device.compute_capability,
            "multiprocessors": properties["multiProcessorCount"],
            "memory_gib": round(properties["totalGlobalMem"] / 2**30, 1),
            "driver_cuda": _cuda_version(runtime.driverGetVersion()),
            "cuda_runtime": _cuda_version(runtime.runtimeGetVersion()),
            "nvrtc": ".".join(str(v) for v in nvrtc.getVersion()),
            "cupy": self._cupy.__version__,
        }

    # ---- argument plumbing ----

    def _device(self, kernel, name, x):
        return on_device(self._cupy, kernel, name, x)

    def _input(self, kernel, name, x):
        """An input as a C-contiguous device array (copied only if it is not one)."""
        return self._cupy.ascontiguousarray(self._device(kernel, name, x))

    def _launch(self, kernel, dtype, variant, grid, block, args, shared_mem=0):
        function = self._modules.function(kernel, dtype.name, *variant)
        function(grid, block, args, shared_mem=shared_mem)

    def _flat_grid(self, n, dtype):
        """The grid of a flat kernel over ``n`` elements of ``dtype``: a thread per 16-byte chunk, at most
        max_blocks blocks (the kernels' grid-stride loops cover the rest)."""
        return (min(_blocks(_blocks(n, VECTOR_BYTES // dtype.itemsize), THREADS), self.max_blocks),)

    def _launch_rows(self, kernel, variant, dtype, rows, cols, args, caches_row=False):
        """Launch a row-wise kernel with the team that suits rows of ``cols``; ``caches_row`` kernels take
        a last argument saying whether a block keeps its row in shared memory."""
        team, lanes = row_team(cols)
        if lanes:
            grid, shared, cache = min(_blocks(rows * lanes, THREADS), self.max_blocks), 0, False
        else:
            row_bytes = cols * np.dtype(_accum_scalar(dtype)).itemsize
            grid, cache = min(rows, self.max_blocks), caches_row and row_bytes <= ROW_CACHE_BYTES
            shared = row_bytes if cache else 0
        tail = (np.int32(cache),) if caches_row else ()
        self._launch(kernel, dtype, variant + (team,), (grid,), (THREADS,), args + tail, shared)

    # ---- kernels ----

    def gemm(self, a, b, out=None, trans_a=False, trans_b=False, alpha=1.0, beta=0.0):
        """cuBLAS (gemmStridedBatchedEx; a 2-D product is a stack of one). Transposed and other strided
        views on the device are read in place through cuBLAS's transpose flags and leading dimensions."""
        shape = check_gemm(a, b, out, trans_a, trans_b, self.device)
        a, b = self._device("gemm", "a", a), self._device("gemm", "b", b)
        outputs = Outputs(self, "gemm")
        if out is None:
            out, beta = self._cupy.empty(shape, dtype=a.dtype), 0.0
        writable = out if self._gemm_writes_in_place(out) else outputs.buffer("out", out, read=beta != 0.0)
        self._cublas_gemm(a, b, writable, bool(trans_a), bool(trans_b), alpha, beta)
        outputs.write_back()
        return out

    def _gemm_writes_in_place(self, out):
        return isinstance(out, self._cupy.ndarray) and blas_layout(out.shape, out.strides, out.itemsize) is not None

    def _cublas_gemm(self, a, b, out, trans_a, trans_b, alpha, beta):
        from cupy_backends.cuda.api import runtime
        from cupy_backends.cuda.libs import cublas

        # an operand no leading dimension describes (e.g. a broadcast) is copied once
        a, b = (x if blas_layout(x.shape, x.strides, x.itemsize) else self._cupy.ascontiguousarray(x) for x in (a, b))
        plan = gemm_plan(a, b, out, trans_a, trans_b)
        first, second = (a, b) if plan.first_is_a else (b, a)
        data_type_name, compute_type_name = CUBLAS_TYPES[a.dtype.name]
        data_type, compute_type = getattr(runtime, data_type_name), getattr(cublas, compute_type_name)
        scalars = np.array([alpha, beta], dtype=_accum_scalar(a.dtype))  # host memory, alive through the call
        handle = self._cupy.cuda.device.get_cublas_handle()
        cublas.setPointerMode(handle, cublas.CUBLAS_POINTER_MODE_HOST)
        cublas.gemmStridedBatchedEx(
            handle, int(plan.trans_first), int(plan.trans_second), plan.m, plan.n, plan.k,
            scalars.ctypes.data,
            first.data.ptr, data_type, plan.ld_first, plan.stride_first,
            second.data.ptr, data_type, plan.ld_second, plan.stride_second,
            scalars.ctypes.data + scalars.itemsize,
            out.data.ptr, data_type, plan.ld_out, plan.stride_out,
            plan.batch, compute_type, cublas.CUBLAS_GEMM_DEFAULT,
        )

    def bias_act(self, acc, b, act, z_out=None, a_out=None):
        dtype = check_rows("bias_act", self.device, acc, b, z_out=z_out, a_out=a_out)
        get_activation(act)
        acc, b = self._input("bias_act", "acc", acc), self._input("bias_act", "b", b)
        outputs = Outputs(self, "bias_act")
        z_out, z = outputs.output("z_out", z_out, acc.shape, dtype)
        a_out, a = outputs.output("a_out", a_out, acc.shape, dtype)
        rows, cols = acc.shape
        block_x = min(THREADS, 1 << (cols - 1).bit_length())
        block_y = THREADS // block_x
        grid_x = min(_blocks(cols, block_x), self.max_blocks)
        grid_y = min(_blocks(rows, block_y), max(self.max_blocks // grid_x, 1), MAX_GRID_Y)
        self._launch(
            "bias_act", dtype, (f"act_{act}",), (grid_x, grid_y), (block_x, block_y),
            (acc, b, z, a, np.int64(rows), np.int64(cols)),
        )
        outputs.write_back()
        return z_out, a_out

    def act_backward(self, g, z, act, out=None):
        dtype = check_rows("act_backward", self.device, g, z=z, out=out)
        get_activation(act)
        g, z = self._input("act_backward", "g", g), self._input("act_backward", "z", z)
        outputs = Outputs(self, "act_backward")
        out, result = outputs.output("out", out, g.shape, dtype)
        self._launch("act_backward", dtype, (f"act_{act}",), self._flat_grid(g.size, dtype), (THREADS,),
                     (g, z, result, np.int64(g.size)))
        outputs.write_back()
        return out

    def softmax(self, z, out=None):
        dtype = check_rows("softmax", self.device, z, out=out)
        z = self._input("softmax", "z", z)
        outputs = Outputs(self, "softmax")
        out, result = outputs.output("out", out, z.shape, dtype)
        rows, cols = z.shape
        args = (z, NULL, result, NULL, np.int64(rows), np.int64(cols), _accum_scalar(dtype)(1))
        self._launch_rows("softmax", ("NoTargets<{T}>",), dtype, rows, cols, args, caches_row=True)
        outputs.write_back()
        return out

    def softmax_xent(self, z, labels, delta_out=None, scale=None):
        return self._loss("softmax_xent", (), z, labels, delta_out, scale)

    def sigmoid_xent(self, z, targets, delta_out=None, scale=None):
        return self._loss("sigmoid_xent", ("SigmoidXent",), z, targets, delta_out, scale)

    def squared_error(self, y_hat, targets, delta_out=None, scale=None):
        return self._loss("squared_error", ("SquaredError",), y_hat, targets, delta_out, scale)

    def bias_grad(self, delta, out=None):
        check_matrix("bias_grad", "delta", delta)
        check_shape("bias_grad", "out", out, (delta.shape[1],))
        dtype = check_dtypes("bias_grad", self.device, delta=delta, out=out)
        delta = self._input("bias_grad", "delta", delta)
        rows, cols = delta.shape
        outputs = Outputs(self, "bias_grad")
        out, result = outputs.output("out", out, (cols,), dtype)
        self._launch("bias_grad", dtype, (), (min(_blocks(cols, 32), self.max_blocks),), (32, 32),
                     (delta, result, np.int64(rows), np.int64(cols)))
        outputs.write_back()
        return out

    def sgd_update(self, params, grads, lr, weight_decay=0.0):
        dtype = check_flat("sgd_update", self.device, params=params, grads=grads)
        t = _accum_scalar(dtype)
        outputs = Outputs(self, "sgd_update")
        p = outputs.buffer("params", params, read=True)
        grads = self._input("sgd_update", "grads", grads)
        self._launch("sgd_update", dtype, (), self._flat_grid(p.size, dtype), (THREADS,),
                     (p, grads, np.int64(p.size), t(lr), t(weight_decay)))
        outputs.write_back()

    def momentum_update(self, params, grads, velocity, lr, momentum=0.9, nesterov=False, weight_decay=0.0):
        dtype = check_flat("momentum_update", self.device, params=params, grads=grads, velocity=velocity)
        t = _accum_scalar(dtype)
        outputs = Outputs(self, "momentum_update")
        p, v = outputs.buffer("params", params, read=True), outputs.buffer("velocity", velocity, read=True)
        grads = self._input("momentum_update", "grads", grads)
        self._launch("momentum_update", dtype, (), self._flat_grid(p.size, dtype), (THREADS,),
                     (p, grads, v, np.int64(p.size), t(lr), t(momentum), t(weight_decay), np.int32(bool(nesterov))))
        outputs.write_back()

    def adam_update(self, params, grads, m, v, step, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                    weight_decay=0.0, decoupled=False):
        dtype = check_flat("adam_update", self.device, params=params, grads=grads, m=m, v=v)
        if int(step) < 1:
            raise ValueError(f"adam_update: step: expected the 1-based update count (>= 1), got {step}")
        t = _accum_scalar(dtype)
        outputs = Outputs(self, "adam_update")
        p = outputs.buffer("params", params, read=True)
        m, v = outputs.buffer("m", m, read=True), outputs.buffer("v", v, read=True)
        grads = self._input("adam_update", "grads", grads)
        bias1, bias2 = 1 - float(beta1) ** int(step), 1 - float(beta2) ** int(step)
        self._launch("adam_update", dtype, (), self._flat_grid(p.size, dtype), (THREADS,),
                     (p, grads, m, v, np.int64(p.size), t(lr), t(beta1), t(beta2), t(1 - float(beta1)),
                      t(1 - float(beta2)), t(eps), t(weight_decay), t(bias1), t(bias2), np.int32(bool(decoupled))))
        outputs.write_back()

    # ---- the loss kernels ----

    def check_loss_args(self, kernel, z, targets, delta_out, scale):
        """The shared checks, but the label range only after a NaN loss (see the module docstring) and
        finiteness only with ``check_inputs``. Returns (kind of targets, scale in the compute type)."""
        check_rows(kernel, self.device, z, delta_out=delta_out)
        kind = check_targets(kernel, z, targets)
        if self.check_inputs and not bool(self._cupy.get_array_module(z).isfinite(z).all()):
            raise ValueError(f"{kernel}: z: expected finite values, got NaN or infinity")
        return kind, _accum_scalar(z.dtype)(1.0 / z.shape[0] if scale is None else scale)

    def _loss(self, kernel, variant_head, z, targets, delta_out, scale):
        """Launch a loss kernel (one loss per row), then reduce the rows; returns the mean loss."""
        kind, scale = self.check_loss_args(kernel, z, targets, delta_out, scale)
        dtype, accum = z.dtype, _accum_scalar(z.dtype)
        z = self._input(kernel, "z", z)
        if kind == "labels":
            targets = self._device(kernel, "labels", targets).astype(np.int64, copy=False)
        targets = self._input(kernel, "targets", targets)
        outputs = Outputs(self, kernel)
        delta = NULL if delta_out is None else outputs.buffer("delta_out", delta_out)
        rows, cols = z.shape
        row_loss = self._cupy.empty(rows, dtype=accum)
        args = (z, targets, delta, row_loss, np.int64(rows), np.int64(cols), scale)
        self._launch_rows(kernel, variant_head + (TARGET_KINDS[kind],), dtype, rows, cols, args,
                          caches_row=kernel == "softmax_xent")
        loss = self._cupy.empty((), dtype=accum)
        self._launch("mean_of_rows", dtype, (), (1,), (MEAN_THREADS,), (row_loss, np.int64(rows), loss))
        outputs.write_back()
        value = float(loss)
        if math.isnan(value) and kind == "labels":
            check_label_range(kernel, targets, cols, self._cupy)
        return value


class Outputs:
    """The arrays one kernel call writes. A C-contiguous device array is written in place; any other
    (a NumPy array, a strided or transposed CuPy view) through a contiguous device copy that
    ``write_back`` copies into it once the kernel has run."""

    def __init__(self, backend: CupyBackend, kernel: str):
        self._backend, self._kernel, self._copies = backend, kernel, []

    def buffer(self, name, array, read=False):
        """The device array the kernel writes for ``array``; ``read``: the kernel also reads its values."""
        cp = self._backend.xp
        if isinstance(array, cp.ndarray) and array.flags.c_contiguous:
            return array
        if read:
            copy = cp.array(on_device(cp, self._kernel, name, array), order="C")
        else:
            copy = cp.empty(array.shape, dtype=array.dtype)
        self._copies.append((array, copy))
        return copy

    def output(self, name, out, shape, dtype):
        """(what the call returns, what the kernel writes) for an ``out=`` argument, allocated where None."""
        if out is None:
            out = self._backend.xp.empty(shape, dtype=dtype)
        return out, self.buffer(name, out)

    def write_back(self):
        for array, copy in self._copies:
            array[...] = copy if isinstance(array, self._backend.xp.ndarray) else copy.get()
