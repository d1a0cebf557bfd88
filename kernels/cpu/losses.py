"""Loss kernels (loss + delta in one pass over the rows) and the row softmax.

A loss kernel returns (sum over the batch of the per-sample losses, -1) and writes
delta = (prediction - targets) * scale; targets are int labels (B,), read as one-hot rows, or a (B, C)
matrix. When a label is outside [0, C) it writes nothing and returns (0, that row), so that the caller
raises the shared message. Sums are compensated, in the array dtype.
"""

from __future__ import annotations

import math

from numba.extending import register_jitable

from deltaprop.kernels.activations import get_activation
from deltaprop.kernels.cpu.common import first_bad_label, kahan_add, target


@register_jitable
def exp_shifted_row(z, i, e, zero):
    """Writes e[i, j] = exp(z[i, j] - m), m the max of row i (so no exp overflows); returns (m, sum_j e[i, j])."""
    m = z[i, 0]
    for j in range(1, z.shape[1]):
        if z[i, j] > m:
            m = z[i, j]
    total, compensation = zero, zero
    for j in range(z.shape[1]):
        e[i, j] = math.exp(z[i, j] - m)
        total, compensation = kahan_add(total, compensation, e[i, j])
    return m, total


def build_softmax(T):
    zero = T(0)

    def softmax(z, out):
        """out = row-wise softmax of z. z, out: (B, C)."""
        for i in range(z.shape[0]):
            _, row_sum = exp_shifted_row(z, i, out, zero)
            for j in range(z.shape[1]):
                out[i, j] /= row_sum

    return softmax


# ---- the losses: one kernel skeleton, and each loss's form -------------------------------------------
# A form is (row_state(z, i, e), element(z_ij, e_ij, state, t) -> (element loss, prediction)): row_state
# runs once per row before its elements and may write scratch values e[i, :] (the delta buffer) that
# element then reads back at (i, j) before delta[i, j] is written.


@register_jitable
def no_row_state(z, i, e):
    return 0


def softmax_xent_form(T):
    """Softmax cross-entropy: the row's shifted exponentials go to e, the row state is (m, sum, log sum)."""
    zero = T(0)

    def row_state(z, i, e):
        m, row_sum = exp_shifted_row(z, i, e, zero)
        return m, row_sum, math.log(row_sum)  # row_sum >= 1 (the max term is exp(0)): never log(0)

    def element(z, e, state, t):
        m, row_sum, log_row_sum = state
        # -t * log softmax(z)_j, where log softmax(z)_j = (z_j - m) - log(row_sum)
        return t * (log_row_sum - (z - m)), e / row_sum

    return register_jitable(row_state), register_jitable(element)


def sigmoid_xent_form(T):
    """Multi-label sigmoid cross-entropy of sigmoid(z) against t, element by element."""
    zero = T(0)
    sigmoid = register_jitable(get_activation("sigmoid").scalar(T, register_jitable)[0])

    def element(z, e, state, t):
        # -[t log s + (1 - t) log(1 - s)] = max(z, 0) - t z + log(1 + exp(-|z|)), stable for any finite z
        return (z if z > zero else zero) - t * z + math.log1p(math.exp(-abs(z))), sigmoid(z)

    return no_row_state, register_jitable(element)


def squared_error_form(T):
    """1/2 (y_hat - t)^2, element by element (identity output map)."""
    half = T(0.5)

    def element(y_hat, e, state, t):
        diff = y_hat - t
        return half * (diff * diff), y_hat

    return no_row_state, register_jitable(element)


# loss kernel name -> its form
FORMS = {"softmax_xent": softmax_xent_form, "sigmoid_xent": sigmoid_xent_form, "squared_error": squared_error_form}


def build_loss(T, form):
    zero, one = T(0), T(1)
    row_state, element = form(T)

    def loss(z, targets, delta, scale):
        """Summed per-sample losses; delta = (prediction - t) * scale. z, delta: (B, C); targets: (B,) int or (B, C)."""
        bad_row = first_bad_label(targets, z.shape[1])
        if bad_row >= 0:
            return zero, bad_row
        total, compensation = zero, zero
        for i in range(z.shape[0]):
            state = row_state(z, i, delta)
            for j in range(z.shape[1]):
                t = target(targets, i, j, zero, one)
                element_loss, prediction = element(z[i, j], delta[i, j], state, t)
                total, compensation = kahan_add(total, compensation, element_loss)
                delta[i, j] = (prediction - t) * scale
        return total, bad_row

    return loss
