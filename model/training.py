"""The fit loop, and chunked inference (predict, predict_proba, evaluate) for an MLP.

Shapes: X is (N, n0), one sample per row; y is int labels (N,) or a target matrix (N, n_L).
Inputs may be NumPy arrays, arrays of the network's backend (CuPy on the GPU backend) or any DLPack
producer on the same device (a torch CPU tensor); they are converted to the network's dtype once.
Nothing non-finite passes silently: NaN or inf in X or y (or in the logits, when the network overflows)
is a ValueError naming the first rows, and a diverging fit a NonFiniteLossError naming epoch and batch.

``fit`` converts the training set once, and per epoch gathers a shuffled copy into buffers allocated
once per fit, so that each step works on contiguous row slices: a step allocates nothing beyond what
the network's own forward/backward pass and the optimizer's update kernel need. The running training
accuracy is counted in buffers kept per batch size. Each batch's loss and hits stay where the backend
computed them (model/epoch_totals.py) and are read once per epoch: on a GPU the inner loop never waits
for the device. Inference runs in chunks of ``chunk_size`` rows so
that predicting on a large X needs workspaces of one chunk only.
"""

from __future__ import annotations

import itertools
import math
import sys
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from deltaprop.backend.checks import check_label_range
from deltaprop.errors import NonFiniteLossError
from deltaprop.kernels.dtypes import floating
from deltaprop.model.callbacks import Callback, CallbackList, EarlyStopping, EpochEnd, TrainingState
from deltaprop.model.epoch_totals import EpochTotals, non_finite_loss
from deltaprop.model.losses import get_loss
from deltaprop.model.optim import check_count, check_seed, get_optimizer

DEFAULT_CHUNK = 4096  # rows per forward pass in predict/predict_proba/evaluate
_ROWS_NAMED = 5  # the first rows an error about non-finite rows names


@dataclass
class History:
    """Per-epoch metrics of a fit, one entry per epoch run.

    loss: mean training loss over the epoch's batches (weighted by batch size), before each update;
    accuracy: running training accuracy over the epoch (classifier losses, and sigmoid cross-entropy
    as exact-match accuracy of the thresholded rows; empty for mse); val_loss, val_accuracy: on
    ``validation_data`` after each epoch (empty without it); time: the epoch's wall seconds (validation
    included); lr: the learning rate of the epoch's last update. best_epoch: the epoch (1-based) whose
    weights early stopping restored; stopped_epoch: the epoch after which a callback stopped the fit
    (None if it ran on).
    """

    loss: list = field(default_factory=list)
    accuracy: list = field(default_factory=list)
    val_loss: list = field(default_factory=list)
    val_accuracy: list = field(default_factory=list)
    time: list = field(default_factory=list)
    lr: list = field(default_factory=list)
    best_epoch: int | None = None
    stopped_epoch: int | None = None

    @property
    def epochs(self) -> int:
        return len(self.loss)


class Evaluation(NamedTuple):
    """The mean loss over the samples, and the accuracy (None for a loss without one, mse)."""

    loss: float
    accuracy: float | None


