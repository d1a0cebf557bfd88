"""The whole SGD training step in one compiled call, for a network of any depth: forward, loss, backward
and the update, with BLAS GEMMs (``gemm.chosen_gemm_into`` on views, NumPy's BLAS where it has one) and
the same Numba kernels as the kernel-by-kernel loop, so that both paths compute the same function.

Everything lives in flat buffers at the offsets of a ``kernels.layout.Layout`` (its ``offsets`` table:
one row per layer, (n_in, n_out, offset of W, offset of b in ``params``, offsets of z, a and delta in
``work``); the last ``2 * max(sizes)`` elements of ``work`` are scratch. Flat buffers rather than a
tuple of arrays per layer, because Numba's dispatch costs grow with each array argument, and one kernel
serves every depth (no recompilation per network).

Up to ``SMALL_BATCH`` rows the GEMMs are replaced by dot-product loops (forward) and one pass over
each W that propagates delta through the old W and applies the outer-product update (backward): W is
read once instead of three times. Larger batches propagate delta through the old W with a GEMM, then
update W with a second one, W -= lr * delta.T @ a, accumulated in place (dW is never stored: one pass
over W instead of three).

The two are variants compiled apart (``small``, a constant of the closure, so that Numba prunes the
other branch before typing it): each computes the same function at any batch size, but compiles only
its own loops, which halves the first compile of the GEMM step. ``kernels.cpu.step_for_batch`` picks
the variant by the batch size.
"""

from __future__ import annotations

import math

import numba
from numba.extending import register_jitable

from deltaprop.kernels.cpu import elementwise, losses, optimizers
from deltaprop.kernels.cpu.blas_threads import register_blas_threads, restore_blas, serial_blas
from deltaprop.kernels.cpu.common import fixed_identity, matrix_at
from deltaprop.kernels.cpu.gemm import chosen_gemm_into
from deltaprop.kernels.layout import A_AT, B_AT, DELTA_AT, N_IN, N_OUT, W_AT, Z_AT

SMALL_BATCH = 8  # at most this many rows: the outer-product update fused with delta's propagation


# The small-batch loops reassociate their sums (as BLAS does) so that LLVM vectorizes the dot products;
# they are compiled apart, because fastmath flags pass down to inlined helpers and would undo the
# compensated sums of the loss and the bias gradient. No nnan/ninf: NaN and inf must propagate. The flags
# are a dict, not a set: the steps' cache key pickles them, and a set of strings pickles in a random order.
# Disk caching is turned on by ``kernels.cpu`` (MODULE_KERNELS), in the folder of ``kernels.cache``.
SMALL_BATCH_JIT = {"nogil": True, "error_model": "numpy",
                   "fastmath": dict.fromkeys(("reassoc", "contract", "nsz", "arcp"), True)}


@register_jitable
def _dot(row, a, total):
    for k in range(row.shape[0]):
        total += row[k] * a[k]
    return total


@fixed_identity
@numba.njit(**SMALL_BATCH_JIT)
def small_dense(a_in, W, z):
    """z = a_in @ W.T, by dot products over eight rows of W at a time (each a[k] loaded once for eight
    outputs), then one at a time for the last n_out % 8. a_in: (B, n_in); W: (n_out, n_in); z: (B, n_out)."""
    zero = z.dtype.type(0)
    n_out, n_in = W.shape
    blocked = n_out - n_out % 8
    for i in range(a_in.shape[0]):
        a = a_in[i]
        for j in range(0, blocked, 8):
            r0, r1, r2, r3, r4, r5, r6, r7 = W[j], W[j + 1], W[j + 2], W[j + 3], W[j + 4], W[j + 5], W[j + 6], W[j + 7]
            t0 = t1 = t2 = t3 = t4 = t5 = t6 = t7 = zero
            for k in range(n_in):
                ak = a[k]
                t0 += r0[k] * ak
                t1 += r1[k] * ak
                t2 += r2[k] * ak
                t3 += r3[k] * ak
                t4 += r4[k] * ak
                t5 += r5[k] * ak
                t6 += r6[k] * ak
                t7 += r7[k] * ak
            z[i, j], z[i, j + 1], z[i, j + 2], z[i, j + 3] = t0, t1, t2, t3
            z[i, j + 4], z[i, j + 5], z[i, j + 6], z[i, j + 7] = t4, t5, t6, t7
        for j in range(blocked, n_out):
            z[i, j] = _dot(W[j], a, zero)


