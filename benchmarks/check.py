"""The parity check behind `deltaprop check`: every kernel and a whole training step against the reference.

Random inputs (never zeros) in each dtype the backend computes in; each row of the table is the
norm-wise relative error of the backend's result against kernels/reference.py computed in float64
from the same inputs, and passes when it is within the dtype's tolerance. This is the parity check
between backends that users run on their own machine (the command is deltaprop.cli.check).
"""

from __future__ import annotations

import numpy as np

from deltaprop.kernels import reference
from deltaprop.kernels.activations import ACTIVATIONS
from deltaprop.kernels.dtypes import accumulation_dtype, tolerance

BATCH, WIDTH, CLASSES = 37, 65, 10


def rel_err(actual, expected) -> float:
    """``reference.relative_error`` of ``actual``, which may live on the backend's device."""
    from deltaprop.backend import to_numpy

    return reference.relative_error(to_numpy(actual), expected)


class _Inputs:
    """Random host arrays in ``dtype`` and their copies on the backend."""

    def __init__(self, backend, dtype, seed):
        self.backend, self.dtype = backend, dtype
        self.rng = np.random.default_rng(seed)

    def pair(self, *shape, low=None, state=False):
        """``state``: an optimizer state buffer, in the accumulation dtype (float32 for the 16-bit types)."""
        host = (self.rng.uniform(low, 1.0, shape) if low is not None else self.rng.standard_normal(shape))
        host = host.astype(accumulation_dtype(self.dtype) if state else self.dtype)
        return host, self.device(host)

    def device(self, host):
        """A copy of ``host`` on the backend (a copy on the NumPy backend too, so kernels never touch ``host``)."""
        return self.backend.asarray(host.copy())

    def labels(self, batch=BATCH, classes=CLASSES):
        host = self.rng.integers(0, classes, batch)
        return host, self.device(host)


def _gemm_cases(backend, data):
    a, a_d = data.pair(BATCH, WIDTH)
    b, b_d = data.pair(WIDTH, CLASSES)
    c, c_d = data.pair(BATCH, CLASSES)
    s, s_d = data.pair(3, BATCH, WIDTH)
    t, t_d = data.pair(3, CLASSES, WIDTH)
    yield "gemm", backend.gemm(a_d, b_d), reference.gemm(a, b)
    yield "gemm trans_a", backend.gemm(a_d, c_d, trans_a=True), reference.gemm(a, c, trans_a=True)
    yield "gemm trans_b", backend.gemm(c_d, b_d, trans_b=True), reference.gemm(c, b, trans_b=True)
    yield ("gemm alpha, beta", backend.gemm(a_d, b_d, out=c_d.copy(), alpha=0.5, beta=-2.0),
           reference.gemm(a, b, c, alpha=0.5, beta=-2.0))
    yield "gemm batched", backend.gemm(s_d, t_d, trans_b=True), reference.gemm(s, t, trans_b=True)


def _elementwise_cases(backend, data):
    acc, acc_d = data.pair(BATCH, WIDTH)
    b, b_d = data.pair(WIDTH)
    g, g_d = data.pair(BATCH, WIDTH)
    for act in ACTIVATIONS:
        z_ref, a_ref = reference.bias_act(acc, b, act)
        z_d, a_d = backend.bias_act(acc_d, b_d, act)
        yield f"bias_act {act} (z)", z_d, z_ref
        yield f"bias_act {act} (a)", a_d, a_ref
        yield f"act_backward {act}", backend.act_backward(g_d, acc_d, act), reference.act_backward(g, acc, act)
    yield "bias_grad", backend.bias_grad(g_d), reference.bias_grad(g)
    yield "softmax", backend.softmax(acc_d), reference.softmax(acc)


def _loss_cases(backend, data):
    z, z_d = data.pair(BATCH, CLASSES)
    labels, labels_d = data.labels()
    probs = reference.softmax(data.rng.standard_normal((BATCH, CLASSES))).astype(data.dtype)
    targets, targets_d = data.pair(BATCH, CLASSES, low=0.0)
    kernels = {"softmax_xent": reference.softmax_xent, "sigmoid_xent": reference.sigmoid_xent,
               "squared_error": reference.mse}
    for kernel, ref in kernels.items():
        for kind, host, device in (("labels", labels, labels_d), ("targets", targets, targets_d)):
            if kernel == "softmax_xent" and kind == "targets":
                host, device = probs, data.device(probs)
            delta = backend.empty(z_d.shape, z_d.dtype)
            loss = getattr(backend, kernel)(z_d, device, delta_out=delta)
            ref_loss, ref_delta = ref(z, host)
            yield f"{kernel} {kind} (loss)", np.float64(float(loss)), ref_loss
            yield f"{kernel} {kind} (delta)", delta, ref_delta


def _update_cases(backend, data):
    size = 1000
    p, p_d = data.pair(size)
    g, g_d = data.pair(size)
    v, v_d = data.pair(size, state=True)
    m, m_d = data.pair(size, state=True)
    s, s_d = data.pair(size, low=0.0, state=True)
    backend.sgd_update(p_d, g_d, 0.1, weight_decay=0.01)
    yield "sgd_update", p_d, reference.sgd_update(p, g, 0.1, weight_decay=0.01)
    p_d = data.device(p)
    backend.momentum_update(p_d, g_d, v_d, 0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    ref_p, ref_v = reference.momentum_update(p, g, v, 0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    yield "momentum_update (params)", p_d, ref_p
    yield "momentum_update (velocity)", v_d, ref_v
    p_d = data.device(p)
    backend.adam_update(p_d, g_d, m_d, s_d, 3, lr=0.01, weight_decay=0.01, decoupled=True)
    ref_p, ref_m, ref_s = reference.adam_update(p, g, m, s, 3, lr=0.01, weight_decay=0.01, decoupled=True)
    yield "adamw_update (params)", p_d, ref_p
    yield "adamw_update (m, v)", backend.xp.concatenate([m_d, s_d]), np.concatenate([ref_m, ref_s])


def _step_cases(backend, data):
    from deltaprop.model import MLP

    net = MLP([WIDTH, 48, 32, CLASSES], activation="relu", backend=backend, dtype=data.dtype,
              seed=data.rng.integers(1000))
    weights = [backend.to_numpy(W).copy() for W in net.weights]
    biases = [backend.to_numpy(b).copy() for b in net.biases]
    batches = [(data.pair(BATCH, WIDTH)[0], data.labels()[0]) for _ in range(3)]
    losses = [net.train_step(x, y, lr=0.05) for x, y in batches]
    ref_w, ref_b, ref_losses = reference.sgd_steps(weights, biases, batches, "relu", "softmax_cross_entropy", 0.05)
    yield "train_step x3 (losses)", np.array(losses), np.array(ref_losses)
    expected = np.concatenate([np.concatenate([W.ravel(), b]) for W, b in zip(ref_w, ref_b)])
    yield "train_step x3 (params)", net.params, expected


CASES = (_gemm_cases, _elementwise_cases, _loss_cases, _update_cases, _step_cases)


def check_backend(backend, dtype, seed=0):
    """[(backend, dtype, what, relative error, tolerance, passed)] for every case on one backend and dtype."""
    rows = []
    data = _Inputs(backend, dtype, seed)
    for cases in CASES:
        for what, actual, expected in cases(backend, data):
            tol = tolerance(dtype)
            err = rel_err(actual, expected)
            rows.append((backend.name, dtype, what, err, tol, bool(err <= tol)))
    return rows
