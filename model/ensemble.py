"""K perceptrons of one shape trained in one pass: an ensemble, bootstrap replicas, a learning-rate or
seed sweep.

The K networks are stacked: the parameters are one (K, P) buffer, row k being member k's flat buffer
(``kernels.layout.Layout``'s views of it carry a leading K axis), and a batch's workspace is one (K,
work_size) buffer laid out the same way. A layer of every member is then one strided-batched GEMM on
(K, n_l, n_{l-1}) views (``Backend.gemm`` on 3-D stacks) and each elementwise pass one call of a
``stacked_*`` kernel; on a backend with a compiled ensemble step (``fused_ensemble_step``) a whole
SGD or gradients step of every member is one call. Member k computes what ``MLP(sizes, ..., seed=seed + k)`` computes
on the same batches with the same hyperparameters.

Shapes: x is (B, n0), shared by every member, or (K, B, n0), one batch per member; y is int labels (B,)
or (K, B), or targets (B, n_L) or (K, B, n_L). Per-member hyperparameters (lr, momentum, weight decay)
are a scalar for all or a length-K sequence.

Not thread-safe: calls that share an ensemble from several threads are serialised by its lock.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from deltaprop.atomic import write_atomic
from deltaprop.backend.checks import check_label_range
from deltaprop.errors import CheckpointError, NonFiniteLossError
from deltaprop.kernels.dtypes import floating
from deltaprop.kernels.layout import Layout
from deltaprop.model.callbacks import check_epoch_function
from deltaprop.model.losses import get_loss
from deltaprop.model.mlp import MLP, initial_parameters, network_spec
from deltaprop.model.optim import OPTIMIZERS as OPTIMIZER_CLASSES
from deltaprop.model.optim import check_count, check_seed, get_schedule
from deltaprop.model.training import DEFAULT_CHUNK, check_validation_data

MAGIC = "deltaprop-ensemble"
FORMAT_VERSION = 1
_WORKSPACES_KEPT = 4  # batch sizes whose buffers stay allocated (full and last batch of a fit, evaluation)
# fit's optimizers: name -> the stacked update that runs it (Backend.stacked_<update>_update); their
# defaults (lr, momentum, weight decay) and AdamW's decoupled decay are model.optim's classes', as MLP.fit's
OPTIMIZERS = {"sgd": "sgd", "momentum": "sgd", "adam": "adam", "adamw": "adam"}


@dataclass
class EnsembleHistory:
    """Per-epoch metrics of an ensemble fit: each entry a (K,) float64 array, one value per member
    (accuracy and val_accuracy not for mse, val_* only with validation data). With ``patience``:
    best_epoch[k], the epoch (1-based) whose weights member k kept, and stopped_epoch[k], the epoch after
    which it stopped (None if it ran on); a stopped member's later entries are those of its kept weights."""

    loss: list = field(default_factory=list)
    accuracy: list = field(default_factory=list)
    val_loss: list = field(default_factory=list)
    val_accuracy: list = field(default_factory=list)
    best_epoch: list | None = None
    stopped_epoch: list | None = None

    @property
    def epochs(self) -> int:
        return len(self.loss)


class _Workspace:
    """The (K, work_size) workspace of one batch size and its (K, B, n_l) views."""

    def __init__(self, backend, sizes, members, batch, dtype):
        self.batch = batch
        layout = Layout(sizes, batch)
        self.offsets = layout.offsets
        self.work = backend.empty((members, layout.work_size), dtype)
        self.z, self.a, self.delta = layout.z(self.work), layout.a(self.work), layout.delta(self.work)
        self.loss_sums = np.empty(members, dtype)  # the compiled step's (K,) summed losses, on the host


