"""The Numba CPU backend ("numba"): BLAS GEMM called inside njit, Numba kernels for the rest.

Every override keeps Backend's signature and runs the same argument checks (``backend/checks.py``), so
it refuses bad input with the same messages; the docstrings of Backend give the shapes and the semantics.
Importing this module imports no Numba and compiles nothing: Numba loads when the backend is made, and
each kernel compiles (or loads from the disk cache of ``kernels.cache``) on first use or in ``warmup``,
which compiles only what it is asked for (``warmup_parts``).
"""

from __future__ import annotations

import importlib.util
import time
from functools import partial

import numpy as np

from deltaprop.backend.base import Backend, adam_bias_corrections
from deltaprop.backend import checks
from deltaprop.kernels.activations import get_activation
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


class StepsByBatch(dict):
    """{batch size: the fused step for batches of that many rows}, each looked up on first use of its size
    (``kernels.cpu.step_for_batch``); after that, ``steps[B]`` is one dict lookup."""

    def __init__(self, lookup, *kernel):
        super().__init__()
        self._lookup, self._kernel = lookup, kernel

    def __missing__(self, batch):
        step = self[batch] = self._lookup(*self._kernel, batch)
        return step


# A part of a warm-up compiles the kernels of one call on tiny arrays of the dtype, shaped and typed as the
# model passes them (x and buffers C-contiguous, int64 labels, scalars of the dtype), so that the model's
# first call finds every signature it needs.
TINY = 4  # rows and widths of the warm-up arrays


def _targets(loss, x):
    """int64 labels for softmax cross-entropy, a target matrix of x's dtype for the other losses."""
    return np.zeros(len(x), np.int64) if loss == "softmax_xent" else np.full(x.shape, 0.5, x.dtype)


def _warm_step(backend, name, dtype, activation, loss, batch):
    """The fused step ``name`` for batches like ``batch`` (its variant), through the backend's mapping."""
    layout = Layout([TINY, TINY, TINY], batch)
    params, work = np.full(layout.n_params, 0.1, dtype), np.empty(layout.work_size, dtype)
    x = np.ones((batch, TINY), dtype)
    if name == "sgd_step":
        steps = backend.fused_sgd_step(activation, loss, dtype)
        steps[batch](x, _targets(loss, x), params, work, layout.offsets, dtype.type(0.1))
    else:
        steps = backend.fused_grads_step(activation, loss, dtype)
        steps[batch](x, _targets(loss, x), params, np.empty_like(params), work, layout.offsets)


def _warm_ensemble_steps(backend, dtype, activation, loss, batch):
    """MLPEnsemble's SGD and gradients steps for batches like ``batch``, on a stack of two networks."""
    layout = Layout([TINY, TINY, TINY], batch)
    params, work = np.full((2, layout.n_params), 0.1, dtype), np.empty((2, layout.work_size), dtype)
    x = np.ones((1, batch, TINY), dtype)
    targets = _targets(loss, x[0])[None]
    for grads, per_member in ((False, np.full(2, 0.1, dtype)), (True, np.empty_like(params))):
        steps = backend.fused_ensemble_step(activation, loss, dtype, grads)
        steps[batch](x, targets, params, work, layout.offsets, per_member, np.empty(2, dtype))


def _warm_stacked_kernels(backend, dtype):
    """MLPEnsemble's stacked GEMMs and optimizer updates (SGD, momentum, Adam), on stacks of two."""
    _warm_gemms(backend, dtype, shapes=((2, TINY, TINY),))
    params, per_member = np.ones((2, TINY), dtype), np.full(2, 0.1, dtype)
    backend.stacked_sgd_update(params, params.copy(), per_member, per_member)
    backend.stacked_sgd_update(params, params.copy(), per_member, per_member, np.zeros_like(params), per_member)
    backend.stacked_adam_update(params, params.copy(), np.zeros_like(params), np.zeros_like(params), 1, per_member,
                                per_member)


def _warm_updates(backend, dtype):
    flat = np.ones(TINY, dtype)
    backend.sgd_update(flat.copy(), flat, 0.1)
    backend.momentum_update(flat.copy(), flat, np.zeros_like(flat), 0.1)
    backend.adam_update(flat.copy(), flat, np.zeros_like(flat), np.zeros_like(flat), 1)


