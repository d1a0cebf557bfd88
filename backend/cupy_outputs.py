"""The CuPy backend's array plumbing: inputs brought to the device, and outputs that a kernel cannot write
in place (a NumPy array, a strided or transposed CuPy view) written through a contiguous device copy.

Those copies are for convenience and tests; the training step passes C-contiguous device arrays only,
which go through untouched.
"""

from __future__ import annotations

import numpy as np


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

    def buffer(self, name, array, read=False, staged=False):
        """The device array the kernel writes for ``array``; ``read``: the kernel also reads its values;
        ``staged``: through a copy even where in place would do, so that nothing reaches ``array`` before
        ``write_back`` (a call that may still refuse after its launch)."""
        cp = self._cp
        if not staged and isinstance(array, cp.ndarray) and array.flags.c_contiguous:
            return array
        if read:
            copy = cp.array(on_device(cp, self._kernel, name, array), order="C")
        else:
            copy = cp.empty(array.shape, dtype=array.dtype)
        self._copies.append((array, copy))
        return copy

    def output(self, name, out, shape, dtype):
        """(what the call returns, what the kernel writes) for an ``out=`` argument, allocated where None."""
        if out is None:
            out = self._cp.empty(shape, dtype=dtype)
        return out, self.buffer(name, out)

    def write_back(self):
        """Copies each written copy into the array it stands for."""
        for array, copy in self._copies:
            array[...] = copy if isinstance(array, self._cp.ndarray) else copy.get()
        self.clear()

    def clear(self):
        """Forgets the copies (of a call that failed before ``write_back``): the object serves the next call."""
        self._copies.clear()
