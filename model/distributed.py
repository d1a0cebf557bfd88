"""Data-parallel training over MPI (mpi4py, host buffers) and NCCL (cupy.cuda.nccl, one GPU per rank).

Every rank holds a replica of the network and the whole training set. ``fit(..., comm=...)`` then runs
exactly the single-process fit with the same global batch:

    shuffle    every rank draws the same permutation per epoch from the shared seed
    slice      rank r of R takes rows [B*r//R, B*(r+1)//R) of every global batch of B rows (possibly none)
    backward   each rank's gradient is the mean over its b_r rows
    reduce     grads *= b_r / B on each rank, then one in-place sum over the ranks of the flat gradient
               buffer: the mean over the B rows, exact for an uneven last batch (weights by rows, not ranks)
    update     the same update of the same parameters on every rank

The epoch's loss sum and correct count are summed over the ranks once per epoch. A digest of what must
agree (sizes, dtype, activation, loss, seeds, batch size, data, parameters and optimizer state) is
compared across ranks when a fit starts (a mismatch: DistributedError on every rank, naming the field
and the ranks) and of the parameters when it ends. Only rank 0 draws progress and writes checkpoints.
Callbacks run on every rank and see the same epoch logs; a per-batch hook sees its own rank's loss
(of its rows), so a callback that stops a fit mid-epoch must decide alike on every rank.

Faults: every collective is non-blocking and waited on for at most ``timeout`` seconds; a rank that
died or hangs makes the others raise DistributedError within that time instead of waiting forever
(mpiexec itself ends the job when a rank is killed). The checkpoint is written atomically by rank 0 at
the end of every epoch; ``resume`` loads it on every rank, with any number of ranks.

mpi4py and CuPy are imported when a communicator is used, never at ``import deltaprop``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass

import numpy as np

from deltaprop.errors import DistributedError

# What keeps MPICH (the mpich wheel) on one machine, for tests and benchmarks: the OFI netmod over TCP
# (UCX, the wheel's default, may refuse to start in a container), no GPU support in MPICH itself; and
# mpiexec's flags for processes started by fork (no ssh) on host localhost (no name lookup).
LOOPBACK_ENV = {"MPIR_CVAR_CH4_NETMOD": "ofi", "FI_PROVIDER": "tcp", "MPIR_CVAR_ENABLE_GPU": "0"}
MPIEXEC_LOOPBACK = ("-launcher", "fork", "-hosts", "localhost")
DEFAULT_TIMEOUT = 60.0  # seconds a rank waits for the others in one collective (first steps compile kernels)
_POLLS_PER_CLOCK_READ = 64  # Test() calls between two reads of the clock while waiting


def _wait(test, timeout, what, rank):
    """Polls ``test()`` until it is true; DistributedError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        for _ in range(_POLLS_PER_CLOCK_READ):
            if test():
                return
        if time.monotonic() > deadline:
            raise DistributedError(
                f"rank {rank}: {what}: expected every rank within {timeout:g} s, got no answer: "
                f"another rank has died or hangs (its own error, if any, is on its stderr)")


