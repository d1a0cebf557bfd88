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


def kernel_calls(net, x, y) -> list[KernelCall]:
    """The kernel calls of one ``net.train_step(x, y)``, in order, on the net's own buffers.

    x: (B, n0) and y: (B,) on the net's backend. Each call writes where the step writes (the forward
    cache, the gradient buffers, delta buffers filled with random values), so that any call may run
    alone any number of times.
    """
    be, sizes, batch = net.backend, net.sizes, x.shape[0]
    cache = net.forward(x)
    rng = np.random.default_rng(SEED)
    delta = [be.asarray(rng.standard_normal((batch, n)), net.dtype) for n in sizes[1:]]
    calls = []
    for l in range(net.depth):
        n_in, n_out, last = sizes[l], sizes[l + 1], l == net.depth - 1
        act = "identity" if last else net.activation
        a_out = cache.z[l] if last else cache.a[l + 1]
        calls += [
            KernelCall("gemm", "forward", l + 1, (batch, n_out), 2 * batch * n_in * n_out,
                       partial(be.gemm, cache.a[l], net.weights[l], out=cache.z[l], trans_b=True)),
            KernelCall("bias_act", "forward", l + 1, (batch, n_out), None,
                       partial(be.bias_act, cache.z[l], net.biases[l], act, z_out=cache.z[l], a_out=a_out)),
        ]
    calls.append(KernelCall("softmax_xent", "loss", net.depth, (batch, sizes[-1]), None,
                            partial(be.softmax_xent, cache.logits, y, delta_out=delta[-1])))
    for l in reversed(range(net.depth)):
        n_in, n_out = sizes[l], sizes[l + 1]
        calls += [
            KernelCall("gemm", "weight grad", l + 1, (n_out, n_in), 2 * batch * n_in * n_out,
                       partial(be.gemm, delta[l], cache.a[l], out=net.grad_weights[l], trans_a=True)),
            KernelCall("bias_grad", "weight grad", l + 1, (n_out,), None,
                       partial(be.bias_grad, delta[l], out=net.grad_biases[l])),
        ]
        if l > 0:
            calls += [
                KernelCall("gemm", "input grad", l + 1, (batch, n_in), 2 * batch * n_in * n_out,
                           partial(be.gemm, delta[l], net.weights[l], out=delta[l - 1])),
                KernelCall("act_backward", "input grad", l, (batch, n_in), None,
                           partial(be.act_backward, delta[l - 1], cache.z[l - 1], net.activation,
                                   out=delta[l - 1])),
            ]
    calls.append(KernelCall("sgd_update", "update", None, (net.n_params,), None,
                            partial(be.sgd_update, net.params, net.grads, LEARNING_RATE)))
    return calls
