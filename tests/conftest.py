"""Fixtures: every usable backend x float32/float64, and the tolerances of DESIGN.md."""

from __future__ import annotations

import numpy as np
import pytest

from deltaprop.backend import available_backends, get_backend

# DESIGN.md: float64 <= 1e-12 relative for elementwise kernels; float32 <= 1e-5 (norm-wise for GEMM results)
TOLERANCES = {"float32": 1e-5, "float64": 1e-12}


def tol(dtype) -> float:
    return TOLERANCES[np.dtype(dtype).name]


def rel_err(result, expected) -> float:
    """Norm-wise relative error max|result - expected| / max|expected| (absolute where expected is all 0).

    Norm-wise, because an elementwise ratio is meaningless where the exact value crosses zero
    (act'(z) of gelu and silu, the columns of a GEMM); nothing is widened to make a case pass.
    """
    result, expected = np.asarray(result, np.float64), np.asarray(expected, np.float64)
    assert result.shape == expected.shape
    scale = np.max(np.abs(expected), initial=0.0)
    error = np.max(np.abs(result - expected), initial=0.0)
    return error / scale if scale > 0 else error


@pytest.fixture(params=available_backends())
def backend_name(request):
    return request.param


@pytest.fixture
def backend(backend_name):
    return get_backend(backend_name)


@pytest.fixture(params=["float32", "float64"])
def dtype(request):
    return np.dtype(request.param)


@pytest.fixture
def rng():
    return np.random.default_rng(20261128)
