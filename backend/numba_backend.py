"""The Numba CPU backend ("numba"): BLAS GEMM called inside njit, Numba kernels for the rest.

Every override keeps Backend's signature and runs the same argument checks (``backend/checks.py``), so
it refuses bad input with the same messages; the docstrings of Backend give the shapes and the semantics.
Importing this module imports no Numba and compiles nothing: Numba loads when the backend is made, and
each kernel compiles (or loads from Numba's on-disk cache) on first use or in ``warmup``.
"""

from __future__ import annotations

import importlib.util
import time

import numpy as np

from deltaprop.backend.base import Backend, adam_bias_corrections
from deltaprop.backend import checks
from deltaprop.kernels.activations import ACTIVATIONS, get_activation
from deltaprop.kernels.dtypes import resolve_dtype
from deltaprop.kernels.layout import Layout


def _blas_operand(x):
    """``x`` as the gemm kernel passes it to BLAS without a copy: C-contiguous, or F-contiguous when 2-D."""
    if x.flags.c_contiguous or (x.ndim == 2 and x.flags.f_contiguous):
        return x
    return np.ascontiguousarray(x)


def _blas_info() -> list[dict]:
    """The BLAS libraries loaded (the numba backend's GEMMs call ``gemm_blas``'s), with their thread counts."""
    import scipy.linalg.cython_blas  # noqa: F401  (load SciPy's BLAS so that it is listed)
    from threadpoolctl import threadpool_info

    keys = ("internal_api", "version", "num_threads", "threading_layer", "architecture", "filepath")
    return [{k: lib.get(k) for k in keys} for lib in threadpool_info() if lib.get("user_api") == "blas"]


