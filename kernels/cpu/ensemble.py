"""The compiled kernels of K stacked networks (an ensemble): the step of every member in one call (member
k's fused step, ``step.py``, on row k of the (K, P) parameters and the (K, work_size) workspace), the
stacked GEMM and the stacked optimizer updates.

Each member runs exactly the single network's step, so a member of an ensemble computes what the network
trained alone computes (the same BLAS calls on the same shapes, or the same small-batch loops), and the
per-member Python and dispatch cost of a loop of networks is paid once per ensemble step. A shared batch
is a stack of one (x (1, B, n0)), read by every member.

Where the members are: a member step whose GEMMs are too small for BLAS's threads (``blas_threads``)
uses one core, so the members run on Numba's threads (``numba.prange``, compiled with ``parallel``),
BLAS on one thread each; a member with larger GEMMs runs on every core through BLAS, so the members run
one after the other (two layers of threads would oversubscribe the cores). Members are independent, so
the order in which they run changes no result.

The stacked GEMM follows the same rule per product: on Numba's threads, BLAS on one thread each, where
a product is too small for BLAS's threads, else one after the other. The stacked optimizer updates run
the flat update of ``optimizers.py`` on row k of the (K, P) buffers with member k's hyperparameters, the
rows on Numba's threads: row k computes what the flat update does.
"""

from __future__ import annotations

import numba
import numpy as np
from numba.extending import register_jitable

from deltaprop.kernels.cpu import optimizers
from deltaprop.kernels.cpu.blas_threads import SERIAL_BLAS_BELOW, register_blas_threads, restore_blas, serial_blas
from deltaprop.kernels.cpu.gemm import OPS, chosen_gemm_into
from deltaprop.kernels.cpu.step import build_grads_step, build_sgd_step, jitable_variant, largest_gemm


@register_jitable
def members_in_parallel(batch, offsets):
    """Whether the ensemble step runs its members on Numba's threads for batches of ``batch`` rows: when
    a member's largest GEMM runs BLAS on one thread (or it has none: the small-batch loops)."""
    return largest_gemm(batch, offsets) < SERIAL_BLAS_BELOW


def build_ensemble_step(T, act, loss, small, grads):
    """The ensemble's SGD step (``grads`` False) or gradients step (True) for activation ``act``, loss
    kernel ``loss`` and the ``small`` variant of the member step (as ``step.build_sgd_step``)."""
    build = build_grads_step if grads else build_sgd_step
    variant = f"{act}_{loss}_{'small' if small else 'gemm'}_{'grads' if grads else 'sgd'}"
    member_step = jitable_variant(build(T, act, loss, small), variant)

    def run_member(k, x, targets, params, work, offsets, per_member, totals):
        """Member k's step, its summed loss into totals[k]; its first bad row, or -1."""
        x_k, targets_k = x[min(k, x.shape[0] - 1)], targets[min(k, targets.shape[0] - 1)]
        if grads:
            total, bad_row = member_step(x_k, targets_k, params[k], per_member[k], work[k], offsets)
        else:
            total, bad_row = member_step(x_k, targets_k, params[k], work[k], offsets, per_member[k])
        totals[k] = total
        return bad_row

    run_member = jitable_variant(run_member, variant)

    def ensemble_step(x, targets, params, work, offsets, per_member, totals):
        """Every member's step (``run_member``). Returns -1, or the first bad row of the first member
        whose labels are out of range (every such member unchanged, the others stepped). x: (1 or K, B,
        n0); targets: (1 or K, B) int64 or (1 or K, B, n_L); params: (K, P); work: (K, W); per_member: lr
        (K,) of the dtype for the SGD step, the (K, P) gradient buffer for the gradients step; totals: (K,)
        of the dtype."""
        members, batch = params.shape[0], x.shape[1]
        none_bad = members * batch
        first_bad = none_bad  # k * batch + row of the first bad row, for one reduction across threads
        if members > 1 and members_in_parallel(batch, offsets):
            serial = serial_blas(largest_gemm(batch, offsets))  # once for all, not per member
            for k in numba.prange(members):
                k = np.int64(k)  # the prange index is unsigned: mixed with int64 it would become a float64
                bad_row = run_member(k, x, targets, params, work, offsets, per_member, totals)
                first_bad = min(first_bad, k * batch + bad_row if bad_row >= 0 else none_bad)
            restore_blas(serial)
        else:
            for k in range(members):
                bad_row = run_member(k, x, targets, params, work, offsets, per_member, totals)
                first_bad = min(first_bad, k * batch + bad_row if bad_row >= 0 else none_bad)
        return -1 if first_bad == none_bad else first_bad % batch

    return ensemble_step


def build_stacked_gemm(T, trans_a, trans_b):
    op_a, op_b = OPS[trans_a], OPS[trans_b]
    gemm_into = chosen_gemm_into()  # a closure cell: the BLAS is part of the cache key
    register_blas_threads()  # before the kernel compiles or loads from the cache

    def stacked_gemm(a, b, out, alpha, beta):
        """out[s] = alpha * op(a[s]) @ op(b[s]) + beta * out[s] for each matrix of the (S, ., .) stacks; out
        is not read when beta is 0. The stacks are not empty (``checks.check_gemm``)."""
        m, k = op_a(a[0]).shape
        serial = serial_blas(m * k * out.shape[2])
        if serial:
            for s in numba.prange(a.shape[0]):
                gemm_into(op_a(a[s]), op_b(b[s]), out[s], alpha, beta)
        else:
            for s in range(a.shape[0]):
                gemm_into(op_a(a[s]), op_b(b[s]), out[s], alpha, beta)
        restore_blas(serial)

    return stacked_gemm


def build_stacked_sgd(T):
    sgd = register_jitable(optimizers.build_sgd(T))

    def stacked_sgd(params, grads, lr, weight_decay):
        """Row k: ``sgd`` with lr[k] and weight_decay[k]. params, grads: (K, P); lr, weight_decay: (K,)."""
        for k in numba.prange(params.shape[0]):
            sgd(params[k], grads[k], lr[k], weight_decay[k])

    return stacked_sgd


def build_stacked_momentum(T):
    momentum = register_jitable(optimizers.build_momentum(T))

    def stacked_momentum(params, grads, velocity, lr, mu, nesterov, weight_decay):
        """Row k: ``momentum`` with lr[k], mu[k] and weight_decay[k]. params, grads, velocity: (K, P); lr, mu,
        weight_decay: (K,)."""
        for k in numba.prange(params.shape[0]):
            momentum(params[k], grads[k], velocity[k], lr[k], mu[k], nesterov, weight_decay[k])

    return stacked_momentum


def build_stacked_adam(T):
    adam = register_jitable(optimizers.build_adam(T))

    def stacked_adam(params, grads, m, v, lr, beta1, beta2, eps, weight_decay, decoupled, bias1, bias2, keep1, keep2):
        """Row k: ``adam`` with lr[k] and weight_decay[k], the other scalars shared. params, grads, m, v:
        (K, P); lr, weight_decay: (K,)."""
        for k in numba.prange(params.shape[0]):
            adam(params[k], grads[k], m[k], v[k], lr[k], beta1, beta2, eps, weight_decay[k], decoupled, bias1,
                 bias2, keep1, keep2)

    return stacked_adam
