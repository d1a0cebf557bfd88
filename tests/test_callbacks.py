"""Callbacks steering fit: the state they see (against the float64 reference), stopping, the ready
callbacks (early stopping, time budget, NaN guard), the History's time and learning rate, clipping in fit."""

import math

import numpy as np
import pytest
from helpers import host_params, tol

from deltaprop.backend import to_numpy
from deltaprop.errors import NonFiniteLossError
from deltaprop.kernels import reference
from deltaprop.model import MLP
from deltaprop.model.callbacks import Callback, CallbackList, EarlyStopping, NaNGuard, TimeBudget, TrainingState
from deltaprop.model.optim import OPTIMIZERS, get_optimizer


def blobs(rng, n, features=5, classes=3):
    centres = rng.standard_normal((classes, features)) * 3
    y = rng.integers(0, classes, n)
    return centres[y] + rng.standard_normal((n, features)), y


class Recorder(Callback):
    """Keeps what each hook saw: (hook, epoch, batch), the batch losses and the parameters after each batch."""

    def __init__(self):
        self.calls, self.losses, self.params = [], [], []

    def on_train_begin(self, state):
        self.calls.append(("train_begin", state.epoch, state.batch))
        self.params.append(host_params(state.net))

    def on_epoch_begin(self, state):
        self.calls.append(("epoch_begin", state.epoch, state.batch))

    def on_batch_end(self, state):
        self.calls.append(("batch_end", state.epoch, state.batch))
        self.losses.append((state.loss, state.batch_rows))
        self.params.append(host_params(state.net))

    def on_epoch_end(self, state):
        self.calls.append(("epoch_end", state.epoch, state.batch))

    def on_train_end(self, state):
        self.calls.append(("train_end", state.epoch, state.batch))


def test_hooks_run_in_order_and_each_batch_loss_is_the_references(backend_name, rng):
    """Without shuffling, batch b of epoch e holds known rows: its loss is the reference loss of those rows
    under the parameters the previous hook saw (before the update)."""
    X, y = blobs(rng, 20)
    net = MLP([5, 6, 3], activation="tanh", backend=backend_name, dtype="float64", seed=0)
    recorder = Recorder()
    history = net.fit(X, y, epochs=2, batch_size=8, optimizer="sgd", lr=0.1, shuffle=False, progress=False,
                      callbacks=[recorder])
    assert recorder.calls == [("train_begin", 0, None),
                              *[call for e in (1, 2) for call in
                                [("epoch_begin", e, None), *[("batch_end", e, b) for b in (1, 2, 3)], ("epoch_end", e, None)]],
                              ("train_end", 2, None)]
    for (loss, rows), (weights, biases), start in zip(recorder.losses, recorder.params, [0, 8, 16] * 2):
        expected, _ = reference.loss_and_grads(weights, biases, X[start:start + 8], y[start:start + 8], "tanh",
                                               "softmax_cross_entropy")
        assert rows == len(X[start:start + 8])
        assert abs(loss - expected) <= tol("float64") * expected
    assert history.loss[0] == pytest.approx(sum(loss * rows for loss, rows in recorder.losses[:3]) / 20, rel=1e-12)


def test_the_batch_loss_is_converted_only_when_a_callback_reads_it():
    """The per-batch hook must not bring the step's loss to the host (a GPU sync) unless asked to."""
    conversions = []

    class DeviceScalar:  # stands in for a 0-d array on the device
        def __float__(self):
            conversions.append(1)
            return 0.5

    class Reads(Callback):
        def on_batch_end(self, state):
            self.seen = state.loss

    state = TrainingState(net=None, optimizer=None, history=None, epochs=1, n_batches=1)
    state.step_loss = DeviceScalar()
    CallbackList([TimeBudget(60)]).call("on_batch_end", state)
    assert conversions == []
    reads = Reads()
    CallbackList([reads]).call("on_batch_end", state)
    assert conversions == [1] and reads.seen == 0.5


def test_a_callback_stops_training_after_a_batch(rng):
    X, y = blobs(rng, 40)
    net = MLP([5, 6, 3], backend="numpy", dtype="float64", seed=0)

    class StopAt(Callback):
        def __init__(self):
            self.losses = []

        def on_batch_end(self, state):
            self.losses.append((state.loss, state.batch_rows))
            if (state.epoch, state.batch) == (2, 3):
                state.stop_training = True

    stop = StopAt()
    history = net.fit(X, y, epochs=5, batch_size=10, progress=False, callbacks=[stop])
    assert history.epochs == 2 and history.stopped_epoch == 2
    assert net.optimizer.step_count == 4 + 3
    # the stopped epoch's loss is over the 30 rows run, not the 40 of a whole epoch
    assert history.loss[1] == pytest.approx(sum(loss * rows for loss, rows in stop.losses[4:]) / 30, rel=1e-12)