class NumbaBackend(Backend):
    """The kernel contract on the CPU with Numba (serial @njit kernels beside a multi-threaded BLAS)."""

    name = "numba"
    device = "cpu"

    def __init__(self):
        from deltaprop.kernels.cpu import get_kernel  # imports Numba: when the backend is made, not imported

        self._kernel = get_kernel

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        if importlib.util.find_spec("numba") is None:
            return False, "Numba is not installed (pip install numba)"
        return True, ""

    def warmup(self, dtypes=None) -> float:
        start = time.perf_counter()
        rng = np.random.default_rng(0)
        for name in dtypes or self.dtypes:
            dtype = resolve_dtype(name, self.device)
            x = rng.standard_normal((4, 4)).astype(dtype)
            stack = rng.standard_normal((2, 4, 4)).astype(dtype)
            for trans_a in (False, True):
                for trans_b in (False, True):
                    self.gemm(x, x, np.empty_like(x), trans_a, trans_b)
                    self.gemm(stack, stack, np.empty_like(stack), trans_a, trans_b)
            for act in ACTIVATIONS:
                self.bias_act(x, x[0], act, np.empty_like(x), np.empty_like(x))
                self.act_backward(x, x, act, np.empty_like(x))
            self.softmax(x, np.empty_like(x))
            for loss in (self.softmax_xent, self.sigmoid_xent, self.squared_error):
                loss(x, np.arange(4), np.empty_like(x))
                loss(x, self.softmax(x), np.empty_like(x))
            self.bias_grad(x, np.empty_like(x[0]))
            flat = x.ravel()
            self.sgd_update(flat.copy(), flat, 0.1)
            self.momentum_update(flat.copy(), flat, np.zeros_like(flat), 0.1)
            self.adam_update(flat.copy(), flat, np.zeros_like(flat), np.zeros_like(flat), 1)
            self._warm_step(dtype)
        return time.perf_counter() - start

    def _warm_step(self, dtype):
        """Compiles the fused steps that benchmarks train (relu, softmax cross-entropy, int labels)."""
        layout = Layout([4, 4, 4], 4)
        params = np.full(layout.n_params, 0.1, dtype)
        x, labels = np.ones((4, 4), dtype), np.zeros(4, np.int64)
        step = self.fused_sgd_step("relu", "softmax_xent", dtype)
        step(x, labels, params, np.empty(layout.work_size, dtype), layout.offsets, dtype.type(0.1))
        grads_step = self.fused_grads_step("relu", "softmax_xent", dtype)
        grads_step(x, labels, params, np.empty_like(params), np.empty(layout.work_size, dtype), layout.offsets)

    def fused_sgd_step(self, activation, loss, dtype):
        get_activation(activation)
        return self._kernel("sgd_step", resolve_dtype(dtype, self.device), activation, loss)

    def fused_grads_step(self, activation, loss, dtype):
        get_activation(activation)
        return self._kernel("grads_step", resolve_dtype(dtype, self.device), activation, loss)

    def describe(self) -> dict:
        import numba

        from deltaprop.kernels.cpu.gemm import gemm_blas

        return {
            **super().describe(),
            "numba": numba.__version__,
            "threading_layer": numba.config.THREADING_LAYER,
            "numba_threads": numba.config.NUMBA_NUM_THREADS,
            "blas": _blas_info(),
            "gemm_blas": gemm_blas()[0],  # whose BLAS the GEMMs call: "numpy" or "scipy"
        }

    # ---- kernels ----

    def gemm(self, a, b, out=None, trans_a=False, trans_b=False, alpha=1.0, beta=0.0):
        shape = checks.check_gemm(a, b, out, trans_a, trans_b, self.device)
        if out is None:
            out, beta = np.empty(shape, dtype=a.dtype), 0.0
        result = out if out.flags.c_contiguous else np.ascontiguousarray(out)  # BLAS writes C order
        scalar = a.dtype.type
        kernel = self._kernel("gemm", a.dtype, bool(trans_a), bool(trans_b))
        kernel(_blas_operand(a), _blas_operand(b), result, scalar(alpha), scalar(beta))
        if result is not out:
            out[...] = result
        return out

    def bias_act(self, acc, b, act, z_out=None, a_out=None):
        checks.check_rows("bias_act", self.device, b, acc=acc, z_out=z_out, a_out=a_out)
        get_activation(act)  # an unknown name raises with the list of known ones
        z = np.empty(acc.shape, acc.dtype) if z_out is None else z_out
        a = np.empty(acc.shape, acc.dtype) if a_out is None else a_out  # may be z: an in-place activation
        self._kernel("bias_act", acc.dtype, act)(acc, b, z, a)
        return z, a

    def act_backward(self, g, z, act, out=None):
        checks.check_rows("act_backward", self.device, g=g, z=z, out=out)
        get_activation(act)
        out = np.empty(g.shape, g.dtype) if out is None else out
        self._kernel("act_backward", g.dtype, act)(g, z, out)
        return out

    def softmax(self, z, out=None):
        checks.check_rows("softmax", self.device, z=z, out=out)
        out = np.empty(z.shape, z.dtype) if out is None else out
        self._kernel("softmax", z.dtype)(z, out)
        return out

    def bias_grad(self, delta, out=None):
        checks.check_bias_grad(self.device, delta, out)
        out = np.empty(delta.shape[1], delta.dtype) if out is None else out
        self._kernel("bias_grad", delta.dtype)(delta, out)
        return out

    def sgd_update(self, params, grads, lr, weight_decay=0.0):
        scalar = checks.check_flat("sgd_update", self.device, params=params, grads=grads).type
        self._kernel("sgd_update", params.dtype)(params, grads, scalar(lr), scalar(weight_decay))

    def momentum_update(self, params, grads, velocity, lr, momentum=0.9, nesterov=False, weight_decay=0.0):
        scalar = checks.check_flat("momentum_update", self.device, params=params, grads=grads, velocity=velocity).type
        kernel = self._kernel("momentum_update", params.dtype)
        kernel(params, grads, velocity, scalar(lr), scalar(momentum), bool(nesterov), scalar(weight_decay))

    def adam_update(self, params, grads, m, v, step, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                    weight_decay=0.0, decoupled=False):
        scalar = checks.check_adam(self.device, params, grads, m, v, step).type
        bias1, bias2 = map(scalar, adam_bias_corrections(step, beta1, beta2))
        kernel = self._kernel("adam_update", params.dtype)
        kernel(params, grads, m, v, scalar(lr), scalar(beta1), scalar(beta2), scalar(eps), scalar(weight_decay),
               bool(decoupled), bias1, bias2, scalar(1 - float(beta1)), scalar(1 - float(beta2)))

    def _loss(self, kernel, z, targets, delta_out, scale, z_name="z"):
        """The shared checks (the label range is checked inside the kernel), the kernel, the mean loss."""
        scale = z.dtype.type(checks.check_loss(kernel, self.device, z, targets, delta_out, scale, z_name)[1])
        delta = np.empty(z.shape, z.dtype) if delta_out is None else delta_out
        total, bad_row = self._kernel(kernel, z.dtype)(z, targets, delta, scale)
        if bad_row >= 0:  # the kernel found a label outside [0, C) and wrote nothing
            checks.check_label_range(kernel, targets, z.shape[1])  # raises the message every backend gives
        return float(total) / z.shape[0]
