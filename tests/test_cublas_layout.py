"""The cuBLAS call's arithmetic (kernels/cuda/cublas.py) on the host: for every layout the cupy backend
passes (row-major, column-major, a slice of wider rows or columns, 2-D or stacked) and every transpose
flag, the call that ``cublas_gemm`` solves, run through a NumPy emulation of column-major cuBLAS,
computes NumPy's op(a) @ op(b)."""

import numpy as np
import pytest
from numpy.lib.stride_tricks import as_strided

from deltaprop.kernels import reference
from deltaprop.kernels.cuda.cublas import blas_layout, cublas_gemm


def test_blas_layout_refuses_what_no_leading_dimension_describes():
    x = np.zeros((3, 4), dtype=np.float32)
    assert blas_layout(x.shape, x.strides, x.itemsize) == (True, 4, 0)
    assert blas_layout(x.T.shape, x.T.strides, x.itemsize) == (False, 4, 0)
    for view in (x[:, ::2], x[::-1], np.broadcast_to(x[0], (3, 4))):
        assert blas_layout(view.shape, view.strides, view.itemsize) is None


def emulate_cublas(a, b, out, trans_a, trans_b, alpha, beta):
    """Run cublas_gemm's call on NumPy arrays the way column-major cuBLAS reads memory."""
    call = cublas_gemm(a, b, out, trans_a, trans_b)
    first, second = (a, b) if call.first_is_a else (b, a)

    def read(x, trans, lead, stride, rows, cols):  # op(X) of a column-major X of leading dimension `lead`
        stored = (cols, rows) if trans else (rows, cols)
        view = as_strided(x, (call.batch, *stored), (stride * x.itemsize, x.itemsize, lead * x.itemsize),
                          writeable=False)
        return np.swapaxes(view, 1, 2) if trans else view

    op_first = read(first, call.trans_first, call.ld_first, call.stride_first, call.m, call.k)
    op_second = read(second, call.trans_second, call.ld_second, call.stride_second, call.k, call.n)
    c = as_strided(out, (call.batch, call.m, call.n),
                   (call.stride_out * out.itemsize, out.itemsize, call.ld_out * out.itemsize))
    c[...] = alpha * (op_first @ op_second) + beta * c


def layouts(shape, stack, seed):
    """A matrix (or stack) of ``shape`` as row-major, column-major, a slice of wider rows, and a slice of
    longer columns (column-major with a leading dimension beyond its rows)."""
    rng = np.random.default_rng(seed)
    row_major = rng.standard_normal(stack + shape)
    column_major = np.ascontiguousarray(np.swapaxes(row_major, -1, -2)).swapaxes(-1, -2)
    sliced = rng.standard_normal(stack + (shape[0], shape[1] + 3))[..., : shape[1]]
    tall = np.swapaxes(rng.standard_normal(stack + (shape[1], shape[0] + 5)), -1, -2)[..., : shape[0], :]
    return row_major, column_major, sliced, tall


@pytest.mark.parametrize("stack", [(), (3,)], ids=["2d", "3d"])
@pytest.mark.parametrize("mkn", [(4, 5, 6), (1, 5, 6), (4, 1, 6), (4, 5, 1), (1, 1, 1)])
@pytest.mark.parametrize(("trans_a", "trans_b"), [(False, False), (True, False), (False, True), (True, True)])
def test_cublas_gemm_computes_the_product_for_every_layout(stack, mkn, trans_a, trans_b):
    m, k, n = mkn
    for a in layouts((k, m) if trans_a else (m, k), stack, seed=1):
        for b in layouts((n, k) if trans_b else (k, n), stack, seed=2):
            for out in layouts((m, n), stack, seed=3):
                expected = reference.gemm(a, b, out, trans_a, trans_b, alpha=0.5, beta=2.0)
                emulate_cublas(a, b, out, trans_a, trans_b, alpha=0.5, beta=2.0)
                np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)
