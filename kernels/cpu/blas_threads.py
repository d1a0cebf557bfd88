"""The BLAS thread-count policy of the fused steps, in one place: which steps run BLAS on one thread, and
the process-wide section that puts it there and back.

A GEMM too small for BLAS's threads to pay for their hand-off runs faster on one thread; a step whose
largest GEMM has fewer than ``SERIAL_BLAS_BELOW`` multiply-adds therefore runs BLAS on one thread
(benchmarks/RESULTS.md has the measurements behind the threshold). The thread count is process-wide in
OpenBLAS's pthreads builds, and nogil steps may run in several threads at once: ``enter_serial_blas`` and
``leave_serial_blas`` share one count between them (the first section in saves it, the last one out
restores it).
"""

from __future__ import annotations

import ctypes
import functools

import llvmlite.binding
from llvmlite import ir
from numba.core import cgutils, types
from numba.core.imputils import impl_ret_borrowed
from numba.extending import intrinsic, register_jitable
from numba.np.arrayobj import populate_array

from deltaprop.kernels.cpu.common import fixed_identity
from deltaprop.kernels.cpu.gemm import gemm_blas

SERIAL_BLAS_BELOW = 1 << 23  # multiply-adds of a step's largest GEMM under which BLAS runs on one thread

BLAS_THREADS_SYMBOL = "deltaprop_blas_threads"
SERIAL_STATE_SYMBOL = "deltaprop_serial_blas_state"
LOCK, ACTIVE, SAVED = range(3)  # the words of the process-wide state that the serial-BLAS sections share
_SERIAL_STATE = (ctypes.c_int64 * 3)()
# calls that set a BLAS's thread count and return the previous one, in the libraries NumPy and SciPy link
BLAS_THREAD_SETTERS = ("openblas_set_num_threads_local", "scipy_openblas_set_num_threads_local",
                       "mkl_set_num_threads_local")


@functools.cache
def register_blas_threads() -> bool:
    """Registers ``BLAS_THREADS_SYMBOL``, the call that ``set_blas_threads`` makes, for the BLAS of the
    kernels' GEMMs (``gemm_blas``); True when that BLAS has one of ``BLAS_THREAD_SETTERS``, False when it
    has none and the symbol is libc's ``abs``, a call of the same type with no effect.

    A kernel calling ``set_blas_threads`` finds the symbol when it is compiled or loaded from the disk
    cache, so its builder calls this first. A symbol rather than a ctypes pointer keeps the kernel
    cacheable. In OpenBLAS's pthreads builds the "local" setter is process-wide, so callers go through
    ``enter_serial_blas``/``leave_serial_blas``, which share the count between threads.
    """
    blas = gemm_blas()[1]
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


@register_jitable
def serial_blas(multiply_adds):
    """Puts BLAS on one thread when a step's largest GEMM has fewer than ``SERIAL_BLAS_BELOW``
    ``multiply_adds`` (0: the step has no GEMM, and BLAS is left as it is); says whether it did, for
    ``restore_blas``. A step's builder calls ``register_blas_threads`` first."""
    if multiply_adds == 0 or multiply_adds >= SERIAL_BLAS_BELOW:
        return False
    enter_serial_blas()
    return True


@register_jitable
def restore_blas(serial):
    """Undoes ``serial_blas``: BLAS back to its thread count when ``serial`` says it left it."""
    if serial:
        leave_serial_blas()
