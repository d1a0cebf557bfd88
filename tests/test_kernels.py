"""Every kernel of every backend against kernels/reference.py (float64), on random data.

Shapes include B = 1, n = 1, odd sizes and 1000 classes; inputs come C-contiguous, as transposed views
and as strided views; outputs are written in place where the contract allows it.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import LOSS_REFERENCES, rel_err, tol

from deltaprop.backend import get_backend
from deltaprop.backend.base import HOST_ALIGNMENT
from deltaprop.kernels import reference as ref
from deltaprop.kernels.activations import ACTIVATIONS


def _strided(x):
    """A view of x's values with a stride of two elements along the last axis (NaN in the gaps)."""
    holder = np.full(x.shape[:-1] + (2 * x.shape[-1],), np.nan, dtype=x.dtype)
    view = holder[..., ::2]
    view[...] = x
    return view


LAYOUTS = {
    "contiguous": np.ascontiguousarray,
    "transposed": lambda x: np.swapaxes(np.ascontiguousarray(np.swapaxes(x, -1, -2)), -1, -2),
    "strided": _strided,
}
ROW_SHAPES = [(1, 1), (1, 7), (5, 1), (33, 17), (64, 130)]


def randn(rng, shape, dtype, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(dtype)


def probability_rows(rng, shape, dtype):
    return ref.softmax(rng.standard_normal(shape)).astype(dtype)


# ---- GEMM ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("m, k, n", [(1, 1, 1), (1, 64, 33), (7, 1, 5), (33, 17, 65), (128, 256, 96)])
@pytest.mark.parametrize("alpha, beta", [(1.0, 0.0), (0.5, -1.5)])
def test_gemm(backend, dtype, rng, trans_a, trans_b, m, k, n, alpha, beta):
    a = randn(rng, (k, m) if trans_a else (m, k), dtype)
    b = randn(rng, (n, k) if trans_b else (k, n), dtype)
    out = randn(rng, (m, n), dtype)
    expected = ref.gemm(a, b, out, trans_a, trans_b, alpha, beta)
    result = backend.gemm(a, b, out, trans_a, trans_b, alpha, beta)
    assert result is out
    assert rel_err(out, expected) <= tol(dtype)


@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("alpha, beta", [(1.0, 0.0), (-2.0, 0.25)])
def test_gemm_batched(backend, dtype, rng, trans_a, trans_b, alpha, beta):
    stack, m, k, n = 3, 9, 20, 11
    a = randn(rng, (stack, k, m) if trans_a else (stack, m, k), dtype)
    b = randn(rng, (stack, n, k) if trans_b else (stack, k, n), dtype)
    out = randn(rng, (stack, m, n), dtype)
    expected = ref.gemm(a, b, out, trans_a, trans_b, alpha, beta)
    backend.gemm(a, b, out, trans_a, trans_b, alpha, beta)
    assert rel_err(out, expected) <= tol(dtype)


@pytest.mark.parametrize("shape", [(0,), (3,), (5, 7), (2, 0, 3), (4, 3, 2)])
def test_host_empty_and_zeros_are_aligned(shape):
    backend = get_backend("numpy")
    for dtype in ("float32", "float64", "int64"):
        for _ in range(4):  # NumPy's own 16-byte alignment would pass one draw in four
            empty, zeros = backend.empty(shape, dtype), backend.zeros(shape, dtype)
            assert (empty.shape, empty.dtype, empty.flags.c_contiguous) == (shape, np.dtype(dtype), True)
            assert zeros.shape == shape and not zeros.any()
            if empty.size:  # an empty array points nowhere in particular
                assert empty.ctypes.data % HOST_ALIGNMENT == 0 and zeros.ctypes.data % HOST_ALIGNMENT == 0


@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("batched", [False, True])
def test_gemm_does_not_read_out_when_beta_is_zero(backend, dtype, rng, trans_a, batched):
    lead = (2,) if batched else ()
    a = randn(rng, lead + ((13, 6) if trans_a else (6, 13)), dtype)
    b = randn(rng, lead + (13, 5), dtype)
    out = np.full(lead + (6, 5), np.nan, dtype)
    backend.gemm(a, b, out, trans_a=trans_a, alpha=0.5)
    assert rel_err(out, ref.gemm(a, b, None, trans_a, False, 0.5, 0.0)) <= tol(dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("batched", [False, True])
def test_gemm_layouts(backend, dtype, rng, layout, batched):
    lead = (2,) if batched else ()
    a = LAYOUTS[layout](randn(rng, lead + (6, 13), dtype))
    b = LAYOUTS[layout](randn(rng, lead + (13, 5), dtype))
    out = LAYOUTS[layout](randn(rng, lead + (6, 5), dtype))
    expected = ref.gemm(a, b, out, beta=2.0)
    backend.gemm(a, b, out, beta=2.0)
    assert rel_err(out, expected) <= tol(dtype)
    assert rel_err(backend.gemm(a, b), ref.gemm(a, b)) <= tol(dtype)


# ---- elementwise ---------------------------------------------------------------------------------


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("shape", ROW_SHAPES)
def test_bias_act(backend, dtype, rng, act, shape):
    acc, b = randn(rng, shape, dtype, 2.0), randn(rng, shape[1], dtype)
    z_expected, a_expected = ref.bias_act(acc, b, act)
    z, a = backend.bias_act(acc, b, act)
    assert rel_err(z, z_expected) <= tol(dtype)
    assert rel_err(a, a_expected) <= tol(dtype)
    assert z.dtype == a.dtype == dtype


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_bias_act_layouts_and_in_place(backend, dtype, rng, act, layout):
    acc = LAYOUTS[layout](randn(rng, (9, 14), dtype, 2.0))
    b = _strided(randn(rng, 14, dtype))
    a_out = LAYOUTS[layout](np.empty((9, 14), dtype))
    z_expected, a_expected = ref.bias_act(acc, b, act)
    z, a = backend.bias_act(acc, b, act, z_out=acc, a_out=a_out)
    assert z is acc
    assert a is a_out
    assert rel_err(acc, z_expected) <= tol(dtype)
    assert rel_err(a, a_expected) <= tol(dtype)


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("shape", ROW_SHAPES)
def test_act_backward(backend, dtype, rng, act, shape):
    g, z = randn(rng, shape, dtype), randn(rng, shape, dtype, 2.0)
    out = backend.act_backward(g, z, act)
    assert out.dtype == dtype
    assert rel_err(out, ref.act_backward(g, z, act)) <= tol(dtype)


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_act_backward_layouts_and_in_place(backend, dtype, rng, act, layout):
    g = LAYOUTS[layout](randn(rng, (11, 6), dtype))
    z = LAYOUTS[layout](randn(rng, (11, 6), dtype, 2.0))
    expected = ref.act_backward(g, z, act)
    assert backend.act_backward(g, z, act, out=g) is g
    assert rel_err(g, expected) <= tol(dtype)


@pytest.mark.parametrize("shape", ROW_SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_bias_grad(backend, dtype, rng, shape, layout):
    delta = LAYOUTS[layout](randn(rng, shape, dtype))
    out = _strided(np.empty(shape[1], dtype))
    assert backend.bias_grad(delta, out) is out
    assert rel_err(out, ref.bias_grad(delta)) <= tol(dtype)
    assert rel_err(backend.bias_grad(delta), ref.bias_grad(delta)) <= tol(dtype)


# ---- softmax and the losses ----------------------------------------------------------------------

TARGET_KINDS = {
    "int64 labels": lambda rng, shape, dtype: rng.integers(0, shape[1], shape[0]),
    "int32 labels": lambda rng, shape, dtype: rng.integers(0, shape[1], shape[0]).astype(np.int32),
    "probability rows": probability_rows,
}
LOSS_SHAPES = [(1, 1), (1, 10), (7, 3), (33, 1000)]


@pytest.mark.parametrize("shape", LOSS_SHAPES)
@pytest.mark.parametrize("logit_scale", [1.0, 30.0])
def test_softmax(backend, dtype, rng, shape, logit_scale):
    z = randn(rng, shape, dtype, logit_scale)
    assert rel_err(backend.softmax(z), ref.softmax(z)) <= tol(dtype)
    strided_out = _strided(np.empty(shape, dtype))
    backend.softmax(LAYOUTS["transposed"](z), strided_out)
    assert rel_err(strided_out, ref.softmax(z)) <= tol(dtype)


@pytest.mark.parametrize("loss", LOSS_REFERENCES)
@pytest.mark.parametrize("targets_kind", TARGET_KINDS)
@pytest.mark.parametrize("shape", LOSS_SHAPES)
@pytest.mark.parametrize("scale", [None, 0.25])
def test_loss(backend, dtype, rng, loss, targets_kind, shape, scale):
    z = randn(rng, shape, dtype, 3.0)
    targets = TARGET_KINDS[targets_kind](rng, shape, dtype)
    expected_loss, expected_delta = LOSS_REFERENCES[loss](z, targets, scale)
    delta = np.empty(shape, dtype)
    value = getattr(backend, loss)(z, targets, delta, scale)
    assert isinstance(value, float)
    assert rel_err(value, expected_loss) <= tol(dtype)
    assert rel_err(delta, expected_delta) <= tol(dtype)
    assert getattr(backend, loss)(z, targets) == pytest.approx(value, rel=tol(dtype))


@pytest.mark.parametrize("loss", LOSS_REFERENCES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_loss_layouts(backend, dtype, rng, loss, layout):
    z = LAYOUTS[layout](randn(rng, (6, 5), dtype, 3.0))
    targets = LAYOUTS[layout](probability_rows(rng, (6, 5), dtype))
    delta = LAYOUTS[layout](np.empty((6, 5), dtype))
    expected_loss, expected_delta = LOSS_REFERENCES[loss](z, targets)
    assert rel_err(getattr(backend, loss)(z, targets, delta), expected_loss) <= tol(dtype)
    assert rel_err(delta, expected_delta) <= tol(dtype)


@pytest.mark.parametrize("targets_kind", TARGET_KINDS)
@pytest.mark.parametrize("magnitude", [1e4, 1e30])
def test_softmax_xent_extreme_logits(backend, dtype, rng, targets_kind, magnitude):
    shape = (8, 1000)
    z = rng.uniform(-magnitude, magnitude, shape).astype(dtype)
    z[0, :2] = dtype.type(magnitude)  # a tie at the maximum
    targets = TARGET_KINDS[targets_kind](rng, shape, dtype)
    delta = np.empty(shape, dtype)
    value = backend.softmax_xent(z, targets, delta)
    expected_loss, expected_delta = ref.softmax_xent(z, targets)
    assert np.isfinite(value) and np.all(np.isfinite(delta))
    assert rel_err(value, expected_loss) <= tol(dtype)
    assert rel_err(delta, expected_delta) <= tol(dtype)
    # softmax rows and target rows both sum to 1: delta rows sum to 0 (to the rounding of 1/B)
    assert np.max(np.abs(delta.astype(np.float64).sum(axis=1))) <= tol(dtype) / shape[0]


def test_softmax_xent_nan_logit_gives_nan(backend, dtype, rng):
    z = randn(rng, (3, 4), dtype)
    z[1, 2] = np.nan
    delta = np.empty_like(z)
    assert np.isnan(backend.softmax_xent(z, np.array([0, 1, 2]), delta))
    assert np.all(np.isnan(delta[1])) and np.all(np.isfinite(delta[[0, 2]]))


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_nan_propagates_through_every_activation(backend, dtype, rng, act):
    """A NaN pre-activation gives a NaN activation, as in the reference (and torch): never a silent 0."""
    acc = randn(rng, (2, 3), dtype)
    acc[1, 1] = np.nan
    _, a = backend.bias_act(backend.asarray(acc), backend.asarray(randn(rng, (3,), dtype)), act)
    a = np.asarray(backend.to_numpy(a))
    assert np.isnan(a[1, 1]) and np.isfinite(np.delete(a.ravel(), 4)).all()


# ---- optimizer updates ---------------------------------------------------------------------------

FLAT_LAYOUTS = {"contiguous": np.ascontiguousarray, "strided": _strided}


@pytest.mark.parametrize("size", [1, 7, 1000])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("layout", FLAT_LAYOUTS)
def test_sgd_update(backend, dtype, rng, size, weight_decay, layout):
    params, grads = (FLAT_LAYOUTS[layout](randn(rng, size, dtype)) for _ in range(2))
    expected = ref.sgd_update(params, grads, 0.1, weight_decay)
    backend.sgd_update(params, grads, 0.1, weight_decay)
    assert rel_err(params, expected) <= tol(dtype)


@pytest.mark.parametrize("size", [1, 7, 1000])
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("layout", FLAT_LAYOUTS)
def test_momentum_update(backend, dtype, rng, size, nesterov, weight_decay, layout):
    params, grads, velocity = (FLAT_LAYOUTS[layout](randn(rng, size, dtype)) for _ in range(3))
    expected_params, expected_velocity = ref.momentum_update(params, grads, velocity, 0.1, 0.9, nesterov, weight_decay)
    backend.momentum_update(params, grads, velocity, 0.1, 0.9, nesterov, weight_decay)
    assert rel_err(params, expected_params) <= tol(dtype)
    assert rel_err(velocity, expected_velocity) <= tol(dtype)


@pytest.mark.parametrize("size", [1, 7, 1000])
@pytest.mark.parametrize("step", [1, 5])
@pytest.mark.parametrize("weight_decay, decoupled", [(0.0, False), (0.01, False), (0.01, True)])
@pytest.mark.parametrize("layout", FLAT_LAYOUTS)
def test_adam_update(backend, dtype, rng, size, step, weight_decay, decoupled, layout):
    params, grads, m = (FLAT_LAYOUTS[layout](randn(rng, size, dtype)) for _ in range(3))
    v = FLAT_LAYOUTS[layout](rng.uniform(0.1, 1.0, size).astype(dtype))
    expected = ref.adam_update(params, grads, m, v, step, 0.01, 0.9, 0.999, 1e-8, weight_decay, decoupled)
    backend.adam_update(params, grads, m, v, step, 0.01, 0.9, 0.999, 1e-8, weight_decay, decoupled)
    for result, wanted in zip((params, m, v), expected):
        assert rel_err(result, wanted) <= tol(dtype)


# ---- bad input: every backend refuses it with the same message, naming the argument ---------------


def _x(dtype, shape=(4, 3)):
    return np.arange(1, 1 + np.prod(shape), dtype=dtype).reshape(shape) / 7


BAD_CALLS = {
    "gemm inner sizes": (
        lambda backend, dt: backend.gemm(_x(dt, (3, 4)), _x(dt, (5, 2))),
        ValueError, r"gemm: inner sizes of op\(a\) and op\(b\) must agree, got op\(a\) \(3, 4\) and op\(b\) \(5, 2\)",
    ),
    "gemm out shape": (
        lambda backend, dt: backend.gemm(_x(dt, (3, 4)), _x(dt, (4, 2)), _x(dt, (2, 3))),
        ValueError, r"gemm: out: expected shape \(3, 2\), got \(2, 3\)",
    ),
    "gemm mixed dtypes": (
        lambda backend, dt: backend.gemm(_x(dt, (3, 4)), _x(np.float16, (4, 2))),
        TypeError, r"gemm: b: expected dtype .*, got float16",
    ),
    "gemm stack sizes": (
        lambda backend, dt: backend.gemm(_x(dt, (2, 3, 4)), _x(dt, (3, 4, 2))),
        ValueError, r"gemm: a and b: expected the same stack size, got 2 and 3",
    ),
    "gemm empty": (
        lambda backend, dt: backend.gemm(_x(dt, (0, 4)), _x(dt, (4, 2))),
        ValueError, r"gemm: a: expected a non-empty array, got shape \(0, 4\)",
    ),
    "bias_act b shape": (
        lambda backend, dt: backend.bias_act(_x(dt), _x(dt, (5,)), "relu"),
        ValueError, r"bias_act: b: expected shape \(3,\), got \(5,\)",
    ),
    "bias_act empty batch": (
        lambda backend, dt: backend.bias_act(_x(dt, (0, 3)), _x(dt, (3,)), "relu"),
        ValueError, r"bias_act: acc: expected a non-empty array, got shape \(0, 3\)",
    ),
    "bias_act 1-D acc": (
        lambda backend, dt: backend.bias_act(_x(dt, (3,)), _x(dt, (3,)), "relu"),
        ValueError, r"bias_act: acc: expected a 2-D \(batch, features\) array, got shape \(3,\)",
    ),
    "bias_act int acc": (
        lambda backend, dt: backend.bias_act(np.ones((4, 3), np.int64), _x(dt, (3,)), "relu"),
        TypeError, r"bias_act: acc: expected one of \['float32', 'float64'(, 'float16', 'bfloat16')?\] on c(pu|uda), got int64",
    ),
    "bias_act mixed dtypes": (
        lambda backend, dt: backend.bias_act(_x(dt), _x(np.float16, (3,)), "relu"),
        TypeError, r"bias_act: b: expected dtype float\d\d \(the dtype of acc\), got float16",
    ),
    "bias_act unknown activation": (
        lambda backend, dt: backend.bias_act(_x(dt), _x(dt, (3,)), "swish"),
        ValueError, r"activation: expected one of \[.*'relu'.*\], got 'swish'",
    ),
    "bias_act a_out shape": (
        lambda backend, dt: backend.bias_act(_x(dt), _x(dt, (3,)), "tanh", a_out=_x(dt, (3, 4))),
        ValueError, r"bias_act: a_out: expected shape \(4, 3\), got \(3, 4\)",
    ),
    "act_backward z shape": (
        lambda backend, dt: backend.act_backward(_x(dt), _x(dt, (4, 2)), "tanh"),
        ValueError, r"act_backward: z: expected shape \(4, 3\), got \(4, 2\)",
    ),
    "act_backward unknown activation": (
        lambda backend, dt: backend.act_backward(_x(dt), _x(dt), "swish"),
        ValueError, r"activation: expected one of .*, got 'swish'",
    ),
    "softmax out shape": (
        lambda backend, dt: backend.softmax(_x(dt), _x(dt, (4, 4))),
        ValueError, r"softmax: out: expected shape \(4, 3\), got \(4, 4\)",
    ),
    "bias_grad out shape": (
        lambda backend, dt: backend.bias_grad(_x(dt), _x(dt, (4,))),
        ValueError, r"bias_grad: out: expected shape \(3,\), got \(4,\)",
    ),
    "bias_grad 1-D delta": (
        lambda backend, dt: backend.bias_grad(_x(dt, (3,))),
        ValueError, r"bias_grad: delta: expected a 2-D \(batch, features\) array, got shape \(3,\)",
    ),
    "sgd grads size": (
        lambda backend, dt: backend.sgd_update(_x(dt, (5,)), _x(dt, (4,)), 0.1),
        ValueError, r"sgd_update: grads: expected shape \(5,\) \(that of params\), got \(4,\)",
    ),
    "sgd 2-D params": (
        lambda backend, dt: backend.sgd_update(_x(dt), _x(dt), 0.1),
        ValueError, r"sgd_update: params: expected a 1-D flat buffer, got shape \(4, 3\)",
    ),
    "sgd empty buffers": (
        lambda backend, dt: backend.sgd_update(_x(dt, (0,)), _x(dt, (0,)), 0.1),
        ValueError, r"sgd_update: params: expected a non-empty flat buffer, got shape \(0,\)",
    ),
    "adam empty buffers": (
        lambda backend, dt: backend.adam_update(*(_x(dt, (0,)) for _ in range(4)), 1),
        ValueError, r"adam_update: params: expected a non-empty flat buffer, got shape \(0,\)",
    ),
    "momentum velocity dtype": (
        lambda backend, dt: backend.momentum_update(_x(dt, (5,)), _x(dt, (5,)), _x(np.float16, (5,)), 0.1),
        TypeError, r"momentum_update: velocity: expected dtype float\d\d \(the optimizer state dtype of float\d\d params\), got float16",
    ),
    "adam step 0": (
        lambda backend, dt: backend.adam_update(*(_x(dt, (5,)) for _ in range(4)), 0),
        ValueError, r"adam_update: step: expected the 1-based update count \(>= 1\), got 0",
    ),
    "adam m size": (
        lambda backend, dt: backend.adam_update(_x(dt, (5,)), _x(dt, (5,)), _x(dt, (6,)), _x(dt, (5,)), 1),
        ValueError, r"adam_update: m: expected shape \(5,\) \(that of params\), got \(6,\)",
    ),
}


@pytest.mark.parametrize("case", BAD_CALLS)
def test_bad_input(backend, dtype, case):
    call, error, message = BAD_CALLS[case]
    with pytest.raises(error, match=message):
        call(backend, dtype)


BAD_TARGETS = {
    "label too large": (np.array([0, 1, 3, 2]), ValueError, r"labels: expected class labels in \[0, 2\], got 3"),
    "negative label": (np.array([0, -1, 2, 2]), ValueError, r"labels: expected class labels in \[0, 2\], got -1"),
    "wrong label count": (np.array([0, 1, 2]), ValueError, r"{loss}: labels: expected 4 labels \(one per row of z\), got 3"),
    "float labels": (np.array([0.0, 1.0, 2.0, 1.0]), TypeError, r"{loss}: labels: expected integer class labels of shape \(4,\)"),
    "target matrix shape": (np.full((4, 2), 0.5), ValueError, r"{loss}: targets: expected shape \(4, 3\), got \(4, 2\)"),
}


@pytest.mark.parametrize("on_backend", [False, True], ids=["host delta_out", "backend delta_out"])
@pytest.mark.parametrize("loss", LOSS_REFERENCES)
@pytest.mark.parametrize("case", BAD_TARGETS)
def test_bad_targets_write_nothing(backend, dtype, loss, case, on_backend):
    """A refused call leaves delta_out as it was, whether a host array or one the kernel writes in place."""
    targets, error, message = BAD_TARGETS[case]
    targets = targets.astype(dtype) if targets.dtype.kind == "f" else targets
    delta = np.full((4, 3), 7.0, dtype)
    delta = backend.asarray(delta) if on_backend else delta
    with pytest.raises(error, match=message.format(loss=loss)):
        getattr(backend, loss)(_x(dtype), targets, delta)
    assert np.all(backend.to_numpy(delta) == 7.0)


@pytest.mark.parametrize("loss", LOSS_REFERENCES)
def test_bad_loss_arguments(backend, dtype, loss):
    first = "y_hat" if loss == "squared_error" else "z"  # the name the contract gives the loss's first argument
    with pytest.raises(ValueError, match=rf"{loss}: {first}: expected a non-empty array, got shape \(0, 3\)"):
        getattr(backend, loss)(_x(dtype, (0, 3)), np.zeros(0, np.int64))
    with pytest.raises(TypeError, match=rf"{loss}: targets: expected dtype {dtype} \(the dtype of z\), got float16"):
        getattr(backend, loss)(_x(dtype), np.full((4, 3), 0.5, np.float16))
    with pytest.raises(ValueError, match=rf"{loss}: delta_out: expected shape \(4, 3\), got \(3, 4\)"):
        getattr(backend, loss)(_x(dtype), np.array([0, 1, 2, 0]), _x(dtype, (3, 4)))


@pytest.mark.parametrize("library", ["numpy", "scipy"])
@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
def test_both_blas_gemm_calls(library, dtype_name, rng):
    """The numba kernels call NumPy's CBLAS where NumPy has it, else SciPy's through Numba's wrapper: both
    calls, against the reference, with C and F (transposed) operands and a single row, beta 0 (out not read)
    and 1. The NumPy call is skipped only where NumPy's BLAS has no 64-bit CBLAS, and then nothing uses it."""
    numba = pytest.importorskip("numba")
    from deltaprop.kernels.cpu.gemm import GEMM_INTO, gemm_blas

    if library == "numpy" and gemm_blas()[0] != "numpy":
        pytest.skip("this NumPy has no 64-bit CBLAS gemm")
    gemm_into = GEMM_INTO[library]

    @numba.njit
    def call(a, b, out, alpha, beta):
        gemm_into(a, b, out, alpha, beta)

    dtype = np.dtype(dtype_name)
    for a, b in [(randn(rng, (7, 5), dtype), randn(rng, (5, 3), dtype)),
                 (randn(rng, (5, 7), dtype).T, randn(rng, (3, 5), dtype).T),
                 (randn(rng, (1, 4), dtype), randn(rng, (4, 1), dtype))]:
        shape = (a.shape[0], b.shape[1])
        for beta in (0.0, 1.0):
            start = randn(rng, shape, dtype) if beta else np.full(shape, np.nan, dtype)
            out = start.copy()
            call(a, b, out, dtype.type(-0.5), dtype.type(beta))
            assert rel_err(out, ref.gemm(a, b, start, alpha=-0.5, beta=beta)) <= tol(dtype)