# The batch-1 updates take two rows of W at a time, so that a[k] (and g[k]) is loaded and stored once for
# both. Not more than two: LLVM vectorizes these loops only while its runtime checks that the rows, a and
# g do not overlap stay within its limit.
@register_jitable
def _outer_update(W, b, d, a, lr):
    """Batch 1, no propagation: W -= lr * outer(d, a) and b -= lr * d.
    W: (n_out, n_in); b, d: (n_out,); a: (n_in,)."""
    n_out = W.shape[0]
    for j in range(0, n_out - 1, 2):
        r0, r1 = W[j], W[j + 1]
        s0, s1 = lr * d[j], lr * d[j + 1]
        for k in range(r0.shape[0]):
            ak = a[k]
            r0[k] -= s0 * ak
            r1[k] -= s1 * ak
        b[j] -= s0
        b[j + 1] -= s1
    if n_out % 2:
        j = n_out - 1
        step = lr * d[j]
        row = W[j]
        for k in range(row.shape[0]):
            row[k] -= step * a[k]
        b[j] -= step


@register_jitable
def _outer_update_propagate(W, b, d, a, g, lr):
    """Batch 1: g = d @ W (the old W) and the update of ``_outer_update``, in one pass over each row
    of W, which g reads before it changes. g: (n_in,)."""
    g[:] = 0
    n_out = W.shape[0]
    for j in range(0, n_out - 1, 2):
        r0, r1 = W[j], W[j + 1]
        d0, d1 = d[j], d[j + 1]
        s0, s1 = lr * d0, lr * d1
        for k in range(r0.shape[0]):
            w0, w1, ak = r0[k], r1[k], a[k]
            g[k] += d0 * w0 + d1 * w1
            r0[k] = w0 - s0 * ak
            r1[k] = w1 - s1 * ak
        b[j] -= s0
        b[j + 1] -= s1
    if n_out % 2:
        j = n_out - 1
        dj = d[j]
        step = lr * dj
        row = W[j]
        for k in range(row.shape[0]):
            w = row[k]
            g[k] += dj * w
            row[k] = w - step * a[k]
        b[j] -= step


@fixed_identity
@numba.njit(**SMALL_BATCH_JIT)
def small_update(W, b, delta, a_in, g, propagate, lr):
    """g = delta @ W when ``propagate``, then W -= lr * delta.T @ a_in and b -= lr * sum(delta), in one
    pass over the rows of W. W: (n_out, n_in); b: (n_out,); delta: (B, n_out); a_in, g: (B, n_in)."""
    if delta.shape[0] == 1:  # one-dimensional loops: at batch 1 the per-row overhead is what counts
        if propagate:
            _outer_update_propagate(W, b, delta[0], a_in[0], g[0], lr)
        else:
            _outer_update(W, b, delta[0], a_in[0], lr)
        return
    if propagate:
        g[:] = 0
    for j in range(W.shape[0]):
        row = W[j]
        db = b.dtype.type(0)
        for i in range(delta.shape[0]):
            d = delta[i, j]
            db += d
            if propagate:
                g_i = g[i]
                for k in range(row.shape[0]):
                    g_i[k] += d * row[k]  # the old W: row j changes only below
        for i in range(delta.shape[0]):
            step = lr * delta[i, j]
            a = a_in[i]
            for k in range(row.shape[0]):
                row[k] -= step * a[k]
        b[j] -= lr * db


@fixed_identity
@numba.njit(**SMALL_BATCH_JIT)
def small_grads(W, dW, delta, a_in, g, propagate):
    """g = delta @ W when ``propagate`` and dW = delta.T @ a_in, in one pass over the rows of W.
    W, dW: (n_out, n_in); delta: (B, n_out); a_in, g: (B, n_in)."""
    if propagate:
        g[:] = 0
    for j in range(W.shape[0]):
        row, grad = W[j], dW[j]
        grad[:] = 0
        for i in range(delta.shape[0]):
            d = delta[i, j]
            a = a_in[i]
            for k in range(row.shape[0]):
                grad[k] += d * a[k]
            if propagate:
                g_i = g[i]
                for k in range(row.shape[0]):
                    g_i[k] += d * row[k]


@register_jitable
def largest_gemm(batch, offsets):
    """The multiply-adds of a step's largest GEMM: 0 up to ``SMALL_BATCH`` rows, which run no GEMM."""
    if batch <= SMALL_BATCH:
        return 0
    largest = 0
    for l in range(offsets.shape[0]):
        largest = max(largest, offsets[l, N_IN] * offsets[l, N_OUT])
    return batch * largest


