"""The CuPy backend's array plumbing: inputs brought to the device, and outputs that a kernel cannot write
in place (a NumPy array, a strided or transposed CuPy view) written through a contiguous device copy.

Those copies are for convenience and tests; the training step passes C-contiguous device arrays only,
which go through untouched. A kernel over a stack of members (an ensemble's (K, B, n) workspace views)
reads and writes in place any stack whose members are each C-contiguous, at any member stride.
"""

from __future__ import annotations

import math

import numpy as np


def member_stride(x) -> int | None:
    """The elements from one member of a stack ``x`` (K, ...) to the next, where each member is
    C-contiguous (a kernel reads member k k * stride elements after x's first), else None."""
    expected = x.itemsize
    for size, stride in zip(reversed(x.shape[1:]), reversed(x.strides[1:])):
        if size != 1 and stride != expected:
            return None
        expected *= size
    return None if x.strides[0] % x.itemsize else x.strides[0] // x.itemsize


def _writable_stack(x) -> bool:
    """Whether a kernel over a stack writes ``x`` in place: members C-contiguous and apart (no overlap)."""
    stride = member_stride(x)
    return stride is not None and (x.shape[0] == 1 or abs(stride) >= math.prod(x.shape[1:]))


def on_device(cp, kernel, name, x):
    """An array argument on the device in its own layout: CuPy arrays as they are, NumPy arrays uploaded."""
    if isinstance(x, cp.ndarray):
        return x
    if isinstance(x, np.ndarray):
        return cp.asarray(x)
    raise TypeError(f"{kernel}: {name}: expected a CuPy or NumPy array, got {type(x).__module__}.{type(x).__name__}")


class Outputs:
    """The arrays one kernel call writes. A C-contiguous device array is written in place; any other
    through a contiguous device copy that ``write_back`` copies into it once the kernel has run.

    cp: the CuPy module; kernel: the kernel's name, for messages. One object serves one call at a time,
    call after call (``CupyBackend`` keeps one per kernel and thread)."""

    def __init__(self, cp, kernel: str):
        self._cp, self._kernel = cp, kernel
        self._copies: list[tuple] = []  # (the caller's array, the contiguous device copy the kernel writes)

    def buffer(self, name, array, read=False, staged=False, stacked=False):
        """The device array the kernel writes for ``array``; ``read``: the kernel also reads its values;
        ``staged``: through a copy even where in place would do, so that nothing reaches ``array`` before
        ``write_back`` (a call that may still refuse after its launch); ``stacked``: ``array`` is a stack
        (K, ...) for a kernel that takes a member stride, written in place where ``_writable_stack``."""
        cp = self._cp
        in_place = _writable_stack if stacked else lambda x: x.flags.c_contiguous
        if not staged and isinstance(array, cp.ndarray) and in_place(array):
            return array
        if read:
            copy = cp.array(on_device(cp, self._kernel, name, array), order="C")
        else:
            copy = cp.empty(array.shape, dtype=array.dtype)
        self._copies.append((array, copy))
        return copy

    def output(self, name, out, shape, dtype, stacked=False):
        """(what the call returns, what the kernel writes) for an ``out=`` argument, allocated where None;
        ``stacked`` as for ``buffer``."""
        if out is None:
            out = self._cp.empty(shape, dtype=dtype)
        return out, self.buffer(name, out, stacked=stacked)

    def write_back(self):
        """Copies each written copy into the array it stands for."""
        for array, copy in self._copies:
            array[...] = copy if isinstance(array, self._cp.ndarray) else copy.get()
        self.clear()

    def clear(self):
        """Forgets the copies (of a call that failed before ``write_back``): the object serves the next call."""
        self._copies.clear()