class _EarlyStopping:
    """Early stopping of each member on its own (EarlyStopping's rule): member k stops after ``patience``
    epochs without a lower monitored loss, and its best epoch's weights, put back then, stay frozen (its
    learning rate 0: the stacked step still computes it, its update changes nothing) while the others
    train on; at the end every member has its best epoch's weights."""

    def __init__(self, ensemble, patience):
        check_count("patience", patience, minimum=1)
        self.ensemble, self.patience = ensemble, patience
        self.best = np.full(ensemble.members, np.inf)
        self.best_epoch = np.zeros(ensemble.members, np.int64)
        self.waited = np.zeros(ensemble.members, np.int64)
        self.stopped_epoch = [None] * ensemble.members
        self.best_params = ensemble.backend.empty(ensemble.params.shape, ensemble.dtype)

    @property
    def running(self) -> np.ndarray:
        """(K,) 1.0 for a member still training, 0.0 for a stopped one: the factor of its learning rate."""
        return np.array([stopped is None for stopped in self.stopped_epoch], np.float64)

    def epoch_end(self, epoch, monitored) -> bool:
        """Takes the epoch's (K,) monitored losses; whether every member has stopped."""
        params, running = self.ensemble.params, self.running.astype(bool)
        better = running & (monitored < self.best)
        for k in np.flatnonzero(better):
            self.best[k], self.best_epoch[k], self.waited[k] = monitored[k], epoch, 0
            self.best_params[k] = params[k]
        self.waited[running & ~better] += 1
        for k in np.flatnonzero(running & (self.waited >= self.patience)):
            self.stopped_epoch[k] = epoch
            params[k] = self.best_params[k]
        return not self.running.any()

    def train_end(self, history):
        """Puts back every member's best weights (those stopped have them already); records the epochs."""
        self.ensemble.params[...] = self.best_params
        history.best_epoch, history.stopped_epoch = self.best_epoch.tolist(), list(self.stopped_epoch)


def _non_finite(losses, where):
    bad = np.flatnonzero(~np.isfinite(losses))
    return NonFiniteLossError(f"{where}: expected a finite loss for every member, got {losses[bad].tolist()} "
                              f"for member(s) {bad.tolist()} (NaN/inf in x, or a diverging learning rate)")


