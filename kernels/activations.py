"""The activation table: one entry per activation, looked up by name.

Each entry holds the formulas of act(z) and act'(z) three times, once per way a backend spells them:

- ``forward`` / ``derivative``: NumPy array functions (the reference, and the NumPy backend);
- ``scalar(T, jitable)``: a factory returning ``(f, df)``, plain-Python scalar functions that use only
  ``math`` and constants made with ``T`` (``numpy.float32`` or ``numpy.float64``), so that Numba compiles
  them without promoting float32 to float64; a helper they share (the stable sigmoid) is passed through
  ``jitable`` (Numba's ``register_jitable``; the identity for plain Python);
- ``cuda``: C++ expressions of ``z`` in the compute type ``T``, with ``C(x)`` a constant of that type
  (``kernels/cuda`` turns each into a device functor).

Every derivative is a function of the pre-activation z, the value kept by the forward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

LEAKY_SLOPE = 0.01
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
GELU_TANH_CUBIC = 0.044715
INV_SQRT_2 = 1.0 / math.sqrt(2.0)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@dataclass(frozen=True)
class Activation:
    name: str
    forward: Callable[[np.ndarray], np.ndarray]
    derivative: Callable[[np.ndarray], np.ndarray]
    scalar: Callable[[type, Callable], tuple[Callable, Callable]]
    cuda_forward: str
    cuda_derivative: str
    init: str  # "he" for the ReLU family, "xavier" for saturating or linear units


def _erf(x):
    from scipy.special import erf  # imported on first use: keeps `import deltaprop` light

    return erf(x)


# The stable sigmoid, once per spelling: exp of a non-positive number only, so no overflow for any finite z.


def _sigmoid(z):
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1 / (1 + e), e / (1 + e)).astype(z.dtype, copy=False)


# ---- NumPy spellings ------------------------------------------------------------------------------


def _gelu(z):
    return (0.5 * z * (1 + _erf(z * INV_SQRT_2))).astype(z.dtype, copy=False)


def _gelu_grad(z):
    cdf = 0.5 * (1 + _erf(z * INV_SQRT_2))
    pdf = INV_SQRT_2PI * np.exp(-0.5 * z * z)
    return (cdf + z * pdf).astype(z.dtype, copy=False)


def _gelu_tanh(z):
    t = np.tanh(SQRT_2_OVER_PI * (z + GELU_TANH_CUBIC * z**3))
    return (0.5 * z * (1 + t)).astype(z.dtype, copy=False)


def _gelu_tanh_grad(z):
    t = np.tanh(SQRT_2_OVER_PI * (z + GELU_TANH_CUBIC * z**3))
    dinner = SQRT_2_OVER_PI * (1 + 3 * GELU_TANH_CUBIC * z * z)
    return (0.5 * (1 + t) + 0.5 * z * (1 - t * t) * dinner).astype(z.dtype, copy=False)


def _silu_grad(z):
    s = _sigmoid(z)
    return s * (1 + z * (1 - s))


def _softplus(z):
    return np.maximum(z, 0) + np.log1p(np.exp(-np.abs(z)))


# ---- scalar spellings (compiled by Numba per dtype T) ---------------------------------------------


def _stable_sigmoid(T, jitable):
    zero, one = T(0), T(1)

    def sigmoid(z):
        e = math.exp(-abs(z))
        return one / (one + e) if z >= zero else e / (one + e)

    return jitable(sigmoid)


def _identity_scalar(T, jitable):
    one = T(1)

    def f(z):
        return z

    def df(z):
        return one

    return f, df


def _relu_scalar(T, jitable):
    zero, one = T(0), T(1)

    def f(z):
        return zero if z < zero else z  # NaN passes through, as np.maximum and torch.relu let it

    def df(z):
        return one if z > zero else zero

    return f, df


def _leaky_relu_scalar(T, jitable):
    zero, one, slope = T(0), T(1), T(LEAKY_SLOPE)

    def f(z):
        return z if z > zero else slope * z

    def df(z):
        return one if z > zero else slope

    return f, df


def _sigmoid_scalar(T, jitable):
    one = T(1)
    sigmoid = _stable_sigmoid(T, jitable)

    def f(z):
        return sigmoid(z)

    def df(z):
        s = sigmoid(z)
        return s * (one - s)

    return f, df


def _tanh_scalar(T, jitable):
    one = T(1)

    def f(z):
        return math.tanh(z)

    def df(z):
        t = math.tanh(z)
        return one - t * t

    return f, df


def _gelu_scalar(T, jitable):
    half, one, inv_sqrt2, inv_sqrt2pi = T(0.5), T(1), T(INV_SQRT_2), T(INV_SQRT_2PI)

    def f(z):
        return half * z * (one + math.erf(z * inv_sqrt2))

    def df(z):
        return half * (one + math.erf(z * inv_sqrt2)) + z * inv_sqrt2pi * math.exp(-half * z * z)

    return f, df


def _gelu_tanh_scalar(T, jitable):
    half, one, three = T(0.5), T(1), T(3)
    k, c = T(SQRT_2_OVER_PI), T(GELU_TANH_CUBIC)

    def f(z):
        return half * z * (one + math.tanh(k * (z + c * z * z * z)))

    def df(z):
        t = math.tanh(k * (z + c * z * z * z))
        return half * (one + t) + half * z * (one - t * t) * k * (one + three * c * z * z)

    return f, df


def _silu_scalar(T, jitable):
    one = T(1)
    sigmoid = _stable_sigmoid(T, jitable)

    def f(z):
        return z * sigmoid(z)

    def df(z):
        s = sigmoid(z)
        return s * (one + z * (one - s))

    return f, df


def _softplus_scalar(T, jitable):
    zero = T(0)
    sigmoid = _stable_sigmoid(T, jitable)

    def f(z):
        return (z if z > zero else zero) + math.log1p(math.exp(-abs(z)))

    def df(z):
        return sigmoid(z)

    return f, df


def _elu_scalar(T, jitable):
    zero, one = T(0), T(1)

    def f(z):
        return z if z > zero else math.expm1(z)

    def df(z):
        return one if z > zero else math.exp(z)

    return f, df


_SIGMOID_C = "(z >= C(0) ? C(1) / (C(1) + exp(-z)) : exp(z) / (C(1) + exp(z)))"

ACTIVATIONS: dict[str, Activation] = {
    a.name: a
    for a in (
        Activation(
            "identity",
            lambda z: z.copy(),
            lambda z: np.ones_like(z),
            _identity_scalar,
            "z",
            "C(1)",
            "xavier",
        ),
        Activation(
            "relu",
            lambda z: np.maximum(z, 0),
            lambda z: (z > 0).astype(z.dtype),
            _relu_scalar,
            "(z < C(0) ? C(0) : z)",
            "(z > C(0) ? C(1) : C(0))",
            "he",
        ),
        Activation(
            "leaky_relu",
            lambda z: np.where(z > 0, z, z * z.dtype.type(LEAKY_SLOPE)),
            lambda z: np.where(z > 0, 1, LEAKY_SLOPE).astype(z.dtype),
            _leaky_relu_scalar,
            f"(z > C(0) ? z : C({LEAKY_SLOPE}) * z)",
            f"(z > C(0) ? C(1) : C({LEAKY_SLOPE}))",
            "he",
        ),
        Activation(
            "sigmoid",
            _sigmoid,
            lambda z: _sigmoid(z) * (1 - _sigmoid(z)),
            _sigmoid_scalar,
            _SIGMOID_C,
            f"({_SIGMOID_C} * (C(1) - {_SIGMOID_C}))",
            "xavier",
        ),
        Activation(
            "tanh",
            np.tanh,
            lambda z: 1 - np.tanh(z) ** 2,
            _tanh_scalar,
            "tanh(z)",
            "(C(1) - tanh(z) * tanh(z))",
            "xavier",
        ),
        Activation(
            "gelu",
            _gelu,
            _gelu_grad,
            _gelu_scalar,
            f"(C(0.5) * z * (C(1) + erf(z * C({INV_SQRT_2!r}))))",
            f"(C(0.5) * (C(1) + erf(z * C({INV_SQRT_2!r}))) + z * C({INV_SQRT_2PI!r}) * exp(C(-0.5) * z * z))",
            "he",
        ),
        Activation(
            "gelu_tanh",
            _gelu_tanh,
            _gelu_tanh_grad,
            _gelu_tanh_scalar,
            f"(C(0.5) * z * (C(1) + tanh(C({SQRT_2_OVER_PI!r}) * (z + C({GELU_TANH_CUBIC}) * z * z * z))))",
            "(C(0.5) * (C(1) + tanh(C({k}) * (z + C({c}) * z * z * z)))"
            " + C(0.5) * z * (C(1) - tanh(C({k}) * (z + C({c}) * z * z * z)) * tanh(C({k}) * (z + C({c}) * z * z * z)))"
            " * C({k}) * (C(1) + C(3) * C({c}) * z * z))".format(k=repr(SQRT_2_OVER_PI), c=GELU_TANH_CUBIC),
            "he",
        ),
        Activation(
            "silu",
            lambda z: z * _sigmoid(z),
            _silu_grad,
            _silu_scalar,
            f"(z * {_SIGMOID_C})",
            f"({_SIGMOID_C} * (C(1) + z * (C(1) - {_SIGMOID_C})))",
            "he",
        ),
        Activation(
            "softplus",
            _softplus,
            _sigmoid,
            _softplus_scalar,
            "((z > C(0) ? z : C(0)) + log1p(exp(-fabs(z))))",
            _SIGMOID_C,
            "he",
        ),
        Activation(
            "elu",
            lambda z: np.where(z > 0, z, np.expm1(np.minimum(z, 0))),
            lambda z: np.where(z > 0, 1, np.exp(np.minimum(z, 0))).astype(z.dtype),
            _elu_scalar,
            "(z > C(0) ? z : expm1(z))",
            "(z > C(0) ? C(1) : exp(z))",
            "he",
        ),
    )
}


def get_activation(name: str) -> Activation:
    """The table entry for ``name``; a ValueError lists the known names otherwise."""
    try:
        return ACTIVATIONS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"activation: expected one of {sorted(ACTIVATIONS)}, got {name!r}"
        ) from None