class _Scorer:
    """Counts the correct predictions of a batch of logits (B, C) against its targets, in buffers kept
    per batch shape, so that counting allocates nothing after the first call at a shape.

    Classifier losses: argmax of the logits against the labels (or the argmax of probability rows).
    Sigmoid cross-entropy: a row is correct when every thresholded logit (z > 0) matches its target (> 0.5).
    """

    def __init__(self, backend, loss_name):
        loss = get_loss(loss_name)
        self.kind = "argmax" if loss.classifier else ("threshold" if loss.output == "sigmoid" else None)
        self.xp = backend.xp
        self._buffers: dict = {}

    def _get(self, shape):
        buffers = self._buffers.get(shape)
        if buffers is None:
            xp, rows = self.xp, shape[0]
            buffers = {"hit": xp.empty(rows, bool)}
            if self.kind == "argmax":
                buffers.update(predicted=xp.empty(rows, np.int64), target=xp.empty(rows, np.int64))
            else:
                buffers.update(above=xp.empty(shape, bool), target_above=xp.empty(shape, bool))
            self._buffers[shape] = buffers
        return buffers

    def count(self, logits, targets) -> int:
        return int(self.hits(logits, targets))

    def hits(self, logits, targets):
        """The count, unread: an int on the CPU, a 0-d array on a GPU (which ``count`` waits for)."""
        xp, buf = self.xp, self._get(tuple(logits.shape))
        if self.kind == "argmax":
            xp.argmax(logits, axis=1, out=buf["predicted"])
            if targets.ndim == 2:
                targets = xp.argmax(targets, axis=1, out=buf["target"])
            xp.equal(buf["predicted"], targets, out=buf["hit"])
        else:
            xp.greater(logits, 0, out=buf["above"])
            xp.greater(targets, 0.5, out=buf["target_above"])
            xp.equal(buf["above"], buf["target_above"], out=buf["above"])
            xp.all(buf["above"], axis=1, out=buf["hit"])
        return xp.count_nonzero(buf["hit"])


# ---- inputs ---------------------------------------------------------------------------------------


def _rows(x, name, width):
    """``x`` as an array that slices by rows without a copy, checked to be (N, width) with N >= 1."""
    if not (hasattr(x, "shape") and hasattr(x, "__getitem__")):
        x = np.from_dlpack(x) if hasattr(x, "__dlpack__") else np.asarray(x)
    shape = tuple(int(s) for s in x.shape)
    if len(shape) != 2 or shape[1] != width or shape[0] == 0:
        raise ValueError(f"{name}: expected a non-empty 2-D array of shape (n_samples, {width}), got shape {shape}")
    return x


def _non_finite_rows(xp, parts):
    """(number of rows holding NaN or inf, the first _ROWS_NAMED of them) over ``parts``, pairs of (index of
    the first row, array (n, ...)) that together make up an array."""
    count, named = 0, []
    for offset, array in parts:
        bad = xp.flatnonzero(~xp.isfinite(array.reshape(array.shape[0], -1)).all(axis=1))
        count += int(bad.size)
        named += [offset + int(row) for row in bad[:_ROWS_NAMED - len(named)]]
    return count, named


def _check_finite(xp, parts, name):
    """A ValueError naming ``name`` and the first rows if the array made of ``parts`` (see _non_finite_rows)
    holds NaN or inf."""
    count, rows = _non_finite_rows(xp, parts)
    if count:
        raise ValueError(f"{name}: expected finite values, got NaN or inf in {count} row(s), the first {rows}")


def _dataset(net, X, y, name="X"):
    """X (N, n0) and y as arrays of the network's backend and dtype, converted once, checked finite; labels
    checked in range. For sigmoid cross-entropy, int labels become one-hot rows (so that accuracy
    compares whole rows).
    """
    X = net.as_inputs(_rows(X, name, net.sizes[0]))
    y = net.as_targets(y, X.shape[0])
    xp = net.backend.xp
    _check_finite(xp, [(0, X)], name)
    if floating(y.dtype):
        _check_finite(xp, [(0, y)], name.replace("X", "y"))
    loss = get_loss(net.loss)
    if y.ndim == 1:
        check_label_range(loss.kernel, y, net.sizes[-1], net.backend.xp)
        if loss.output == "sigmoid":
            onehot = net.backend.zeros((X.shape[0], net.sizes[-1]), net.dtype)
            onehot[net.backend.xp.arange(X.shape[0]), y] = 1
            y = onehot
    return X, y


def check_validation_data(validation_data):
    """``validation_data`` as the pair (X_val, y_val) it must be; a TypeError naming what came otherwise."""
    if not (isinstance(validation_data, (tuple, list)) and len(validation_data) == 2):
        raise TypeError(f"validation_data: expected a pair (X_val, y_val), got {type(validation_data).__name__}")
    return validation_data


