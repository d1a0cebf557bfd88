"""The L-layer perceptron: the forward/backward loop over the kernels of whichever backend it runs on.

Samples are rows. Layer l (1..L) has W[l] of shape (n_l, n_{l-1}) and b[l] of shape (n_l,):

    forward    z[l] = a[l-1] @ W[l].T + b[l]; a[l] = act(z[l])      gemm, then bias_act
    loss       delta[L] = (y_hat - y) / B                            the loss's kernel (softmax_xent, ...)
    backward   dW[l] = delta[l].T @ a[l-1]; db[l] = sum of delta[l]  gemm(trans_a), bias_grad
               delta[l-1] = (delta[l] @ W[l]) * act'(z[l-1])         gemm, then act_backward
    update     params -= lr * grads                                  sgd_update over the flat buffer

The parameters live in one flat buffer (per layer: W[l] row-major, then b[l]); ``weights`` and
``biases`` are views into it, and the gradients mirror that layout in a second flat buffer, so that an
optimizer updates every layer in one kernel launch. The activations of the forward pass live in a
workspace per batch size, so that ``train_step`` allocates nothing after its first call.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property
from math import isfinite

import numpy as np

from deltaprop.backend import get_backend
from deltaprop.backend.base import check_label_range, check_shape
from deltaprop.errors import NonFiniteLossError
from deltaprop.kernels.activations import get_activation
from deltaprop.kernels.dtypes import resolve_dtype
from deltaprop.kernels.plan import A_AT, DELTA_AT, Z_AT, step_plan
from deltaprop.model import io, training
from deltaprop.model.losses import get_loss

_INT64 = np.dtype(np.int64)
_NDARRAY = np.ndarray
_WORKSPACES_KEPT = 4  # batch sizes whose buffers stay allocated (full and last partial batch of a fit, eval)


@dataclass
class ForwardCache:
    """What the forward pass keeps for the backward pass.

    a: [a[0] = x (B, n0), a[1], ..., a[L-1]], the inputs of each layer;
    z: [z[1], ..., z[L]], the pre-activations, z[L] (B, n_L) being the logits.
    The arrays are the network's workspace: valid until the next forward pass of this batch size.
    """

    a: list
    z: list

    @property
    def logits(self):
        return self.z[-1]


class _Workspace:
    """Buffers for one batch size: z[l] and delta[l] (B, n_l) for every layer, a[l] for the hidden ones,
    views of one flat buffer ``work`` laid out by ``plan`` (what a backend's fused step reads)."""

    def __init__(self, backend, sizes, batch, dtype):
        self.batch = batch
        self.plan, work_size = step_plan(sizes, batch)
        self.work = backend.empty(work_size, dtype)

        def views(column, layers):
            return [self.work[at:at + batch * n].reshape(batch, n) for at, n in zip(self.plan[:, column], layers)]

        self.z = views(Z_AT, sizes[1:])
        self.a = views(A_AT, sizes[1:-1])
        self.delta = views(DELTA_AT, sizes[1:])


def _finite(loss):
    """``loss``, or NonFiniteLossError when it is NaN or infinite."""
    if not isfinite(loss):
        raise NonFiniteLossError(
            f"loss: expected a finite value, got {loss} (NaN/inf in x, or a diverging learning rate)")
    return loss


def _check_sizes(sizes):
    try:
        widths = [int(n) for n in sizes]
        ok = len(widths) >= 2 and all(w >= 1 and w == n for w, n in zip(widths, sizes))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"sizes: expected at least two positive integer widths like [784, 512, 10], got {sizes!r}")
    return widths


