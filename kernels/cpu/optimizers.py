"""Optimizer updates: one pass over the flat parameter buffer, in place, with the operations (and so the
rounding) of Backend's NumPy formulas. Every scalar argument arrives in the buffers' dtype."""

from __future__ import annotations

import math


def build_sgd(T):
    one = T(1)

    def sgd(params, grads, lr, weight_decay):
        """params = params * (1 - lr * weight_decay) - lr * grads. params, grads: (P,)."""
        decay = one - lr * weight_decay
        for k in range(params.shape[0]):
            params[k] = params[k] * decay - lr * grads[k]

    return sgd


def build_momentum(T):
    zero = T(0)

    def momentum(params, grads, velocity, lr, mu, nesterov, weight_decay):
        """torch.optim.SGD with momentum mu (dampening 0). params, grads, velocity: (P,)."""
        for k in range(params.shape[0]):
            g = grads[k] + weight_decay * params[k] if weight_decay != zero else grads[k]
            v = mu * velocity[k] + g
            velocity[k] = v
            params[k] -= lr * (g + mu * v if nesterov else v)

    return momentum


def build_adam(T):
    zero, one = T(0), T(1)

    def adam(params, grads, m, v, lr, beta1, beta2, eps, weight_decay, decoupled, bias1, bias2, keep1, keep2):
        """torch.optim.Adam / AdamW (decoupled); bias1, bias2 = 1 - beta^step; keep1, keep2 = 1 - beta, each
        computed in float64 before the cast (1 - float32(beta) loses the low digits). params, grads, m, v: (P,)."""
        decay = one - lr * weight_decay if decoupled else one
        l2 = zero if decoupled else weight_decay
        step_size = lr / bias1
        for k in range(params.shape[0]):
            p = params[k] * decay
            g = grads[k] + l2 * p if l2 != zero else grads[k]
            mk = beta1 * m[k] + keep1 * g
            vk = beta2 * v[k] + keep2 * g * g
            m[k], v[k] = mk, vk
            params[k] = p - step_size * mk / (math.sqrt(vk / bias2) + eps)

    return adam
