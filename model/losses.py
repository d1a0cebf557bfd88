"""The loss table: each loss names the Backend kernel that computes it with its delta, and its output map.

    softmax_cross_entropy   mean over the batch of -sum(y * log softmax(z))     kernel softmax_xent
    mse                     mean over the batch of 1/2 ||z - y||^2              kernel squared_error
    sigmoid_cross_entropy   mean over the batch of the summed element losses    kernel sigmoid_xent

For each, delta[L] = dJ/dz[L] = (output_map(z[L]) - y) / B.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Loss:
    name: str
    kernel: str  # the Backend method: (z, targets, delta_out, scale) -> mean loss
    output: str  # the output map y_hat = output(z[L]): "softmax", or an activation of the activation table
    classifier: bool  # predictions are class labels (argmax) rather than the outputs themselves


LOSSES: dict[str, Loss] = {
    loss.name: loss
    for loss in (
        Loss("softmax_cross_entropy", "softmax_xent", "softmax", classifier=True),
        Loss("mse", "squared_error", "identity", classifier=False),
        Loss("sigmoid_cross_entropy", "sigmoid_xent", "sigmoid", classifier=False),
    )
}


def get_loss(name: str) -> Loss:
    """The table entry for ``name``; a ValueError lists the known names otherwise."""
    try:
        return LOSSES[name]
    except (KeyError, TypeError):
        raise ValueError(f"loss: expected one of {sorted(LOSSES)}, got {name!r}") from None
