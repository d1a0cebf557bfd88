"""The SGD step of K stacked networks in one compiled call: member k's fused step (``step.py``) on row k
of the (K, P) parameters and the (K, work_size) workspace, in a compiled loop over the members.

Each member runs exactly the single network's step, so a member of an ensemble computes what the network
trained alone computes (the same BLAS calls on the same shapes, or the same small-batch loops), and the
per-member Python and dispatch cost of a loop of networks is paid once per ensemble step. A shared batch
is a stack of one (x (1, B, n0)), read by every member.
"""

from __future__ import annotations

from deltaprop.kernels.cpu.step import build_sgd_step, jitable_variant


def build_ensemble_sgd_step(T, act, loss, small):
    """The ensemble step for activation ``act``, loss kernel ``loss`` and the ``small`` variant of the
    member step (as ``step.build_sgd_step``)."""
    member_step = jitable_variant(build_sgd_step(T, act, loss, small), f"{act}_{loss}_{'small' if small else 'gemm'}")

    def ensemble_sgd_step(x, targets, params, work, offsets, lr, totals):
        """Member k's SGD step with lr[k]; its summed loss into totals[k]. Returns -1, or the first bad row
        of the first member whose labels are out of range (that member and those after it unchanged).
        x: (1 or K, B, n0); targets: (1 or K, B) int64 or (1 or K, B, n_L); params: (K, P); work: (K, W);
        lr: (K,) of the dtype; totals: (K,) float64."""
        shared_x, shared_targets = x.shape[0] == 1, targets.shape[0] == 1
        for k in range(params.shape[0]):
            total, bad_row = member_step(x[0 if shared_x else k], targets[0 if shared_targets else k],
                                         params[k], work[k], offsets, lr[k])
            if bad_row >= 0:
                return bad_row
            totals[k] = total
        return -1

    return ensemble_sgd_step
