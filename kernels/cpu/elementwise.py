"""Elementwise kernels: fused bias + activation forward, the act' product backward, and the bias gradient.

Each activation's scalar formulas come from the activation table (``scalar(T)``), compiled into one
kernel per activation and dtype.
"""

from __future__ import annotations

import numpy as np
from numba.extending import register_jitable

from deltaprop.kernels.activations import get_activation
from deltaprop.kernels.cpu.common import kahan_add


def build_bias_act(T, act):
    act_fn = register_jitable(get_activation(act).scalar(T, register_jitable)[0])

    def bias_act(acc, b, z_out, a_out):
        """z_out = acc + b; a_out = act(z_out). acc, z_out, a_out: (B, n), z_out may be acc; b: (n,)."""
        for i in range(acc.shape[0]):
            for j in range(acc.shape[1]):
                z = acc[i, j] + b[j]
                z_out[i, j] = z
                a_out[i, j] = act_fn(z)

    return bias_act


def build_act_backward(T, act):
    derivative = register_jitable(get_activation(act).scalar(T, register_jitable)[1])

    def act_backward(g, z, out):
        """out = g * act'(z). g, z, out: (B, n); out may be g."""
        for i in range(g.shape[0]):
            for j in range(g.shape[1]):
                out[i, j] = g[i, j] * derivative(z[i, j])

    return act_backward


def build_act_backward_sums(T, act):
    derivative = register_jitable(get_activation(act).scalar(T, register_jitable)[1])

    def act_backward_sums(g, z, out, sums, compensation):
        """out = g * act'(z) and sums[j] = sum_i out[i, j] (compensated) in one pass: a layer's delta and its
        bias gradient, bit for bit what act_backward then column_sums give. g, z, out: (B, n), out may be g;
        sums, compensation: (n,), compensation is scratch."""
        sums[:] = 0
        compensation[:] = 0
        for i in range(g.shape[0]):
            for j in range(g.shape[1]):
                out[i, j] = g[i, j] * derivative(z[i, j])
            add_row(sums, compensation, out[i])

    return act_backward_sums


@register_jitable
def add_row(sums, compensation, row):
    """sums += row, compensated. sums, compensation, row: (n,)."""
    for j in range(row.shape[0]):
        sums[j], compensation[j] = kahan_add(sums[j], compensation[j], row[j])


@register_jitable
def column_sums(delta, out, compensation):
    """out[j] = sum_i delta[i, j] (compensated). delta: (B, n); out, compensation: (n,), compensation is scratch."""
    out[:] = 0
    compensation[:] = 0
    for i in range(delta.shape[0]):
        add_row(out, compensation, delta[i])


def build_bias_grad(T):
    def bias_grad(delta, out):
        """out[j] = sum_i delta[i, j] (compensated). delta: (B, n); out: (n,)."""
        column_sums(delta, out, np.empty_like(out))

    return bias_grad
