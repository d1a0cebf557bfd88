"""GEMM through BLAS: ``gemm_into``, one gemm call on C- or F-contiguous operands inside njit.

C- and F-contiguous operands (a transposed view of a C array is F-contiguous) go straight to BLAS gemm
without copies, as Numba's ``np.dot(a, b, out)`` hands them, and a vector-matrix product with a
transposed operand stays a gemm call (NumPy's matmul leaves BLAS for it). The transposition is a
compile-time variant, so that every operand keeps a contiguous layout type.

The BLAS is NumPy's own where NumPy has one with a 64-bit CBLAS (its wheels bundle OpenBLAS), else
SciPy's, which Numba's np.dot calls, through Numba's wrapper: the library whose peak ``deltaprop bench``
measures is the one the kernels call.
"""

from __future__ import annotations

import ctypes
import functools

import llvmlite.binding
import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic, register_jitable
from numba.np.linalg import check_blas_return, ensure_blas, get_blas_kind

from deltaprop.kernels.cpu.common import fixed_identity


@register_jitable
def _as_is(x):
    return x


@register_jitable
def _transposed(x):
    return x.T


OPS = {False: _as_is, True: _transposed}


# NumPy's 64-bit CBLAS gemm by dtype, as its wheels name it: scipy-openblas64 (NumPy 2), openblas64_ (1.x)
NUMPY_CBLAS_GEMMS = ({"float32": "scipy_cblas_sgemm64_", "float64": "scipy_cblas_dgemm64_"},
                     {"float32": "cblas_sgemm64_", "float64": "cblas_dgemm64_"})
CBLAS_GEMM_SYMBOL = "deltaprop_cblas_gemm64_{}"  # by dtype name; registered only when NumPy has them
CBLAS_ROW_MAJOR, CBLAS_NO_TRANS, CBLAS_TRANS = 101, 111, 112


@functools.cache
def gemm_blas() -> tuple[str, ctypes.CDLL]:
    """("numpy" or "scipy", a handle whose dlsym finds that BLAS): the library that the kernels' GEMMs
    (``chosen_gemm_into``) and ``set_blas_threads`` call; NumPy's when it has a 64-bit CBLAS gemm for
    both dtypes, whose symbols this registers."""
    numpy_core = getattr(np, "_core", None) or np.core  # NumPy 2 and 1.x
    handle = ctypes.CDLL(numpy_core._multiarray_umath.__file__)  # dlsym searches the libraries it links
    for names in NUMPY_CBLAS_GEMMS:
        if all(hasattr(handle, name) for name in names.values()):
            for dtype, name in names.items():
                llvmlite.binding.add_symbol(CBLAS_GEMM_SYMBOL.format(dtype), ctypes.cast(getattr(handle, name),
                                                                                         ctypes.c_void_p).value)
            return "numpy", handle
    from scipy.linalg import cython_blas

    return "scipy", ctypes.CDLL(cython_blas.__file__)


def _numpy_gemm(builder, operands, arrays, m, n, k, alpha, beta):
    """One call of NumPy's row-major CBLAS gemm (registered by ``gemm_blas``)."""
    a, b, out = operands
    a_, b_, out_ = arrays
    enum, blasint, void_p, scalar = ir.IntType(32), ir.IntType(64), ir.IntType(8).as_pointer(), alpha.type
    gemm = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [
        enum, enum, enum, blasint, blasint, blasint, scalar, void_p, blasint, void_p, blasint, scalar, void_p,
        blasint]), CBLAS_GEMM_SYMBOL.format(str(out.dtype)))

    def leading(size):  # BLAS refuses a leading dimension below 1, even for an empty matrix
        return builder.select(builder.icmp_signed("<", size, size.type(1)), size.type(1), size)

    def operand(ty, array, rows, cols):
        # an F-contiguous (rows, cols) view is the transpose of a C (cols, rows) array
        c_order = ty.layout == "C"
        return (enum(CBLAS_NO_TRANS if c_order else CBLAS_TRANS), builder.bitcast(array.data, void_p),
                leading(cols if c_order else rows))

    trans_a, data_a, ld_a = operand(a, a_, m, k)
    trans_b, data_b, ld_b = operand(b, b_, k, n)
    builder.call(gemm, (enum(CBLAS_ROW_MAJOR), trans_a, trans_b, m, n, k, alpha, data_a, ld_a, data_b, ld_b, beta,
                        builder.bitcast(out_.data, void_p), leading(n)))