def _chunks(total, size):
    for start in range(0, total, size):
        yield start, min(start + size, total)


def _forward_chunks(net, X, chunk_size):
    """(start, stop, logits) for consecutive row chunks of X; the logits live in the network's workspace.
    A ValueError naming the rows when X holds NaN or inf, or when the logits do (an overflow)."""
    check_count("chunk_size", chunk_size, minimum=1)
    xp = net.backend.xp
    for start, stop in _chunks(X.shape[0], chunk_size):
        x = net.as_inputs(X[start:stop])
        if not bool(xp.isfinite(x).all()):
            rest = ((at, net.as_inputs(X[at:end])) for at, end in _chunks(X.shape[0], chunk_size) if at > start)
            _check_finite(xp, itertools.chain([(start, x)], rest), "X")
        logits = net.forward(x).logits
        if not bool(xp.isfinite(logits).all()):
            count, rows = _non_finite_rows(xp, [(start, logits)])
            raise ValueError(f"X: expected inputs with finite outputs, got NaN or inf logits in {count} row(s), "
                             f"the first {rows}: the network overflows on them")
        yield start, stop, logits


# ---- inference ------------------------------------------------------------------------------------


def predict_proba(net, X, chunk_size=DEFAULT_CHUNK):
    """The loss's output map of the logits: softmax rows, sigmoids, or the outputs (identity). (N, n_L)."""
    X = _rows(X, "X", net.sizes[0])
    backend, output = net.backend, get_loss(net.loss).output
    out = backend.empty((X.shape[0], net.sizes[-1]), net.dtype)
    zero_bias = backend.zeros((net.sizes[-1],), net.dtype)
    for start, stop, logits in _forward_chunks(net, X, chunk_size):
        if output == "softmax":
            backend.softmax(logits, out=out[start:stop])
        elif output == "identity":
            out[start:stop] = logits
        else:
            backend.bias_act(logits, zero_bias, output, z_out=logits, a_out=out[start:stop])
    return out


def predict(net, X, chunk_size=DEFAULT_CHUNK):
    """Class labels int64 (N,) for a classifier loss; 0/1 int64 (N, n_L) for sigmoid cross-entropy
    (sigmoid(z) > 0.5); the outputs (N, n_L) otherwise. Arrays of the network's backend."""
    loss = get_loss(net.loss)
    if not loss.classifier and loss.output != "sigmoid":
        return predict_proba(net, X, chunk_size)
    X = _rows(X, "X", net.sizes[0])
    xp = net.backend.xp
    out = xp.empty((X.shape[0],) if loss.classifier else (X.shape[0], net.sizes[-1]), np.int64)
    for start, stop, logits in _forward_chunks(net, X, chunk_size):
        if loss.classifier:
            xp.argmax(logits, axis=1, out=out[start:stop])
        else:
            xp.greater(logits, 0, out=out[start:stop])
    return out


def _evaluate_converted(net, X, y, scorer, chunk_size):
    kernel = getattr(net.backend, get_loss(net.loss).kernel)
    loss_sum, hits = 0.0, 0
    for start, stop, logits in _forward_chunks(net, X, chunk_size):
        loss_sum += float(kernel(logits, y[start:stop])) * (stop - start)
        if scorer.kind:
            hits += scorer.count(logits, y[start:stop])
    n = X.shape[0]
    return Evaluation(loss_sum / n, hits / n if scorer.kind else None)


def _finite_loss(loss, name):
    if not math.isfinite(loss):
        raise NonFiniteLossError(f"{name}: expected a finite value, got {loss} (an overflow in the loss)")
    return loss


def evaluate(net, X, y, chunk_size=DEFAULT_CHUNK) -> Evaluation:
    """The mean loss over the N samples and the accuracy (None for mse), in chunks of ``chunk_size`` rows."""
    X, y = _dataset(net, X, y)
    evaluation = _evaluate_converted(net, X, y, _Scorer(net.backend, net.loss), chunk_size)
    _finite_loss(evaluation.loss, "evaluate: loss")
    return evaluation


