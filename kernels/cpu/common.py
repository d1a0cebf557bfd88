"""Small helpers that jitted kernels call (inlined by Numba); generic over the float type."""

from __future__ import annotations

from numba.extending import register_jitable


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
