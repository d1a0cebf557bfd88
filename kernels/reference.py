"""The reference: the backpropagation equations in NumPy, line by line, in float64.

Samples are rows. For a batch of B samples, a[0] = x has shape (B, n0); layer l has W[l] of shape
(n_l, n_{l-1}) and b[l] of shape (n_l,):

    z[l] = a[l-1] @ W[l].T + b[l]          a[l] = act(z[l])        (l = 1..L-1)
    z[L] = a[L-1] @ W[L].T + b[L]          y_hat = output map of the loss applied to z[L]
    J    = mean over the batch of the per-sample loss
    delta[L] = dJ/dz[L]
    delta[l] = (delta[l+1] @ W[l+1]) * act'(z[l])
    dJ/dW[l] = delta[l].T @ a[l-1]         dJ/db[l] = delta[l].sum(axis=0)

This is the column form z = W a + b, delta = (W^T delta) * act'(z), dW = delta a^T with samples as
rows. Every kernel of every backend is tested against these functions; they favour plainness over
speed and always compute in float64. Python lists here are indexed from 0 for layer 1.
"""

from __future__ import annotations

import numpy as np

from deltaprop.kernels.activations import get_activation


def f64(x):
    return np.asarray(x, dtype=np.float64)


def relative_error(result, expected) -> float:
    """max|result - expected| / max|expected| (the absolute error where expected is all zeros), in float64.

    Norm-wise (the max norm), because an elementwise ratio is meaningless where the exact value crosses
    zero (act'(z) of gelu and silu, the columns of a GEMM). ``result`` and ``expected`` are host arrays of
    one shape; the dtype table's ``tolerance`` bounds this.
    """
    result, expected = f64(result), f64(expected)
    if result.shape != expected.shape:
        raise ValueError(f"relative_error: result: expected shape {expected.shape} (that of expected), got {result.shape}")
    scale = np.max(np.abs(expected), initial=0.0)
    error = float(np.max(np.abs(result - expected), initial=0.0))
    return error / scale if scale > 0 else error


# ---- the kernels, one function each ----------------------------------------------------------------


def gemm(a, b, c=None, trans_a=False, trans_b=False, alpha=1.0, beta=0.0):
    """alpha * op(a) @ op(b) + beta * c, for 2-D matrices or 3-D stacks of them."""
    a, b = f64(a), f64(b)
    op_a = np.swapaxes(a, -1, -2) if trans_a else a
    op_b = np.swapaxes(b, -1, -2) if trans_b else b
    result = alpha * (op_a @ op_b)
    if beta != 0:
        result = result + beta * f64(c)
    return result


def bias_act(acc, b, act):
    """z = acc + b; a = act(z). Returns (z, a)."""
    z = f64(acc) + f64(b)
    return z, get_activation(act).forward(z)


def act_backward(g, z, act):
    """g * act'(z)."""
    return f64(g) * get_activation(act).derivative(f64(z))


def onehot(labels, n_classes):
    y = np.zeros((len(labels), n_classes))
    y[np.arange(len(labels)), labels] = 1.0
    return y


def targets_matrix(y, n_classes):
    """An int label vector (B,) as one-hot rows; a (B, C) target matrix as it is."""
    y = np.asarray(y)
    return onehot(y, n_classes) if y.ndim == 1 else f64(y)


def softmax(z):
    z = f64(z)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def log_softmax(z):
    z = f64(z)
    shifted = z - z.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def softmax_xent(z, y, scale=None):
    """Mean cross-entropy of softmax(z) against labels or probability rows y; delta = (softmax(z) - y) * scale."""
    z = f64(z)
    batch = z.shape[0]
    t = targets_matrix(y, z.shape[1])
    loss = -(t * log_softmax(z)).sum() / batch
    return loss, (softmax(z) - t) * (1.0 / batch if scale is None else scale)


def mse(y_hat, y, scale=None):
    """Mean over the batch of 1/2 ||y_hat - y||^2; delta = (y_hat - y) * scale (identity output map)."""
    y_hat = f64(y_hat)
    batch = y_hat.shape[0]
    diff = y_hat - targets_matrix(y, y_hat.shape[1])
    return 0.5 * (diff * diff).sum() / batch, diff * (1.0 / batch if scale is None else scale)


