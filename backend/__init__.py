"""Backend selection: the registry of backends, looked up by name, loaded on first use.

    get_backend("auto" | "numpy" | "numba" | "cupy")   an instance (one per name, cached)
    available_backends()                                names usable here
    use_backend(name)                                   a context manager: the backend "auto" means inside it
    register_backend(name, "module:Class" or class)     add a backend

"auto" resolves, in order, to the backend of the innermost ``use_backend`` block, the environment
variable DELTAPROP_BACKEND, cupy when a CUDA device is usable, else numba. A name that is known but
cannot run here raises BackendUnavailableError with the reason; it never falls back silently.

DELTAPROP_CUDA_SIM=1 puts "cupy" on the host stand-in of the CUDA runtime (kernels/cuda/host/standin.py,
for tests): then "cupy" is usable without a GPU, and "auto" never picks it.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import logging
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from deltaprop.backend.base import Backend
from deltaprop.errors import BackendUnavailableError

if TYPE_CHECKING:
    import numpy as np

    from deltaprop.arrays import Array

__all__ = [
    "Backend",
    "available_backends",
    "backend_status",
    "environment_backend",
    "get_backend",
    "register_backend",
    "registered_backends",
    "to_numpy",
    "use_backend",
]

log = logging.getLogger("deltaprop")

# name -> "module:Class" (imported on first use, so that importing deltaprop loads neither Numba nor CuPy)
_REGISTRY: dict[str, str | type[Backend]] = {
    "numpy": "deltaprop.backend.base:Backend",
    "numba": "deltaprop.backend.numba_backend:NumbaBackend",
    "cupy": "deltaprop.backend.cupy_backend:CupyBackend",
}
# the order "auto" tries, fastest first
_AUTO_ORDER = ("cupy", "numba", "numpy")
_instances: dict[tuple[str, bool], Backend] = {}  # (name, on the CUDA stand-in) -> the instance
_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("deltaprop_backend", default=None)
_auto_logged = False


def register_backend(name: str, backend: str | type[Backend]) -> None:
    """Register a Backend subclass (or "module:Class" to import lazily) under ``name``."""
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"register_backend: name: expected a non-empty string other than 'auto', got {name!r}")
    _REGISTRY[name] = backend
    for key in [key for key in _instances if key[0] == name]:
        del _instances[key]


def _backend_class(name: str) -> type[Backend]:
    entry = _REGISTRY[name]
    if isinstance(entry, str):
        module, _, cls = entry.partition(":")
        try:
            entry = getattr(importlib.import_module(module), cls)
        except ModuleNotFoundError as e:
            if (e.name or "").partition(".")[0] == "deltaprop":
                raise  # our own module missing is a bug, not an unusable backend
            raise BackendUnavailableError(f"backend {name!r} cannot be imported here: {e}") from e
    return entry


def backend_status(name: str) -> tuple[bool, str]:
    """(usable here, why not) for a registered backend name; imports no heavy package when it can avoid it."""
    try:
        return _backend_class(name).availability()
    except BackendUnavailableError as e:
        return False, str(e)


def registered_backends() -> list[str]:
    """Every registered backend name, usable here or not."""
    return list(_REGISTRY)


def available_backends() -> list[str]:
    """The registered backends usable on this machine."""
    return [name for name in registered_backends() if backend_status(name)[0]]


def environment_backend() -> str | None:
    """The backend the environment variable DELTAPROP_BACKEND names, None when it is unset or empty; a
    ValueError naming the variable and the valid values for anything else."""
    value = os.environ.get("DELTAPROP_BACKEND") or None
    if value is not None and value != "auto" and value not in _REGISTRY:
        raise ValueError(f"environment variable DELTAPROP_BACKEND: expected 'auto' or one of "
                         f"{sorted(_REGISTRY)}, got {value!r}")
    return value


def _resolve_auto() -> str:
    global _auto_logged
    chosen = _current.get() or environment_backend()
    if chosen and chosen != "auto":
        return chosen
    reasons: list[str] = []
    for name in _AUTO_ORDER:
        ok, why = backend_status(name)
        if ok and _simulated(name):
            ok, why = False, "simulated on the host (DELTAPROP_CUDA_SIM=1): name it to use it"
        if ok:
            if reasons and not _auto_logged:
                log.info("deltaprop: backend 'auto' is %r (%s)", name, "; ".join(reasons))
                _auto_logged = True
            return name
        reasons.append(f"{name} unavailable: {why}")
    raise BackendUnavailableError("no backend is usable: " + "; ".join(reasons))  # numpy always is


def get_backend(name: str | Backend | None = "auto") -> Backend:
    """The backend called ``name`` ("auto" or None: see the module docstring); a Backend passes through."""
    if isinstance(name, Backend):
        return name
    if name is None or name == "auto":
        name = _resolve_auto()
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"backend: expected 'auto' or one of {sorted(_REGISTRY)}, got {name!r}")
    key = (name, _simulated(name))
    if key not in _instances:
        cls = _backend_class(name)
        ok, why = cls.availability()
        if not ok:
            raise BackendUnavailableError(f"backend {name!r} is not usable here: {why}")
        _instances[key] = cls()
    return _instances[key]


def _simulated(name: str) -> bool:
    """Whether ``name`` runs on the CUDA stand-in now (DELTAPROP_CUDA_SIM=1: "cupy" does); a ValueError
    naming the variable for a value it does not take."""
    if name != "cupy":
        return False
    from deltaprop.kernels.cuda.host import standin

    return standin.simulated()


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[Backend]:
    """Within the block, "auto" (and MLP's default) means ``name``; scoped to this context (thread/task)."""
    backend = get_backend(name)  # fail at the door, not at first use
    token = _current.set(backend.name)
    try:
        yield backend
    finally:
        _current.reset(token)


def to_numpy(x: Array) -> np.ndarray:
    """Any array of any backend (NumPy, CuPy, or a DLPack producer) as a NumPy array on the host."""
    if hasattr(x, "get") and type(x).__module__.startswith(("cupy", "deltaprop.kernels.cuda.host")):
        return x.get()  # a device array (CuPy's, or the CUDA stand-in's)
    import numpy as np

    return np.asarray(x)