def test_a_callback_stops_training_after_an_epoch(rng):
    X, y = blobs(rng, 30)
    net = MLP([5, 6, 3], backend="numpy", seed=0)

    class StopAfterTwo(Callback):
        def on_epoch_end(self, state):
            state.stop_training = state.epoch == 2

    history = net.fit(X, y, epochs=6, batch_size=10, progress=False, callbacks=[StopAfterTwo()])
    assert history.epochs == 2 and history.stopped_epoch == 2 and net.optimizer.step_count == 6


@pytest.mark.parametrize("monitor", ["val_loss", "val_accuracy"])
def test_early_stopping_callback_watches_its_key_and_restores_the_best_weights(monitor, rng):
    """Random labels: the watched value soon stops improving; fit stops ``patience`` epochs after the best
    (the first lowest loss, or the first highest accuracy) and holds that epoch's weights."""
    X, y = rng.standard_normal((40, 6)), rng.integers(0, 4, 40)
    X_val, y_val = rng.standard_normal((40, 6)), rng.integers(0, 4, 40)
    net = MLP([6, 32, 4], backend="numba", dtype="float64", seed=0)
    snapshots = {}

    class Snapshot(Callback):
        def on_epoch_end(self, state):
            snapshots[state.epoch] = to_numpy(state.net.params).copy()

    history = net.fit(X, y, epochs=100, batch_size=8, lr=0.01, validation_data=(X_val, y_val), progress=False,
                      callbacks=[Snapshot(), EarlyStopping(patience=3, monitor=monitor)])
    values = getattr(history, monitor)
    best = 1 + int(np.argmax(values) if monitor == "val_accuracy" else np.argmin(values))
    assert history.best_epoch == best and history.stopped_epoch == best + 3 == history.epochs < 100
    assert np.array_equal(to_numpy(net.params), snapshots[best])


def test_patience_is_the_early_stopping_callback(rng):
    X, y = rng.standard_normal((40, 6)), rng.integers(0, 4, 40)
    runs = []
    for kwargs in (dict(patience=2), dict(callbacks=[EarlyStopping(2)])):
        net = MLP([6, 16, 4], backend="numpy", dtype="float64", seed=0)
        history = net.fit(X, y, epochs=60, batch_size=8, lr=0.05, progress=False, **kwargs)
        runs.append((history.loss, history.best_epoch, history.stopped_epoch, to_numpy(net.params)))
    assert runs[0][:3] == runs[1][:3] and np.array_equal(runs[0][3], runs[1][3])


def test_time_budget_stops_once_the_clock_passes_it(rng, monkeypatch):
    """A clock that moves one second per batch: a 2.5 s budget stops after the third batch."""
    import deltaprop.model.callbacks as callbacks

    now = [0.0]

    class Tick(Callback):
        def on_batch_end(self, state):
            now[0] += 1.0

    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: now[0])
    X, y = blobs(rng, 40)
    net = MLP([5, 6, 3], backend="numpy", seed=0)
    history = net.fit(X, y, epochs=3, batch_size=20, progress=False, callbacks=[Tick(), TimeBudget(2.5)])
    assert net.optimizer.step_count == 3 and history.stopped_epoch == 2 == history.epochs


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # diverging on purpose
def test_nan_guard_stops_cleanly_with_the_last_good_epochs_weights_and_state(rng):
    X, y = blobs(rng, 60)
    net = MLP([5, 8, 3], backend="numba", seed=0)
    optimizer = get_optimizer("momentum", lr=0.01)
    kept = {}

    def blow_up(epoch, logs):
        kept[epoch] = (to_numpy(net.params).copy(), to_numpy(optimizer.state["velocity"]).copy(), optimizer.step_count)
        if epoch == 2:
            optimizer.hyper["lr"] = 1e30  # epoch 3 diverges

    guard = NaNGuard()
    history = net.fit(X, y, epochs=6, batch_size=16, optimizer=optimizer, callback=blow_up, callbacks=[guard],
                      progress=False)
    assert isinstance(guard.diverged, NonFiniteLossError)
    assert history.epochs == 2 and history.stopped_epoch == 3
    params, velocity, steps = kept[2]
    assert np.array_equal(to_numpy(net.params), params)
    assert np.array_equal(to_numpy(optimizer.state["velocity"]), velocity) and optimizer.step_count == steps == 8