def split_rows(start: int, stop: int, rank: int, size: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous slice of rows [start, stop) shared by ``size`` ranks: sizes differ by at most one."""
    rows = stop - start
    return start + rows * rank // size, start + rows * (rank + 1) // size


def gpu_for_rank(local_rank: int, device_count: int) -> int:
    """The CUDA device of a rank: its rank among the ranks of its node, which must not exceed the devices."""
    if device_count < 1:
        raise DistributedError(f"NCCL: expected at least one CUDA device per node, got {device_count}")
    if not 0 <= local_rank < device_count:
        raise DistributedError(f"NCCL: expected one GPU per rank, got node-local rank {local_rank} with "
                               f"{device_count} device(s): start at most {device_count} ranks per node")
    return local_rank


def _check_comm(comm):
    """``comm`` if it is an mpi4py intra-communicator (what a collective needs), else a TypeError."""
    needed = ("Get_rank", "Get_size", "Iallreduce", "Iallgather")
    missing = [name for name in needed if not hasattr(comm, name)]
    if missing:
        raise TypeError(f"comm: expected an mpi4py communicator such as MPI.COMM_WORLD, got {comm!r} "
                        f"(no {', '.join(missing)})")
    return comm


class MpiSum:
    """In-place sum over the ranks of a host array (``__call__(buffer)``), waited on for ``timeout`` s."""

    def __init__(self, comm, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.comm, self.timeout, self.rank = _check_comm(comm), _check_timeout(timeout), comm.Get_rank()

    def __call__(self, buffer, what="gradient allreduce"):
        from mpi4py import MPI

        request = self.comm.Iallreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)
        _wait(request.Test, self.timeout, what, self.rank)


# the NCCL element type of each array dtype NCCL can sum
NCCL_DTYPES = {"float16": "NCCL_FLOAT16", "float32": "NCCL_FLOAT32", "float64": "NCCL_FLOAT64",
               "bfloat16": "NCCL_BFLOAT16"}


def nccl_dtype(dtype) -> str:
    """The name of the cupy.cuda.nccl constant for ``dtype``; a TypeError for one NCCL cannot sum."""
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in NCCL_DTYPES:
        raise TypeError(f"NCCL allreduce: expected a buffer of {sorted(NCCL_DTYPES)}, got {name}")
    return NCCL_DTYPES[name]


class NcclSum:
    """In-place sum over the ranks of a CuPy array on this rank's GPU, through a NCCL communicator made
    from ``comm``'s ranks (rank 0 draws the unique id; MPI broadcasts it). The rank's GPU must be current
    before the network is made: ``use_rank_gpu(comm)``."""

    def __init__(self, comm, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.comm, self.timeout, self.rank = _check_comm(comm), _check_timeout(timeout), comm.Get_rank()
        nccl = _nccl()
        # the id is a tuple of C chars as ints (signed or not by platform): int64 holds either
        unique_id = np.array(nccl.get_unique_id(), np.int64) if self.rank == 0 else None
        unique_id = _bcast_ints(comm, unique_id, self.timeout, "NCCL unique id")
        self.nccl = nccl
        self.communicator = nccl.NcclCommunicator(comm.Get_size(), tuple(unique_id.tolist()), self.rank)

    def __call__(self, buffer, what="gradient allreduce"):
        import cupy

        stream = cupy.cuda.get_current_stream()
        kind = getattr(self.nccl, nccl_dtype(buffer.dtype), None)
        if kind is None:
            raise TypeError(f"NCCL allreduce: this CuPy's NCCL has no {nccl_dtype(buffer.dtype)}")
        self.communicator.allReduce(buffer.data.ptr, buffer.data.ptr, buffer.size, kind, self.nccl.NCCL_SUM, stream.ptr)
        done = stream.record()
        try:
            _wait(lambda: done.done, self.timeout, what, self.rank)
        except DistributedError:
            self.communicator.abort()  # frees the kernel that waits for the dead rank
            raise


def _nccl():
    """cupy.cuda.nccl with its library loaded; a DistributedError saying what to install otherwise."""
    try:
        with warnings.catch_warnings():  # CuPy warns when libnccl is missing: said below in the error instead
            warnings.simplefilter("ignore", UserWarning)
            from cupy.cuda import nccl
    except ImportError as e:
        raise DistributedError(f"NCCL: expected CuPy (pip install 'deltaprop[cuda,nccl]'), got: {e}") from None
    if not nccl.available:
        raise DistributedError("NCCL: expected CuPy's NCCL library, got none loadable (libnccl.so.2): "
                               "pip install 'deltaprop[cuda,nccl]'")
    return nccl


def use_rank_gpu(comm) -> int:
    """Makes this rank's GPU (one per rank, by node-local rank) the current CuPy device; returns its number."""
    from mpi4py import MPI
    import cupy

    local = _check_comm(comm).Split_type(MPI.COMM_TYPE_SHARED)
    device = gpu_for_rank(local.Get_rank(), cupy.cuda.runtime.getDeviceCount())
    cupy.cuda.Device(device).use()
    return device


def _bcast_ints(comm, array, timeout, what):
    """Rank 0's int64 array on every rank (its length first), each collective waited on for ``timeout``."""
    from mpi4py import MPI

    rank = comm.Get_rank()
    length = np.array([0 if array is None else array.size], np.int64)
    _wait(comm.Iallreduce(MPI.IN_PLACE, length, op=MPI.MAX).Test, timeout, what, rank)
    out = array if rank == 0 else np.empty(int(length[0]), np.int64)
    _wait(comm.Ibcast(out, root=0).Test, timeout, what, rank)
    return out


# the collective that sums the gradients, by the kind of device the network's backend runs on
REDUCERS: dict[str, type[MpiSum] | type[NcclSum]] = {"cpu": MpiSum, "cuda": NcclSum}


def _check_timeout(timeout):
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (timeout > 0 and math.isfinite(timeout)):
        raise ValueError(f"timeout: expected a positive finite number of seconds, got {timeout!r}")
    return float(timeout)


def _sha256(array) -> str:
    """The first 16 hex digits of the SHA-256 of ``array``'s bytes (what an error shows of a differing array)."""
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


@dataclass
class _Agreement:
    """What every rank's fit must agree on, as text by field, and one digest of it all."""

    fields: dict

    @property
    def digest(self) -> np.ndarray:
        text = json.dumps(self.fields, sort_keys=True).encode()
        return np.frombuffer(hashlib.sha256(text).digest(), np.uint8).copy()


class DataParallel:
    """The hook ``fit(..., comm=...)`` runs data parallel with (``comm`` may also be the communicator itself).

    comm: an mpi4py communicator (MPI.COMM_WORLD); timeout: seconds to wait for the other ranks in any
    collective; checkpoint: a .npz path that rank 0 writes atomically after every epoch (None: none);
    resume: the network comes from that checkpoint (``resume()``), so that fit starts after the epochs
    its optimizer step count says are done, with the shuffles of the uninterrupted run.
    """

    def __init__(self, comm, timeout: float = DEFAULT_TIMEOUT, checkpoint: str | os.PathLike[str] | None = None,
                 resume: bool = False) -> None:
        self.comm = _check_comm(comm)
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.timeout = _check_timeout(timeout)
        self.checkpoint = None if checkpoint is None else os.fspath(checkpoint)
        self.resume = bool(resume)
        self.first_epoch = 1
        self.batch_rows = self.batch_end = 0  # rows of the current global batch, and the row it ends at
        self._sum: MpiSum | NcclSum | None = None  # bound by start(), for the network's device
        self._sum_totals = MpiSum(comm, self.timeout)  # the epoch's loss and hits, on the host

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    # ---- what fit calls ----

    def start(self, net, X, y, seed, batch_size, rng) -> int:
        """Binds the collective for the network's device, checks that every rank agrees and, when resuming,
        draws the shuffles of the epochs done; returns the first epoch to run (1-based)."""
        n_batches = -(-X.shape[0] // batch_size)
        steps = net.optimizer.step_count if net.optimizer is not None else 0
        if self.resume:
            if steps % n_batches:
                raise DistributedError(f"resume: expected a checkpoint written at the end of an epoch of "
                                       f"{n_batches} batches, got one after {steps} steps")
            self.first_epoch = steps // n_batches + 1
        self._agree("start of fit", self._agreement(net, X, y, seed, batch_size))  # the device too: first
        self._sum = REDUCERS[net.backend.device](self.comm, self.timeout)
        for _ in range(self.first_epoch - 1):
            rng.permutation(X.shape[0])
        return self.first_epoch

    def progress(self, progress):
        """fit's ``progress`` on rank 0; off elsewhere."""
        return progress if self.is_root else False

    def local_batch(self, batch_size: int) -> int:
        """The most rows this rank takes of a global batch (the fused step's size)."""
        return -(-batch_size // self.size)

    def chunks(self, n, batch_size):
        """This rank's (start, stop) of each global batch of ``batch_size`` rows of ``n`` (possibly empty)."""
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            self.batch_rows, self.batch_end = stop - start, stop
            yield split_rows(start, stop, self.rank, self.size)

    def reduce_gradients(self, grads, rows: int) -> None:
        """grads (P,), the mean over this rank's ``rows`` of the current batch, becomes the batch's mean."""
        if self._sum is None:
            raise RuntimeError("DataParallel.reduce_gradients: call start() first (fit does)")
        if rows == 0:
            grads.fill(0)
        else:
            grads *= grads.dtype.type(rows / self.batch_rows)
        self._sum(grads)

    def reduce_totals(self, loss_sum, hits):
        """(loss summed over rows, correct rows) of this rank's rows of an epoch -> (the sums over every
        rank's rows, the rows run by all ranks: the end of the last global batch)."""
        totals = np.array([float(loss_sum), float(hits)])
        self._sum_totals(totals, "epoch loss allreduce")
        return float(totals[0]), int(totals[1]), self.batch_end

    def end_epoch(self, net, epoch) -> None:
        """Rank 0 writes the checkpoint (atomically), when there is one."""
        if self.checkpoint is not None and self.is_root:
            net.save(self.checkpoint)

    def finish(self, net) -> None:
        """Checks that the ranks ended with the same parameters."""
        self._agree("end of fit", _Agreement({"params": _sha256(net.backend.to_numpy(net.params))}))

    # ---- agreement ----

    def _agreement(self, net, X, y, seed, batch_size):
        to_numpy, optimizer = net.backend.to_numpy, net.optimizer
        state = [to_numpy(buffer).ravel().view(np.uint8) for buffer in (optimizer.state.values() if optimizer else ())]
        return _Agreement({
            "sizes": str(net.sizes), "dtype": net.dtype.name, "activation": net.activation, "loss": net.loss,
            "network seed": str(net.seed), "shuffle seed": str(seed), "batch_size": str(batch_size),
            "backend device": net.backend.device, "samples": str(X.shape[0]),
            "X": _sha256(to_numpy(X)), "y": _sha256(to_numpy(y)), "params": _sha256(to_numpy(net.params)),
            "optimizer": "" if optimizer is None else f"{optimizer.name} step {optimizer.step_count}",
            "optimizer state": _sha256(np.concatenate(state) if state else np.zeros(0, np.uint8)),
        })

    def _agree(self, when, mine: _Agreement):
        """DistributedError on every rank when the ranks' agreements differ: digests are gathered first, and
        only on a mismatch (which every rank then sees) the fields, to name what differs."""
        digests = np.empty((self.size, mine.digest.size), np.uint8)
        _wait(self.comm.Iallgather(mine.digest, digests).Test, self.timeout, f"{when}: digest", self.rank)
        if (digests == digests[0]).all():
            return
        encoded = np.frombuffer(json.dumps(mine.fields, sort_keys=True).encode(), np.uint8)
        lengths = np.empty(self.size, np.int64)
        _wait(self.comm.Iallgather(np.array([encoded.size], np.int64), lengths).Test, self.timeout, when, self.rank)
        everyone = np.zeros((self.size, int(lengths.max())), np.uint8)
        mine_padded = np.zeros(everyone.shape[1], np.uint8)
        mine_padded[:encoded.size] = encoded
        _wait(self.comm.Iallgather(mine_padded, everyone).Test, self.timeout, when, self.rank)
        fields = [json.loads(everyone[r, :lengths[r]].tobytes()) for r in range(self.size)]
        differing = [key for key in fields[0] if any(f.get(key) != fields[0][key] for f in fields)]
        shown = "; ".join(f"{key}: " + ", ".join(f"rank {r} {f.get(key)}" for r, f in enumerate(fields))
                          for key in differing)
        raise DistributedError(f"rank {self.rank}: {when}: expected every rank to agree, got different {shown}")


def data_parallel(comm) -> DataParallel:
    """fit's ``comm`` argument as a hook: a DataParallel stays itself, a communicator is wrapped."""
    return comm if isinstance(comm, DataParallel) else DataParallel(comm)


def resume(path, comm, backend="auto", **options):
    """(the network of the checkpoint at ``path``, loaded on every rank; the DataParallel hook that resumes
    fit after its epochs, with ``options`` as DataParallel's and the same checkpoint path)."""
    from deltaprop.model.mlp import MLP

    return MLP.load(path, backend=backend), DataParallel(comm, checkpoint=path, resume=True, **options)


def session(backend_name="auto", **options) -> DataParallel:
    """The hook of a program started by mpiexec: MPI.COMM_WORLD; stdout sent to the null device on every rank
    but 0 (only rank 0 prints); this rank's GPU made current when ``backend_name`` may run on CUDA ("auto",
    "cupy") and CuPy sees devices. A DistributedError when mpi4py is not installed."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise DistributedError(f"data parallel: expected mpi4py and an MPI (pip install 'deltaprop[mpi]'), got: {e}") from None
    hook = DataParallel(MPI.COMM_WORLD, **options)
    if not hook.is_root:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    if backend_name in ("auto", "cupy") and _cuda_devices() > 0:
        use_rank_gpu(hook.comm)
    return hook


def _cuda_devices() -> int:
    """CUDA devices CuPy sees; 0 without CuPy or a driver."""
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # noqa: BLE001 - no CuPy, no driver, no device: all mean none
        return 0
