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


def build_softmax_xent(T):
    zero, one = T(0), T(1)

    def softmax_xent(z, targets, delta, scale):
        """Summed cross-entropy of softmax(z) against targets; delta = (softmax(z) - t) * scale. z, delta: (B, C)."""
        bad_row = first_bad_label(targets, z.shape[1])
        if bad_row >= 0:
            return zero, bad_row
        total, compensation = zero, zero
        for i in range(z.shape[0]):
            m, row_sum = exp_shifted_row(z, i, delta, zero)
            log_row_sum = math.log(row_sum)  # row_sum >= 1 (the max term is exp(0)): never log(0)
            for j in range(z.shape[1]):
                t = target(targets, i, j, zero, one)
                # -t * log softmax(z)_j, where log softmax(z)_j = (z_j - m) - log(row_sum)
                total, compensation = kahan_add(total, compensation, t * (log_row_sum - (z[i, j] - m)))
                delta[i, j] = (delta[i, j] / row_sum - t) * scale
        return total, bad_row

    return softmax_xent


def sigmoid_xent_element(T):
    """(element loss, prediction) of the multi-label sigmoid cross-entropy, as a function of (z, t)."""
    zero = T(0)
    sigmoid = register_jitable(get_activation("sigmoid").scalar(T)[0])

    def element(z, t):
        # -[t log s + (1 - t) log(1 - s)] = max(z, 0) - t z + log(1 + exp(-|z|)), stable for any finite z
        return (z if z > zero else zero) - t * z + math.log1p(math.exp(-abs(z))), sigmoid(z)

    return register_jitable(element)


def squared_error_element(T):
    """(1/2 (y_hat - t)^2, y_hat) as a function of (y_hat, t)."""
    half = T(0.5)

    def element(y_hat, t):
        diff = y_hat - t
        return half * (diff * diff), y_hat

    return register_jitable(element)


def build_elementwise_loss(T, element):
    zero, one = T(0), T(1)
    loss_and_prediction = element(T)

    def elementwise_loss(z, targets, delta, scale):
        """Summed element losses; delta = (prediction - t) * scale. z, delta: (B, C)."""
        bad_row = first_bad_label(targets, z.shape[1])
        if bad_row >= 0:
            return zero, bad_row
        total, compensation = zero, zero
        for i in range(z.shape[0]):
            for j in range(z.shape[1]):
                t = target(targets, i, j, zero, one)
                loss, prediction = loss_and_prediction(z[i, j], t)
                total, compensation = kahan_add(total, compensation, loss)
                delta[i, j] = (prediction - t) * scale
        return total, bad_row

    return elementwise_loss
