"""deltaprop: backpropagation kernels for multilayer perceptrons on GPUs (CuPy) and CPUs (Numba).

The repository root is this package; its folders are the subpackages:

    deltaprop.kernels      the math per device (reference NumPy, Numba CPU, CUDA C)
    deltaprop.backend      the Backend contract and its implementations
    deltaprop.model        the L-layer MLP and what trains it
    deltaprop.benchmarks   measuring: the training-step timings, the parity check, the machine
    deltaprop.cli          the `deltaprop` command (also `python -m deltaprop`)

Importing deltaprop (or any subpackage) imports neither CuPy nor Numba and compiles nothing.
"""

import importlib.metadata

try:
    __version__ = importlib.metadata.version("deltaprop")  # pyproject.toml's, the one source
except importlib.metadata.PackageNotFoundError:  # a checkout on sys.path that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__", "MLP", "get_backend", "available_backends", "use_backend"]


def __getattr__(name):
    # Lazy re-exports keep `import deltaprop` light.
    if name == "MLP":
        from deltaprop.model import MLP

        return MLP
    if name in ("get_backend", "available_backends", "use_backend"):
        from deltaprop import backend

        return getattr(backend, name)
    raise AttributeError(f"module 'deltaprop' has no attribute {name!r}")
