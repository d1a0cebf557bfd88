"""deltaprop.distributed in one process: the row split, argument handling, the NCCL path without a device,
and a fit over a one-rank communicator (MPI.COMM_SELF) against the plain fit. The runs over 2 ranks under
mpiexec are in test_distributed_mpi.py."""

import sys
import warnings

import numpy as np
import pytest

from deltaprop import distributed
from deltaprop.errors import DistributedError
from deltaprop.model import MLP
from deltaprop.model.distributed import LOOPBACK_ENV, NCCL_DTYPES, gpu_for_rank, nccl_dtype


@pytest.fixture(scope="module")
def MPI():
    """mpi4py.MPI, initialised (a singleton: one rank, no mpiexec) with the loopback settings."""
    with pytest.MonkeyPatch.context() as env:
        for key, value in LOOPBACK_ENV.items():
            env.setenv(key, value)  # read by MPI_Init only, which importing mpi4py.MPI runs
        return pytest.importorskip("mpi4py.MPI")


@pytest.mark.parametrize("rows, size", [(33, 2), (1, 2), (7, 3), (2, 5), (256, 4)])
def test_split_rows_gives_each_row_to_one_rank_in_rank_order(rows, size):
    start = 10
    slices = [distributed.split_rows(start, start + rows, rank, size) for rank in range(size)]
    assert [row for lo, hi in slices for row in range(lo, hi)] == list(range(start, start + rows))
    assert all(hi - lo in (rows // size, -(-rows // size)) for lo, hi in slices)  # sizes differ by at most one


def test_gpu_for_rank_is_one_gpu_per_node_local_rank():
    assert [gpu_for_rank(r, 4) for r in range(4)] == [0, 1, 2, 3]
    with pytest.raises(DistributedError, match="expected one GPU per rank, got node-local rank 2 with 2"):
        gpu_for_rank(2, 2)
    with pytest.raises(DistributedError, match="at least one CUDA device per node, got 0"):
        gpu_for_rank(0, 0)


def test_nccl_dtype_table_names_the_nccl_constants_and_refuses_the_rest():
    assert nccl_dtype(np.float32) == "NCCL_FLOAT32" and nccl_dtype("float64") == "NCCL_FLOAT64"
    with pytest.raises(TypeError, match=r"expected a buffer of \['bfloat16', 'float16', 'float32', 'float64'\], got int64"):
        nccl_dtype(np.int64)


def test_nccl_path_names_the_package_when_its_library_is_missing(MPI):
    pytest.importorskip("cupy")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        from cupy.cuda import nccl
    if nccl.available:
        assert all(hasattr(nccl, name) for name in NCCL_DTYPES.values() if name != "NCCL_BFLOAT16")
        pytest.skip("NCCL is installed here: the device check runs the NCCL path")
    with pytest.raises(DistributedError, match=r"NCCL: expected CuPy's NCCL library, got none loadable "
                                               r"\(libnccl.so.2\): pip install 'deltaprop\[cuda,nccl\]'"):
        distributed.NcclSum(MPI.COMM_SELF)


@pytest.mark.parametrize("make", [distributed.DataParallel, distributed.MpiSum, distributed.NcclSum])
def test_a_non_communicator_is_refused_before_anything_is_imported(make):
    with pytest.raises(TypeError, match=r"comm: expected an mpi4py communicator such as MPI.COMM_WORLD, got 4 "
                                        r"\(no Get_rank, Get_size, Iallreduce, Iallgather\)"):
        make(4)


@pytest.mark.parametrize("timeout", [0, -1.0, float("inf"), float("nan"), "5", True])
def test_a_bad_timeout_is_refused(timeout, MPI):
    with pytest.raises(ValueError, match="timeout: expected a positive finite number of seconds"):
        distributed.DataParallel(MPI.COMM_SELF, timeout=timeout)


def test_fit_with_a_bad_comm_changes_nothing():
    net = MLP([4, 3, 2], backend="numpy", dtype="float64")
    before = net.params.copy()
    with pytest.raises(TypeError, match="comm: expected an mpi4py communicator"):
        net.fit(np.zeros((5, 4)), np.zeros(5, np.int64), epochs=1, comm="world")
    assert np.array_equal(net.params, before) and net.optimizer is None


def _data(rows=50, features=6, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((rows, features))
    return X, (X[:, 0] > 0).astype(np.int64) + (X[:, 1] > 0.5)


def test_fit_on_one_rank_is_the_plain_fit_and_resumes_from_its_checkpoint(tmp_path, MPI):
    X, y = _data()
    plain = MLP([6, 8, 3], backend="numpy", dtype="float64", seed=3)
    expected = plain.fit(X, y, epochs=4, batch_size=16, seed=5).loss
    path = tmp_path / "run.npz"
    net = MLP([6, 8, 3], backend="numpy", dtype="float64", seed=3)
    history = net.fit(X, y, epochs=2, batch_size=16, seed=5,
                      comm=distributed.DataParallel(MPI.COMM_SELF, checkpoint=path))
    np.testing.assert_allclose(history.loss, expected[:2], rtol=1e-12)
    resumed, hook = distributed.resume(path, MPI.COMM_SELF, backend="numpy")
    epochs = []
    rest = resumed.fit(X, y, epochs=4, batch_size=16, seed=5, comm=hook, callback=lambda e, logs: epochs.append(e))
    assert epochs == [3, 4]  # the epochs after the checkpoint's, numbered as in the uninterrupted run
    np.testing.assert_allclose(rest.loss, expected[2:], rtol=1e-12)
    np.testing.assert_allclose(resumed.params, plain.params, rtol=0, atol=1e-12)


def test_resume_from_a_checkpoint_written_mid_epoch_is_refused(tmp_path, MPI):
    X, y = _data()
    net = MLP([6, 8, 3], backend="numpy", dtype="float64")
    net.fit(X[:20], y[:20], epochs=1, batch_size=16)  # 2 steps: not a whole number of epochs of X
    net.save(tmp_path / "odd.npz")
    resumed, hook = distributed.resume(tmp_path / "odd.npz", MPI.COMM_SELF, backend="numpy")
    with pytest.raises(DistributedError, match="expected a checkpoint written at the end of an epoch of 4 batches, "
                                               "got one after 2 steps"):
        resumed.fit(X, y, epochs=3, batch_size=16, comm=hook)


@pytest.mark.gpu
def test_fit_over_nccl_on_one_gpu_is_the_plain_fit(MPI):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        from cupy.cuda import nccl
    if not nccl.available:
        pytest.skip("no NCCL library here: pip install 'deltaprop[nccl]'")
    assert distributed.use_rank_gpu(MPI.COMM_SELF) == 0  # before the networks: they live on this GPU
    X, y = _data()
    plain = MLP([6, 8, 3], backend="cupy", dtype="float64", seed=3)
    expected = plain.fit(X, y, epochs=3, batch_size=16, seed=5).loss
    net = MLP([6, 8, 3], backend="cupy", dtype="float64", seed=3)
    history = net.fit(X, y, epochs=3, batch_size=16, seed=5, comm=MPI.COMM_SELF)  # NcclSum, one rank
    np.testing.assert_allclose(history.loss, expected, rtol=1e-12)


def test_a_session_without_mpi4py_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import mpi4py then fails as where it is not installed
    with pytest.raises(DistributedError, match=r"data parallel: expected mpi4py and an MPI "
                                               r"\(pip install 'deltaprop\[mpi\]'\), got: "):
        distributed.session("numpy")
