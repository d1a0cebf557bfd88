"""GEMM through BLAS: ``np.dot(a, b, out)`` inside njit.

Numba hands C- and F-contiguous operands (a transposed view of a C array is F-contiguous) straight to
BLAS gemm without copies. Measured against ``np.matmul(..., out=)`` on this machine's 2-thread OpenBLAS:
equal at (256, 1024) and faster at batch 1, where NumPy's matmul leaves BLAS for a vector-matrix product
with a transposed operand (see the backend's report). The transposition is a compile-time variant, so
that every operand keeps a contiguous layout type.
"""

from __future__ import annotations

import numpy as np
from numba.extending import register_jitable


@register_jitable
def _as_is(x):
    return x


@register_jitable
def _transposed(x):
    return x.T


OPS = {False: _as_is, True: _transposed}


@register_jitable
def _product(a, b, out, alpha, beta, zero, one):
    """out = alpha * a @ b + beta * out for 2-D contiguous a, b and C-contiguous out; out is not read when beta is 0."""
    if beta == zero:
        np.dot(a, b, out)
        if alpha != one:
            out *= alpha
    else:
        product = np.dot(a, b)
        product *= alpha
        out *= beta
        out += product


def build_gemm(T, trans_a, trans_b):
    zero, one = T(0), T(1)
    op_a, op_b = OPS[trans_a], OPS[trans_b]

    def gemm(a, b, out, alpha, beta):
        """out = alpha * op(a) @ op(b) + beta * out: 2-D, or for each matrix of 3-D stacks (s, ., .)."""
        if a.ndim == 2:  # Numba prunes the branch that does not match the arguments' rank
            _product(op_a(a), op_b(b), out, alpha, beta, zero, one)
        else:
            for s in range(a.shape[0]):
                _product(op_a(a[s]), op_b(b[s]), out[s], alpha, beta, zero, one)

    return gemm
