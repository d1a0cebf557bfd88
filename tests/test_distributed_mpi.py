"""Data parallel over 2 ranks under the mpich wheel's mpiexec, on loopback, each run under a timeout: the
2-rank fit against the plain 1-process fit with the same global batch, ranks that disagree, a rank that
dies. This file is also the program the ranks run (``python test_distributed_mpi.py CASE ARGS``).
Every run has distributed.LOOPBACK_ENV and MPIEXEC_LOOPBACK: MPICH on this machine only.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from deltaprop.model.distributed import LOOPBACK_ENV, MPIEXEC_LOOPBACK

RUN_LIMIT = 60  # seconds any one mpiexec run may take before the test fails
DEAD_RANK_TIMEOUT = 5  # seconds the ranks wait for each other in the dead-rank runs
SIZES, ROWS, BATCH, EPOCHS = [6, 16, 3], 100, 33, 4  # batches of 33, 33, 33, 1 rows: split 16/17 and 0/1


def _data():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((ROWS, SIZES[0]))
    return X, (X[:, 0] > 0).astype(np.int64) + (X[:, 1] > 0.5)


def _net(backend, dtype, seed=1, sizes=SIZES):
    from deltaprop.model import MLP

    return MLP(sizes, backend=backend, dtype=dtype, seed=seed)


# ---- what the ranks run -----------------------------------------------------------------------------


def _equivalence(out):
    """Rank 0 writes, per backend and dtype, the loss of every epoch and the final parameters."""
    from mpi4py import MPI

    X, y = _data()
    results = {}
    for backend, dtype in (("numpy", "float64"), ("numba", "float32")):
        net = _net(backend, dtype)
        history = net.fit(X, y, epochs=EPOCHS, batch_size=BATCH, seed=2, comm=MPI.COMM_WORLD)
        results[f"{backend} {dtype}"] = {"loss": history.loss, "accuracy": history.accuracy,
                                         "params": np.asarray(net.params, np.float64).tolist()}
    if MPI.COMM_WORLD.Get_rank() == 0:
        with open(out, "w") as file:
            json.dump(results, file)


# (field named in the error, the network rank 1 makes instead)
MISMATCHES = {
    "network seed": lambda: _net("numpy", "float64", seed=9),
    "dtype": lambda: _net("numpy", "float32"),
    "sizes": lambda: _net("numpy", "float64", sizes=[6, 8, 3]),
}


def _mismatch(folder):
    """Each case once: rank 1's network differs; every rank writes the error it gets to folder/rank<r>.txt."""
    from mpi4py import MPI

    from deltaprop.errors import DistributedError

    rank = MPI.COMM_WORLD.Get_rank()
    X, y = _data()
    lines = []
    for field, other in MISMATCHES.items():
        net = other() if rank == 1 else _net("numpy", "float64")
        try:
            net.fit(X, y, epochs=1, batch_size=BATCH, comm=MPI.COMM_WORLD)
            lines.append(f"case {field}: rank {rank}: no error")
        except DistributedError as e:
            lines.append(f"case {field}: {e}")
    with open(os.path.join(folder, f"rank{rank}.txt"), "w") as file:
        file.write("\n".join(lines))


def _dies(checkpoint, how):
    """Trains with a checkpoint per epoch; rank 1 is killed (``kill``) or raises (``raise``) at the end of epoch 2."""
    from mpi4py import MPI

    from deltaprop.distributed import DataParallel

    rank = MPI.COMM_WORLD.Get_rank()

    def fault(epoch, logs):
        if rank == 1 and epoch == 2:
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("rank 1 fails on purpose")

    X, y = _data()
    net = _net("numpy", "float64")
    MPI.COMM_WORLD.Barrier()  # both ranks started: the time limit measures the fit, not the imports
    net.fit(X, y, epochs=EPOCHS, batch_size=BATCH, seed=2, callback=fault,
            comm=DataParallel(MPI.COMM_WORLD, timeout=DEAD_RANK_TIMEOUT, checkpoint=checkpoint))


CASES = {"equivalence": _equivalence, "mismatch": _mismatch, "dies": _dies}


# ---- the tests --------------------------------------------------------------------------------------


def _mpiexec_command(ranks, *command):
    """``command`` on ``ranks`` ranks of the wheel's mpiexec on loopback, under ``timeout``."""
    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
    if mpiexec is None:
        pytest.skip("no mpiexec (pip install 'deltaprop[mpi]')")
    return ["timeout", "-k", "5", str(RUN_LIMIT), mpiexec, *MPIEXEC_LOOPBACK, "-n", str(ranks), *map(str, command)]


def _mpiexec(ranks, *args):
    """Runs this file on ``ranks`` ranks with ``args``; the finished process (its output as text)."""
    return subprocess.run(_mpiexec_command(ranks, sys.executable, __file__, *args), capture_output=True, text=True,
                          env={**os.environ, **LOOPBACK_ENV}, timeout=RUN_LIMIT + 10)


