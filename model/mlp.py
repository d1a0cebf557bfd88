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
workspace per batch size and thread, so that ``train_step`` allocates nothing after its first call.

Threads: inference (``forward``, ``predict``, ``predict_proba``, ``evaluate``) may run on one network from
any number of threads at once: each thread has its own workspaces, and inference only reads the
parameters. Everything that writes the parameters, the gradients or the optimizer state (``train_step``,
``forward_backward``, ``backward``, ``loss_and_grads``, ``fit``, and ``save``, which reads them as one
snapshot) holds the network's training lock: training one network from two threads is serialised, call
by call (a whole ``fit`` is one call). Inference while another thread trains sees the parameters of
some step, possibly mid-update.
"""

from __future__ import annotations

import copy
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from math import isfinite
from typing import TYPE_CHECKING, Any

import numpy as np

from deltaprop.backend import get_backend, to_numpy
from deltaprop.backend.checks import check_label_range, check_shape
from deltaprop.kernels.activations import get_activation
from deltaprop.kernels.dtypes import floating, resolve_dtype
from deltaprop.kernels.layout import Layout
from deltaprop.model import io, training
from deltaprop.model.epoch_totals import non_finite_loss
from deltaprop.model.losses import get_loss
from deltaprop.model.optim import check_learning_rate, check_seed

if TYPE_CHECKING:
    from deltaprop.arrays import Array, ArrayInput, DTypeLike
    from deltaprop.backend import Backend
    from deltaprop.model.callbacks import Callback
    from deltaprop.model.optim import Optimizer

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
    def logits(self) -> Array:
        return self.z[-1]


class _Workspace:
    """Buffers for one batch size: z[l] and delta[l] (B, n_l) for every layer, a[l] for the hidden ones,
    views of one flat buffer ``work`` at the offsets of ``layout`` (what a backend's fused step reads)."""

    def __init__(self, backend, sizes, batch, dtype):
        self.batch = batch
        layout = Layout(sizes, batch)
        self.offsets = layout.offsets
        self.work = backend.empty(layout.work_size, dtype)
        self.z, self.a, self.delta = layout.z(self.work), layout.a(self.work), layout.delta(self.work)


def _finite(loss):
    """``loss``, or NonFiniteLossError when it is NaN or infinite."""
    if not isfinite(loss):
        raise non_finite_loss(loss)
    return loss


def _moved(backend, array):
    """A fresh copy of ``array`` (of any backend) on ``backend``, in its own (aligned) buffer."""
    out = backend.empty(array.shape, array.dtype)
    out[...] = array if isinstance(array, type(out)) else backend.asarray(to_numpy(array))
    return out


def _check_sizes(sizes):
    try:
        widths = [int(n) for n in sizes]
        ok = len(widths) >= 2 and all(w >= 1 and w == n for w, n in zip(widths, sizes))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"sizes: expected at least two positive integer widths like [784, 512, 10], got {sizes!r}")
    return widths


def network_spec(sizes, activation, loss, backend, dtype, seed):
    """(sizes, activation name, loss name, Backend, numpy dtype, seed), each checked or resolved: the
    arguments every network of this module family takes (MLP, MLPEnsemble)."""
    sizes = _check_sizes(sizes)
    activation, loss = get_activation(activation).name, get_loss(loss).name
    backend = get_backend(backend)
    return sizes, activation, loss, backend, resolve_dtype(dtype, backend.device), check_seed("seed", seed)


def initial_parameters(layout, activation, seed):
    """The flat float64 (P,) initial parameters of a network of ``layout``: He (ReLU family) or Xavier
    weights drawn from default_rng(seed) on the host, zero biases."""
    rng = np.random.default_rng(seed)
    flat = np.zeros(layout.n_params)
    scheme = get_activation(activation).init
    for W in layout.weights(flat):
        fan_out, fan_in = W.shape
        if scheme == "he":
            W[...] = rng.normal(0.0, math.sqrt(2.0 / fan_in), W.shape)
        else:
            limit = math.sqrt(6.0 / (fan_in + fan_out))
            W[...] = rng.uniform(-limit, limit, W.shape)
    return flat