def jitable_variant(fn, variant):
    """``fn``, a kernel builder's closure, callable from jitted code under a name of its own variant.

    A cached kernel calls its helpers by their mangled names (qualname and types), and a builder's
    closures share one qualname across variants: two cached steps loaded in one process (say relu and
    elu, compiled by different processes) would otherwise call each other's activation.
    """
    fn.__qualname__ = f"{fn.__qualname__}_{variant}"
    return register_jitable(fn)


def build_start_step(T, act, loss, small):
    """The start of a fused step, shared by the SGD step and the gradients step: ``start_step(x, targets,
    params, work, offsets) -> (summed loss, bad_row, serial, proceed)`` puts BLAS on one thread for small GEMMs
    (``serial``, for ``restore_blas``), runs the forward pass and the loss, and leaves z[l], a[l] (the
    logits in z[L]) and delta[L] in ``work``. When ``proceed`` is False (a label out of range, or a loss that
    is not finite) BLAS is already restored and the step must return at once, changing nothing."""
    bias_act = jitable_variant(elementwise.build_bias_act(T, act), act)
    bias_add = jitable_variant(elementwise.build_bias_act(T, "identity"), "identity")
    loss_rows = jitable_variant(losses.build_loss(T, losses.FORMS[loss]), loss)
    zero, one = T(0), T(1)
    gemm_into = chosen_gemm_into()  # a closure cell: the BLAS is part of the cache key
    register_blas_threads()  # before the step compiles or loads from the cache

    def start_step(x, targets, params, work, offsets):
        batch, depth = x.shape[0], offsets.shape[0]
        serial = serial_blas(largest_gemm(batch, offsets))
        for l in range(depth):
            n_in, n_out, w_at, b_at = offsets[l, N_IN], offsets[l, N_OUT], offsets[l, W_AT], offsets[l, B_AT]
            a_in = x if l == 0 else matrix_at(work, offsets[l - 1, A_AT], batch, n_in)
            z = matrix_at(work, offsets[l, Z_AT], batch, n_out)
            W = matrix_at(params, w_at, n_out, n_in)
            if small:
                small_dense(a_in, W, z)
            else:
                gemm_into(a_in, W.T, z, one, zero)
            if l < depth - 1:
                bias_act(z, params[b_at:b_at + n_out], z, matrix_at(work, offsets[l, A_AT], batch, n_out))
            else:
                bias_add(z, params[b_at:b_at + n_out], z, z)  # the logits

        last = offsets[depth - 1]
        delta = matrix_at(work, last[DELTA_AT], batch, last[N_OUT])
        total, bad_row = loss_rows(matrix_at(work, last[Z_AT], batch, last[N_OUT]), targets, delta, one / T(batch))
        proceed = bad_row < 0 and math.isfinite(total)
        if not proceed:
            restore_blas(serial)
        return total, bad_row, serial, proceed

    start_step.__qualname__ = f"start_step_{act}_{loss}_{'small' if small else 'gemm'}"  # a symbol per variant
    return register_jitable(start_step)


@register_jitable
def layer_views(x, work, offsets, l):
    """Layer l's sizes and backward views: (n_in, n_out, a[l-1] (x for l = 0), delta[l], g), g being
    delta[l-1] before act' (an empty view for the input layer, which gets none)."""
    batch, n_in, n_out = x.shape[0], offsets[l, N_IN], offsets[l, N_OUT]
    a_in = x if l == 0 else matrix_at(work, offsets[l - 1, A_AT], batch, n_in)
    g = matrix_at(work, offsets[l - 1, DELTA_AT], batch, n_in) if l > 0 else matrix_at(work, 0, 0, n_in)
    return n_in, n_out, a_in, matrix_at(work, offsets[l, DELTA_AT], batch, n_out), g


@register_jitable
def step_scratch(work, offsets):
    """(the last 2 * n_max elements of ``work``, n_max), n_max being the widest layer."""
    n_max = offsets[0, N_IN]
    for l in range(offsets.shape[0]):
        n_max = max(n_max, offsets[l, N_OUT])
    return work[work.shape[0] - 2 * n_max:], n_max


