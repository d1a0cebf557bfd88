"""GEMM through BLAS: ``np.dot(a, b, out)`` inside njit.

Numba hands C- and F-contiguous operands (a transposed view of a C array is F-contiguous) straight to
BLAS gemm without copies. Measured against ``np.matmul(..., out=)`` on this machine's 2-thread OpenBLAS:
equal at (256, 1024) and faster at batch 1, where NumPy's matmul leaves BLAS for a vector-matrix product
with a transposed operand (see the backend's report). The transposition is a compile-time variant, so
that every operand keeps a contiguous layout type.
"""

from __future__ import annotations

import ctypes
import functools

import llvmlite.binding
import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic, register_jitable
from numba.core.imputils import impl_ret_borrowed
from numba.np.arrayobj import populate_array
from numba.np.linalg import check_blas_return, ensure_blas, get_blas_kind

from deltaprop.kernels.cpu.common import fixed_identity


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


@fixed_identity
@intrinsic
def gemm_into(typingctx, a, b, out, alpha, beta):
    """out = alpha * a @ b + beta * out in one BLAS gemm call, the scaled accumulation that np.dot lacks.

    a: (m, k) and b: (k, n), each C- or F-contiguous (a transposed view of a C array is F); out: (m, n)
    C-contiguous; alpha, beta: scalars of the arrays' dtype. Calls the BLAS wrapper that Numba's np.dot
    calls, ``numba_xxgemm`` (SciPy's BLAS), by name, so that kernels using it still cache on disk.
    """
    operands = (a, b, out)
    if not (all(isinstance(t, types.Array) and t.ndim == 2 and t.dtype == out.dtype for t in operands)
            and a.layout in "CF" and b.layout in "CF" and out.layout == "C" and alpha == beta == out.dtype):
        return None
    ensure_blas()

    def codegen(context, builder, signature, args):
        a_, b_, out_ = (context.make_array(t)(context, builder, v) for t, v in zip(operands, args[:3]))
        (m, k), (_, n) = cgutils.unpack_tuple(builder, a_.shape), cgutils.unpack_tuple(builder, b_.shape)
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
        slots = [builder.bitcast(cgutils.alloca_once_value(builder, v), void_p) for v in args[3:]]
        status = builder.call(gemm, (ir.Constant(char, ord(get_blas_kind(out.dtype))), trans_b, trans_a, n, m, k,
                                     slots[0], data_b, ld_b, data_a, ld_a, slots[1],
                                     builder.bitcast(out_.data, void_p), n))
        check_blas_return(context, builder, status)
        return context.get_dummy_value()

    return types.none(a, b, out, alpha, beta), codegen


BLAS_THREADS_SYMBOL = "deltaprop_blas_threads"
SERIAL_STATE_SYMBOL = "deltaprop_serial_blas_state"
LOCK, ACTIVE, SAVED = range(3)  # the words of the process-wide state that the serial-BLAS sections share
_SERIAL_STATE = (ctypes.c_int64 * 3)()
# calls that set a BLAS's thread count and return the previous one, in the libraries SciPy links
BLAS_THREAD_SETTERS = ("openblas_set_num_threads_local", "scipy_openblas_set_num_threads_local",
                       "mkl_set_num_threads_local")


@functools.cache
def register_blas_threads() -> bool:
    """Registers ``BLAS_THREADS_SYMBOL``, the call that ``set_blas_threads`` makes, for the BLAS that
    Numba's np.dot calls (SciPy's); True when that BLAS has one of ``BLAS_THREAD_SETTERS``, False when
    it has none and the symbol is libc's ``abs``, a call of the same type with no effect.

    A kernel calling ``set_blas_threads`` finds the symbol when it is compiled or loaded from the disk
    cache, so its builder calls this first. A symbol rather than a ctypes pointer keeps the kernel
    cacheable. In OpenBLAS's pthreads builds the "local" setter is process-wide, so callers go through
    ``enter_serial_blas``/``leave_serial_blas``, which share the count between threads.
    """
    from scipy.linalg import cython_blas

    blas = ctypes.CDLL(cython_blas.__file__)  # dlsym searches the module and the libraries it links
    setter = next((getattr(blas, name) for name in BLAS_THREAD_SETTERS if hasattr(blas, name)), None)
    llvmlite.binding.add_symbol(BLAS_THREADS_SYMBOL, ctypes.cast(setter or ctypes.CDLL(None).abs, ctypes.c_void_p).value)
    llvmlite.binding.add_symbol(SERIAL_STATE_SYMBOL, ctypes.addressof(_SERIAL_STATE))
    return setter is not None


