"""Fixtures shared by the tests: the backends usable here × the dtypes, and honest error measures.

Tests parametrized over ``backend_name`` run on every backend present (numpy always, numba, cupy when a
CUDA device is usable); those on cupy carry the ``gpu`` marker, and every ``gpu`` test is skipped
without a device, so CPU CI runs everything else.
"""

import numpy as np
import pytest

from deltaprop.backend import backend_status, get_backend, to_numpy

ALL_BACKENDS = ("numpy", "numba", "cupy")
GPU_BACKENDS = ("cupy",)
CPU_DTYPES = ("float32", "float64")
# relative tolerances from DESIGN.md: elementwise results, and norm-wise for GEMM-based ones
TOLERANCE = {"float32": 1e-5, "float64": 1e-12}


def gpu_usable() -> bool:
    return backend_status("cupy")[0]


@pytest.fixture(params=ALL_BACKENDS)
def backend_name(request):
    ok, why = backend_status(request.param)
    if not ok:
        pytest.skip(f"backend {request.param} unusable here: {why}")
    return request.param


@pytest.fixture
def backend(backend_name):
    return get_backend(backend_name)


@pytest.fixture(params=CPU_DTYPES)
def dtype(request):
    return np.dtype(request.param)


@pytest.fixture
def rng():
    return np.random.default_rng(20261128)


def pytest_collection_modifyitems(config, items):
    gpu = gpu_usable()
    skip_gpu = pytest.mark.skip(reason="needs a usable CUDA device (cupy backend unavailable here)")
    for item in items:
        params = getattr(item, "callspec", None)
        if params is not None and params.params.get("backend_name") in GPU_BACKENDS:
            item.add_marker(pytest.mark.gpu)
        if not gpu and "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def rel_err(actual, expected) -> float:
    """Norm-wise relative error of ``actual`` (any backend's array) against a float64 ``expected``."""
    actual = np.asarray(to_numpy(actual), dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"shape {actual.shape} != expected {expected.shape}"
    scale = np.linalg.norm(expected)
    return float(np.linalg.norm(actual - expected) / (scale if scale > 0 else 1.0))


def max_rel_err(actual, expected, floor=None) -> float:
    """Elementwise: max |actual - expected| / max(|expected|, floor); floor defaults to the mean |expected|,
    so that entries near zero are judged against the array's scale rather than against zero."""
    actual = np.asarray(to_numpy(actual), dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"shape {actual.shape} != expected {expected.shape}"
    if floor is None:
        floor = max(float(np.abs(expected).mean()), np.finfo(np.float64).tiny)
    return float((np.abs(actual - expected) / np.maximum(np.abs(expected), floor)).max())
