"""Numba @njit kernels for the CPU: one compiled kernel per (kernel, dtype, variant), built on first use.

    get_kernel("bias_act", "float32", "relu")     the fused bias + relu forward for float32 arrays
    get_kernel("gemm", "float64", False, True)    out = alpha * a @ b.T + beta * out

Each entry of BUILDERS takes the scalar type T (numpy.float32 or numpy.float64) and the variant, and
returns a plain Python function whose constants are all made with T, so that nothing in a float32
kernel is promoted to float64; it is compiled with ``njit(cache=True)`` (honouring NUMBA_CACHE_DIR), so
compile time is paid once per machine. Importing this package compiles nothing.

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

from functools import partial

import numba
import numpy as np

from deltaprop.kernels.cpu import elementwise, gemm, losses, optimizers, step

JIT_OPTIONS = {"cache": True, "nogil": True, "error_model": "numpy"}

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
    "sgd_step": step.build_sgd_step,  # variant: (activation name, loss kernel name)
    "grads_step": step.build_grads_step,  # variant: (activation name, loss kernel name)
}

_compiled: dict[tuple, numba.core.dispatcher.Dispatcher] = {}


def get_kernel(name: str, dtype, *variant):
    """The dispatcher of kernel ``name`` for arrays of ``dtype`` (and the variant), built on first use."""
    key = (name, np.dtype(dtype), *variant)  # a dtype compares equal to its name; `.name` costs microseconds
    dispatcher = _compiled.get(key)
    if dispatcher is None:
        kernel = BUILDERS[name](key[1].type, *variant)
        # A name per variant: the variants of one builder would otherwise share one cache index file
        # (whose entries processes compiling at once can overwrite) and one symbol name when loaded.
        kernel.__qualname__ = "_".join([kernel.__qualname__, key[1].name, *map(str, variant)])
        dispatcher = numba.njit(**JIT_OPTIONS)(kernel)
        _compiled[key] = dispatcher
    return dispatcher


def built_kernels() -> dict[tuple, numba.core.dispatcher.Dispatcher]:
    """Every dispatcher built so far, by (name, dtype, *variant)."""
    return dict(_compiled)
