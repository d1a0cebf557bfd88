"""Data-parallel scaling on this machine's cores: 1 rank x 2 BLAS threads against 2 ranks x 1 thread.

    python -m deltaprop.benchmarks.scaling [--batches 256,2048] [--rows 8192] [--repeats 3] [--json FILE]

A 784-1024-1024-10 ReLU network, float32, the numba backend, Adam, softmax cross-entropy, on random data
of ``--rows`` rows. For each global batch size, one ``MLP.fit`` epoch is timed ``--repeats`` times after a
warm-up epoch (the best time counts): in one process with BLAS on 1 thread (the baseline), in one
process with BLAS on 2 threads, and with ``fit(comm=MPI.COMM_WORLD)`` on 2 ranks of mpiexec with BLAS on
1 thread each. Reports throughput (samples/s), the parallel efficiency of each 2-core configuration
(its throughput / (2 x the baseline's)), the ratio of 2 ranks to 2 threads, and the time of one in-place
allreduce of the network's float32 gradient buffer (1,863,690 values, 7.45 MB) between the 2 ranks (the
median of 20). Prints JSON (and writes it with --json), with the load average before and after: a
busy machine makes every figure noisy (two BLAS threads suffer most when the cores are shared), so
compare only figures of one run on a quiet machine. Needs mpi4py and an mpiexec: pip install 'deltaprop[mpi]'.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

from deltaprop.model.distributed import LOOPBACK_ENV, MPIEXEC_LOOPBACK

SIZES = [784, 1024, 1024, 10]
RUN_LIMIT = 1800  # seconds one configuration may take
ALLREDUCE_REPEATS = 20
# (name, ranks, BLAS threads per rank)
CONFIGURATIONS = (("1 rank x 1 thread", 1, 1), ("1 rank x 2 threads", 1, 2), ("2 ranks x 1 thread", 2, 1))


def _worker(batches, rows, repeats, threads):
    """Times fit epochs (on every rank of COMM_WORLD when there are several); rank 0 prints one JSON line."""
    from threadpoolctl import threadpool_limits

    from deltaprop.model import MLP

    comm = None
    if int(os.environ.get("PMI_SIZE", "1")) > 1:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
    rng = np.random.default_rng(0)
    X = rng.standard_normal((rows, SIZES[0])).astype(np.float32)
    y = rng.integers(0, SIZES[-1], rows)
    result = {"epoch_seconds": {}}
    with threadpool_limits(limits=threads, user_api="blas"):
        for batch in batches:
            net = MLP(SIZES, backend="numba", dtype="float32", seed=0)
            net.fit(X, y, epochs=1, batch_size=batch, progress=False, comm=comm)  # compiles, warms the caches
            seconds = []
            for _ in range(repeats):
                started = time.perf_counter()
                net.fit(X, y, epochs=1, batch_size=batch, progress=False, comm=comm)
                seconds.append(time.perf_counter() - started)
            result["epoch_seconds"][str(batch)] = min(seconds)
        if comm is not None:
            result["allreduce_seconds"] = _allreduce_seconds(comm, net.grads)
            result["allreduce_bytes"] = int(net.grads.nbytes)
    if comm is None or comm.Get_rank() == 0:
        print(json.dumps(result), flush=True)


def _allreduce_seconds(comm, buffer):
    """The median time of one in-place sum of ``buffer`` over ``comm`` (after a barrier each time)."""
    from mpi4py import MPI

    times = []
    for _ in range(ALLREDUCE_REPEATS):
        comm.Barrier()
        started = time.perf_counter()
        comm.Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def _run(ranks, threads, args):
    worker = [sys.executable, "-m", "deltaprop.benchmarks.scaling", "--worker", "--threads", str(threads),
              "--batches", args.batches, "--rows", str(args.rows), "--repeats", str(args.repeats)]
    env = {**os.environ, **LOOPBACK_ENV, "OPENBLAS_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads), "NUMBA_NUM_THREADS": str(threads)}
    if ranks > 1:
        mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
        if mpiexec is None:
            sys.exit("scaling: error: needs mpiexec: pip install 'deltaprop[mpi]'")
        worker = [mpiexec, *MPIEXEC_LOOPBACK, "-n", str(ranks), *worker]
    done = subprocess.run(worker, capture_output=True, text=True, env=env, timeout=RUN_LIMIT)
    if done.returncode != 0:
        sys.exit(f"scaling: error: {' '.join(worker)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(runs, batches, rows, load):
    """The JSON report from the worker results of each configuration."""
    (base_name, _), (threads_name, _), (ranks_name, two) = runs
    by_batch = {}
    for batch in batches:
        rate = {name: rows / run["epoch_seconds"][str(batch)] for name, run in runs}
        by_batch[str(batch)] = {
            **{f"{name} samples/s": value for name, value in rate.items()},
            **{f"{name} parallel efficiency": rate[name] / (2 * rate[base_name]) for name in (threads_name, ranks_name)},
            "2 ranks / 2 threads": rate[ranks_name] / rate[threads_name],
        }
    return {"sizes": SIZES, "dtype": "float32", "backend": "numba", "rows": rows, "cpus": os.cpu_count(),
            "load average (1 min) before and after": load, "batches": by_batch,
            "allreduce": {"bytes": two["allreduce_bytes"], "seconds": two["allreduce_seconds"],
                          "GB/s (bytes / time)": two["allreduce_bytes"] / two["allreduce_seconds"] / 1e9}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="256,2048", help="global batch sizes, comma-separated")
    parser.add_argument("--rows", type=int, default=8192, help="training rows (one epoch is timed)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", metavar="FILE", help="also write the report here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    if args.worker:
        _worker(batches, args.rows, args.repeats, args.threads)
        return 0
    load_before = os.getloadavg()[0]
    runs = [(name, _run(ranks, threads, args)) for name, ranks, threads in CONFIGURATIONS]
    result = report(runs, batches, args.rows, [load_before, os.getloadavg()[0]])
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        from deltaprop.atomic import write_atomic

        write_atomic(args.json, lambda file: file.write(text.encode()), "--json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