class MLP:
    """A multilayer perceptron trained by backpropagation on a deltaprop backend.

    sizes: layer widths [n0, n1, ..., nL] (input first); activation: a name of the activation table for
    the hidden layers; loss: "softmax_cross_entropy", "mse" or "sigmoid_cross_entropy"; backend: a name
    ("auto", "numpy", "numba", "cupy") or a Backend; dtype: "float32" or "float64" (float16/bfloat16
    on the GPU); seed: the initialisation (He for the ReLU family, Xavier otherwise) is drawn from
    numpy's default_rng(seed) in float64 on the host, so the same seed gives the same network on every
    backend.
    """

    def __init__(self, sizes, activation="relu", loss="softmax_cross_entropy", backend="auto",
                 dtype="float32", seed=0):
        self.sizes = _check_sizes(sizes)
        self.activation = get_activation(activation).name
        self.loss = get_loss(loss).name
        self.backend = get_backend(backend)
        self.dtype = resolve_dtype(dtype, self.backend.device)
        self.seed = seed
        self._layout = self._param_layout(self.sizes)
        self.params = self.backend.empty(self.n_params, self.dtype)  # aligned, where the backend aligns
        self.params[...] = self.backend.asarray(self._initial_params(), self.dtype)
        self.grads = self.backend.zeros(self.params.shape, self.dtype)
        self.weights, self.biases = self._views(self.params)
        self.grad_weights, self.grad_biases = self._views(self.grads)
        self._workspaces: OrderedDict[int, _Workspace] = OrderedDict()
        self._recent_workspace = None  # the last one used: a step at the same batch size skips the LRU bookkeeping
        self._lr, self._lr_scalar = None, None  # the last learning rate and it as a scalar of the dtype
        self.optimizer = None  # the Optimizer of the last fit (or of a loaded checkpoint), with its state

    # ---- layout and initialisation ----

    @staticmethod
    def _param_layout(sizes):
        """[(offset of W[l], offset of b[l], end)] per layer, in the flat buffer."""
        layout, offset = [], 0
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            bias_at = offset + fan_out * fan_in
            layout.append((offset, bias_at, bias_at + fan_out))
            offset = bias_at + fan_out
        return layout

    @property
    def n_params(self) -> int:
        return self._layout[-1][2]

    @property
    def depth(self) -> int:
        """L, the number of layers with weights."""
        return len(self.sizes) - 1

    def _views(self, flat):
        weights = [flat[w:b].reshape(n_out, n_in)
                   for (w, b, _), n_in, n_out in zip(self._layout, self.sizes[:-1], self.sizes[1:])]
        biases = [flat[b:end] for (_, b, end) in self._layout]
        return weights, biases

    def _initial_params(self):
        rng = np.random.default_rng(self.seed)
        flat = np.zeros(self.n_params)
        scheme = get_activation(self.activation).init
        for (w, b, _), fan_in, fan_out in zip(self._layout, self.sizes[:-1], self.sizes[1:]):
            if scheme == "he":
                flat[w:b] = rng.normal(0.0, math.sqrt(2.0 / fan_in), fan_out * fan_in)
            else:
                limit = math.sqrt(6.0 / (fan_in + fan_out))
                flat[w:b] = rng.uniform(-limit, limit, fan_out * fan_in)
        return flat

    def __repr__(self):
        return (f"MLP({self.sizes}, activation={self.activation!r}, loss={self.loss!r}, "
                f"backend={self.backend.name!r}, dtype={self.dtype.name!r})")

    # ---- inputs ----

    def _workspace(self, batch):
        ws = self._recent_workspace
        if ws is not None and ws.batch == batch:
            return ws
        ws = self._workspaces.get(batch)
        if ws is None:
            ws = self._workspaces[batch] = _Workspace(self.backend, self.sizes, batch, self.dtype)
            if len(self._workspaces) > _WORKSPACES_KEPT:
                self._workspaces.popitem(last=False)
        else:
            self._workspaces.move_to_end(batch)
        self._recent_workspace = ws
        return ws

    def _inputs(self, x):
        """x as a (B, n0) array of the network's dtype on its backend (converted once when it is not)."""
        x = self.backend.asarray(x, self.dtype)
        if x.ndim != 2 or x.shape[1] != self.sizes[0]:
            raise ValueError(f"x: expected shape (batch, {self.sizes[0]}), got {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError(f"x: expected a non-empty batch, got shape {tuple(x.shape)}")
        return x

    def _targets(self, y, batch):
        """y as int64 labels (B,) or a (B, n_L) target matrix of the network's dtype, on the backend."""
        y = self.backend.asarray(y)
        if y.ndim == 1 and y.dtype.kind in "iu":
            y = self.backend.asarray(y, np.int64)
        elif y.ndim == 2 and y.dtype.kind in "fiub":
            y = self.backend.asarray(y, self.dtype)
        else:
            raise TypeError(
                f"y: expected int labels of shape ({batch},) or a target matrix of shape ({batch}, "
                f"{self.sizes[-1]}), got {y.dtype} of shape {tuple(y.shape)}"
            )
        if y.shape[0] != batch:
            raise ValueError(f"y: expected {batch} rows (one per row of x), got {y.shape[0]}")
        return y

    # ---- the loop ----

    def forward(self, x) -> ForwardCache:
        """Runs the layers on x (B, n0); returns the ForwardCache of z[l] and a[l] (logits = z[L])."""
        return self._forward(self._inputs(x))

    def _forward(self, x):
        be, ws = self.backend, self._workspace(x.shape[0])
        inputs = [x]  # a[l-1] of each layer: a[l] is z[l] itself for the identity activation
        for l, (W, b, z) in enumerate(zip(self.weights, self.biases, ws.z)):
            be.gemm(inputs[-1], W, out=z, trans_b=True)  # z = a @ W.T
            if l < self.depth - 1:
                inputs.append(be.bias_act(z, b, self.activation, z_out=z, a_out=ws.a[l])[1])  # z += b; a = act(z)
            else:
                be.bias_act(z, b, "identity", z_out=z, a_out=z)  # the logits; the loss applies the output map
        return ForwardCache(a=inputs, z=ws.z)

    def backward(self, cache: ForwardCache, y) -> float:
        """From a forward pass's cache and the targets, writes dJ/dW and dJ/db into ``self.grads``
        (views: ``grad_weights``, ``grad_biases``); returns the mean loss over the batch."""
        x = cache.a[0]
        return self._backward(cache, self._targets(y, x.shape[0]))

    def _backward(self, cache, y):
        be, ws = self.backend, self._workspace(cache.a[0].shape[0])
        loss = _finite(float(getattr(be, get_loss(self.loss).kernel)(cache.logits, y, delta_out=ws.delta[-1])))
        for l in reversed(range(self.depth)):
            delta = ws.delta[l]
            be.gemm(delta, cache.a[l], out=self.grad_weights[l], trans_a=True)  # dW = delta.T @ a[l-1]
            be.bias_grad(delta, out=self.grad_biases[l])  # db = column sums of delta
            if l > 0:
                be.gemm(delta, self.weights[l], out=ws.delta[l - 1])  # delta @ W[l]
                be.act_backward(ws.delta[l - 1], cache.z[l - 1], self.activation, out=ws.delta[l - 1])
        return loss

    def loss_and_grads(self, x, y):
        """The mean loss and [(dW[l], db[l])] for l = 1..L, fresh arrays shaped like W[l] and b[l]."""
        loss = self._loss_grads(x, y)[0]
        return loss, [(dW.copy(), db.copy()) for dW, db in zip(self.grad_weights, self.grad_biases)]

    def _loss_grads(self, x, y, step_batch=None):
        """Forward, loss and backward into ``grads``: (mean loss, logits (B, n_L) in the workspace).

        One compiled call where the backend has a fused gradients step (and ``use_fused_step``), else the
        kernel-by-kernel loop. ``step_batch``: run the fused step of batches of that size (default B's),
        as ``fit`` does for its last, smaller batch, so that one epoch compiles and runs one step. Raises the loss kernels' error for a label outside [0, C) and
        NonFiniteLossError for a NaN or infinite loss, ``grads`` left as it was in both cases.
        """
        steps = self._fused_grads_step if self.use_fused_step else None
        if steps is None:
            x = self._inputs(x)
            cache = self._forward(x)
            return self._backward(cache, self._targets(y, x.shape[0])), cache.logits
        x, y = self._fused_inputs(x, y, "loss_and_grads")
        ws = self._workspace(len(x))
        step = steps[step_batch or len(x)]
        return self._fused_loss(*step(x, y, self.params, self.grads, ws.work, ws.plan), y), ws.z[-1]

    # train_step runs the backend's fused step where it has one; False forces the kernel-by-kernel loop
    use_fused_step = True

    def train_step(self, x, y, lr=0.01) -> float:
        """Forward, loss, backward and a plain SGD update (params -= lr * grads) in one call.

        Returns the mean loss before the update. Raises NonFiniteLossError, leaving the parameters
        untouched, if the loss is NaN or infinite. Allocation-free after the first call at a batch size.
        The fused step of a backend that has one never stores the gradients: ``grads`` is left as it was.
        """
        steps = self._fused_step if self.use_fused_step else None
        if steps is None:
            x = self._inputs(x)
            loss = self._backward(self._forward(x), self._targets(y, x.shape[0]))
            self.backend.sgd_update(self.params, self.grads, lr)
            return loss
        # The fast path, ~1 µs of Python around the compiled step: at batch 1 every attribute lookup shows.
        if not self._ready(x, y):
            x, y = self._fused_inputs(x, y, "train_step")
        ws = self._workspace(len(x))
        if lr != self._lr:  # the scalar costs ~0.3 µs to make; a fixed or stepwise lr makes it once
            self._lr, self._lr_scalar = lr, self.dtype.type(lr)
        total, bad_row = steps[len(x)](x, y, self.params, ws.work, ws.plan, self._lr_scalar)
        if bad_row < 0:
            loss = total / len(x)
            if isfinite(loss):
                return loss
        return self._fused_loss(total, bad_row, y)

    def _fused_inputs(self, x, y, caller):
        """x and y as a fused step takes them: as they are when already in that form (the fast path),
        else converted and checked once."""
        if self._ready(x, y):
            return x, y
        x = self._inputs(x)
        y = self._targets(y, x.shape[0])
        if y.ndim == 2:
            check_shape(caller, "targets", y, (x.shape[0], self.sizes[-1]))
        return x, y

    def _fused_loss(self, total, bad_row, y):
        """The mean loss from a fused step's summed loss and bad row; raises as the loss kernels do."""
        if bad_row >= 0:  # the step found a label outside [0, C) and changed nothing
            check_label_range(get_loss(self.loss).kernel, y, self.sizes[-1])  # the message every backend gives
        return _finite(float(total) / y.shape[0])

    @cached_property
    def _fused_step(self):
        """The backend's compiled SGD steps by batch size (None where it has none), looked up once."""
        return self.backend.fused_sgd_step(self.activation, get_loss(self.loss).kernel, self.dtype)

    @cached_property
    def _fused_grads_step(self):
        """The backend's compiled gradients steps by batch size (None where it has none), looked up once."""
        return self.backend.fused_grads_step(self.activation, get_loss(self.loss).kernel, self.dtype)

    def _ready(self, x, y):
        """x and y are host arrays that the fused step takes as they are: x (B, n0) C-contiguous in the
        network's dtype, y int64 labels (B,) or a C-contiguous (B, n_L) target matrix in that dtype."""
        if not (type(x) is _NDARRAY and type(y) is _NDARRAY and x.dtype is self.dtype and x.ndim == 2
                and x.flags.c_contiguous and y.flags.c_contiguous):
            return False
        batch, n0 = x.shape
        if batch == 0 or n0 != self.sizes[0]:
            return False
        if y.ndim == 1:
            return len(y) == batch and y.dtype is _INT64
        return y.dtype is self.dtype and y.shape == (batch, self.sizes[-1])  # a 0-d or 3-d y is not ready

    # ---- training, inference and checkpoints (model/training.py, model/io.py) ----

    def fit(self, X, y, epochs=10, batch_size=32, optimizer=None, lr=None, schedule=None, validation_data=None,
            patience=None, shuffle=True, seed=None, progress=None, callback=None) -> training.History:
        """Trains on X (N, n0) and y (int labels (N,) or targets (N, n_L)) by minibatches; returns a History.

        optimizer: "adam", "adamw", "sgd", "momentum" (torch.optim's defaults; ``lr`` overrides the
        default learning rate, ``schedule`` is "constant", "step", "cosine" or a schedule object) or an
        Optimizer; None carries on with ``self.optimizer`` (left by the last fit or a loaded checkpoint)
        when there is one and no lr/schedule is given, else starts Adam. validation_data: (X_val, y_val),
        evaluated after each epoch. patience: stop after that many epochs without a lower validation
        loss (training loss without validation_data) and restore the best weights. shuffle: a new
        order each epoch, drawn from default_rng(seed), seed defaulting to the network's seed.
        progress: a tqdm bar on stderr (None: on iff stderr is a terminal). callback(epoch, logs):
        called after each epoch (1-based) with that epoch's metrics.
        """
        return training.fit(self, X, y, epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr,
                            schedule=schedule, validation_data=validation_data, patience=patience,
                            shuffle=shuffle, seed=seed, progress=progress, callback=callback)

    def predict(self, X, chunk_size=training.DEFAULT_CHUNK):
        """Class labels (N,) for softmax cross-entropy, 0/1 (N, n_L) for sigmoid cross-entropy, outputs
        (N, n_L) for mse; arrays of the backend, computed chunk by chunk."""
        return training.predict(self, X, chunk_size)

    def predict_proba(self, X, chunk_size=training.DEFAULT_CHUNK):
        """The loss's output map of the logits (softmax, sigmoid or identity), (N, n_L) on the backend."""
        return training.predict_proba(self, X, chunk_size)

    def evaluate(self, X, y, chunk_size=training.DEFAULT_CHUNK) -> training.Evaluation:
        """(loss, accuracy) over X (N, n0) and y; accuracy is None for mse."""
        return training.evaluate(self, X, y, chunk_size)

    def save(self, path) -> None:
        """Writes the network and its optimizer state to ``path`` (.npz), atomically."""
        io.save(self, path)

    @classmethod
    def load(cls, path, backend="auto") -> MLP:
        """The network saved at ``path``, on ``backend``; CheckpointError if the file is not a valid checkpoint."""
        return io.load(cls, path, backend=backend)