def sigmoid_xent(z, y, scale=None):
    """Mean over the batch of the summed element losses of sigmoid(z) against y; delta = (sigmoid(z) - y) * scale."""
    z = f64(z)
    batch = z.shape[0]
    t = targets_matrix(y, z.shape[1])
    # -[t log s + (1 - t) log(1 - s)] = max(z, 0) - t z + log(1 + exp(-|z|)), stable for any finite z
    elementwise = np.maximum(z, 0) - t * z + np.log1p(np.exp(-np.abs(z)))
    s = get_activation("sigmoid").forward(z)
    return elementwise.sum() / batch, (s - t) * (1.0 / batch if scale is None else scale)


def bias_grad(delta):
    """Column sums of delta: dJ/db."""
    return f64(delta).sum(axis=0)


def sgd_update(params, grads, lr, weight_decay=0.0):
    """torch.optim.SGD without momentum: params - lr * (grads + weight_decay * params)."""
    p = f64(params)
    return p - lr * (f64(grads) + weight_decay * p)


def momentum_update(params, grads, velocity, lr, momentum=0.9, nesterov=False, weight_decay=0.0):
    """torch.optim.SGD with momentum (dampening 0). Returns (params, velocity)."""
    p = f64(params)
    g = f64(grads) + weight_decay * p
    velocity = momentum * f64(velocity) + g
    step = g + momentum * velocity if nesterov else velocity
    return p - lr * step, velocity


def adam_update(params, grads, m, v, step, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                decoupled=False):
    """torch.optim.Adam (decoupled=False) or torch.optim.AdamW (decoupled=True). Returns (params, m, v)."""
    p, g = f64(params), f64(grads)
    if decoupled:
        p = p * (1 - lr * weight_decay)
    else:
        g = g + weight_decay * p
    m = beta1 * f64(m) + (1 - beta1) * g
    v = beta2 * f64(v) + (1 - beta2) * g * g
    m_hat = m / (1 - beta1**step)
    v_hat = v / (1 - beta2**step)
    return p - lr * m_hat / (np.sqrt(v_hat) + eps), m, v


LOSSES = {"softmax_cross_entropy": softmax_xent, "mse": mse, "sigmoid_cross_entropy": sigmoid_xent}


# ---- the whole network --------------------------------------------------------------------------------


def forward(weights, biases, x, activation):
    """zs[l], activations[l] for l = 0..L-1 (layer l+1); activations[-1] = z[L] (the loss maps it)."""
    a = f64(x)
    zs, acts = [], []
    depth = len(weights)
    for l, (W, b) in enumerate(zip(weights, biases)):
        z = a @ f64(W).T + f64(b)
        a = get_activation(activation).forward(z) if l < depth - 1 else z
        zs.append(z)
        acts.append(a)
    return zs, acts


def loss_and_grads(weights, biases, x, y, activation, loss):
    """The mean loss and [(dW[l], db[l])] for every layer, by backpropagation."""
    zs, acts = forward(weights, biases, x, activation)
    value, delta = LOSSES[loss](zs[-1], y)
    inputs = [f64(x)] + acts[:-1]  # a[l-1] for each layer
    grads = [None] * len(weights)
    for l in reversed(range(len(weights))):
        grads[l] = (delta.T @ inputs[l], delta.sum(axis=0))
        if l > 0:
            delta = (delta @ f64(weights[l])) * get_activation(activation).derivative(zs[l - 1])
    return value, grads


def sgd_steps(weights, biases, batches, activation, loss, lr):
    """Plain SGD over (x, y) batches; returns the new weights, biases and the losses."""
    weights, biases = [f64(W) for W in weights], [f64(b) for b in biases]
    losses = []
    for x, y in batches:
        value, grads = loss_and_grads(weights, biases, x, y, activation, loss)
        losses.append(value)
        weights = [W - lr * dW for W, (dW, _) in zip(weights, grads)]
        biases = [b - lr * db for b, (_, db) in zip(biases, grads)]
    return weights, biases, losses
