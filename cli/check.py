"""`deltaprop check`: every kernel and a whole training step, on each usable backend, against the reference.

One row per kernel, backend and dtype: the norm-wise relative error against kernels/reference.py in
float64 and the dtype's tolerance (the checking is deltaprop.benchmarks.check). Exit status 1 when any
row fails, 2 for a backend or dtype that is unknown or cannot run here.
"""

from __future__ import annotations

from deltaprop.cli import UsageError, backend_for


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def add_arguments(parser) -> None:
    parser.add_argument("--backends", type=_names, metavar="NAME,...",
                        help="comma-separated backends to check (default: every usable one)")
    parser.add_argument("--dtypes", type=_names, metavar="DTYPE,...",
                        help="comma-separated dtypes (default: every dtype each backend computes in)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")


def _backends_and_dtypes(args):
    """[(backend, [dtype, ...])] to check; a UsageError for a name or dtype that is wrong here."""
    from deltaprop.backend import available_backends
    from deltaprop.kernels.dtypes import DTYPES, supports

    chosen = []
    for name in args.backends or available_backends():
        backend = backend_for("--backends", name)
        # every dtype the device computes in whose NumPy type is here (bfloat16: with ml_dtypes)
        computable = [d for d in backend.dtypes if (found := DTYPES[d].numpy_dtype()) is not None
                      and supports(backend.device, found)]
        for dtype in args.dtypes or ():
            if dtype not in computable:
                raise UsageError(f"--dtypes: expected dtypes among {computable} for backend {name}, got {dtype!r}")
        chosen.append((backend, args.dtypes or computable))
    return chosen


def run(args) -> int:
    from deltaprop.backend.checks import LOSS_KERNELS
    from deltaprop.benchmarks.check import BATCH, check_backend
    from deltaprop.cli.warmup import CompileProgress
    from deltaprop.kernels.activations import ACTIVATIONS

    from deltaprop.backend import backend_status

    chosen = _backends_and_dtypes(args)
    failures = 0
    for backend, _ in chosen:
        if backend.describe().get("simulated"):
            print(f"{backend.name}: {backend_status(backend.name)[1]}")
    print(f"{'backend':<7} {'dtype':<8} {'kernel':<34} {'rel err':>11} {'tolerance':>9}  result")
    for backend, dtypes in chosen:
        with CompileProgress(backend) as progress:  # every kernel alone and the step, for every activation and loss
            backend.warmup(dtypes, sorted(ACTIVATIONS), LOSS_KERNELS, [BATCH], ["kernels", "train_step"], progress)
        for dtype in dtypes:
            for name, dt, what, err, tol, ok in check_backend(backend, dtype, args.seed):
                failures += not ok
                print(f"{name:<7} {dt:<8} {what:<34} {err:>11.2e} {tol:>9.0e}  {'pass' if ok else 'FAIL'}")
    names = ", ".join(backend.name for backend, _ in chosen)
    print(f"{'all passed' if not failures else f'{failures} FAILED'} on {names}")
    return 1 if failures else 0
