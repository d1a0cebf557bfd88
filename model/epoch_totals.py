"""The running totals of a fit's epoch, kept where the backend computes them: fit's inner loop never waits
for a device.

Each batch's mean loss and count of correct predictions are written, as the backend gives them, into
one slot per batch of two arrays of the backend (a GPU's 0-d results are copied there by a launch on
the device, never read); the epoch's loss and hits are read once, after its last batch. A loss that is
a host number (``Backend.results_on_host``) is also checked finite at once, at no cost, so that a
diverging batch stops the fit before its update; a device's is checked at that read, which names the
first batch whose loss was not finite.
"""

from __future__ import annotations

from math import isfinite

import numpy as np

from deltaprop.errors import NonFiniteLossError


def non_finite_loss(loss) -> NonFiniteLossError:
    """The error for a mean loss that is NaN or infinite."""
    return NonFiniteLossError(
        f"loss: expected a finite value, got {loss} (NaN/inf in x, or a diverging learning rate)")


class EpochTotals:
    """Per-batch slots for the mean losses, rows and hits of an epoch of ``n_batches`` batches, allocated once
    per fit on ``backend``; a slot left unwritten (a rank's empty slice, an epoch a callback stopped)
    counts no rows."""

    def __init__(self, backend, n_batches):
        self.xp = xp = backend.xp
        self.check_each_batch = backend.results_on_host
        self.losses = xp.zeros(n_batches, np.float64)  # the mean loss of each batch
        self.rows = xp.zeros(n_batches, np.float64)  # its weight in the epoch's loss
        self.hits = xp.zeros(n_batches, np.int64)

    def start_epoch(self):
        for slots in (self.losses, self.rows, self.hits):
            slots.fill(0)

    def add(self, batch, loss, rows, hits=0):
        """Keeps the mean ``loss`` over ``rows`` rows and the ``hits`` of ``batch`` (1-based) as the backend
        gave them, unread; raises NonFiniteLossError for a host loss that is not finite."""
        if self.check_each_batch and not isfinite(loss):
            raise non_finite_loss(loss)
        slot = slice(batch - 1, batch)  # an element's slice: setting the element itself would read a 0-d array
        self.losses[slot] = loss
        self.rows[slot] = rows
        self.hits[slot] = hits

    def read(self) -> tuple[float, int, int | None]:
        """(the loss summed over the epoch's rows, its hits, None) read from the backend, or (the sum, its
        hits, the first batch, 1-based, whose loss was not finite) where one was not."""
        loss_sum, hits = float(self.losses @ self.rows), int(self.hits.sum())
        if isfinite(loss_sum):
            return loss_sum, hits, None
        return loss_sum, hits, int(self.xp.argmax(~self.xp.isfinite(self.losses))) + 1  # argmax: the first True
