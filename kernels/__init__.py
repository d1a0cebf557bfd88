"""The kernels: the math per device.

    reference.py     NumPy, line by line from the equations: the oracle every kernel is tested against
    activations.py   the activation table (formulas and each backend's spelling)
    cpu/             Numba @njit kernels
    cuda/            CUDA C sources and their loader/compiler
"""
