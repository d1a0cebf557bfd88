"""On the CuPy stand-in (DELTAPROP_CUDA_SIM=1), fit's inner loop is launches and GEMMs only: its copies
between host and device do not grow with the number of batches (the epoch's totals are read once per
epoch, the shuffled order uploaded once per epoch). The stand-in's log records every launch, GEMM and
copy: ``standin.recording()`` -> [standin.Event(kind, name, nbytes)], kind in {"launch", "gemm",
"to_device", "to_host"}. The CPU counterpart of this test is tests/test_step_sync.py.
"""

from collections import Counter

import numpy as np
import pytest

standin = pytest.importorskip("deltaprop.kernels.cuda.host.standin")

from deltaprop.backend import get_backend  # noqa: E402
from deltaprop.model.mlp import MLP  # noqa: E402

pytestmark = pytest.mark.cuda_sim

SIZES = [6, 8, 3]
ROWS = 48
EPOCHS = 2


@pytest.fixture
def backend(monkeypatch):
    monkeypatch.setenv("DELTAPROP_CUDA_SIM", "1")
    return get_backend("cupy")


def logged_fit(backend, loss, batch_size):
    """The kinds of the events of a fit of EPOCHS epochs, counted."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((ROWS, SIZES[0])).astype(np.float32)
    y = rng.integers(0, SIZES[-1], ROWS) if loss == "softmax_cross_entropy" else rng.standard_normal((ROWS, SIZES[-1]))
    net = MLP(SIZES, loss=loss, backend=backend, seed=0)
    X, y = backend.asarray(X, net.dtype), backend.asarray(y)  # uploaded before the recording
    with standin.recording() as log:
        net.fit(X, y, epochs=EPOCHS, batch_size=batch_size, optimizer="adam", progress=False)
    return Counter(event.kind for event in log)


@pytest.mark.parametrize("loss", ["softmax_cross_entropy", "mse"])
def test_the_inner_loop_copies_nothing_between_host_and_device(backend, loss):
    few, many = logged_fit(backend, loss, batch_size=16), logged_fit(backend, loss, batch_size=4)  # 3, 12 batches
    assert many["launch"] > few["launch"]  # the recording saw the steps
    assert many["to_host"] == few["to_host"] <= 2 * EPOCHS + 2  # the epoch reads (and the fit's set-up)
    assert many["to_device"] == few["to_device"]


def test_the_loss_scratch_is_reused_per_thread_and_shape(backend):
    """device_loss's result is the calling thread's buffer for that batch size, reused call after call."""
    rng = np.random.default_rng(1)
    z = backend.asarray(rng.standard_normal((5, 3)).astype(np.float32))
    labels = backend.asarray(rng.integers(0, 3, 5))
    first = backend.device_loss("softmax_xent", z, labels)
    assert backend.device_loss("softmax_xent", z, labels) is first
    assert backend.device_loss("softmax_xent", z[:4], labels[:4]) is not first
