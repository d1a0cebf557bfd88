"""Where a network's arrays live in its two flat buffers, for given layer sizes and a batch size.

The parameters are one flat buffer: per layer l = 1..L, W[l] (n_l, n_{l-1}) row-major, then b[l] (n_l,).
The workspace of a batch size B is another: z[l] for every layer, then a[l] for the hidden ones, then
delta[l] for every layer, each (B, n_l) row-major, then ``2 * max(sizes)`` elements of scratch.

``Layout`` is the one owner of these offsets. The model asks it for views by name (``weights``,
``biases``, ``z``, ``a``, ``delta``, ``scratch``); a compiled fused step reads the same facts from
``offsets``, an int64 (L, len(COLUMNS)) table, so that it takes a handful of arguments whatever the
depth. Every view is a function of (buffer, offset, shape), so a stack of networks is a leading axis
on the same table: K networks of one ``sizes`` live in a (K, n_params) parameter buffer and a (K,
work_size) workspace (member k's buffers are row k, laid out as one network's), and every view of such
a buffer gets the leading K axis: W[l] (K, n_l, n_{l-1}), b[l] (K, n_l), z[l] (K, B, n_l). The views
of a row-strided stack are strided views, never copies, so a layer of every member is one
strided-batched GEMM.
"""

from __future__ import annotations

import numpy as np

# the columns of a row of ``Layout.offsets`` (one row per layer), by name, for compiled code
COLUMNS = ("n_in", "n_out", "w_at", "b_at", "z_at", "a_at", "delta_at")
N_IN, N_OUT, W_AT, B_AT, Z_AT, A_AT, DELTA_AT = range(len(COLUMNS))


class Layout:
    """The offsets of a network of ``sizes`` [n0, ..., nL] in its parameter buffer and in the workspace of
    ``batch`` rows (batch 0: the parameters only, and a workspace of scratch alone)."""

    def __init__(self, sizes, batch: int = 0):
        self.sizes = tuple(int(n) for n in sizes)
        self.batch = int(batch)
        depth = len(self.sizes) - 1
        offsets = np.zeros((depth, len(COLUMNS)), np.int64)
        param_at = 0
        for l, (n_in, n_out) in enumerate(zip(self.sizes[:-1], self.sizes[1:])):
            offsets[l, [N_IN, N_OUT, W_AT, B_AT]] = n_in, n_out, param_at, param_at + n_out * n_in
            param_at += n_out * (n_in + 1)
        work_at = 0
        for column, layers in ((Z_AT, range(depth)), (A_AT, range(depth - 1)), (DELTA_AT, range(depth))):
            for l in layers:
                offsets[l, column] = work_at
                work_at += self.batch * self.sizes[l + 1]
        offsets[-1, A_AT] = -1  # the last layer has only logits, in z[L]
        self.offsets = offsets
        self.n_params = param_at
        self.scratch_size = 2 * max(self.sizes)
        self.work_size = work_at + self.scratch_size

    @staticmethod
    def parameter_count(sizes) -> int:
        """P, the length of the flat parameter buffer of a network of ``sizes``, as a Python int (which may
        exceed what the int64 offsets can hold)."""
        return sum(int(n_out) * (int(n_in) + 1) for n_in, n_out in zip(sizes[:-1], sizes[1:]))

    @property
    def depth(self) -> int:
        """L, the number of layers with weights."""
        return len(self.sizes) - 1

    def _matrices(self, flat, column, rows, layers):
        lead = flat.shape[:-1]  # () for one network, (K,) for a stack
        return [flat[..., at:at + rows * n].reshape(lead + (rows, n))
                for at, n in zip(self.offsets[layers, column].tolist(), self.offsets[layers, N_OUT].tolist())]

    def weights(self, params) -> list:
        """W[l] (n_l, n_{l-1}) for l = 1..L, views of the flat (``n_params``,) buffer ``params`` (a (K,
        ``n_params``) stack: (K, n_l, n_{l-1}) views)."""
        lead = params.shape[:-1]
        return [params[..., w:b].reshape(lead + (n_out, n_in))
                for n_in, n_out, w, b in self.offsets[:, :B_AT + 1].tolist()]

    def biases(self, params) -> list:
        """b[l] (n_l,) for l = 1..L, views of ``params`` ((K, n_l) of a stack)."""
        return [params[..., b:b + n_out] for n_out, b in self.offsets[:, [N_OUT, B_AT]].tolist()]

    def z(self, work) -> list:
        """z[l] (B, n_l) for l = 1..L (z[L] being the logits), views of the flat (``work_size``,) ``work``
        ((K, B, n_l) views of a (K, ``work_size``) stack, as for every view below)."""
        return self._matrices(work, Z_AT, self.batch, slice(None))

    def a(self, work) -> list:
        """a[l] (B, n_l) for the hidden layers l = 1..L-1, views of ``work``."""
        return self._matrices(work, A_AT, self.batch, slice(None, -1))

    def delta(self, work) -> list:
        """delta[l] (B, n_l) for l = 1..L, views of ``work``."""
        return self._matrices(work, DELTA_AT, self.batch, slice(None))

    def scratch(self, work):
        """The (2 * max(sizes),) scratch at the end of ``work`` ((K, 2 * max(sizes)) of a stack)."""
        return work[..., self.work_size - self.scratch_size:self.work_size]

    def __repr__(self):
        return f"Layout({list(self.sizes)}, batch={self.batch})"