class MLPEnsemble:
    """``members`` multilayer perceptrons of one ``sizes``, trained side by side in one pass.

    Arguments after ``sizes`` as for ``MLP``; member k is initialised exactly as ``MLP(sizes, activation,
    loss, backend, dtype, seed=seed + k)``.
    """

    def __init__(self, members, sizes, activation="relu", loss="softmax_cross_entropy", backend="auto",
                 dtype="float32", seed=0):
        check_count("members", members, minimum=1)
        self.members = members
        self.sizes, self.activation, self.loss, self.backend, self.dtype, self.seed = network_spec(
            sizes, activation, loss, backend, dtype, seed)
        if self.seed + members > 2**63:
            raise ValueError(f"seed: expected seed + members <= 2**63 (member k's seed is seed + k), got {seed}")
        self._layout = Layout(self.sizes)
        shape = (members, self._layout.n_params)
        self.params = self.backend.empty(shape, self.dtype)
        self.grads = self.backend.zeros(shape, self.dtype)
        initial = np.stack([initial_parameters(self._layout, self.activation, self.seed + k) for k in range(members)])
        self.params[...] = self.backend.asarray(initial, self.dtype)
        self.weights, self.biases = self._layout.weights(self.params), self._layout.biases(self.params)
        self.grad_weights, self.grad_biases = self._layout.weights(self.grads), self._layout.biases(self.grads)
        self._workspaces: OrderedDict[int, _Workspace] = OrderedDict()
        self._lock = threading.RLock()
        self._state = {}  # fit's optimizer: its name, and its (K, P) buffers and step count

    def __repr__(self):
        return (f"MLPEnsemble({self.members}, {self.sizes}, activation={self.activation!r}, loss={self.loss!r}, "
                f"backend={self.backend.name!r}, dtype={self.dtype.name!r})")

    @property
    def depth(self) -> int:
        return len(self.sizes) - 1

    def member(self, k: int) -> MLP:
        """Member k as an independent ``MLP`` (its own copy of the parameters, on the same backend)."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k < self.members:
            raise ValueError(f"member: k: expected an integer in [0, {self.members - 1}], got {k!r}")
        net = MLP(self.sizes, self.activation, self.loss, self.backend, self.dtype, seed=self.seed + int(k))
        with self._lock:
            net.params[...] = self.params[int(k)]
        return net

    # ---- arguments ----

    def per_member(self, name, value, minimum=0.0, exclusive=False) -> np.ndarray:
        """``value`` (a real number, or one per member) as a float64 (K,) host array of finite numbers >=
        ``minimum`` (> when ``exclusive``); a ValueError naming ``name`` otherwise."""
        try:
            values = np.broadcast_to(np.asarray(value, dtype=np.float64), (self.members,))
        except (TypeError, ValueError):
            values = None
        bound = "> " if exclusive else ">= "
        if values is None or np.asarray(value).dtype == bool or not np.isfinite(values).all() or (
                (values <= minimum).any() if exclusive else (values < minimum).any()):
            raise ValueError(f"{name}: expected a finite real number {bound}{minimum} or {self.members} of them "
                             f"(one per member), got {value!r}")
        return np.array(values)

    def as_inputs(self, x):
        """x as (B, n0) shared or (K, B, n0) per member, in the ensemble's dtype on its backend."""
        x = self.backend.asarray(x, self.dtype)
        K, n0 = self.members, self.sizes[0]
        if not ((x.ndim == 2 and x.shape[1] == n0) or (x.ndim == 3 and x.shape[0] == K and x.shape[2] == n0)) \
                or x.shape[-2] == 0:
            raise ValueError(f"x: expected a non-empty batch of shape (batch, {n0}), shared by the members, or "
                             f"({K}, batch, {n0}), one per member, got {tuple(x.shape)}")
        return x

    def as_targets(self, y, batch):
        """y as int64 labels (B,)/(K, B) or targets (B, n_L)/(K, B, n_L) in the dtype, on the backend;
        per-member labels are checked in range here (shared ones by the loss kernel)."""
        y = self.backend.asarray(y)
        K, C = self.members, self.sizes[-1]
        labels = y.dtype.kind in "iu" and y.shape in ((batch,), (K, batch))
        matrix = (floating(y.dtype) or y.dtype.kind in "fiub") and y.shape in ((batch, C), (K, batch, C))
        if not (labels or matrix):
            raise TypeError(f"y: expected int labels of shape ({batch},) or ({K}, {batch}), or targets of shape "
                            f"({batch}, {C}) or ({K}, {batch}, {C}), got {y.dtype} of shape {tuple(y.shape)}")
        if labels:
            y = self.backend.asarray(y, np.int64)
            if y.ndim == 2:  # members after a bad one must not have been updated when it is found
                check_label_range(get_loss(self.loss).kernel, y, C, self.backend.xp)
            return y
        return self.backend.asarray(y, self.dtype)

    # ---- the stacked loop ----

    def _workspace(self, batch):
        workspace = self._workspaces.get(batch)
        if workspace is None:
            workspace = self._workspaces[batch] = _Workspace(self.backend, self.sizes, self.members, batch, self.dtype)
            if len(self._workspaces) > _WORKSPACES_KEPT:
                self._workspaces.popitem(last=False)
        else:
            self._workspaces.move_to_end(batch)
        return workspace

    def _stack(self, a, ndim):
        """``a`` with the member axis: itself when it has one, else a broadcast view (no copy)."""
        return a if a.ndim == ndim else self.backend.xp.broadcast_to(a, (self.members,) + a.shape)

    def forward(self, x):
        """The logits of every member, (K, B, n_L), in the ensemble's workspace (valid until the next
        pass at this batch size)."""
        with self._lock:
            return self._forward(self.as_inputs(x))[-1][-1]

    def _forward(self, x):
        """(workspace, inputs of each layer [a[0] (K, B, n0), a[1], ...], z) after the forward pass."""
        backend = self.backend
        workspace = self._workspace(x.shape[-2])
        inputs = [self._stack(x, 3)]
        for l, (W, b, z) in enumerate(zip(self.weights, self.biases, workspace.z)):
            backend.gemm(inputs[-1], W, out=z, trans_b=True)  # z[k] = a[k] @ W[k].T, one batched GEMM
            if l < self.depth - 1:
                inputs.append(backend.stacked_bias_act(z, b, self.activation, z_out=z, a_out=workspace.a[l])[1])
            else:
                backend.stacked_bias_act(z, b, "identity", z_out=z, a_out=z)
        return workspace, inputs, workspace.z

    def _backward(self, workspace, inputs, y):
        """The (K,) mean losses; the gradients into ``grads``. NonFiniteLossError (grads unchanged) when a
        member's loss is not finite."""
        backend = self.backend
        kernel = get_loss(self.loss).kernel
        targets = self._stack(y, 2 if y.dtype.kind in "iu" else 3)
        losses = backend.to_numpy(backend.stacked_loss(kernel, workspace.z[-1], targets, workspace.delta[-1]))
        if not np.isfinite(losses).all():
            raise _non_finite(losses, "loss")
        for l in reversed(range(self.depth)):
            delta = workspace.delta[l]
            backend.gemm(delta, inputs[l], out=self.grad_weights[l], trans_a=True)  # dW[k] = delta[k].T @ a[k]
            backend.stacked_bias_grad(delta, out=self.grad_biases[l])
            if l > 0:
                backend.gemm(delta, self.weights[l], out=workspace.delta[l - 1])
                backend.stacked_act_backward(workspace.delta[l - 1], workspace.z[l - 1], self.activation,
                                             out=workspace.delta[l - 1])
        return losses

    def loss_and_grads(self, x, y):
        """The (K,) mean losses and [(dW[l] (K, n_l, n_{l-1}), db[l] (K, n_l))] for l = 1..L, fresh arrays."""
        with self._lock:
            x = self.as_inputs(x)
            losses = self._gradients(x, self.as_targets(y, x.shape[-2]), x.shape[-2])[0]
            return losses, [(dW.copy(), db.copy()) for dW, db in zip(self.grad_weights, self.grad_biases)]

    # train_step runs the backend's compiled ensemble step where it has one; False forces the stacked loop
    use_fused_step = True

    def train_step(self, x, y, lr=0.01) -> np.ndarray:
        """Forward, loss, backward and a plain SGD update of every member (member k with lr[k]); returns
        the (K,) mean losses before the update. lr: a number > 0 or one per member.

        NonFiniteLossError names the members whose loss is not finite; those are left unchanged (by the
        compiled step, which updates the others; the stacked loop updates no member then).
        """
        lr = self.per_member("train_step: lr", lr, exclusive=True)
        with self._lock:
            x = self.as_inputs(x)
            y = self.as_targets(y, x.shape[-2])
            steps = self._fused_steps(grads=False)
            if steps is None:
                workspace, inputs, _ = self._forward(x)
                losses = self._backward(workspace, inputs, y)
                self.backend.stacked_sgd_update(self.params, self.grads, lr.astype(self.dtype),
                                                np.zeros(self.members, self.dtype))
                return losses
            return self._run_fused(steps, x.shape[-2], x, y, lr.astype(self.dtype))[0]

    def _gradients(self, x, y, step_batch):
        """The (K,) mean losses and the (K, B, n_L) logits of x and y, the gradients in ``grads``: by the
        backend's compiled gradients step (the one for batches of ``step_batch``) where it has one."""
        steps = self._fused_steps(grads=True)
        if steps is None:
            workspace, inputs, z = self._forward(x)
            return self._backward(workspace, inputs, y), z[-1]
        return self._run_fused(steps, step_batch, x, y, self.grads)

    def _run_fused(self, steps, step_batch, x, y, per_member):
        """A compiled ensemble step on x, y (made stacks of one where shared); (losses, logits) as above."""
        batch = x.shape[-2]
        workspace = self._workspace(batch)
        x3 = self.backend.asarray(x if x.ndim == 3 else x[None])
        y3 = self.backend.asarray(y if y.ndim == (2 if y.dtype.kind in "iu" else 3) else y[None])
        bad_row = steps[step_batch](x3, y3, self.params, workspace.work, workspace.offsets, per_member,
                                    workspace.loss_sums)
        if bad_row >= 0:
            check_label_range(get_loss(self.loss).kernel, y, self.sizes[-1])  # the message every backend gives
        losses = workspace.loss_sums.astype(np.float64) / batch
        if not np.isfinite(losses).all():
            raise _non_finite(losses, "loss")
        return losses, workspace.z[-1]

    def _fused_steps(self, grads):
        """The backend's compiled ensemble steps by batch size, or None (and None when ``use_fused_step``
        is False), looked up once."""
        if not self.use_fused_step:
            return None
        key = "_gradient_steps" if grads else "_sgd_steps"
        if key not in self.__dict__:
            self.__dict__[key] = self.backend.fused_ensemble_step(self.activation, get_loss(self.loss).kernel,
                                                                  self.dtype, grads)
        return self.__dict__[key]

    # ---- fit and inference ----

    def fit(self, X, y, epochs=10, batch_size=32, optimizer="adam", lr=None, momentum=None, weight_decay=None,
            nesterov=False, schedule=None, validation_data=None, patience=None, shuffle=True, seed=None,
            callback=None):
        """Trains every member on X (N, n0) and y (labels (N,) or targets (N, n_L); for sigmoid
        cross-entropy labels become one-hot rows, as ``MLP.fit`` makes them) by minibatches; returns an
        EnsembleHistory of per-member metrics.

        optimizer: "adam", "adamw", "sgd" or "momentum" (torch.optim's formulas and defaults, as
        ``MLP.fit``'s; momentum only for the SGDs; weight_decay None: the optimizer's default, 1e-2 for
        AdamW, else 0); lr, momentum, weight_decay: a number or one per member; schedule: as ``MLP.fit``.
        The optimizer state (velocity, or Adam's moments and step) carries on from the last fit with the
        same optimizer.
        patience: early stopping of each member, as ``MLP.fit(patience=...)`` alone: member k stops after
        that many epochs without a lower validation loss (training loss without validation_data), its
        best epoch's weights put back and frozen while the others train on; the fit ends when all stopped.
        shuffle: a new order each epoch; seed None: member k draws its orders from default_rng(seed + k),
        as ``MLP(seed=seed + k).fit`` would (each member gets its own batches), an int: every member
        shares the orders of default_rng(seed). callback(epoch, logs): logs of (K,) arrays.
        """
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer: expected one of {sorted(OPTIMIZERS)}, got {optimizer!r}")
        check_count("epochs", epochs, minimum=1)
        check_count("batch_size", batch_size, minimum=1)
        seed = check_seed("seed", seed)
        defaults = OPTIMIZER_CLASSES[optimizer].defaults
        lr = self.per_member("fit: lr", defaults["lr"] if lr is None else lr, exclusive=True)
        mu = self.per_member("fit: momentum", defaults.get("momentum", 0.0) if momentum is None else momentum)
        wd = self.per_member("fit: weight_decay", defaults["weight_decay"] if weight_decay is None else weight_decay)
        if nesterov and not (mu > 0).all():
            raise ValueError(f"fit: nesterov: expected momentum > 0 for every member, got {mu.tolist()}")
        schedule = get_schedule(schedule)
        if callback is not None:
            check_epoch_function(callback)
        X, y = self._dataset(X, y, "X")
        if validation_data is not None:
            X_val, y_val = self._dataset(*check_validation_data(validation_data), "validation_data X")
        stopping = None if patience is None else _EarlyStopping(self, patience)
        backend, xp = self.backend, self.backend.xp
        n = X.shape[0]
        scored = self._scored()
        rngs = [np.random.default_rng(seed if seed is not None else self.seed + k)
                for k in range(1 if seed is not None else self.members)]
        update = self._updater(optimizer, wd, mu, nesterov)
        total_steps, step = epochs * -(-n // batch_size), 0
        history = EnsembleHistory()
        with self._lock:
            for epoch in range(1, epochs + 1):
                # row indices (1 or K, N): one order for all, or one per member; None: slices of X and y
                order = np.stack([rng.permutation(n) for rng in rngs]) if shuffle else None
                loss_sum, hits = np.zeros(self.members), np.zeros(self.members)
                for start in range(0, n, batch_size):
                    if order is None:
                        x_batch, y_batch = X[start:start + batch_size], y[start:start + batch_size]
                    else:  # a contiguous (B, ...) or (K, B, ...) copy of the batch's rows
                        rows = backend.asarray(order[:, start:start + batch_size] if len(order) > 1
                                               else order[0, start:start + batch_size])
                        x_batch, y_batch = xp.take(X, rows, axis=0), xp.take(y, rows, axis=0)
                    losses, logits = self._gradients(x_batch, y_batch, batch_size)
                    loss_sum += losses * x_batch.shape[-2]
                    if scored:
                        hits += self._hits(logits, y_batch)
                    factor = schedule.factor(step, total_steps)
                    step += 1
                    update((lr * factor * (1.0 if stopping is None else stopping.running)).astype(self.dtype))
                logs = {"loss": loss_sum / n}
                if scored:
                    logs["accuracy"] = hits / n
                if validation_data is not None:
                    logs["val_loss"], val_accuracy = self._evaluate(X_val, y_val)
                    if scored:
                        logs["val_accuracy"] = val_accuracy
                for key, value in logs.items():
                    getattr(history, key).append(value)
                if callback is not None:
                    callback(epoch, logs)
                if stopping is not None and stopping.epoch_end(epoch, logs.get("val_loss", logs["loss"])):
                    break
            if stopping is not None:
                stopping.train_end(history)
        return history

    def _updater(self, optimizer, wd, mu, nesterov):
        """update(lr (K,)) for one step of ``optimizer``, its state made (or kept from the last fit)."""
        backend, wd = self.backend, wd.astype(self.dtype)
        state = self._state
        adam = OPTIMIZERS[optimizer] == "adam"
        if state.get("name") != optimizer:
            names = ("m", "v") if adam else ("velocity",) if mu.any() else ()
            state.clear()
            state.update({"name": optimizer, "step": 0}, **{n: backend.zeros(self.params.shape, self.dtype) for n in names})
        if adam:
            decoupled = OPTIMIZER_CLASSES[optimizer].decoupled

            def update(lr):
                state["step"] += 1
                backend.stacked_adam_update(self.params, self.grads, state["m"], state["v"], state["step"], lr, wd,
                                            decoupled=decoupled)
            return update
        if mu.any() and "velocity" not in state:
            state["velocity"] = backend.zeros(self.params.shape, self.dtype)
        velocity = state["velocity"] if mu.any() else None
        return partial(backend.stacked_sgd_update, self.params, self.grads, weight_decay=wd, velocity=velocity,
                       momentum=mu.astype(self.dtype), nesterov=nesterov)

    def _dataset(self, X, y, name):
        """X (N, n0) and y (N,)/(N, n_L) (or None) converted once, finite, labels in range; for sigmoid
        cross-entropy, int labels become one-hot rows (N, n_L) (so that accuracy compares whole rows)."""
        X = self.backend.asarray(X, self.dtype)
        if X.ndim != 2 or X.shape[1] != self.sizes[0] or X.shape[0] == 0:
            raise ValueError(f"{name}: expected shape (samples, {self.sizes[0]}), got {tuple(X.shape)}")
        y = None if y is None else self.as_targets(y, X.shape[0])
        xp = self.backend.xp
        if not bool(xp.isfinite(X).all()) or (y is not None and floating(y.dtype) and not bool(xp.isfinite(y).all())):
            raise ValueError(f"{name}: expected finite values, got NaN or inf")
        if y is not None and y.ndim == 1:
            check_label_range(get_loss(self.loss).kernel, y, self.sizes[-1], xp)
            if get_loss(self.loss).output == "sigmoid":
                y = (y[:, None] == xp.arange(self.sizes[-1])).astype(self.dtype)
        return X, y

    def _scored(self) -> bool:
        """Whether the loss has an accuracy: a classifier's, or sigmoid cross-entropy's exact-match rows."""
        loss = get_loss(self.loss)
        return loss.classifier or loss.output == "sigmoid"

    def _hits(self, logits, y):
        """(K,) count of correct rows: whose argmax is the label (or the target row's argmax) for a
        classifier; for sigmoid cross-entropy, whose thresholded logits (z > 0) all match the targets (> 0.5)."""
        xp = self.backend.xp
        if not get_loss(self.loss).classifier:
            hit = ((logits > 0) == (y > 0.5)).all(axis=-1)
        else:
            hit = xp.argmax(logits, axis=-1) == (y if y.dtype.kind in "iu" else xp.argmax(y, axis=-1))
        return self.backend.to_numpy(hit.sum(axis=-1)).astype(np.float64)

    def _evaluate(self, X, y, chunk_size=DEFAULT_CHUNK):
        """((K,) mean losses, (K,) accuracies or None) over converted X, y."""
        n, scored = X.shape[0], self._scored()
        loss_sum, hits = np.zeros(self.members), np.zeros(self.members)
        for start in range(0, n, chunk_size):
            y_chunk = y[start:start + chunk_size]
            workspace, inputs, z = self._forward(X[start:start + chunk_size])
            losses = self.backend.to_numpy(self.backend.stacked_loss(
                get_loss(self.loss).kernel, z[-1], self._stack(y_chunk, y_chunk.ndim + 1), workspace.delta[-1]))
            loss_sum += losses * len(y_chunk)
            if scored:
                hits += self._hits(z[-1], y_chunk)
        if not np.isfinite(loss_sum).all():
            raise _non_finite(loss_sum / n, "val_loss")
        return loss_sum / n, (hits / n if scored else None)

    def evaluate(self, X, y):
        """((K,) mean losses, (K,) accuracies or None for mse) of every member over X (N, n0) and y (int
        labels become one-hot rows for sigmoid cross-entropy, whose accuracy is exact-match rows)."""
        with self._lock:
            return self._evaluate(*self._dataset(X, y, "X"))

    def predict_proba(self, X, reduce="mean", chunk_size=DEFAULT_CHUNK):
        """The loss's output map (softmax, sigmoid, identity) of each member: (K, N, n_L) with
        reduce=None, or their mean over the members (N, n_L) with reduce="mean"."""
        if reduce not in ("mean", None):
            raise ValueError(f"predict_proba: reduce: expected 'mean' or None, got {reduce!r}")
        X = self._dataset(X, None, "X")[0]
        backend, output = self.backend, get_loss(self.loss).output
        out = backend.empty((self.members, X.shape[0], self.sizes[-1]), self.dtype)
        zero_bias = backend.zeros((self.members, self.sizes[-1]), self.dtype)
        with self._lock:
            for start in range(0, X.shape[0], chunk_size):
                logits = self._forward(X[start:start + chunk_size])[2][-1]
                rows = out[:, start:start + chunk_size]
                if output == "softmax":
                    for k in range(self.members):
                        backend.softmax(logits[k], out=rows[k])
                else:
                    backend.stacked_bias_act(logits, zero_bias, output, z_out=logits, a_out=rows)
        return out if reduce is None else out.mean(axis=0)

    def predict(self, X, reduce="mean"):
        """Class labels (N,) (or (K, N) with reduce=None) from the (mean) probabilities for a classifier
        loss, 0/1 rows for sigmoid cross-entropy, the (mean) outputs for mse."""
        proba = self.predict_proba(X, reduce)
        loss, xp = get_loss(self.loss), self.backend.xp
        if loss.classifier:
            return xp.argmax(proba, axis=-1)
        return (proba > 0.5).astype(np.int64) if loss.output == "sigmoid" else proba

    # ---- checkpoints ----

    def save(self, path):
        """Writes the ensemble (parameters and shape, no optimizer state) to ``path`` (.npz), atomically."""
        with self._lock:
            params = self.backend.to_numpy(self.params)
        if not np.isfinite(params).all():
            raise ValueError("save: params: expected finite parameters, got NaN or inf; nothing written")
        meta = {"format_version": FORMAT_VERSION, "members": self.members, "sizes": self.sizes,
                "activation": self.activation, "loss": self.loss, "dtype": self.dtype.name, "seed": self.seed}
        write_atomic(path, lambda file: np.savez(file, magic=np.array(MAGIC), meta=np.array(json.dumps(meta)),
                                                 params=params))

    @classmethod
    def load(cls, path, backend="auto") -> MLPEnsemble:
        """The ensemble saved at ``path`` on ``backend``; CheckpointError if it is not a valid ensemble file."""
        try:
            with np.load(os.fspath(path), allow_pickle=False) as arrays:
                if str(arrays["magic"]) != MAGIC:
                    raise CheckpointError(f"{path}: expected a deltaprop ensemble file, got magic {arrays['magic']}")
                meta = json.loads(str(arrays["meta"]))
                params = arrays["params"]
        except (OSError, KeyError, ValueError, EOFError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"{path}: expected a deltaprop ensemble file, could not read it ({e})") from None
        if meta.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{path}: expected format_version {FORMAT_VERSION}, got {meta.get('format_version')}")
        expected = (meta["members"], Layout.parameter_count(meta["sizes"]))
        if params.shape != expected or not np.isfinite(params).all():
            raise CheckpointError(f"{path}: params: expected {expected} finite values for {meta['members']} "
                                  f"networks of sizes {meta['sizes']}, got shape {params.shape}")
        ensemble = cls(meta["members"], meta["sizes"], meta["activation"], meta["loss"], backend, meta["dtype"],
                       meta["seed"])
        ensemble.params[...] = ensemble.backend.asarray(params, ensemble.dtype)
        return ensemble
