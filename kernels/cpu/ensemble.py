"""The steps of K stacked networks in one compiled call: member k's fused step (``step.py``) on row k of
the (K, P) parameters and the (K, work_size) workspace, in a compiled loop over the members.

Each member runs exactly the single network's step, so a member of an ensemble computes what the network
trained alone computes (the same BLAS calls on the same shapes, or the same small-batch loops), and the
per-member Python and dispatch cost of a loop of networks is paid once per ensemble step. A shared batch
is a stack of one (x (1, B, n0)), read by every member.
"""

from __future__ import annotations

from deltaprop.kernels.cpu.step import build_grads_step, build_sgd_step, jitable_variant


def build_ensemble_step(T, act, loss, small, grads):
    """The ensemble's SGD step (``grads`` False) or gradients step (True) for activation ``act``, loss
    kernel ``loss`` and the ``small`` variant of the member step (as ``step.build_sgd_step``)."""
    build = build_grads_step if grads else build_sgd_step
    member_step = jitable_variant(build(T, act, loss, small),
                                  f"{act}_{loss}_{'small' if small else 'gemm'}_{'grads' if grads else 'sgd'}")

    def ensemble_step(x, targets, params, work, offsets, per_member, totals):
        """Member k's step; its summed loss into totals[k]. per_member: lr (K,) of the dtype for the SGD
        step (params updated), the (K, P) gradient buffer for the gradients step. Returns -1, or the first
        bad row of the first member whose labels are out of range (that member and those after it
        unchanged). x: (1 or K, B, n0); targets: (1 or K, B) int64 or (1 or K, B, n_L); params: (K, P);
        work: (K, W); totals: (K,) of the dtype."""
        shared_x, shared_targets = x.shape[0] == 1, targets.shape[0] == 1
        for k in range(params.shape[0]):
            x_k, targets_k = x[0 if shared_x else k], targets[0 if shared_targets else k]
            if grads:
                total, bad_row = member_step(x_k, targets_k, params[k], per_member[k], work[k], offsets)
            else:
                total, bad_row = member_step(x_k, targets_k, params[k], work[k], offsets, per_member[k])
            if bad_row >= 0:
                return bad_row
            totals[k] = total
        return -1

    return ensemble_step