def test_history_records_time_and_the_learning_rate_of_each_epochs_last_update(rng):
    X, y = blobs(rng, 30)
    net = MLP([5, 6, 3], backend="numpy", seed=0)
    history = net.fit(X, y, epochs=4, batch_size=10, optimizer=OPTIMIZERS["sgd"](lr=0.1, schedule=lambda t: 0.5 ** (t // 4)),
                      progress=False)
    assert history.lr == [0.1 * 0.5 ** ((3 * e - 1) // 4) for e in (1, 2, 3, 4)]  # 3 updates an epoch
    assert len(history.time) == 4 and all(seconds > 0 for seconds in history.time)


def test_one_cycle_by_name_ends_at_its_floor(rng):
    X, y = blobs(rng, 30)
    net = MLP([5, 6, 3], backend="numpy", seed=0)
    history = net.fit(X, y, epochs=5, batch_size=10, optimizer="sgd", lr=0.1, schedule="one_cycle", progress=False)
    assert history.lr[-1] == pytest.approx(0.1 / 25 / 1e4, rel=1e-12)  # OneCycleLR's min_lr
    assert max(history.lr) < 0.1 and history.lr[1] > history.lr[0] and history.lr[-2] > history.lr[-1]


def test_fit_clips_the_gradients_before_each_update(backend_name, rng):
    """Full-batch SGD with clipping against the reference gradients clipped by torch's formula."""
    X, y = blobs(rng, 24)
    net = MLP([5, 7, 3], activation="tanh", backend=backend_name, dtype="float64", seed=3)
    weights, biases = host_params(net)
    max_norm = 0.05
    for _ in range(3):
        _, grads = reference.loss_and_grads(weights, biases, X, y, "tanh", "softmax_cross_entropy")
        norm = math.sqrt(sum(float((dW ** 2).sum() + (db ** 2).sum()) for dW, db in grads))
        assert norm > max_norm  # clipping is active at every step
        scale = min(1.0, max_norm / (norm + 1e-6))
        weights = [W - 0.5 * scale * dW for W, (dW, _) in zip(weights, grads)]
        biases = [b - 0.5 * scale * db for b, (_, db) in zip(biases, grads)]
    net.fit(X, y, epochs=3, batch_size=24, optimizer=OPTIMIZERS["sgd"](lr=0.5, max_grad_norm=max_norm),
            shuffle=False, progress=False)
    for ours, expected in zip(host_params(net)[0] + host_params(net)[1], weights + biases):
        np.testing.assert_allclose(ours, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(callbacks=EarlyStopping(2)), TypeError, r"callbacks: expected None or a list of Callback instances"),
        (dict(callbacks=[lambda state: None]), TypeError, r"callbacks: expected Callback instances .*, got <function"),
        (dict(callbacks=[EarlyStopping(2, monitor="val_loss")]), ValueError,
         r"EarlyStopping: monitor: expected one of the epoch logs \['accuracy', 'loss'\], got 'val_loss'"),
    ],
)
def test_bad_callbacks_are_refused(kwargs, error, message):
    net = MLP([4, 5, 3], backend="numpy", dtype="float64", seed=0)
    with pytest.raises(error, match=message):
        net.fit(np.ones((6, 4)), np.array([0, 1, 2, 0, 1, 2]), epochs=2, progress=False, **kwargs)


@pytest.mark.parametrize("make, message", [(lambda: EarlyStopping(0), r"patience: expected an integer >= 1, got 0"),
                                           (lambda: EarlyStopping(2, min_delta=-1), r"min_delta: expected a finite number >= 0"),
                                           (lambda: TimeBudget(0), r"seconds: expected a finite number > 0, got 0")])
def test_ready_callbacks_refuse_bad_settings(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_clipping_betas_and_one_cycle_survive_a_checkpoint(tmp_path, rng):
    X, y = blobs(rng, 30)
    net = MLP([5, 6, 3], backend="numpy", seed=0)
    net.fit(X, y, epochs=2, batch_size=10, optimizer=OPTIMIZERS["adamw"](lr=0.01, betas=(0.8, 0.9), max_grad_norm=0.5,
                                                                         schedule="one_cycle"), progress=False)
    net.save(tmp_path / "net.npz")
    loaded = MLP.load(tmp_path / "net.npz", backend="numpy").optimizer
    assert loaded.betas == (0.8, 0.9) and loaded.hyper["max_grad_norm"] == 0.5
    assert loaded.schedule == net.optimizer.schedule and loaded.schedule.name == "one_cycle"
