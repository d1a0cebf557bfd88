"""The contract's arrangement: every backend override keeps the base signature exactly (names, defaults,
order, kind), and the base class's kernels run on any array module with NumPy's API, so that a backend
overrides only what it accelerates."""

from __future__ import annotations

import inspect
import types

import numpy as np
import pytest

from deltaprop.backend import Backend, available_backends
from deltaprop.backend import _backend_class as backend_class

KERNELS = ("gemm", "bias_act", "act_backward", "softmax", "softmax_xent", "sigmoid_xent", "squared_error",
           "bias_grad", "sgd_update", "momentum_update", "adam_update")


def overrides(cls):
    """(name, override, base) for each attribute of ``cls`` (below Backend) that replaces one of Backend's."""
    for klass in cls.__mro__[: cls.__mro__.index(Backend)]:
        for name, attribute in vars(klass).items():
            if name in vars(Backend) and not name.startswith("__"):
                yield name, attribute, vars(Backend)[name]


def _signature(attribute):
    """[(name, kind, default)] per parameter: the base's annotations hold for an override that leaves them out."""
    function = attribute.fget if isinstance(attribute, property) else attribute
    parameters = inspect.signature(getattr(function, "__func__", function)).parameters.values()
    return [(p.name, p.kind, p.default) for p in parameters]


@pytest.mark.parametrize("name", [n for n in available_backends() if n != "numpy"])
def test_overrides_keep_the_base_signature(name):
    found = list(overrides(backend_class(name)))
    assert found, f"{name} overrides nothing"
    for attribute_name, override, base in found:
        assert type(override) is type(base), attribute_name  # a method stays a method, a classmethod a classmethod
        if callable(base) or isinstance(base, (classmethod, staticmethod, property)):
            assert _signature(override) == _signature(base), attribute_name


# ---- the base class is the reference for any array module with NumPy's API -----------------------------
# Thinc's arrangement: Ops is written against self.xp, so CupyOps overrides only what it accelerates. Here
# the base's kernels run on ForeignArray, arrays of an array module that is not NumPy: NumPy's functions
# reach them only through __array_ufunc__ / __array_function__ (as they reach CuPy's), and they refuse to
# become NumPy arrays implicitly. A kernel body that calls NumPy where it should call ``self.xp`` returns
# a NumPy array (caught below) or raises.


def _unwrap(x):
    if isinstance(x, ForeignArray):
        return x.data
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v) for v in x)
    if isinstance(x, dict):
        return {k: _unwrap(v) for k, v in x.items()}
    return x


def _wrap(x):
    if isinstance(x, np.ndarray):
        return ForeignArray(x)
    if isinstance(x, tuple):
        return tuple(_wrap(v) for v in x)
    return x


class ForeignArray(np.lib.mixins.NDArrayOperatorsMixin):
    """An array of another array module (its data a NumPy array, which NumPy never sees directly)."""

    def __init__(self, data):
        self.data = data

    def __array__(self, dtype=None, copy=None):
        raise TypeError("implicit conversion of a foreign array to NumPy")

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        return _wrap(getattr(ufunc, method)(*_unwrap(inputs), **_unwrap(kwargs)))

    def __array_function__(self, func, types, args, kwargs):
        return _wrap(func(*_unwrap(args), **_unwrap(kwargs)))

    def __getitem__(self, key):
        return _wrap(self.data[_unwrap(key)])

    def __setitem__(self, key, value):
        self.data[_unwrap(key)] = _unwrap(value)

    def __getattr__(self, name):  # shape, dtype, ndim, flags, ...; methods (sum, max, astype) wrap their results
        if name.startswith("__"):  # no __array_interface__ or __array_struct__: NumPy cannot read it directly
            raise AttributeError(name)
        attribute = getattr(self.data, name)
        if callable(attribute):
            return lambda *args, **kwargs: _wrap(attribute(*_unwrap(args), **_unwrap(kwargs)))
        return _wrap(attribute)


def _foreign(function):
    return lambda *args, **kwargs: _wrap(function(*_unwrap(args), **_unwrap(kwargs)))


FOREIGN_MODULE = types.SimpleNamespace(
    ndarray=ForeignArray,
    **{name: _foreign(getattr(np, name)) for name in (
        "abs", "add", "arange", "ascontiguousarray", "empty", "exp", "log", "log1p", "matmul", "max", "maximum",
        "min", "multiply", "sqrt", "subtract", "sum", "swapaxes", "zeros_like")},
)


class ForeignBackend(Backend):
    """The base class, overriding only what a backend must say about its arrays."""

    name = "foreign"

    @property
    def xp(self):
        return FOREIGN_MODULE

    def to_numpy(self, x):
        return x.data

    def empty(self, shape, dtype):
        return FOREIGN_MODULE.empty(shape, dtype)


def _foreign_case(kernel, rng):
    """(outputs of the kernel on the foreign backend, the same on NumPy) for one call with random inputs."""
    x, w, b, flat = rng.standard_normal((5, 4)), rng.standard_normal((3, 4)), rng.standard_normal(4), rng.random(6)
    labels = np.array([0, 3, 1, 2, 3])
    calls = {
        "gemm": lambda backend, on: (backend.gemm(on(x), on(w), trans_b=True, alpha=0.5),),
        "bias_act": lambda backend, on: backend.bias_act(on(x), on(b), "silu"),
        "act_backward": lambda backend, on: (backend.act_backward(on(x), on(x[::-1].copy()), "gelu"),),
        "softmax": lambda backend, on: (backend.softmax(on(x)),),
        "softmax_xent": lambda backend, on: _loss(backend, on, "softmax_xent", x, labels),
        "sigmoid_xent": lambda backend, on: _loss(backend, on, "sigmoid_xent", x, labels),
        "squared_error": lambda backend, on: _loss(backend, on, "squared_error", x, labels),
        "bias_grad": lambda backend, on: (backend.bias_grad(on(x)),),
        "sgd_update": lambda backend, on: _update(backend, on, flat, lambda p, g, s: backend.sgd_update(p, g, 0.1, 0.01), 0),
        "momentum_update": lambda backend, on: _update(
            backend, on, flat, lambda p, g, s: backend.momentum_update(p, g, *s, 0.1, nesterov=True), 1),
        "adam_update": lambda backend, on: _update(backend, on, flat, lambda p, g, s: backend.adam_update(p, g, *s, 2, 0.1), 2),
    }
    return calls[kernel](ForeignBackend(), ForeignArray), calls[kernel](Backend(), np.array)


def _loss(backend, on, kernel, z, labels):
    delta = backend.empty(z.shape, z.dtype)
    return getattr(backend, kernel)(on(z), on(labels), delta_out=delta), delta


def _update(backend, on, flat, update, n_state):
    params, state = on(flat.copy()), [on(flat[::-1].copy()) for _ in range(n_state)]
    update(params, on(flat * 0.5), state)
    return (params, *state)


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_the_base_kernels_run_on_another_array_module(kernel):
    foreign, numpy = _foreign_case(kernel, np.random.default_rng(0))
    for got, expected in zip(foreign, numpy, strict=True):
        if isinstance(expected, float):
            assert got == expected
        else:
            assert isinstance(got, ForeignArray), f"{kernel} returned a {type(got).__name__}"
            np.testing.assert_array_equal(got.data, expected)


def test_the_foreign_array_refuses_numpy_directly():
    """The check above can fail: NumPy code that bypasses xp does not run on the foreign arrays."""
    with pytest.raises(TypeError, match="implicit conversion"):
        np.asarray(ForeignArray(np.zeros(3)))
    assert not isinstance(np.empty(3), ForeignArray)