# ---- fit ------------------------------------------------------------------------------------------


def _progress_bar(progress, epochs):
    if progress is None:  # on in a terminal and in a notebook (whose stderr is no terminal)
        progress = sys.stderr.isatty() or "ipykernel" in sys.modules
    if not progress:
        return None
    from tqdm.auto import tqdm  # imported only when a bar is shown; a widget in notebooks

    return tqdm(total=epochs, unit="epoch", file=sys.stderr, dynamic_ncols=True)


def _callbacks_for(callbacks, callback, patience):
    """The fit's CallbackList: ``callback`` (a function (epoch, logs)) first, then ``callbacks``, then the
    EarlyStopping that ``patience`` asks for."""
    if callbacks is None:
        callbacks = []
    elif isinstance(callbacks, Callback) or not isinstance(callbacks, (list, tuple)):
        raise TypeError(f"callbacks: expected None or a list of Callback instances, got {callbacks!r}")
    return CallbackList([*([EpochEnd(callback)] if callback is not None else []), *callbacks,
                         *([EarlyStopping(patience)] if patience is not None else [])])


def fit(net, X, y, epochs=10, batch_size=32, optimizer=None, lr=None, schedule=None, validation_data=None,
        patience=None, shuffle=True, seed=None, progress=None, callback=None, callbacks=None, comm=None) -> History:
    """Trains ``net`` on X (N, n0) and y (labels (N,) or targets (N, n_L)) for ``epochs`` passes of
    minibatches of ``batch_size`` rows (the last one may be smaller). See ``MLP.fit`` for the arguments.

    Every argument is checked before anything changes. On divergence, raises NonFiniteLossError with
    ``history``, ``epoch``, ``batch`` (None when the validation loss diverged) and ``restored_epoch``,
    unless a callback (NaNGuard) handles it.
    comm: None, or an mpi4py communicator or ``distributed.DataParallel`` hook: data parallel over its
    ranks, each taking its slice of every batch (model/distributed.py).
    """
    check_count("epochs", epochs, minimum=1)
    check_count("batch_size", batch_size, minimum=1)
    seed = net.seed if seed is None else check_seed("seed", seed)
    hooks = _callbacks_for(callbacks, callback, patience)
    backend, xp = net.backend, net.backend.xp
    X, y = _dataset(net, X, y)
    if validation_data is not None:
        X_val, y_val = check_validation_data(validation_data)
        X_val, y_val = _dataset(net, X_val, y_val, name="validation_data X")
    if optimizer is None and lr is None and schedule is None and net.optimizer is not None:
        optimizer = net.optimizer  # carry on with the state of the last fit (or of a loaded checkpoint)
    optimizer = get_optimizer("adam" if optimizer is None else optimizer, lr, schedule)
    sync = _data_parallel(comm)
    net.optimizer = optimizer.bind(backend, net.params)
    n = X.shape[0]
    n_batches = -(-n // batch_size)
    rng = np.random.default_rng(seed)
    first_epoch = 1 if sync is None else sync.start(net, X, y, seed, batch_size, rng)  # after a resume: > 1
    optimizer.total_steps = optimizer.step_count + (epochs - first_epoch + 1) * n_batches
    scorer = _Scorer(backend, net.loss)
    totals = EpochTotals(backend, n_batches)
    X_epoch, y_epoch = (backend.empty(X.shape, X.dtype), backend.empty(y.shape, y.dtype)) if shuffle else (X, y)
    history, bar = History(), _progress_bar(progress if sync is None else sync.progress(progress), epochs)
    state = TrainingState(net, optimizer, history, epochs, n_batches)
    step_batch = batch_size if sync is None else sync.local_batch(batch_size)
    epoch = batch = None
    try:
        hooks.call("on_train_begin", state)
        for epoch in range(first_epoch, epochs + 1):
            started = time.perf_counter()
            state.epoch = epoch
            hooks.call("on_epoch_begin", state)
            if state.stop_training:  # stopped before this epoch's first batch
                history.stopped_epoch = epoch - 1
                break
            if shuffle:
                order = backend.asarray(rng.permutation(n))
                xp.take(X, order, axis=0, out=X_epoch)
                xp.take(y, order, axis=0, out=y_epoch)
            totals.start_epoch()
            for batch, (start, stop) in enumerate(_chunks(n, batch_size) if sync is None else sync.chunks(n, batch_size), 1):
                if stop > start:  # a rank's slice of a batch smaller than the ranks is empty
                    targets = y_epoch[start:stop]
                    loss, logits = net._gradients(X_epoch[start:stop], targets, step_batch)
                    totals.add(batch, loss, stop - start, scorer.hits(logits, targets) if scorer.kind else 0)
                else:
                    loss = 0.0  # no rows of this batch on this rank
                if sync is not None:
                    sync.reduce_gradients(net.grads, stop - start)
                optimizer.step(net.params, net.grads)
                if hooks.has_batch_hooks:
                    state.batch, state.batch_rows, state.step_loss = batch, stop - start, loss
                    hooks.call("on_batch_end", state)
                    if state.stop_training:
                        break
            loss_sum, hits, batch = totals.read()  # batch: the first whose loss was not finite, else None
            if batch is not None:
                raise non_finite_loss(loss_sum)
            state.batch = None
            if sync is not None:  # the sums over every rank's rows, and the rows run over all ranks
                loss_sum, hits, stop = sync.reduce_totals(loss_sum, hits)
            logs = {"loss": loss_sum / stop}  # the rows run: all n unless a callback stopped mid-epoch
            if scorer.kind:
                logs["accuracy"] = hits / stop
            if validation_data is not None:
                logs["val_loss"], val_accuracy = _evaluate_converted(net, X_val, y_val, scorer, DEFAULT_CHUNK)
                _finite_loss(logs["val_loss"], "val_loss")
                if scorer.kind:
                    logs["val_accuracy"] = val_accuracy
            for key, value in logs.items():
                getattr(history, key).append(value)
            history.time.append(time.perf_counter() - started)
            history.lr.append(optimizer.last_lr)
            if bar is not None:
                bar.set_postfix({k: f"{v:.4f}" for k, v in logs.items()}, refresh=False)
                bar.update()
            state.logs = logs
            if sync is not None:
                sync.end_epoch(net, epoch)
            hooks.call("on_epoch_end", state)
            if state.stop_training:
                history.stopped_epoch = epoch
                break
    except NonFiniteLossError as e:
        if not hooks.on_divergence(state, e):
            hooks.call("on_train_end", state)
            raise _diverged(history, epoch, batch, n_batches, e) from e
        history.stopped_epoch = epoch
    finally:
        if bar is not None:
            bar.close()
    hooks.call("on_train_end", state)
    if sync is not None:
        sync.finish(net)
    return history


def _data_parallel(comm):
    """fit's ``comm`` as a DataParallel hook, or None; mpi4py is imported only when a communicator is given."""
    if comm is None:
        return None
    from deltaprop.model.distributed import data_parallel

    return data_parallel(comm)


def _diverged(history, epoch, batch, n_batches, cause):
    """The NonFiniteLossError a fit raises when its loss (or validation loss) stops being finite: says
    where, and which epoch's weights early stopping restored (if it did), and carries the history."""
    where = f"epoch {epoch}, " + (f"batch {batch} of {n_batches}" if batch is not None else "validation")
    restored = history.best_epoch
    left = f"; the weights of epoch {restored} (the best so far) restored" if restored is not None else ""
    error = NonFiniteLossError(f"{cause} at {where}{left}")
    error.history, error.epoch, error.batch, error.restored_epoch = history, epoch, batch, restored
    return error
