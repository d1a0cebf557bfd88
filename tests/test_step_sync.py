"""fit's inner loop reads nothing back from the backend: the losses and hits of its batches stay where the
backend computed them and the epoch's totals are read once per epoch, a non-finite loss still caught.

A GPU's results are stood in for on the NumPy backend: ``HostReadCounting`` is the reference backend with
``results_on_host`` False, whose loss (``device_loss``), hit counts and arrays made by its ``xp`` are
``DeviceValue`` arrays that count every conversion to a Python number (what would copy a device's
value to the host and wait for it). The CuPy stand-in's own log is tests/test_step_transfers_sim.py.
"""

import numpy as np
import pytest
from helpers import CPU_BACKENDS, LOSS_REFERENCES, labels_for, rel_err, tol

from deltaprop.backend import get_backend
from deltaprop.backend.base import Backend
from deltaprop.errors import NonFiniteLossError
from deltaprop.model.callbacks import NaNGuard
from deltaprop.model.mlp import MLP
from deltaprop.model.optim import get_optimizer

SIZES = [6, 8, 3]
ROWS = 48


class DeviceValue(np.ndarray):
    """An array whose conversions to Python numbers are counted in ``DeviceValue.reads`` (reductions of it
    stay arrays, as a device's do)."""

    reads = 0

    def __array_wrap__(self, array, context=None, return_scalar=False):
        return super().__array_wrap__(array, context, False)

    def _read(self, convert):
        DeviceValue.reads += 1
        return convert(np.asarray(self))

    def __float__(self):
        return self._read(float)

    def __int__(self):
        return self._read(int)

    def __bool__(self):
        return self._read(bool)

    def __index__(self):
        return self._read(lambda a: a.__index__())

    def item(self, *args):
        return self._read(lambda a: a.item(*args))

    def tolist(self):
        return self._read(lambda a: a.tolist())