def _warm_forward(backend, dtype, activations, losses, evaluate):
    """What predict and predict_proba run (z = a @ W.T, bias + activation, the losses' output maps) and,
    where ``evaluate``, the losses of ``evaluate``."""
    x = np.ones((TINY, TINY), dtype)
    backend.gemm(x, x, np.empty_like(x), trans_b=True)
    for activation in dict.fromkeys([*activations, "identity", *(["sigmoid"] if "sigmoid_xent" in losses else [])]):
        backend.bias_act(x, x[0], activation, np.empty_like(x), np.empty_like(x))
    if "softmax_xent" in losses:
        backend.softmax(x, np.empty_like(x))
    for loss in losses if evaluate else ():
        getattr(backend, loss)(x, _targets(loss, x), np.empty_like(x))


def _warm_gemms(backend, dtype, shapes=((TINY, TINY), (2, TINY, TINY))):
    """GEMMs of each of ``shapes`` (2-D, and 3-D stacks) in each transposition."""
    for shape in shapes:
        x = np.ones(shape, dtype)
        for trans_a in (False, True):
            for trans_b in (False, True):
                backend.gemm(x, x, np.empty_like(x), trans_a, trans_b)


def _warm_elementwise(backend, dtype, activation):
    x = np.ones((TINY, TINY), dtype)
    backend.bias_act(x, x[0], activation, np.empty_like(x), np.empty_like(x))
    backend.act_backward(x, x, activation, np.empty_like(x))


def _warm_losses(backend, dtype, losses):
    """Each loss with int labels and with a target matrix, the softmax, the bias gradient."""
    x = np.ones((TINY, TINY), dtype)
    backend.softmax(x, np.empty_like(x))
    for loss in losses:
        getattr(backend, loss)(x, np.zeros(TINY, np.int64), np.empty_like(x))
        getattr(backend, loss)(x, np.full(x.shape, 0.25, dtype), np.empty_like(x))
    backend.bias_grad(x, np.empty_like(x[0]))


def warmup_parts(backend, dtypes, activations, losses, batches, uses) -> dict:
    """{what: a call that compiles it} for ``NumbaBackend.warmup``, in the order a command needs them."""
    from deltaprop.kernels.cpu.step import SMALL_BATCH

    # one batch size per variant of the fused steps: the small-batch loops, the GEMMs
    variants = {SMALL_BATCH: f"batch <= {SMALL_BATCH}", SMALL_BATCH + 1: f"batch > {SMALL_BATCH}"}
    if batches is not None:
        variants = {b: v for b, v in variants.items() if any((n <= SMALL_BATCH) == (b <= SMALL_BATCH) for n in batches)}
    parts = {}
    for dtype in dtypes:
        for name, use in (("sgd_step", "train_step"), ("grads_step", "fit")):
            if use in uses:
                for activation in activations:
                    for loss in losses:
                        for batch, variant in variants.items():
                            parts[f"{name} {dtype} {activation} {loss} ({variant})"] = partial(
                                _warm_step, backend, name, dtype, activation, loss, batch)
        if "ensemble" in uses:
            for activation in activations:
                for loss in losses:
                    for batch, variant in variants.items():
                        parts[f"ensemble steps {dtype} {activation} {loss} ({variant})"] = partial(
                            _warm_ensemble_steps, backend, dtype, activation, loss, batch)
            parts[f"ensemble GEMMs and optimizer updates {dtype}"] = partial(_warm_stacked_kernels, backend, dtype)
        if "fit" in uses or "kernels" in uses:
            parts[f"optimizer updates {dtype}"] = partial(_warm_updates, backend, dtype)
        for use in ("predict", "evaluate"):
            if use in uses:
                parts[f"forward pass{' and losses' * (use == 'evaluate')} {dtype} {' '.join(activations)}"] = partial(
                    _warm_forward, backend, dtype, activations, losses, use == "evaluate")
        if "kernels" in uses:
            parts[f"gemm {dtype}"] = partial(_warm_gemms, backend, dtype)
            for activation in dict.fromkeys([*activations, "identity"]):
                parts[f"bias_act, act_backward {dtype} {activation}"] = partial(
                    _warm_elementwise, backend, dtype, activation)
            parts[f"softmax, losses, bias_grad {dtype}"] = partial(_warm_losses, backend, dtype, losses)
    return parts


