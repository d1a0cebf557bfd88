"""Fixtures shared by the tests: the backends usable here × the dtypes (helpers.py holds shared functions).

Tests parametrized over ``backend_name`` run on every backend present: numpy and numba always (they are
hard dependencies: one that cannot load fails the test rather than skipping it), cupy when a CUDA
device is usable. Tests on cupy carry the ``gpu`` marker, and every ``gpu`` test is skipped without a
device, so CPU CI runs everything else.

The ``cupy-sim`` cases (marker ``cuda_sim``, helpers.SIM_BACKEND) run the cupy backend on the host stand-in
of the CUDA runtime (DELTAPROP_CUDA_SIM=1, set for the test), on every machine. Run with
DELTAPROP_CUDA_SIM=0 in the environment, they run on the real device instead (skipped without one): the
same cases on the GPU, for comparison.
"""

import os

import numpy as np
import pytest

from helpers import CPU_BACKENDS, GPU_BACKENDS, SIM_BACKEND, SIM_VARIABLE

from deltaprop.backend import backend_status, get_backend
from deltaprop.errors import BackendUnavailableError


def gpu_usable() -> bool:
    return backend_status("cupy")[0]


SIM_ON_DEVICE = os.environ.get(SIM_VARIABLE) == "0"  # the cuda_sim cases on the real device


@pytest.fixture(params=CPU_BACKENDS + GPU_BACKENDS + (SIM_BACKEND,))
def backend_name(request):
    ok, why = backend_status(request.param)
    if not ok and request.param in CPU_BACKENDS:
        pytest.fail(f"backend {request.param} must be usable on every machine, but: {why}")
    return request.param  # an unusable GPU backend is skipped through the gpu marker below


@pytest.fixture(autouse=True)
def _cuda_stand_in(request, monkeypatch):
    """A cuda_sim test runs "cupy" on the host stand-in (unless DELTAPROP_CUDA_SIM=0 asks for the device)."""
    if request.node.get_closest_marker("cuda_sim") and not SIM_ON_DEVICE:
        monkeypatch.setenv(SIM_VARIABLE, "1")


@pytest.fixture
def backend(backend_name):
    return get_backend(backend_name)


@pytest.fixture
def sim():
    """The cupy backend of a cuda_sim test: on the host stand-in; skipped without a C++ compiler."""
    try:
        return get_backend("cupy")
    except BackendUnavailableError as error:
        pytest.skip(str(error))


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
        simulated = "cuda_sim" in item.keywords
        if params is not None and params.params.get("backend_name") in GPU_BACKENDS and not simulated:
            item.add_marker(pytest.mark.gpu)
        if simulated and SIM_ON_DEVICE and skip_gpu and item.get_closest_marker("cuda_sim").kwargs.get("backend"):
            item.add_marker(skip_gpu)
        if skip_gpu and "gpu" in item.keywords:
            item.add_marker(skip_gpu)

