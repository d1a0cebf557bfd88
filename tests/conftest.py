"""Fixtures shared by the tests: the backends usable here × the dtypes, and an honest error measure.

Tests parametrized over ``backend_name`` run on every backend present: numpy and numba always (they are
hard dependencies: one that cannot load fails the test rather than skipping it), cupy when a CUDA
device is usable. Tests on cupy carry the ``gpu`` marker, and every ``gpu`` test is skipped without a
device, so CPU CI runs everything else.
"""

import numpy as np
import pytest

from deltaprop.backend import backend_status, get_backend, to_numpy

CPU_BACKENDS = ("numpy", "numba")
GPU_BACKENDS = ("cupy",)
# DESIGN.md: float64 <= 1e-12 relative for elementwise kernels; float32 <= 1e-5 (norm-wise for GEMM results)
TOLERANCE = {"float32": 1e-5, "float64": 1e-12}


def tol(dtype) -> float:
    return TOLERANCE[np.dtype(dtype).name]


def gpu_usable() -> bool:
    return backend_status("cupy")[0]


@pytest.fixture(params=CPU_BACKENDS + GPU_BACKENDS)
def backend_name(request):
    ok, why = backend_status(request.param)
    if not ok and request.param in CPU_BACKENDS:
        pytest.fail(f"backend {request.param} must be usable on every machine, but: {why}")
    return request.param  # an unusable GPU backend is skipped through the gpu marker below


@pytest.fixture
def backend(backend_name):
    return get_backend(backend_name)


@pytest.fixture(params=["float32", "float64"])
def dtype(request):
    return np.dtype(request.param)


@pytest.fixture
def rng():
    return np.random.default_rng(20261128)


def pytest_collection_modifyitems(config, items):
    skip_gpu = None if gpu_usable() else pytest.mark.skip(reason=f"no usable CUDA device: {backend_status('cupy')[1]}")
    for item in items:
        params = getattr(item, "callspec", None)
        if params is not None and params.params.get("backend_name") in GPU_BACKENDS:
            item.add_marker(pytest.mark.gpu)
        if skip_gpu and "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def rel_err(result, expected) -> float:
    """Norm-wise relative error max|result - expected| / max|expected| (absolute where expected is all 0).

    Norm-wise, because an elementwise ratio is meaningless where the exact value crosses zero
    (act'(z) of gelu and silu, the columns of a GEMM); nothing is widened to make a case pass.
    ``result`` may live on any backend's device.
    """
    result = np.asarray(to_numpy(result), np.float64)
    expected = np.asarray(expected, np.float64)
    assert result.shape == expected.shape, f"shape {result.shape} != expected {expected.shape}"
    scale = np.max(np.abs(expected), initial=0.0)
    error = np.max(np.abs(result - expected), initial=0.0)
    return error / scale if scale > 0 else error


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda_sim: runs the CUDA C++ kernels on the CPU (kernels/cuda/host)")
