"""Backend selection, and that importing deltaprop loads nothing heavy."""

import subprocess
import sys

import numpy as np
import pytest

import deltaprop
from deltaprop.backend import (
    Backend,
    available_backends,
    backend_status,
    get_backend,
    register_backend,
    registered_backends,
    to_numpy,
    use_backend,
)
from deltaprop.errors import BackendUnavailableError


def test_import_loads_neither_numba_nor_cupy_nor_compiles():
    code = (
        "import sys, deltaprop, deltaprop.model, deltaprop.backend, deltaprop.kernels.activations, "
        "deltaprop.kernels.reference, deltaprop.cli, deltaprop.distributed\n"
        "heavy = [m for m in ('numba', 'cupy', 'scipy', 'torch', 'jax', 'matplotlib', 'mpi4py') if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_numpy_is_always_available_and_is_the_base_class():
    assert "numpy" in available_backends()
    assert type(get_backend("numpy")) is Backend
    assert backend_status("numpy") == (True, "")


def test_unknown_backend_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"backend: expected 'auto' or one of \['cupy', 'numba', 'numpy'\], got 'tpu'"):
        get_backend("tpu")


def test_auto_follows_the_environment_variable(monkeypatch):
    monkeypatch.setenv("DELTAPROP_BACKEND", "numpy")
    assert get_backend("auto").name == "numpy"
    assert get_backend(None).name == "numpy"


def test_auto_without_a_gpu_is_numba_or_numpy(monkeypatch):
    monkeypatch.delenv("DELTAPROP_BACKEND", raising=False)
    expected = next(name for name in ("cupy", "numba", "numpy") if backend_status(name)[0])
    assert get_backend("auto").name == expected


def test_use_backend_is_scoped(monkeypatch):
    monkeypatch.setenv("DELTAPROP_BACKEND", "numba" if backend_status("numba")[0] else "numpy")
    outside = get_backend().name
    with use_backend("numpy") as backend:
        assert backend.name == "numpy" and get_backend().name == "numpy"
        assert deltaprop.MLP([2, 2], seed=0).backend.name == "numpy"
    assert get_backend().name == outside


def test_use_backend_restores_after_an_exception():
    before = get_backend().name
    with pytest.raises(RuntimeError), use_backend("numpy"):
        raise RuntimeError("inside")
    assert get_backend().name == before


def test_unusable_backend_raises_with_the_reason():
    class Absent(Backend):
        name = "absent"

        @classmethod
        def availability(cls):
            return False, "no absent device on this machine (install absent-runtime)"

    register_backend("absent", Absent)
    try:
        assert "absent" in registered_backends() and "absent" not in available_backends()
        with pytest.raises(BackendUnavailableError, match=r"'absent' is not usable here: no absent device.*absent-runtime"):
            get_backend("absent")
    finally:
        from deltaprop.backend import _REGISTRY

        del _REGISTRY["absent"]


def test_register_backend_by_import_path_loads_lazily():
    register_backend("numpy2", "deltaprop.backend.base:Backend")
    try:
        assert type(get_backend("numpy2")) is Backend
    finally:
        from deltaprop.backend import _REGISTRY, _instances

        del _REGISTRY["numpy2"]
        _instances.pop("numpy2", None)


def test_register_backend_refuses_auto():
    with pytest.raises(ValueError, match="name: expected a non-empty string other than 'auto'"):
        register_backend("auto", Backend)


def test_to_numpy_of_numpy_and_lists():
    x = np.arange(3.0)
    assert to_numpy(x) is x
    assert np.array_equal(to_numpy([1, 2]), [1, 2])