def _scipy_gemm(context, builder, operands, arrays, m, n, k, alpha, beta):
    """One call of ``numba_xxgemm``, the wrapper of SciPy's BLAS that Numba's np.dot calls."""
    a, b, out = operands
    a_, b_, out_ = arrays
    char, void_p, intp = ir.IntType(8), ir.IntType(8).as_pointer(), cgutils.intp_t
    gemm = cgutils.get_or_insert_function(builder.module, ir.FunctionType(
        ir.IntType(32), [char, char, char, intp, intp, intp, void_p, void_p, intp, void_p, intp, void_p,
                         void_p, intp]), "numba_xxgemm")

    def operand(ty, array, rows, cols):
        # BLAS is column-major: a C array is its own transpose there, so out.T = b.T @ a.T is computed
        return (ir.Constant(char, ord("n" if ty.layout == "C" else "t")), cols if ty.layout == "C" else rows,
                builder.bitcast(array.data, void_p))

    trans_b, ld_b, data_b = operand(b, b_, k, n)
    trans_a, ld_a, data_a = operand(a, a_, m, k)
    slots = [builder.bitcast(cgutils.alloca_once_value(builder, v), void_p) for v in (alpha, beta)]
    status = builder.call(gemm, (ir.Constant(char, ord(get_blas_kind(out.dtype))), trans_b, trans_a, n, m, k,
                                 slots[0], data_b, ld_b, data_a, ld_a, slots[1],
                                 builder.bitcast(out_.data, void_p), n))
    check_blas_return(context, builder, status)


def _gemm_into(library):
    """The ``gemm_into`` intrinsic that calls ``library``'s BLAS ("numpy" or "scipy")."""

    def gemm_into(typingctx, a, b, out, alpha, beta):
        """out = alpha * a @ b + beta * out in one BLAS gemm call (with beta 0, out is only written).

        a: (m, k) and b: (k, n), each C- or F-contiguous (a transposed view of a C array is F); out: (m, n)
        C-contiguous; alpha, beta: scalars of the arrays' dtype. Calls the BLAS by a symbol's name, so
        that kernels using it still cache on disk.
        """
        operands = (a, b, out)
        if not (all(isinstance(t, types.Array) and t.ndim == 2 and t.dtype == out.dtype for t in operands)
                and a.layout in "CF" and b.layout in "CF" and out.layout == "C" and alpha == beta == out.dtype):
            return None
        ensure_blas()
        gemm_blas()  # NumPy's symbols, before a compile

        def codegen(context, builder, signature, args):
            arrays = [context.make_array(t)(context, builder, v) for t, v in zip(operands, args[:3])]
            (m, k), (_, n) = (cgutils.unpack_tuple(builder, x.shape) for x in arrays[:2])
            if library == "numpy":
                _numpy_gemm(builder, operands, arrays, m, n, k, *args[3:])
            else:
                _scipy_gemm(context, builder, operands, arrays, m, n, k, *args[3:])
            return context.get_dummy_value()

        return types.none(a, b, out, alpha, beta), codegen

    gemm_into.__name__ = gemm_into.__qualname__ = f"gemm_into_{library}"  # each its own fixed identity
    return fixed_identity(intrinsic(gemm_into))


GEMM_INTO = {library: _gemm_into(library) for library in ("numpy", "scipy")}


def chosen_gemm_into():
    """``GEMM_INTO`` of ``gemm_blas``'s library. A builder binds it to a local name, so that it is a cell
    of the kernel's closure: Numba keys its disk cache on the cells, so a kernel cached with one library
    is not loaded in a process that has the other."""
    return GEMM_INTO[gemm_blas()[0]]


def build_gemm(T, trans_a, trans_b):
    op_a, op_b = OPS[trans_a], OPS[trans_b]
    gemm_into = chosen_gemm_into()  # and NumPy's symbols registered, before a load from the cache

    def gemm(a, b, out, alpha, beta):
        """out = alpha * op(a) @ op(b) + beta * out (2-D; ``ensemble.build_stacked_gemm`` for stacks);
        out is not read when beta is 0."""
        gemm_into(op_a(a), op_b(b), out, alpha, beta)

    return gemm
