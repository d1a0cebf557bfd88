"""The machine a benchmark ran on: CPU, cores, BLAS and its threads, GPU and driver, library versions.

Nothing here imports a heavy package: versions come from the installed distributions' metadata, the BLAS
from threadpoolctl (or NumPy's build configuration), the GPU from ``nvidia-smi``.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess

# the distributions whose versions a report names, where installed
DISTRIBUTIONS = ("numpy", "scipy", "numba", "llvmlite", "cupy-cuda13x", "cupy-cuda12x", "torch", "jax", "jaxlib",
                 "jax-cuda12-plugin", "jax-cuda13-plugin", "threadpoolctl", "matplotlib")
# environment variables that change thread counts or backend choice
ENVIRONMENT = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OPENBLAS_THREAD_TIMEOUT", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS",
               "XLA_FLAGS", "CUDA_VISIBLE_DEVICES", "DELTAPROP_BACKEND")


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """The logical CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def blas() -> list[dict]:
    """The BLAS libraries loaded in this process: [{name, version, threads, architecture}].

    From threadpoolctl, which reads the thread counts at run time; for a BLAS it does not know, NumPy's
    build configuration names the library (threads None).
    """
    import numpy as np  # the BLAS numpy loads is the one the CPU backends call
    from threadpoolctl import threadpool_info

    pools = [{"name": pool["internal_api"], "version": pool.get("version"), "threads": pool["num_threads"],
              "architecture": pool.get("architecture")}
             for pool in threadpool_info() if pool["user_api"] == "blas"]
    if pools:
        return pools
    config = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    return [{"name": config.get("name"), "version": config.get("version"), "threads": None, "architecture": None}]


def cpu_threads() -> int:
    """The threads our CPU backends compute with: the BLAS thread count, else the usable cores.

    Peers are given the same count (``torch.set_num_threads``)."""
    counts = [pool["threads"] for pool in blas() if pool["threads"]]
    return max(counts) if counts else usable_cores()


def gpus() -> list[dict]:
    """[{name, driver, memory_mib}] per NVIDIA GPU that ``nvidia-smi`` lists; [] without one."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    rows = [[cell.strip() for cell in line.split(",")] for line in out.splitlines() if line.strip()]
    return [{"name": name, "driver": driver, "memory_mib": int(memory) if memory.isdigit() else None}
            for name, driver, memory in rows]


def versions() -> dict[str, str]:
    """Python, deltaprop and every installed distribution of ``DISTRIBUTIONS``: name -> version."""
    from deltaprop import __version__

    found = {"python": platform.python_version(), "deltaprop": __version__}
    for dist in DISTRIBUTIONS:
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def describe_machine() -> dict:
    """Every fact above, and the load average over 1, 5 and 15 minutes when the run began (other work on
    the machine slows every timing), as the ``machine`` object of a benchmark report."""
    return {
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "platform": platform.platform(),
        "blas": blas(),
        "threads": cpu_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "environment": {name: os.environ[name] for name in ENVIRONMENT if name in os.environ},
        "gpus": gpus(),
        "versions": versions(),
    }
