"""Numba @njit kernels for the CPU: one compiled kernel per (kernel, dtype, variant), built on first use.

    get_kernel("bias_act", "float32", "relu")     the fused bias + relu forward for float32 arrays
    get_kernel("gemm", "float64", False, True)    out = alpha * a @ b.T + beta * out

Each entry of BUILDERS takes the scalar type T (numpy.float32 or numpy.float64) and the variant, and
returns a plain Python function whose constants are all made with T, so that nothing in a float32
kernel is promoted to float64; it is compiled with ``njit`` and cached on disk in the folder that
``deltaprop.kernels.cache`` chooses (never inside the package), so compile time is paid once per
machine. Importing this package compiles nothing and touches no file.

The fused steps come in two variants (see ``step.py``): ``step_for_batch`` gives the one for a batch size.

Why the closures hold only NumPy scalars and plain functions (made callable from jitted code with
``register_jitable``): Numba keys its on-disk cache of a closure on the pickled closure cells, with
everything they reach, and a dispatcher or an intrinsic pickles with a per-process uuid, so the cache
would miss in every new process. The few that closures do reach (``matrix_at``, the ``gemm_into``
intrinsics, the fused step's small-batch loops) are given a fixed identity (``common.fixed_identity``);
a test loads a fused step from the cache in a second process.

No kernel uses ``fastmath`` but the fused step's small-batch loops (see ``step.py``): reassociation would
undo the compensated (Kahan) sums, and the elementwise kernels spend their time in libm calls that the
remaining flags do not speed up.
"""

from __future__ import annotations

import contextlib
import functools
from functools import partial

import numba
import numba.core.event
import numpy as np

from deltaprop.kernels import cache
from deltaprop.kernels.cpu import elementwise, ensemble, gemm, losses, optimizers, step

JIT_OPTIONS = {"nogil": True, "error_model": "numpy"}  # and disk caching, turned on by ``cache.enable``
# the kernels with a loop on Numba's threads (numba.prange): the ensemble's loops over its members
PARALLEL_KERNELS = frozenset({"ensemble_sgd_step", "ensemble_grads_step", "stacked_gemm", "stacked_sgd_update",
                              "stacked_momentum_update", "stacked_adam_update"})

# kernel name -> builder(T, *variant) returning the Python function to compile
BUILDERS = {
    "gemm": gemm.build_gemm,  # variant: (trans_a, trans_b)
    "bias_act": elementwise.build_bias_act,  # variant: (activation name,)
    "act_backward": elementwise.build_act_backward,  # variant: (activation name,)
    "bias_grad": elementwise.build_bias_grad,
    "softmax": losses.build_softmax,
    **{name: partial(losses.build_loss, form=form) for name, form in losses.FORMS.items()},
    "sgd_update": optimizers.build_sgd,
    "momentum_update": optimizers.build_momentum,
    "adam_update": optimizers.build_adam,
    "sgd_step": step.build_sgd_step,  # variant: (activation name, loss kernel name, small)
    "grads_step": step.build_grads_step,  # variant: (activation name, loss kernel name, small)
    "ensemble_sgd_step": partial(ensemble.build_ensemble_step, grads=False),  # variant: as sgd_step's
    "ensemble_grads_step": partial(ensemble.build_ensemble_step, grads=True),  # variant: as grads_step's
    "stacked_gemm": ensemble.build_stacked_gemm,  # variant: (trans_a, trans_b)
    "stacked_sgd_update": ensemble.build_stacked_sgd,
    "stacked_momentum_update": ensemble.build_stacked_momentum,
    "stacked_adam_update": ensemble.build_stacked_adam,
}
# the jitted functions defined at module level, which the fused steps call: cached like the kernels
MODULE_KERNELS = (step.small_dense, step.small_update, step.small_grads)

_compiled: dict[tuple, numba.core.dispatcher.Dispatcher] = {}


def get_kernel(name: str, dtype, *variant):
    """The dispatcher of kernel ``name`` for arrays of ``dtype`` (and the variant), built on first use."""
    key = (name, np.dtype(dtype), *variant)  # a dtype compares equal to its name; `.name` costs microseconds
    dispatcher = _compiled.get(key)
    if dispatcher is None:
        _enable_module_kernels()
        kernel = BUILDERS[name](key[1].type, *variant)
        # A name per kernel and variant: the kernels of one builder would otherwise share one cache index
        # file (whose entries processes compiling at once can overwrite) and one symbol name when loaded.
        scope = kernel.__qualname__.rpartition(".")[0]
        kernel.__qualname__ = f"{scope}.{'_'.join([name, key[1].name, *map(str, variant)])}".lstrip(".")
        dispatcher = cache.enable(numba.njit(**jit_options(name))(kernel))
        _compiled[key] = dispatcher
    return dispatcher


def jit_options(name: str) -> dict:
    """The options ``get_kernel`` compiles kernel ``name`` with (but the disk cache)."""
    return {**JIT_OPTIONS, "parallel": name in PARALLEL_KERNELS}


def step_for_batch(name: str, dtype, activation: str, loss: str, batch: int):
    """The fused step ``name`` ("sgd_step", "grads_step", "ensemble_sgd_step" or
    "ensemble_grads_step") that serves batches of ``batch`` rows: the
    small-batch variant up to ``step.SMALL_BATCH`` rows, the GEMM one above."""
    return get_kernel(name, dtype, activation, loss, batch <= step.SMALL_BATCH)


class _FirstCompile(numba.core.event.Listener):
    """Calls ``on_first()`` when the first compile starts (Numba announces no load from the disk cache)."""

    def __init__(self, on_first):
        self.on_first = on_first

    def on_start(self, event):
        if self.on_first is not None:
            on_first, self.on_first = self.on_first, None
            on_first()

    def on_end(self, event):
        pass


@contextlib.contextmanager
def report_compiles(on_first):
    """Within the block, ``on_first()`` is called once, when a kernel starts compiling (not when kernels
    load from the disk cache); None: nothing is reported."""
    if on_first is None:
        yield
        return
    with numba.core.event.install_listener("numba:compile", _FirstCompile(on_first)):
        yield


@functools.cache
def _enable_module_kernels() -> None:
    for dispatcher in MODULE_KERNELS:
        cache.enable(dispatcher)


def built_kernels() -> dict[tuple, numba.core.dispatcher.Dispatcher]:
    """Every dispatcher built so far, by (name, dtype, *variant)."""
    return dict(_compiled)
