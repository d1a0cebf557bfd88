"""`deltaprop info`: what deltaprop can use on this machine, and why it cannot use the rest."""

from __future__ import annotations

import os
import platform
import sys

from deltaprop.cli import UsageError


def add_arguments(parser):
    parser.add_argument("--load", action="store_true",
                        help="also instantiate each usable backend and print what it reports about itself")


def facts(load=False) -> dict:
    """Everything `deltaprop info` prints, as a dict; a UsageError when DELTAPROP_BACKEND names no backend."""
    import numpy as np

    from deltaprop import __version__
    from deltaprop.backend import backend_status, environment_backend, get_backend, registered_backends
    from deltaprop.benchmarks import machine

    from deltaprop.kernels.cuda.host import standin

    try:
        chosen = environment_backend()
        simulated = standin.simulated()
    except ValueError as e:
        raise UsageError(str(e)) from None
    backends = {}
    for name in registered_backends():
        ok, why = backend_status(name)
        backends[name] = {"usable": ok, "why_not": why}
        if ok and load:
            backends[name]["describe"] = get_backend(name).describe()
    try:
        import numba

        from deltaprop.kernels import cache

        numba_facts = {"version": numba.__version__, "threads": numba.config.NUMBA_NUM_THREADS,
                       "kernel_cache": cache.describe()}
    except ImportError as e:
        numba_facts = {"version": None, "error": str(e)}
    return {
        "deltaprop": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "numpy": np.__version__,
        "numba": numba_facts,
        "blas": machine.blas(),
        "backends": backends,
        "DELTAPROP_BACKEND": chosen,
        "DELTAPROP_CUDA_SIM": simulated,
    }


def run(args) -> int:
    from deltaprop.benchmarks.report import blas_threads

    f = facts(load=args.load)
    print(f"deltaprop {f['deltaprop']}  python {f['python']}  numpy {f['numpy']}  on {f['platform']}")
    print(f"cpus: {f['cpu_count']}")
    if f["DELTAPROP_CUDA_SIM"]:
        print("DELTAPROP_CUDA_SIM=1: cupy runs on the host simulator of the CUDA runtime (tests only), not on a GPU")
    numba = f["numba"]
    print(f"numba: {numba['version'] or 'not importable: ' + numba['error']}"
          + (f" ({numba['threads']} threads)" if numba["version"] else ""))
    if numba["version"]:
        from deltaprop.cli.cache import summary

        print(f"kernel cache: {summary(numba['kernel_cache'])}")
    for pool in f["blas"]:
        print(f"blas: {pool['name']} {pool['version'] or ''} ({blas_threads(pool)}, "
              f"{pool['architecture'] or 'architecture unknown'})")
    print("backends:")
    for name, status in f["backends"].items():
        note = f" ({status['why_not']})" if status["why_not"] else ""  # a usable backend's note: the CUDA stand-in
        print(f"  {name:<6} {'usable' + note if status['usable'] else 'unusable: ' + status['why_not']}")
        for key, value in status.get("describe", {}).items():
            print(f"         {key}: {value}")
    if f["DELTAPROP_BACKEND"]:
        print(f"DELTAPROP_BACKEND={f['DELTAPROP_BACKEND']} (what 'auto' means here)")
    return 0
