"""Small helpers that jitted kernels call (inlined by Numba); generic over the float type."""

from __future__ import annotations

from numba.core import cgutils, types
from numba.core.imputils import impl_ret_borrowed
from numba.extending import intrinsic, register_jitable
from numba.np.arrayobj import populate_array


@register_jitable
def kahan_add(total, compensation, x):
    """One step of compensated summation: returns the new (total, compensation).

    Keeps float32 sums accurate to a few ulps whatever their length, without a float64 accumulator.
    """
    y = x - compensation
    t = total + y
    return t, (t - total) - y


@register_jitable
def first_bad_label(targets, classes):
    """The first row whose int label is outside [0, classes), or -1; -1 for a target matrix."""
    if targets.ndim == 1:  # Numba prunes the branch that does not match the argument's rank
        for i in range(targets.shape[0]):
            if targets[i] < 0 or targets[i] >= classes:
                return i
    return -1


@register_jitable
def target(targets, i, j, zero, one):
    """Element (i, j) of the target matrix; int labels (B,) read as one-hot rows."""
    if targets.ndim == 1:
        return one if targets[i] == j else zero
    return targets[i, j]


def fixed_identity(fn):
    """``fn``, a Numba dispatcher or intrinsic, with an identity that pickles the same in every process.

    Numba keys a cached closure on a pickle of its cells, which reach dispatchers and intrinsics by value,
    and both pickle with a uuid drawn anew in each process: without a fixed identity, every kernel whose
    closure reaches one misses the disk cache and compiles again in each new process. The module path
    and name are unique and stable; ``_set_uuid`` is the hook Numba uses when it unpickles one.
    """
    fn._set_uuid(f"{fn.__module__}.{fn.__qualname__}")
    return fn


@fixed_identity
@intrinsic
def matrix_at(typingctx, flat, offset, batch, n):
    """The (batch, n) C-contiguous view of the 1-D array ``flat`` from element ``offset``, with no checks:
    the caller's layout (``kernels.layout.Layout``) keeps it inside ``flat``.

    An intrinsic rather than ``flat[offset:].reshape(batch, n)``: Numba's reshape compares the sizes
    as float64 (a signed and an unsigned integer), which the float32 kernels must not contain.
    """
    view = types.Array(flat.dtype, 2, "C")

    def codegen(context, builder, signature, args):
        source = context.make_array(signature.args[0])(context, builder, args[0])
        result = context.make_array(view)(context, builder)
        offset, batch, n = (context.cast(builder, v, t, types.intp) for v, t in zip(args[1:], signature.args[1:]))
        itemsize = context.get_constant(types.intp, context.get_abi_sizeof(context.get_data_type(flat.dtype)))
        populate_array(result, data=builder.gep(source.data, [offset]),
                       shape=cgutils.pack_array(builder, [batch, n]),
                       strides=cgutils.pack_array(builder, [builder.mul(n, itemsize), itemsize]),
                       itemsize=itemsize, meminfo=source.meminfo, parent=source.parent)
        return impl_ret_borrowed(context, builder, view, result._getvalue())

    return view(flat, offset, batch, n), codegen
