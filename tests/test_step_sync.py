"""fit's inner loop reads nothing back from the backend: the losses and hits of its batches stay where the
backend computed them and the epoch's totals are read once per epoch, a non-finite loss still caught.

A GPU's results are stood in for on the NumPy backend: ``HostReadCounting`` is the reference backend with
``results_on_host`` False, whose loss (``device_loss``), hit counts and arrays made by its ``xp`` are
``DeviceValue`` arrays that count every conversion to a Python number (what would copy a device's
value to the host and wait for it). The CuPy stand-in's own log is tests/test_step_transfers_sim.py.
"""

import numpy as np
import pytest

from deltaprop.backend.base import Backend
from deltaprop.errors import NonFiniteLossError
from deltaprop.model.mlp import MLP

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
    with pytest.raises(NonFiniteLossError, match=r"at epoch 1, batch 6 of 12$") as caught:
        net.fit(X, y, epochs=2, batch_size=4, shuffle=False, optimizer="sgd", lr=0.1, progress=False)
    assert caught.value.epoch == 1 and caught.value.batch == 6 and caught.value.history.epochs == 0
