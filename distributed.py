"""``deltaprop.distributed``: data-parallel training over MPI and NCCL (the code is model/distributed.py)."""

from deltaprop.model.distributed import (DEFAULT_TIMEOUT, LOOPBACK_ENV, MPIEXEC_LOOPBACK, DataParallel, MpiSum,
                                         NcclSum, resume, session, split_rows, use_rank_gpu)

__all__ = ["DEFAULT_TIMEOUT", "LOOPBACK_ENV", "MPIEXEC_LOOPBACK", "DataParallel", "MpiSum", "NcclSum", "resume",
           "session", "split_rows", "use_rank_gpu"]
