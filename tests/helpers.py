"""Helpers the test modules share (imported as ``from helpers import ...``; conftest holds fixtures only)."""

import numpy as np
import pytest

from deltaprop.backend import to_numpy
from deltaprop.kernels import reference
from deltaprop.kernels.dtypes import DTYPES
from deltaprop.kernels.dtypes import tolerance as tol
from deltaprop.kernels.reference import relative_error

__all__ = ["CPU_BACKENDS", "GPU_BACKENDS", "LOSS_REFERENCES", "SIM", "SIM_BACKEND", "SIM_VARIABLE", "assert_close", "host64", "host_params", "labels_for",
           "random_host", "rel_err", "targets_for", "tol"]

CPU_BACKENDS = ("numpy", "numba")  # hard dependencies: usable on every machine
GPU_BACKENDS = ("cupy",)
SIM_VARIABLE = "DELTAPROP_CUDA_SIM"
# the marks of a case that runs "cupy" on the host stand-in of the CUDA runtime (conftest sets the variable)
SIM = pytest.mark.cuda_sim(backend=True)
SIM_BACKEND = pytest.param("cupy", marks=SIM, id="cupy-sim")  # a backend_name param

LOSS_REFERENCES = {  # contract loss kernel -> its reference
    "softmax_xent": reference.softmax_xent,
    "sigmoid_xent": reference.sigmoid_xent,
    "squared_error": reference.mse,
}


def rel_err(result, expected) -> float:
    """``reference.relative_error`` of ``result``, which may live on any backend's device."""
    return relative_error(to_numpy(result), expected)


def host_params(net):
    """Copies of a network's (weights, biases) on the host."""
    return [to_numpy(W).copy() for W in net.weights], [to_numpy(b).copy() for b in net.biases]


def targets_for(loss, rng, batch, classes):
    """Random targets of the kind ``loss`` (a model loss name) takes: labels, 0/1 rows or real rows."""
    if loss == "softmax_cross_entropy":
        return rng.integers(0, classes, batch)
    if loss == "sigmoid_cross_entropy":
        return (rng.random((batch, classes)) < 0.5).astype(np.float64)
    return rng.standard_normal((batch, classes))


def random_host(shape, dtype, seed=0, low=None, high=None):
    """Random values (never zeros) as a host array of ``dtype`` (a name of the dtype table)."""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(shape) if low is None else rng.uniform(low, high, shape)
    return values.astype(DTYPES[dtype].numpy_dtype())


def labels_for(rows, classes, seed=1):
    """Random int labels (rows,) in [0, classes)."""
    return np.random.default_rng(seed).integers(0, classes, rows)


def host64(backend, x):
    """A float64 copy on the host (a copy: the NumPy backend's arrays are the inputs themselves)."""
    return np.array(backend.to_numpy(x), dtype=np.float64)


def assert_close(actual, expected, dtype):
    """``rel_err(actual, expected)`` within the dtype table's tolerance for ``dtype``."""
    error = rel_err(actual, expected)
    assert error <= tol(dtype), f"relative error {error:.3g} > {tol(dtype)} ({dtype})"
