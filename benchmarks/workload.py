"""What the benchmarks run: the network presets, the FLOPs of a step, the inputs, and the kernel calls of a step.

Every workload is a ReLU MLP trained with softmax cross-entropy and plain SGD (``MLP.train_step``), the
same on our backends and on the peers (PyTorch, JAX).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np

# preset name -> layer widths [n0, ..., nL]; every preset is a ReLU network
PRESETS: dict[str, tuple[int, ...]] = {
    "mlp": (784, 1024, 1024, 10),
    "small": (64, 128, 128, 10),
}
ACTIVATION = "relu"
LOSS = "softmax_cross_entropy"
LEARNING_RATE = 1e-3
SEED = 0

FLOPS_FORMULA = "2*B*(3*sum(n_l*n_{l-1}) - n_0*n_1)"


def step_flops(sizes, batch: int) -> int:
    """The FLOPs one training step needs: 2·B·(3·Σ n_l·n_{l-1} − n_0·n_1).

    Per layer, three GEMMs of 2·B·n_l·n_{l-1} FLOPs each (forward, dW, delta of the layer below), less
    the first layer's delta GEMM: the input gets no gradient. Elementwise work is not counted.
    """
    weights = sum(n_in * n_out for n_in, n_out in zip(sizes[:-1], sizes[1:]))
    return 2 * batch * (3 * weights - sizes[0] * sizes[1])


def host_batch(sizes, batch: int, dtype):
    """Random inputs x (B, n0) in ``dtype`` and int64 labels y (B,) in [0, nL), on the host; one per batch size."""
    rng = np.random.default_rng([SEED, batch])
    x = rng.standard_normal((batch, sizes[0])).astype(dtype)
    y = rng.integers(0, sizes[-1], batch, dtype=np.int64)
    return x, y


@dataclass(frozen=True)
class KernelCall:
    """One kernel call of a training step, ready to run alone.

    kernel: the Backend method; role: what the call does in the step ("forward", "weight grad",
    "input grad", "loss", "update"); layer: l (1..L), or None for the update; shape: the shape of the
    result; flops: 2·m·n·k for a GEMM, None for elementwise kernels; run: a zero-argument callable.
    """

    kernel: str
    role: str
    layer: int | None
    shape: tuple[int, ...]
    flops: int | None
    run: object

    @property
    def label(self) -> str:
        """The call's name, "kernel role Ll": the same at any batch size and on any backend."""
        return f"{self.kernel} {self.role}" + (f" L{self.layer}" if self.layer is not None else "")


_ROLES = {"bias_act": "forward", "softmax_xent": "loss", "squared_error": "loss", "sigmoid_xent": "loss",
          "bias_grad": "weight grad", "act_backward": "input grad", "sgd_update": "update"}  # gemm: by its flags


class _RecordingBackend:
    """Stands in for a backend: forwards everything to it, and records each kernel call as (name, args, kwargs)."""

    def __init__(self, backend):
        self._backend, self.calls = backend, []

    def __getattr__(self, name):
        method = getattr(self._backend, name)
        if name == "device_loss":  # the model's loss call: recorded as the loss kernel it runs
            def loss(kernel, *args, **kwargs):
                self.calls.append((kernel, args, kwargs))
                return method(kernel, *args, **kwargs)
            return loss
        if name != "gemm" and name not in _ROLES:
            return method

        def recorded(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            return method(*args, **kwargs)
        return recorded


def _kernel_call(net, name, args, kwargs, previous):
    """The KernelCall of one recorded call of ``net``'s step; ``previous``: the KernelCall before it."""
    out = kwargs.get("out")
    if name == "gemm":
        a, b = args
        if kwargs.get("trans_b"):
            role, layer = "forward", _index(net.weights, b) + 1
        elif kwargs.get("trans_a"):
            role, layer = "weight grad", _index(net.grad_weights, out) + 1
        else:
            role, layer = "input grad", _index(net.weights, b) + 1
        inner = a.shape[0] if kwargs.get("trans_a") else a.shape[1]
        shape, flops = tuple(out.shape), 2 * out.shape[0] * out.shape[1] * inner
    else:
        role = _ROLES[name]
        layer = {"forward": lambda: _index(net.biases, args[1]) + 1, "loss": lambda: net.depth,
                 "weight grad": lambda: _index(net.grad_biases, out) + 1,
                 "input grad": lambda: previous.layer - 1, "update": lambda: None}[role]()
        shape, flops = tuple((out if out is not None else args[0]).shape), None
    return KernelCall(name, role, layer, shape, flops, partial(getattr(net.backend, name), *args, **kwargs))


def _index(arrays, array):
    return next(i for i, candidate in enumerate(arrays) if candidate is array)


def kernel_calls(net, x, y) -> list[KernelCall]:
    """The kernel calls of one ``net.train_step(x, y)`` (its kernel-by-kernel loop), in order.

    x: (B, n0) and y: (B,) on the net's backend. The calls are those the model makes, recorded from one
    step of a twin of ``net`` (same sizes, activation, loss, backend, dtype and parameters, its own
    buffers): each call writes where the step writes (the twin's forward cache, gradients and deltas),
    so that any call may run alone any number of times.
    """
    twin = type(net)(net.sizes, activation=net.activation, loss=net.loss, backend=net.backend, dtype=net.dtype)
    twin.params[...] = net.params
    twin.use_fused_step = False
    recorder = twin.backend = _RecordingBackend(net.backend)
    twin.train_step(x, y, LEARNING_RATE)
    twin.backend = net.backend
    calls = []
    for name, args, kwargs in recorder.calls:
        calls.append(_kernel_call(twin, name, args, kwargs, calls[-1] if calls else None))
    return calls