@fixed_identity
@intrinsic
def set_blas_threads(typingctx, n):
    """BLAS's thread count set to the integer ``n``; returns the previous count, an intc
    (``register_blas_threads``)."""
    if not isinstance(n, types.Integer):
        return None
    register_blas_threads()  # for a compile; a load from the disk cache relies on the kernel's builder

    def codegen(context, builder, signature, args):
        int32 = ir.IntType(32)
        setter = cgutils.get_or_insert_function(builder.module, ir.FunctionType(int32, [int32]), BLAS_THREADS_SYMBOL)
        return builder.call(setter, [context.cast(builder, args[0], n, types.intc)])

    return types.intc(n), codegen


@fixed_identity
@intrinsic
def serial_blas_state(typingctx):
    """The process-wide int64 words (LOCK, ACTIVE, SAVED) of ``enter_serial_blas``, as a (3,) array."""
    view = types.Array(types.int64, 1, "C")
    register_blas_threads()

    def codegen(context, builder, signature, args):
        words = builder.module.globals.get(SERIAL_STATE_SYMBOL)
        if words is None:  # a declaration: the address comes from register_blas_threads
            words = ir.GlobalVariable(builder.module, ir.ArrayType(ir.IntType(64), 3), SERIAL_STATE_SYMBOL)
        result = context.make_array(view)(context, builder)
        itemsize = context.get_constant(types.intp, 8)
        populate_array(result, data=builder.bitcast(words, ir.IntType(64).as_pointer()),
                       shape=cgutils.pack_array(builder, [context.get_constant(types.intp, 3)]),
                       strides=cgutils.pack_array(builder, [itemsize]), itemsize=itemsize, meminfo=None)
        return impl_ret_borrowed(context, builder, view, result._getvalue())

    return view(), codegen


@fixed_identity
@intrinsic
def compare_and_swap(typingctx, words, index, expected, new):
    """words[index] = new if it equals ``expected``, atomically (sequentially consistent); returns the old
    value. words: an int64 array."""
    if not (isinstance(words, types.Array) and words.dtype == types.int64):
        return None

    def codegen(context, builder, signature, args):
        array = context.make_array(words)(context, builder, args[0])
        word = builder.gep(array.data, [context.cast(builder, args[1], signature.args[1], types.intp)])
        old_new = [context.cast(builder, v, t, types.int64) for v, t in zip(args[2:], signature.args[2:])]
        return builder.extract_value(builder.cmpxchg(word, *old_new, "seq_cst", "seq_cst"), 0)

    return types.int64(words, index, expected, new), codegen


@register_jitable
def _locked(state):
    while compare_and_swap(state, LOCK, 0, 1) != 0:
        pass


@register_jitable
def enter_serial_blas():
    """BLAS on one thread until the matching ``leave_serial_blas``. Safe in concurrent (nogil) calls: the
    first section in keeps the count, the last one out puts it back (``register_blas_threads`` first)."""
    state = serial_blas_state()
    _locked(state)
    if state[ACTIVE] == 0:
        state[SAVED] = set_blas_threads(1)
    state[ACTIVE] += 1
    compare_and_swap(state, LOCK, 1, 0)


@register_jitable
def leave_serial_blas():
    state = serial_blas_state()
    _locked(state)
    state[ACTIVE] -= 1
    if state[ACTIVE] == 0:
        set_blas_threads(state[SAVED])
    compare_and_swap(state, LOCK, 1, 0)