class _ThreadWorkspaces(threading.local):
    """The calling thread's workspaces of one network: batch size -> _Workspace, least recently used first."""

    def __init__(self):
        self.by_batch: OrderedDict[int, _Workspace] = OrderedDict()
        self.recent = None  # the last one used: a step at the same batch size skips the LRU bookkeeping


class _ClassOnly(classmethod):
    """A classmethod that refuses to be called through an instance (where it would silently return a new
    object instead of changing the instance)."""

    def __get__(self, instance, owner=None):
        if instance is None:
            return super().__get__(instance, owner)
        name = self.__func__.__name__

        def refuse(*args, **kwargs):
            raise TypeError(f"{type(instance).__name__}.{name} makes a new network: call it on the class, "
                            f"net = {type(instance).__name__}.{name}(path), not on a network")
        return refuse


class MLP:
    """A multilayer perceptron trained by backpropagation on a deltaprop backend.

    sizes: layer widths [n0, n1, ..., nL] (input first); activation: a name of the activation table for
    the hidden layers; loss: "softmax_cross_entropy", "mse" or "sigmoid_cross_entropy"; backend: a name
    ("auto", "numpy", "numba", "cupy") or a Backend; dtype: "float32" or "float64" (float16/bfloat16
    on the GPU); seed: the initialisation (He for the ReLU family, Xavier otherwise) is drawn from
    numpy's default_rng(seed) in float64 on the host, so the same seed gives the same network on every
    backend.
    """

    def __init__(self, sizes: Sequence[int], activation: str = "relu", loss: str = "softmax_cross_entropy",
                 backend: str | Backend | None = "auto", dtype: DTypeLike = "float32", seed: int = 0) -> None:
        self.sizes, self.activation, self.loss, self.backend, self.dtype, self.seed = network_spec(
            sizes, activation, loss, backend, dtype, seed)
        try:  # sizes whose offsets overflow int64 fail in the layout, others in the allocation
            self._layout = self._param_layout(self.sizes)
            self.params = self.backend.empty(self.n_params, self.dtype)  # aligned, where the backend aligns
            self.grads = self.backend.zeros(self.params.shape, self.dtype)
        except (MemoryError, ValueError, OverflowError) as e:
            n_params = Layout.parameter_count(self.sizes)
            gib = 2 * n_params * self.dtype.itemsize / 2**30
            raise MemoryError(f"sizes: {self.sizes} need {n_params} parameters ({gib:.3g} GiB with the "
                              f"gradients), more than can be allocated here ({e})") from None
        self.params[...] = self.backend.asarray(self._initial_params(), self.dtype)
        self.weights, self.biases = self._views(self.params)
        self.grad_weights, self.grad_biases = self._views(self.grads)
        self._threads = _ThreadWorkspaces()
        self._training = threading.RLock()  # held by whatever writes params, grads or the optimizer state
        # the last learning rate, and it as a scalar of the dtype; NaN equals no lr, so the first one is checked
        self._lr: float = math.nan
        self._lr_scalar: np.floating | None = None
        self.optimizer = None  # the Optimizer of the last fit (or of a loaded checkpoint), with its state
        self.classes: np.ndarray | None = None  # labels of outputs 0..n_L-1, kept by save/load (None: the indices)

    # ---- layout and initialisation ----

    @staticmethod
    def _param_layout(sizes):
        """The network's Layout: where W[l] and b[l] live in the flat buffer."""
        return Layout(sizes)

    @property
    def n_params(self) -> int:
        return self._layout.n_params

    @property
    def depth(self) -> int:
        """L, the number of layers with weights."""
        return len(self.sizes) - 1

    def _views(self, flat):
        return self._layout.weights(flat), self._layout.biases(flat)

    def _initial_params(self):
        return initial_parameters(self._layout, self.activation, self.seed)

    # ---- copies: copy.copy, copy.deepcopy, pickle and ``to`` all make an independent network ----

    # attributes made anew in every copy: the per-thread workspaces, the lock, the views and the backend's
    # compiled steps (cached_property), which belong to one buffer and one process
    _NOT_COPIED = ("_threads", "_training", "weights", "biases", "grad_weights", "grad_biases", "_fused_step",
                   "_fused_grads_step")

    def __getstate__(self):
        """What pickle keeps: the buffers as arrays of the backend, the backend by name (so that a network
        unpickles on the same backend in another process), the optimizer without its binding."""
        state = {key: value for key, value in self.__dict__.items() if key not in self._NOT_COPIED}
        state["backend"] = self.backend.name
        if self.optimizer is not None:
            optimizer = state["optimizer"] = copy.copy(self.optimizer)
            optimizer.backend, optimizer.state, optimizer.hyper = None, dict(optimizer.state), dict(optimizer.hyper)
        return state

    def __setstate__(self, state):
        """Rebuilds a network from ``__getstate__``'s dict (arrays of any backend): the buffers are copied
        into fresh ones of the network's backend, so that the views view this network's own buffers."""
        self.__dict__.update(state)
        backend = self.backend = get_backend(state["backend"])
        self.dtype = resolve_dtype(self.dtype, backend.device)
        self.params, self.grads = _moved(backend, state["params"]), _moved(backend, state["grads"])
        self.weights, self.biases = self._views(self.params)
        self.grad_weights, self.grad_biases = self._views(self.grads)
        self._threads = _ThreadWorkspaces()
        self._training = threading.RLock()
        if self.optimizer is not None:
            self.optimizer.state = {key: _moved(backend, value) for key, value in self.optimizer.state.items()}
            self.optimizer.bind(backend, self.params)

    def to(self, backend: str | Backend) -> MLP:
        """A copy of the network (parameters, gradients, optimizer state) on ``backend``; the original is
        left as it was. ValueError when the backend cannot hold the network's dtype."""
        with self._training:  # one snapshot of parameters and optimizer state
            state = self.__getstate__()
        state["backend"] = get_backend(backend).name
        network = object.__new__(type(self))
        network.__setstate__(state)
        return network

    def __copy__(self) -> MLP:
        """A copy that trains independently (its own buffers): a shallow copy sharing ``params`` would
        change the original on every step."""
        return self.to(self.backend)

    def __deepcopy__(self, memo) -> MLP:
        return self.to(self.backend)

    def __repr__(self):
        return (f"MLP({self.sizes}, activation={self.activation!r}, loss={self.loss!r}, "
                f"backend={self.backend.name!r}, dtype={self.dtype.name!r})")

    # ---- workspaces: one set per thread ----

    def _workspace(self, batch):
        """The calling thread's workspace for ``batch`` rows (made on first use; the least recently used
        of more than _WORKSPACES_KEPT is dropped)."""
        mine = self._threads
        workspace = mine.recent
        if workspace is not None and workspace.batch == batch:
            return workspace
        workspace = mine.by_batch.get(batch)
        if workspace is None:
            workspace = mine.by_batch[batch] = _Workspace(self.backend, self.sizes, batch, self.dtype)
            if len(mine.by_batch) > _WORKSPACES_KEPT:
                mine.by_batch.popitem(last=False)
        else:
            mine.by_batch.move_to_end(batch)
        mine.recent = workspace
        return workspace

    # ---- inputs ----

    def as_inputs(self, x: ArrayInput) -> Array:
        """x as a (B, n0) array of the network's dtype on its backend (converted once when it is not);
        ValueError for another shape or an empty batch."""
        x = self.backend.asarray(x, self.dtype)
        if x.ndim != 2 or x.shape[1] != self.sizes[0]:
            raise ValueError(f"x: expected shape (batch, {self.sizes[0]}), got {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError(f"x: expected a non-empty batch, got shape {tuple(x.shape)}")
        return x

    def as_targets(self, y: ArrayInput, batch: int) -> Array:
        """y as int64 labels (B,) or a (B, n_L) target matrix of the network's dtype, on the backend;
        TypeError/ValueError for another kind or number of rows (label range is the loss kernels' check)."""
        y = self.backend.asarray(y)
        if y.ndim == 1 and y.dtype.kind in "iu":
            y = self.backend.asarray(y, np.int64)
        elif y.ndim == 2 and (floating(y.dtype) or y.dtype.kind in "fiub"):  # bfloat16's kind is V
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

    def forward(self, x: ArrayInput) -> ForwardCache:
        """Runs the layers on x (B, n0); returns the ForwardCache of z[l] and a[l] (logits = z[L]), in the
        calling thread's workspace: valid until this thread's next forward pass at this batch size."""
        return self._forward(self.as_inputs(x))

    def _forward(self, x):
        backend, workspace = self.backend, self._workspace(x.shape[0])
        inputs = [x]  # a[l-1] of each layer: a[l] is z[l] itself for the identity activation
        for l, (W, b, z) in enumerate(zip(self.weights, self.biases, workspace.z)):
            backend.gemm(inputs[-1], W, out=z, trans_b=True)  # z = a @ W.T
            if l < self.depth - 1:
                # z += b; a = act(z)
                inputs.append(backend.bias_act(z, b, self.activation, z_out=z, a_out=workspace.a[l])[1])
            else:
                backend.bias_act(z, b, "identity", z_out=z, a_out=z)  # the logits; the loss applies the output map
        return ForwardCache(a=inputs, z=workspace.z)

    def backward(self, cache: ForwardCache, y: ArrayInput) -> float:
        """From a forward pass's cache and the targets, writes dJ/dW and dJ/db into ``self.grads``
        (views: ``grad_weights``, ``grad_biases``); returns the mean loss over the batch."""
        x = cache.a[0]
        y = self.as_targets(y, x.shape[0])
        with self._training:
            return self._backward(cache, y)

    def _backward(self, cache, y, read=True):
        """Loss and gradients of a forward pass; returns the mean loss, checked and read as a float
        before the gradients are written (``read``), else as ``Backend.device_loss`` leaves it, unread."""
        backend, workspace = self.backend, self._workspace(cache.a[0].shape[0])
        loss = backend.device_loss(get_loss(self.loss).kernel, cache.logits, y, delta_out=workspace.delta[-1])
        if read:
            loss = self._read_loss(loss, y)
        for l in reversed(range(self.depth)):
            delta = workspace.delta[l]
            backend.gemm(delta, cache.a[l], out=self.grad_weights[l], trans_a=True)  # dW = delta.T @ a[l-1]
            backend.bias_grad(delta, out=self.grad_biases[l])  # db = column sums of delta
            if l > 0:
                backend.gemm(delta, self.weights[l], out=workspace.delta[l - 1])  # delta @ W[l]
                backend.act_backward(workspace.delta[l - 1], cache.z[l - 1], self.activation,
                                     out=workspace.delta[l - 1])
        return loss

    def _read_loss(self, loss, y):
        """A mean loss (a float or a device's 0-d array) as a float; for a NaN, the loss kernels' error
        when a label is outside [0, C), else NonFiniteLossError."""
        value = float(loss)
        if not isfinite(value) and y.ndim == 1:
            check_label_range(get_loss(self.loss).kernel, y, self.sizes[-1], self.backend.xp)
        return _finite(value)

    def loss_and_grads(self, x: ArrayInput, y: ArrayInput) -> tuple[float, list[tuple[Array, Array]]]:
        """The mean loss and [(dW[l], db[l])] for l = 1..L, fresh arrays shaped like W[l] and b[l]."""
        with self._training:
            loss = self.forward_backward(x, y)[0]
            return loss, [(dW.copy(), db.copy()) for dW, db in zip(self.grad_weights, self.grad_biases)]

    def forward_backward(self, x: ArrayInput, y: ArrayInput, step_batch: int | None = None) -> tuple[float, Array]:
        """Forward, loss and backward of x (B, n0) and y (labels (B,) or targets (B, n_L)) into ``grads``
        (the flat (P,) buffer; views ``grad_weights``, ``grad_biases``), without an update.

        Returns (mean loss, logits (B, n_L) in the calling thread's workspace). One compiled call where
        the backend has a fused gradients step (and ``use_fused_step``), else the kernel-by-kernel loop.
        step_batch: run the fused step compiled for batches of that size (default B), as ``fit`` does for
        its last, smaller batch, so that an epoch compiles and runs one step. Raises the loss kernels'
        error for a label outside [0, C) and NonFiniteLossError for a NaN or infinite loss, ``grads`` left
        as it was in both cases.
        """
        steps = self._fused_grads_step if self.use_fused_step else None
        with self._training:
            if steps is None:  # checks the loss before it writes the gradients
                x = self.as_inputs(x)
                y = self.as_targets(y, x.shape[0])
                cache = self._forward(x)
                return self._backward(cache, y), cache.logits
            x, y = self._fused_inputs(x, y, "loss_and_grads")
            loss, logits = self._gradients(x, y, step_batch)
            return self._read_loss(loss, y), logits

    def _gradients(self, x, y, step_batch=None):
        """forward_backward of x and y as ``as_inputs`` and ``as_targets`` return them, for ``fit``:
        returns (mean loss, logits) with the loss unread, as ``Backend.device_loss`` leaves it (a float
        on the CPU, a 0-d array on a GPU), for the caller to check; ``grads`` may hold the gradients of a
        non-finite loss. The caller holds the training lock."""
        steps = self._fused_grads_step if self.use_fused_step else None
        if steps is None:
            cache = self._forward(x)
            return self._backward(cache, y, read=False), cache.logits
        workspace = self._workspace(len(x))
        total, bad_row = steps[step_batch or len(x)](x, y, self.params, self.grads, workspace.work, workspace.offsets)
        return self._fused_mean(total, bad_row, y), workspace.z[-1]

    # train_step runs the backend's fused step where it has one; False forces the kernel-by-kernel loop
    use_fused_step = True

    def train_step(self, x: ArrayInput, y: ArrayInput, lr: float = 0.01) -> float:
        """Forward, loss, backward and a plain SGD update (params -= lr * grads) in one call.

        lr: a finite real number > 0 (ValueError otherwise, nothing changed). Returns the mean loss before
        the update. Raises NonFiniteLossError, leaving the parameters untouched, if the loss is NaN or
        infinite. Allocation-free after the first call at a batch size. The fused step of a backend that
        has one never stores the gradients: ``grads`` is left as it was.
        """
        steps = self._fused_step if self.use_fused_step else None
        if steps is None:
            x = self.as_inputs(x)
            y = self.as_targets(y, x.shape[0])
            lr = check_learning_rate("train_step: lr", lr)
            with self._training:
                loss = self._backward(self._forward(x), y)
                self.backend.sgd_update(self.params, self.grads, lr)
                return loss
        # The fast path: Python around the compiled step is kept to a few attribute lookups.
        if not self._ready(x, y):
            x, y = self._fused_inputs(x, y, "train_step")
        lock = self._training  # acquire/release: cheaper than a with-block
        lock.acquire()
        try:
            if lr != self._lr:  # checked and made a scalar of the dtype only when it changes (NaN always does)
                self._lr_scalar = self.dtype.type(check_learning_rate("train_step: lr", lr))
                self._lr = lr
            batch = len(x)
            workspace = self._threads.recent  # _workspace's own first check, without the call
            if workspace is None or workspace.batch != batch:
                workspace = self._workspace(batch)
            total, bad_row = steps[batch](x, y, self.params, workspace.work, workspace.offsets, self._lr_scalar)
        finally:
            lock.release()
        if bad_row < 0:
            loss = total / batch
            if isfinite(loss):
                return loss
        return self._read_loss(self._fused_mean(total, bad_row, y), y)

    def _fused_inputs(self, x, y, caller):
        """x and y as a fused step takes them: as they are when already in that form (the fast path),
        else converted and checked once."""
        if self._ready(x, y):
            return x, y
        x = self.as_inputs(x)
        y = self.as_targets(y, x.shape[0])
        if y.ndim == 2:
            check_shape(caller, "targets", y, (x.shape[0], self.sizes[-1]))
        return x, y

    def _fused_mean(self, total, bad_row, y):
        """The mean loss from a fused step's summed loss and bad row, unread; raises the loss kernels'
        error for a bad row."""
        if bad_row >= 0:  # the step found a label outside [0, C) and changed nothing
            check_label_range(get_loss(self.loss).kernel, y, self.sizes[-1])  # the message every backend gives
        return total / y.shape[0]

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

    # ---- PyTorch interchange ----

    def _torch_keys(self):
        """(layer l, key of W[l], key of b[l]): a torch.nn.Sequential alternating Linear and activation
        modules numbers its Linear layers 0, 2, 4, ... (the activations take the odd indices)."""
        return [(l, f"{2 * l}.weight", f"{2 * l}.bias") for l in range(self.depth)]

    def state_dict(self) -> dict[str, Array]:
        """The parameters in torch.nn.Linear layout, keyed as torch.nn.Sequential(Linear, act, Linear, ...,
        Linear) names them: "0.weight" W[1] (n1, n0), "0.bias" b[1] (n1,), "2.weight" W[2] (n2, n1), ...,
        the last Linear's key 2 * (L - 1) (no activation after it: the loss applies the output map).
        The values are views of ``params`` on the network's backend (as torch's state_dict shares
        storage); torch takes them without a copy: ``{k: torch.from_dlpack(v) for k, v in ...items()}``."""
        state = {}
        for l, weight_key, bias_key in self._torch_keys():
            state[weight_key], state[bias_key] = self.weights[l], self.biases[l]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Copies the parameters from a ``state_dict`` of the same keys and shapes (a torch.nn.Sequential's,
        tensors or any arrays; torch tensors without ``requires_grad`` come in through DLPack), converted
        to the network's dtype. Every key is checked (missing, unexpected, shape, finite) before anything
        changes: a ValueError names the first problem."""
        if not hasattr(state_dict, "keys"):
            raise TypeError(f"state_dict: expected a mapping of parameter names to arrays, got {type(state_dict).__name__}")
        keys = self._torch_keys()
        expected = [key for _, weight_key, bias_key in keys for key in (weight_key, bias_key)]
        missing = [key for key in expected if key not in state_dict]
        unexpected = sorted(set(state_dict.keys()) - set(expected))
        if missing or unexpected:
            raise ValueError(f"state_dict: expected the keys {expected} of a {self.depth}-layer network, "
                             f"got {len(missing)} missing {missing} and {len(unexpected)} unexpected {unexpected}")
        arrays = {}
        for l, weight_key, bias_key in keys:
            for key, target in ((weight_key, self.weights[l]), (bias_key, self.biases[l])):
                array = self.backend.asarray(state_dict[key], self.dtype)
                if tuple(array.shape) != tuple(target.shape):
                    raise ValueError(f"state_dict: {key}: expected shape {tuple(target.shape)}, got {tuple(array.shape)}")
                if not bool(self.backend.xp.isfinite(array).all()):
                    raise ValueError(f"state_dict: {key}: expected finite values, got NaN or inf")
                arrays[key] = array
        with self._training:
            for l, weight_key, bias_key in keys:
                self.weights[l][...] = arrays[weight_key]
                self.biases[l][...] = arrays[bias_key]

    # ---- training, inference and checkpoints (model/training.py, model/io.py) ----

    def fit(self, X: ArrayInput, y: ArrayInput, epochs: int = 10, batch_size: int = 32,
            optimizer: str | Optimizer | None = None, lr: float | None = None, schedule: Any = None,
            validation_data: tuple[ArrayInput, ArrayInput] | None = None, patience: int | None = None,
            shuffle: bool = True, seed: int | None = None, progress: bool | None = None,
            callback: Callable[[int, dict[str, float]], object] | None = None,
            callbacks: Sequence[Callback] | None = None, comm: Any = None) -> training.History:
        """Trains on X (N, n0) and y (int labels (N,) or targets (N, n_L)) by minibatches; returns a History.

        optimizer: "adam", "adamw", "sgd", "momentum" (torch.optim's defaults; ``lr`` overrides the
        default learning rate, ``schedule`` is "constant", "step", "cosine", "one_cycle", a schedule
        object or a function of the update index giving the factor of ``lr``) or an Optimizer (e.g.
        ``Adam(lr=1e-3, betas=(0.9, 0.99), max_grad_norm=1.0)``); None carries on with ``self.optimizer``
        (left by the last fit or a loaded checkpoint) when there is one and no lr/schedule is given,
        else starts Adam. validation_data: (X_val, y_val), evaluated after each epoch. patience: stop
        after that many epochs without a lower validation loss (training loss without validation_data)
        and restore the best weights (an ``EarlyStopping(patience)`` callback). shuffle: a new order
        each epoch, drawn from default_rng(seed), seed defaulting to the network's seed. progress: a
        tqdm bar on stderr (None: on in a terminal or a notebook). callback(epoch, logs): called after
        each epoch (1-based) with that epoch's metrics. callbacks: ``deltaprop.model.callbacks.Callback``
        instances (EarlyStopping, TimeBudget, NaNGuard or your own) with per-batch and per-epoch hooks
        that see a TrainingState and can stop training. comm: an mpi4py communicator
        (``MPI.COMM_WORLD``) or a ``deltaprop.distributed.DataParallel``: data parallel over its ranks,
        the same losses as one process with the same global batch; only rank 0 draws progress.

        The History holds per epoch the training loss and accuracy, the validation loss and accuracy,
        the wall seconds and the learning rate of the last update.

        Non-finite values in X, y or validation_data are refused before training, naming the rows. On a
        NaN or infinite loss (training diverged) raises NonFiniteLossError naming the epoch and batch,
        with ``err.history`` (the epochs completed) and ``err.restored_epoch`` (the epoch whose weights
        early stopping restored, or None: then the parameters and optimizer state are those of the last
        update before the failing batch; on a GPU, whose losses are read once per epoch, those of the
        failing epoch's last update). On a GPU the optimizer state is that of the failing epoch's last
        update in both cases, likely not finite: give the next fit a new optimizer, or fit with the NaNGuard
        callback, which puts back both as they were at the end of the last finished epoch.
        """
        with self._training:
            return training.fit(self, X, y, epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr,
                                schedule=schedule, validation_data=validation_data, patience=patience,
                                shuffle=shuffle, seed=seed, progress=progress, callback=callback,
                                callbacks=callbacks, comm=comm)

    def predict(self, X: ArrayInput, chunk_size: int = training.DEFAULT_CHUNK) -> Array:
        """Class labels (N,) for softmax cross-entropy, 0/1 (N, n_L) for sigmoid cross-entropy, outputs
        (N, n_L) for mse; arrays of the backend, computed chunk by chunk. A row of X that is not finite (or
        whose logits overflow) is refused with a ValueError naming the first such rows."""
        return training.predict(self, X, chunk_size)

    def predict_proba(self, X: ArrayInput, chunk_size: int = training.DEFAULT_CHUNK) -> Array:
        """The loss's output map of the logits (softmax, sigmoid or identity), (N, n_L) on the backend."""
        return training.predict_proba(self, X, chunk_size)

    def evaluate(self, X: ArrayInput, y: ArrayInput, chunk_size: int = training.DEFAULT_CHUNK) -> training.Evaluation:
        """(loss, accuracy) over X (N, n0) and y; accuracy is None for mse. Non-finite rows of X or y are
        refused as in ``predict``."""
        return training.evaluate(self, X, y, chunk_size)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes the network and its optimizer state to ``path`` (.npz), atomically: a crash leaves the old
        file or the new one. ValueError (nothing written) for what ``load`` would refuse: non-finite
        parameters or state, a custom schedule object."""
        with self._training:  # one snapshot of parameters and optimizer state
            io.save(self, path)

    @_ClassOnly
    def load(cls: type[MLP], path: str | os.PathLike[str], backend: str | Backend | None = "auto") -> MLP:
        """The network saved at ``path``, on ``backend``: ``net = MLP.load(path)``, a new network (called on
        a network, a TypeError). CheckpointError if the file is not a valid checkpoint."""
        return io.load(cls, path, backend=backend)