class NumbaBackend(Backend):
    """The kernel contract on the CPU with Numba (serial @njit kernels beside a multi-threaded BLAS)."""

    name = "numba"
    device = "cpu"

    def __init__(self):
        from deltaprop.kernels.cpu import get_kernel, step_for_batch  # imports Numba: when the backend is made

        self._kernel, self._step_for_batch = get_kernel, step_for_batch

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        if importlib.util.find_spec("numba") is None:
            return False, "Numba is not installed (pip install numba)"
        return True, ""

    def warmup(self, dtypes=None, activations=("relu",), losses=("softmax_xent",), batches=None, uses=None,
               progress=None) -> float:
        from deltaprop.kernels.cpu import report_compiles

        start = time.perf_counter()
        parts = warmup_parts(self, *checks.check_warmup(self, dtypes, activations, losses, batches, uses))
        for done, (what, run) in enumerate(parts.items()):
            with report_compiles(None if progress is None else partial(progress, done, len(parts), what)):
                run()
        return time.perf_counter() - start

    def fused_sgd_step(self, activation, loss, dtype):
        get_activation(activation)
        return StepsByBatch(self._step_for_batch, "sgd_step", resolve_dtype(dtype, self.device), activation, loss)

    def fused_grads_step(self, activation, loss, dtype):
        get_activation(activation)
        return StepsByBatch(self._step_for_batch, "grads_step", resolve_dtype(dtype, self.device), activation, loss)

    def fused_ensemble_step(self, activation, loss, dtype, grads=False):
        get_activation(activation)
        return StepsByBatch(self._step_for_batch, "ensemble_grads_step" if grads else "ensemble_sgd_step",
                            resolve_dtype(dtype, self.device), activation, loss)

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
        kernel = self._kernel("gemm" if a.ndim == 2 else "stacked_gemm", a.dtype, bool(trans_a), bool(trans_b))
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

    def stacked_sgd_update(self, params, grads, lr, weight_decay, velocity=None, momentum=None, nesterov=False):
        dtype = checks.check_stacked_sgd(self.device, params, grads, lr, weight_decay, velocity, momentum)
        lr, weight_decay = np.asarray(lr, dtype), np.asarray(weight_decay, dtype)
        if velocity is None:
            self._kernel("stacked_sgd_update", dtype)(params, grads, lr, weight_decay)
        else:
            self._kernel("stacked_momentum_update", dtype)(params, grads, velocity, lr, np.asarray(momentum, dtype),
                                                           bool(nesterov), weight_decay)

    def stacked_adam_update(self, params, grads, m, v, step, lr, weight_decay, beta1=0.9, beta2=0.999, eps=1e-8,
                            decoupled=False):
        scalar = checks.check_stacked_adam(self.device, params, grads, m, v, step, lr, weight_decay).type
        bias1, bias2 = map(scalar, adam_bias_corrections(step, beta1, beta2))
        self._kernel("stacked_adam_update", params.dtype)(
            params, grads, m, v, np.asarray(lr, params.dtype), scalar(beta1), scalar(beta2), scalar(eps),
            np.asarray(weight_decay, params.dtype), bool(decoupled), bias1, bias2, scalar(1 - float(beta1)),
            scalar(1 - float(beta2)))

    def _loss(self, kernel, z, targets, delta_out, scale, z_name="z"):
        """The shared checks (the label range is checked inside the kernel), the kernel, the mean loss."""
        scale = z.dtype.type(checks.check_loss(kernel, self.device, z, targets, delta_out, scale, z_name)[1])
        delta = np.empty(z.shape, z.dtype) if delta_out is None else delta_out
        total, bad_row = self._kernel(kernel, z.dtype)(z, targets, delta, scale)
        if bad_row >= 0:  # the kernel found a label outside [0, C) and wrote nothing
            checks.check_label_range(kernel, targets, z.shape[1])  # raises the message every backend gives
        return float(total) / z.shape[0]
