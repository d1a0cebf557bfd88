"""The flat layout of a network's buffers that a fused training step reads (``Backend.fused_sgd_step``).

The parameters are one flat buffer (per layer: W[l] row-major, then b[l]); the workspace of a batch size
is another, and an int64 plan says where everything is, so that a compiled step takes a handful of
arguments whatever the depth.
"""

from __future__ import annotations

import numpy as np

N_IN, N_OUT, W_AT, B_AT, Z_AT, A_AT, DELTA_AT = range(7)  # the columns of a plan row


def step_plan(sizes, batch):
    """The flat layout of a network's buffers, as ``Backend.fused_sgd_step`` reads it.

    Returns (plan, work_size): plan is an int64 (L, 7) array, one row per layer l = 1..L:
    (n_in, n_out, offset of W[l] and of b[l] in the flat parameter buffer (per layer: W row-major, then b),
    offsets of z[l], a[l] (-1 for the last layer, which has only logits) and delta[l] in the flat
    workspace). The workspace holds z for every layer, then a for the hidden ones, then delta for every
    layer, each (batch, n_l) row-major, then 2 * max(sizes) elements of scratch: work_size in all.
    """
    plan = np.zeros((len(sizes) - 1, 7), np.int64)
    param_at = 0
    for l, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        plan[l, [N_IN, N_OUT, W_AT, B_AT]] = n_in, n_out, param_at, param_at + n_out * n_in
        param_at += n_out * (n_in + 1)
    work_at = 0
    for column, layers in ((Z_AT, plan[:, N_OUT]), (A_AT, plan[:-1, N_OUT]), (DELTA_AT, plan[:, N_OUT])):
        for l, n in enumerate(layers):
            plan[l, column] = work_at
            work_at += batch * int(n)
    plan[-1, A_AT] = -1
    return plan, work_at + 2 * max(sizes)
