"""Callbacks that watch and steer ``fit``: the state they see, the hooks they get, and the ready ones.

A callback subclasses ``Callback`` and overrides the hooks it needs; ``fit`` calls them in the order the
callbacks were given, with one ``TrainingState``:

    on_train_begin(state)     before the first epoch
    on_epoch_begin(state)     before each epoch's first batch (state.epoch is 1-based)
    on_batch_end(state)       after each update (state.batch is 1-based within the epoch)
    on_epoch_end(state)       after each epoch, its metrics in state.logs and already in state.history
    on_train_end(state)       after the last epoch, also when the loss diverged
    on_divergence(state, error) -> bool   the loss became NaN or inf; True: stop training cleanly
                              instead of raising ``error`` (a NonFiniteLossError)

Setting ``state.stop_training = True`` in any hook ends the fit: in on_batch_end after that batch (the
epoch's metrics then cover the batches run), in on_epoch_end after that epoch, in on_train_begin or
on_epoch_begin before the epoch's first batch; ``history.stopped_epoch`` is the last epoch run (0: none).

The per-batch hook costs nothing unless a callback overrides it, and even then it does not wait for the
device: ``state.loss`` converts the step's loss to a float only when a callback reads it.

Ready callbacks: ``EarlyStopping`` (what ``fit(patience=...)`` uses), ``TimeBudget``, ``NaNGuard``;
``EpochEnd`` adapts a function (epoch, logs) (``fit(callback=...)``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from deltaprop.model.optim import check_count

HOOKS = ("on_train_begin", "on_epoch_begin", "on_batch_end", "on_epoch_end", "on_train_end")


class TrainingState:
    """What a callback sees of a running fit, and may change (``stop_training``).

    net: the MLP being trained; optimizer: its bound Optimizer; history: the History filled so far;
    epochs: the epochs planned; n_batches: batches per epoch; epoch: the current epoch (1-based, 0 before
    the first); batch: the current batch (1-based; None outside an epoch's batches); batch_rows: the rows
    of the current batch; logs: the last finished epoch's metrics ({"loss", "accuracy", "val_loss",
    "val_accuracy"}, as present); stop_training: set it to end the fit.
    """

    def __init__(self, net, optimizer, history, epochs: int, n_batches: int) -> None:
        self.net, self.optimizer, self.history = net, optimizer, history
        self.epochs, self.n_batches = epochs, n_batches
        self.epoch, self.batch_rows = 0, 0
        self.batch: int | None = None
        self.logs: dict[str, float] = {}
        self.stop_training = False
        self.step_loss: Any = None  # the last step's mean loss as the loop holds it (a float, or a device scalar)

    @property
    def loss(self) -> float:
        """The mean loss of the current batch, before its update. Reading it waits for the device."""
        return float(self.step_loss)

    @property
    def lr(self) -> float | None:
        """The learning rate of the last update (None before the first)."""
        return self.optimizer.last_lr


class Callback:
    """Hooks ``fit`` calls (see the module docstring); each does nothing unless overridden."""

    def on_train_begin(self, state: TrainingState) -> None: ...

    def on_epoch_begin(self, state: TrainingState) -> None: ...

    def on_batch_end(self, state: TrainingState) -> None: ...

    def on_epoch_end(self, state: TrainingState) -> None: ...

    def on_train_end(self, state: TrainingState) -> None: ...

    def on_divergence(self, state: TrainingState, error: Exception) -> bool:
        return False


class CallbackList:
    """The callbacks of one fit, called in order; a hook is called only on those that override it."""

    def __init__(self, callbacks) -> None:
        callbacks = list(callbacks)
        for callback in callbacks:
            if not isinstance(callback, Callback):
                raise TypeError(f"callbacks: expected Callback instances (deltaprop.model.callbacks), "
                                f"got {callback!r}")
        overrides = {hook: [getattr(c, hook) for c in callbacks if getattr(type(c), hook) is not getattr(Callback, hook)]
                     for hook in (*HOOKS, "on_divergence")}
        self._hooks = overrides
        self.has_batch_hooks = bool(overrides["on_batch_end"])

    def call(self, hook: str, state: TrainingState) -> None:
        for method in self._hooks[hook]:
            method(state)

    def on_divergence(self, state: TrainingState, error: Exception) -> bool:
        """Asks every callback; True if one of them handles the divergence (training then stops cleanly)."""
        return any([method(state, error) for method in self._hooks["on_divergence"]])


def check_epoch_function(function):
    """``function``, the ``callback=`` of a fit, if it is callable (epoch, logs); else a TypeError."""
    if not callable(function):
        raise TypeError(f"callback: expected None or a callable (epoch, logs), got {function!r}")
    return function


class EpochEnd(Callback):
    """Calls ``function(epoch, logs)`` after each epoch (what ``fit(callback=...)`` passes)."""

    def __init__(self, function: Callable[[int, dict[str, float]], object]) -> None:
        self.function = check_epoch_function(function)

    def on_epoch_end(self, state):
        self.function(state.epoch, state.logs)


class EarlyStopping(Callback):
    """Stops when ``monitor`` has not improved for ``patience`` epochs; keeps a copy of the best parameters
    and, with ``restore_best_weights``, puts them back when training ends (also after a divergence), setting
    ``history.best_epoch``.

    monitor: a key of the epoch logs; None watches "val_loss" when the fit has validation data, else
    "loss". Keys ending in "accuracy" are maximised, the others minimised. An improvement is a change
    by more than ``min_delta`` in the right direction.
    """

    def __init__(self, patience: int, monitor: str | None = None, min_delta: float = 0.0,
                 restore_best_weights: bool = True) -> None:
        check_count("patience", patience, minimum=1)
        if not (isinstance(min_delta, (int, float)) and math.isfinite(min_delta) and min_delta >= 0):
            raise ValueError(f"min_delta: expected a finite number >= 0, got {min_delta!r}")
        self.patience, self.monitor, self.min_delta = patience, monitor, float(min_delta)
        self.restore_best_weights = restore_best_weights
        self.best = self.best_epoch = self.best_params = None
        self.waited = 0

    def on_train_begin(self, state):
        self.best, self.best_epoch, self.waited = None, None, 0
        if self.restore_best_weights:
            self.best_params = state.net.backend.empty(state.net.params.shape, state.net.dtype)

    def on_epoch_end(self, state):
        key = self.monitor or ("val_loss" if "val_loss" in state.logs else "loss")
        if key not in state.logs:
            raise ValueError(f"EarlyStopping: monitor: expected one of the epoch logs {sorted(state.logs)}, got {key!r}")
        sign = -1.0 if key.endswith("accuracy") else 1.0  # minimise sign * value
        value = sign * state.logs[key]
        if self.best is None or value < self.best - self.min_delta:
            self.best, self.best_epoch, self.waited = value, state.epoch, 0
            if self.restore_best_weights:
                self.best_params[...] = state.net.params
            return
        self.waited += 1
        if self.waited >= self.patience:
            state.stop_training = True

    def on_train_end(self, state):
        if self.restore_best_weights and self.best_epoch is not None:
            state.net.params[...] = self.best_params
            state.history.best_epoch = self.best_epoch


class TimeBudget(Callback):
    """Stops training once ``seconds`` of wall time have passed since it began, checked after every batch
    (without waiting for the device: on a GPU the queued work may still run past the budget)."""

    def __init__(self, seconds: float) -> None:
        if isinstance(seconds, bool) or not (isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds > 0):
            raise ValueError(f"seconds: expected a finite number > 0, got {seconds!r}")
        self.seconds = float(seconds)
        self.deadline = math.inf

    def on_train_begin(self, state):
        self.deadline = time.perf_counter() + self.seconds

    def on_batch_end(self, state):
        if time.perf_counter() >= self.deadline:
            state.stop_training = True


class NaNGuard(Callback):
    """Turns a diverging loss (NaN or inf) into a clean stop: the parameters and the optimizer state are put
    back to those of the end of the last finished epoch (or of the start of the fit), and ``fit`` returns
    its history, ``history.stopped_epoch`` being the epoch that diverged, instead of raising
    NonFiniteLossError. ``diverged`` is the error it caught (None if none). Keeps one copy of the
    parameters and of the optimizer state, refreshed after each epoch."""

    def __init__(self) -> None:
        self.kept_params: Any = None
        self.kept_state: dict[str, Any] = {}
        self.kept_step = 0
        self.diverged = None

    def _keep(self, state):
        self.kept_params[...] = state.net.params
        for key, buffer in state.optimizer.state.items():
            self.kept_state[key][...] = buffer
        self.kept_step = state.optimizer.step_count

    def on_train_begin(self, state):
        net, optimizer = state.net, state.optimizer
        self.kept_params = net.backend.empty(net.params.shape, net.dtype)
        self.kept_state = {key: net.backend.empty(buffer.shape, buffer.dtype) for key, buffer in optimizer.state.items()}
        self.diverged = None
        self._keep(state)

    def on_epoch_end(self, state):
        self._keep(state)

    def on_divergence(self, state, error):
        state.net.params[...] = self.kept_params
        for key, buffer in self.kept_state.items():
            state.optimizer.state[key][...] = buffer
        state.optimizer.step_count = self.kept_step
        self.diverged = error
        return True