@pytest.fixture(scope="module", autouse=True)
def _mpi():
    pytest.importorskip("mpi4py")


def test_two_ranks_give_the_losses_of_one_process_with_the_same_global_batch(tmp_path):
    done = _mpiexec(2, "equivalence", tmp_path / "out.json")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = json.loads((tmp_path / "out.json").read_text())
    X, y = _data()
    for key, rtol in (("numpy float64", 1e-12), ("numba float32", 1e-6)):
        backend, dtype = key.split()
        net = _net(backend, dtype)
        history = net.fit(X, y, epochs=EPOCHS, batch_size=BATCH, seed=2)
        np.testing.assert_allclose(results[key]["loss"], history.loss, rtol=rtol, err_msg=key)
        assert results[key]["accuracy"] == history.accuracy, key  # the same rows counted right
        np.testing.assert_allclose(results[key]["params"], np.asarray(net.params, np.float64),
                                   rtol=0, atol=100 * rtol, err_msg=key)


def test_ranks_that_disagree_all_get_an_error_naming_what_differs(tmp_path):
    done = _mpiexec(2, "mismatch", tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    for rank in (0, 1):  # every rank raised in every case: none hung, none trained on
        lines = (tmp_path / f"rank{rank}.txt").read_text().splitlines()
        assert [line.split(":")[0] for line in lines] == [f"case {field}" for field in MISMATCHES]
        for line, field in zip(lines, MISMATCHES):
            assert f"case {field}: rank {rank}: start of fit: expected every rank to agree, got different " in line
            assert f"; {field}: rank 0 " in line or f"different {field}: rank 0 " in line, line
        assert "network seed: rank 0 1, rank 1 9" in lines[0]
        assert "dtype: rank 0 float64, rank 1 float32" in lines[1]
        assert "sizes: rank 0 [6, 16, 3], rank 1 [6, 8, 3]" in lines[2]


def _resume_alone(checkpoint):
    """Finishes the run from ``checkpoint`` on one rank (MPI.COMM_SELF); the network."""
    from mpi4py import MPI

    from deltaprop import distributed

    X, y = _data()
    net, hook = distributed.resume(checkpoint, MPI.COMM_SELF, backend="numpy")
    net.fit(X, y, epochs=EPOCHS, batch_size=BATCH, seed=2, comm=hook)
    return net


@pytest.mark.parametrize("how", ["kill", "raise"])
def test_a_rank_that_dies_ends_the_run_and_its_checkpoint_resumes_on_one_rank(tmp_path, how):
    checkpoint = tmp_path / "run.npz"
    started = time.monotonic()
    done = _mpiexec(2, "dies", checkpoint, how)
    assert time.monotonic() - started < RUN_LIMIT and done.returncode not in (0, 124, 137), done.stderr[-2000:]
    if how == "kill":  # mpiexec ends the job and says why
        assert "BAD TERMINATION" in done.stdout + done.stderr and "signal 9" in done.stdout + done.stderr
    else:  # rank 0 waits DEAD_RANK_TIMEOUT s for rank 1's allreduce, then says so
        assert f"rank 0: gradient allreduce: expected every rank within {DEAD_RANK_TIMEOUT} s, got no answer" in done.stderr
        assert "RuntimeError: rank 1 fails on purpose" in done.stderr
    X, y = _data()
    uninterrupted = _net("numpy", "float64")
    uninterrupted.fit(X, y, epochs=EPOCHS, batch_size=BATCH, seed=2)
    resumed = _resume_alone(checkpoint)  # written after epoch 1 or 2: intact, whatever the kill interrupted
    np.testing.assert_allclose(resumed.params, uninterrupted.params, rtol=0, atol=1e-12)


def test_train_distributed_prints_the_single_process_run_once():
    pytest.importorskip("sklearn")
    train = [sys.executable, "-m", "deltaprop", "train", "--dataset", "digits", "--backend", "numpy",
             "--dtype", "float64", "--epochs", "2", "--sizes", "64,32,10"]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for command, env in ((["timeout", str(RUN_LIMIT), *train], os.environ),  # side by side: CI's time
                                 (_mpiexec_command(2, *train, "--distributed"), {**os.environ, **LOOPBACK_ENV}))]
    (one, one_err), (two, two_err) = (run.communicate(timeout=RUN_LIMIT + 10) for run in runs)
    assert [run.returncode for run in runs] == [0, 0], one_err[-2000:] + two_err[-2000:]
    epochs = [line for line in two.splitlines() if line.startswith("epoch")]
    assert epochs == [line for line in one.splitlines() if line.startswith("epoch")]  # once: rank 0 only
    assert len(epochs) == 2 and two.count("test accuracy") == 1 and two.count("digits: 1347 training") == 1


if __name__ == "__main__":
    CASES[sys.argv[1]](*sys.argv[2:])