def build_sgd_step(T, act, loss, small):
    """The step for activation ``act`` on the hidden layers and the loss kernel ``loss`` on the last; with
    the small-batch loops where ``small``, else with GEMMs."""
    start_step = build_start_step(T, act, loss, small)
    act_backward = jitable_variant(elementwise.build_act_backward(T, act), act)
    act_backward_sums = jitable_variant(elementwise.build_act_backward_sums(T, act), act)
    sgd = register_jitable(optimizers.build_sgd(T))
    zero, one = T(0), T(1)
    gemm_into = chosen_gemm_into()

    def sgd_step(x, targets, params, work, offsets, lr):
        """One SGD step; returns (summed loss over the batch, -1), or (0, row) for a label outside [0, C).

        Nothing is updated when a label is out of range or the loss is not finite. x: (B, n0)
        C-contiguous; targets: int labels (B,) or (B, n_L); params: (P,); work: flat workspace;
        offsets: (L, 7) int64; lr: scalar of the dtype.
        """
        batch, depth = x.shape[0], offsets.shape[0]
        total, bad_row, serial, proceed = start_step(x, targets, params, work, offsets)
        if not proceed:
            return total, bad_row  # before any parameter changes
        scratch, n_max = step_scratch(work, offsets)
        for l in range(depth - 1, -1, -1):
            n_in, n_out, a_in, delta, g = layer_views(x, work, offsets, l)
            w_at, b_at = offsets[l, W_AT], offsets[l, B_AT]
            W, b = matrix_at(params, w_at, n_out, n_in), params[b_at:b_at + n_out]
            if small:
                small_update(W, b, delta, a_in, g, l > 0, lr)
            else:
                if l > 0:
                    gemm_into(delta, W, g, one, zero)  # with the old W, updated just below
                gemm_into(delta.T, a_in, W, -lr, one)  # W -= lr * dW, dW = delta.T @ a never stored
                db = scratch[:n_out]
                if l == depth - 1:  # below the top, the act' pass of the layer above left db here
                    elementwise.column_sums(delta, db, scratch[n_max:n_max + n_out])
                sgd(b, db, lr, zero)
            if l > 0:
                z_below = matrix_at(work, offsets[l - 1, Z_AT], batch, n_in)
                if small:
                    act_backward(g, z_below, g)
                else:  # delta[l-1] and its column sums, db[l-1], in one pass over it
                    act_backward_sums(g, z_below, g, scratch[:n_in], scratch[n_max:n_max + n_in])
        restore_blas(serial)
        return total, bad_row

    return sgd_step


def build_grads_step(T, act, loss, small):
    """Forward, loss and backward for activation ``act`` and loss kernel ``loss``, the gradients written
    into the flat ``grads`` buffer (the parameters' layout) for an optimizer's update kernel to apply."""
    start_step = build_start_step(T, act, loss, small)
    act_backward_sums = jitable_variant(elementwise.build_act_backward_sums(T, act), act)
    zero, one = T(0), T(1)
    gemm_into = chosen_gemm_into()

    def grads_step(x, targets, params, grads, work, offsets):
        """dJ/dW[l] and dJ/db[l] into ``grads`` at the parameters' offsets; returns (summed loss over the
        batch, -1), or (0, row) for a label outside [0, C). ``grads`` is left as it was when a label is
        out of range or the loss is not finite. x: (B, n0) C-contiguous; targets: int labels (B,) or
        (B, n_L); params, grads: (P,); work: flat workspace; offsets: (L, 7) int64.
        """
        batch, depth = x.shape[0], offsets.shape[0]
        total, bad_row, serial, proceed = start_step(x, targets, params, work, offsets)
        if not proceed:
            return total, bad_row  # before any gradient changes
        scratch = step_scratch(work, offsets)[0]
        for l in range(depth - 1, -1, -1):
            n_in, n_out, a_in, delta, g = layer_views(x, work, offsets, l)
            w_at, b_at = offsets[l, W_AT], offsets[l, B_AT]
            W, dW = matrix_at(params, w_at, n_out, n_in), matrix_at(grads, w_at, n_out, n_in)
            if small:
                small_grads(W, dW, delta, a_in, g, l > 0)
            else:
                gemm_into(delta.T, a_in, dW, one, zero)  # dW = delta.T @ a[l-1]
                if l > 0:
                    gemm_into(delta, W, g, one, zero)
            if l == depth - 1:  # below the top, the act' pass of the layer above wrote db
                elementwise.column_sums(delta, grads[b_at:b_at + n_out], scratch[:n_out])
            if l > 0:  # delta[l-1] and db[l-1] in one pass
                b_below = offsets[l - 1, B_AT]
                z_below = matrix_at(work, offsets[l - 1, Z_AT], batch, n_in)
                act_backward_sums(g, z_below, g, grads[b_below:b_below + n_in], scratch[:n_in])
        restore_blas(serial)
        return total, bad_row

    return grads_step