class _DeviceNumpy:
    """NumPy, with what it makes (zeros, empty, counts) as DeviceValue arrays."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def zeros(shape, dtype=float):
        return np.zeros(shape, dtype).view(DeviceValue)

    @staticmethod
    def empty(shape, dtype=float):
        return np.empty(shape, dtype).view(DeviceValue)

    @staticmethod
    def count_nonzero(a):
        return np.asarray(np.count_nonzero(a), np.int64).view(DeviceValue)


class HostReadCounting(Backend):
    results_on_host = False

    @property
    def xp(self):
        return _DeviceNumpy()

    def device_loss(self, kernel, z, targets, delta_out=None):
        return np.asarray(super().device_loss(kernel, z, targets, delta_out)).view(DeviceValue)


def data(seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((ROWS, SIZES[0])).astype(np.float32), rng.integers(0, SIZES[-1], ROWS)


@pytest.mark.parametrize("batch_size", [4, 16])
def test_fit_reads_the_backend_twice_an_epoch_whatever_the_number_of_batches(batch_size):
    X, y = data()
    net = MLP(SIZES, backend=HostReadCounting(), seed=3)
    DeviceValue.reads = 0
    history = net.fit(X, y, epochs=3, batch_size=batch_size, optimizer="sgd", lr=0.1, progress=False)
    assert DeviceValue.reads == 2 * 3  # each epoch: its summed loss and its hits, whether 3 or 12 batches

    # the same numbers as the NumPy backend, which reads each batch's loss at once
    host = MLP(SIZES, backend="numpy", seed=3)
    expected = host.fit(X, y, epochs=3, batch_size=batch_size, optimizer="sgd", lr=0.1, progress=False)
    np.testing.assert_allclose(history.loss, expected.loss, rtol=1e-6)
    assert history.accuracy == expected.accuracy


def test_a_device_loss_that_diverges_is_caught_at_the_epoch_read_naming_its_batch():
    X, y = data()
    X[20:24] = 3e38  # finite, but the first layer overflows float32: the loss of batch 6 (rows 20-23) is not
    net = MLP(SIZES, backend=HostReadCounting(), seed=3)
    with pytest.raises(NonFiniteLossError, match=r"at epoch 1, batch 6 of 12$") as caught, \
            np.errstate(over="ignore", invalid="ignore"):
        net.fit(X, y, epochs=2, batch_size=4, shuffle=False, optimizer="sgd", lr=0.1, progress=False)
    assert caught.value.epoch == 1 and caught.value.batch == 6 and caught.value.history.epochs == 0
    assert caught.value.restored_epoch is None


def test_a_device_loss_that_diverges_restores_the_best_weights():
    X, y = data()
    X_val, y_val = data(seed=1)
    net = MLP(SIZES, backend=HostReadCounting(), seed=3)
    optimizer = get_optimizer("sgd", lr=0.05)
    kept = {}

    def callback(epoch, logs):
        kept[epoch] = (logs["val_loss"], net.params.copy())
        if epoch == 3:
            optimizer.hyper["lr"] = 1e30  # epoch 4 diverges

    with pytest.raises(NonFiniteLossError, match=r"at epoch 4, batch \d+ of 3; the weights of epoch \d") as caught, \
            np.errstate(over="ignore", invalid="ignore"):
        net.fit(X, y, epochs=10, batch_size=16, optimizer=optimizer, validation_data=(X_val, y_val), patience=5,
                callback=callback, progress=False)
    error = caught.value
    assert error.epoch == 4 and error.batch == 2  # the first update with lr 1e30 is batch 1's: batch 2 diverges
    assert error.history.epochs == 3 and error.history.val_loss == [kept[e][0] for e in (1, 2, 3)]
    best = min(kept, key=lambda e: kept[e][0])
    assert error.restored_epoch == best == error.history.best_epoch
    np.testing.assert_array_equal(net.params, kept[best][1])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kernel", sorted(LOSS_REFERENCES))
def test_device_loss_is_the_loss_kernel_unread(backend, kernel):
    """On the CPU backends (results on the host) ``device_loss`` is the loss kernel: the reference's loss
    and delta."""
    backend = get_backend(backend)
    rng = np.random.default_rng(5)
    z = rng.standard_normal((7, 4)).astype(np.float32)
    targets = labels_for(7, 4) if kernel == "softmax_xent" else rng.random((7, 4)).astype(np.float32)
    delta = np.full_like(z, np.nan)
    loss = backend.device_loss(kernel, z, targets, delta_out=delta)
    expected_loss, expected_delta = LOSS_REFERENCES[kernel](z, targets)
    assert backend.results_on_host and isinstance(loss, float)
    assert abs(loss - expected_loss) <= tol("float32") * abs(expected_loss)
    assert rel_err(delta, expected_delta) <= tol("float32")
    with pytest.raises(ValueError, match=r"device_loss: kernel: expected one of .*, got 'hinge'"):
        backend.device_loss("hinge", z, targets)


def test_nan_guard_puts_back_the_last_finished_epoch_after_a_device_divergence():
    """The rest of the diverging epoch ran its updates (the device's loss is read at the epoch's end):
    NaNGuard still puts back the parameters and optimizer state of the last finished epoch."""
    X, y = data()
    net = MLP(SIZES, backend=HostReadCounting(), seed=3)
    optimizer = get_optimizer("momentum", lr=0.05)
    kept = {}

    def callback(epoch, logs):
        kept[epoch] = (net.params.copy(), optimizer.state["velocity"].copy(), optimizer.step_count)
        if epoch == 2:
            optimizer.hyper["lr"] = 1e30  # epoch 3 diverges

    guard = NaNGuard()
    with np.errstate(over="ignore", invalid="ignore"):
        history = net.fit(X, y, epochs=5, batch_size=16, optimizer=optimizer, callback=callback, callbacks=[guard],
                          progress=False)
    assert history.stopped_epoch == 3 and history.epochs == 2 and guard.diverged is not None
    params, velocity, steps = kept[2]
    np.testing.assert_array_equal(net.params, params)
    np.testing.assert_array_equal(optimizer.state["velocity"], velocity)
    assert optimizer.step_count == steps == 2 * 3
