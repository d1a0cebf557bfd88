"""The MLP against the reference: gradients, whole steps, layout, and its refusals of bad input."""

import math

import numpy as np
import pytest
from helpers import host_params, rel_err, targets_for, tol

from deltaprop.backend import to_numpy
from deltaprop.backend.base import HOST_ALIGNMENT
from deltaprop.errors import NonFiniteLossError
from deltaprop.kernels import reference
from deltaprop.kernels.activations import ACTIVATIONS
from deltaprop.model import LOSSES, MLP


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_gradients_match_central_differences(activation, loss, rng):
    """Backprop's dJ/dW and dJ/db against central differences of the reference loss, in float64."""
    sizes = [4, 5, 3, 3]
    net = MLP(sizes, activation=activation, loss=loss, backend="numpy", dtype="float64", seed=7)
    x = rng.standard_normal((6, sizes[0]))
    y = targets_for(loss, rng, 6, sizes[-1])
    _, grads = net.loss_and_grads(x, y)
    weights, biases = host_params(net)

    def loss_at(ws, bs):
        zs, _ = reference.forward(ws, bs, x, activation)
        return reference.LOSSES[loss](zs[-1], y)[0]

    h = 1e-6
    for l in range(net.depth):
        for params, grad in ((weights, grads[l][0]), (biases, grads[l][1])):
            numeric = np.zeros(params[l].shape)
            for idx in np.ndindex(params[l].shape):
                saved = params[l][idx]
                params[l][idx] = saved + h
                up = loss_at(weights, biases)
                params[l][idx] = saved - h
                down = loss_at(weights, biases)
                params[l][idx] = saved
                numeric[idx] = (up - down) / (2 * h)
            assert rel_err(grad, numeric) <= 1e-6, (l, params[l].shape)


def test_loss_and_grads_match_reference(backend_name, dtype, rng):
    net = MLP([9, 16, 7, 5], activation="gelu", backend=backend_name, dtype=dtype, seed=1)
    x = rng.standard_normal((11, 9))
    y = rng.integers(0, 5, 11)
    loss, grads = net.loss_and_grads(x, y)
    ref_loss, ref_grads = reference.loss_and_grads(*host_params(net), x.astype(dtype), y, "gelu",
                                                   "softmax_cross_entropy")
    assert abs(loss - ref_loss) <= tol(dtype.name) * abs(ref_loss)
    for (dW, db), (rW, rb) in zip(grads, ref_grads):
        assert rel_err(dW, rW) <= tol(dtype.name)
        assert rel_err(db, rb) <= tol(dtype.name)


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_five_sgd_steps_match_reference(backend_name, dtype, loss, rng):
    """Whole-step parity: from the same initial weights, 5 train_steps equal the reference's SGD."""
    net = MLP([12, 20, 20, 6], activation="tanh", loss=loss, backend=backend_name, dtype=dtype, seed=2)
    weights, biases = host_params(net)
    batches = [(rng.standard_normal((16, 12)).astype(dtype), targets_for(loss, rng, 16, 6)) for _ in range(5)]
    losses = [net.train_step(x, y.astype(dtype) if y.ndim == 2 else y, lr=0.1) for x, y in batches]
    ref_w, ref_b, ref_losses = reference.sgd_steps(weights, biases, batches, "tanh", loss, 0.1)
    np.testing.assert_allclose(losses, ref_losses, rtol=tol(dtype.name) * 10)
    for W, rW in zip(net.weights, ref_w):
        assert rel_err(W, rW) <= tol(dtype.name)
    for b, rb in zip(net.biases, ref_b):
        assert rel_err(b, rb) <= tol(dtype.name)


def test_forward_keeps_z_and_a(backend_name, rng):
    net = MLP([3, 4, 2], activation="sigmoid", backend=backend_name, dtype="float64", seed=0)
    x = rng.standard_normal((5, 3))
    cache = net.forward(x)
    zs, acts = reference.forward(*host_params(net), x, "sigmoid")
    assert len(cache.z) == 2 and len(cache.a) == 2
    assert rel_err(cache.a[0], x) == 0
    for z, rz in zip(cache.z, zs):
        assert rel_err(z, rz) <= 1e-12
    assert rel_err(cache.a[1], acts[0]) <= 1e-12


def test_parameters_are_views_of_one_flat_buffer():
    net = MLP([3, 4, 2], backend="numpy", seed=0)
    assert net.n_params == 3 * 4 + 4 + 4 * 2 + 2 == net.params.size
    net.params[:] = np.arange(net.n_params)
    assert net.weights[0][0, 0] == 0 and net.biases[0][0] == 12 and net.weights[1][0, 0] == 16
    assert all(np.shares_memory(W, net.params) for W in net.weights + net.biases)


@pytest.mark.parametrize("backend_name", ["numpy", "numba"])
def test_host_buffers_start_on_a_cache_line(backend_name, rng):
    """Parameters, gradients and the workspace of the fused step are 64-byte aligned (NumPy gives 16)."""
    net = MLP([5, 7, 3], backend=backend_name, seed=0)
    net.train_step(rng.standard_normal((4, 5)).astype(np.float32), np.array([0, 1, 2, 0]))
    buffers = [net.params, net.grads, *(ws.work for ws in net._threads.by_batch.values())]
    assert [b.ctypes.data % HOST_ALIGNMENT for b in buffers] == [0] * len(buffers)


def test_same_seed_same_network_on_every_backend(backend_name):
    a = MLP([6, 5, 4], backend="numpy", dtype="float32", seed=11)
    b = MLP([6, 5, 4], backend=backend_name, dtype="float32", seed=11)
    assert np.array_equal(to_numpy(a.params), to_numpy(b.params))
    assert not np.array_equal(to_numpy(a.params), to_numpy(MLP([6, 5, 4], backend="numpy", seed=12).params))


@pytest.mark.parametrize("activation, bound", [("relu", "he"), ("tanh", "xavier")])
def test_initialisation_scale(activation, bound):
    net = MLP([400, 300, 10], activation=activation, backend="numpy", dtype="float64", seed=0)
    W = net.weights[0]
    expected_std = math.sqrt(2 / 400) if bound == "he" else math.sqrt(6 / 700) / math.sqrt(3)
    assert abs(W.std() / expected_std - 1) < 0.02
    assert not np.any(net.biases[0])


# ---- refusals -------------------------------------------------------------------------------------


@pytest.fixture
def net(backend_name):
    return MLP([4, 6, 3], backend=backend_name, dtype="float64", seed=0)


@pytest.mark.parametrize(
    "x_shape, y, error, message",
    [
        ((5, 7), np.zeros(5, int), ValueError, r"x: expected shape \(batch, 4\), got \(5, 7\)"),
        ((0, 4), np.zeros(0, int), ValueError, r"x: expected a non-empty batch"),
        ((5, 4), np.zeros(4, int), ValueError, r"y: expected 5 rows"),
        ((5, 4), np.array([0, 1, 2, 3, 1]), ValueError, r"labels in \[0, 2\], got 3"),
        ((5, 4), np.array([0, 1, -1, 2, 1]), ValueError, r"labels in \[0, 2\], got -1"),
        ((5, 4), np.array([0.0, 1.0, 2.0, 1.0, 0.0]), TypeError, r"y: expected int labels of shape \(5,\)"),
        ((5, 4), np.array(1), ValueError, r"y: expected 5 rows"),  # a 0-d label: the conversion makes it (1,)
        ((5, 4), np.zeros((5, 2)), ValueError, r"targets: expected shape \(5, 3\), got \(5, 2\)"),
    ],
)
def test_train_step_refuses_bad_input(net, x_shape, y, error, message):
    before = to_numpy(net.params).copy()
    with pytest.raises(error, match=message):
        net.train_step(np.ones(x_shape), y)
    assert np.array_equal(to_numpy(net.params), before), "a refused step must not touch the parameters"


def test_nan_input_raises_non_finite_loss_and_leaves_parameters(net):
    x = np.ones((2, 4))
    x[1, 2] = np.nan
    before = to_numpy(net.params).copy()
    with pytest.raises(NonFiniteLossError, match="loss: expected a finite value, got nan"):
        net.train_step(x, np.array([0, 1]))
    assert np.array_equal(to_numpy(net.params), before)
    assert np.isnan(to_numpy(net.forward(x).logits)[1]).all()  # forward documents NaN through


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(activation="swish"), r"activation: expected one of \['elu', .*got 'swish'"),
        (dict(loss="hinge"), r"loss: expected one of \['mse', .*got 'hinge'"),
        (dict(backend="tpu"), r"backend: expected 'auto' or one of .*got 'tpu'"),
        (dict(sizes=[4]), r"sizes: expected at least two positive integer widths"),
        (dict(sizes=[4, 0, 2]), r"sizes: expected at least two positive integer widths"),
        (dict(sizes=[4, 2.5, 2]), r"sizes: expected at least two positive integer widths"),
    ],
)
def test_constructor_refuses_unknown_names(kwargs, message):
    args = dict(sizes=[4, 3, 2], backend="numpy") | kwargs
    with pytest.raises(ValueError, match=message):
        MLP(**args)


def test_dtype_refused_with_the_supported_list():
    with pytest.raises(TypeError, match=r"dtype: expected one of \['float32', 'float64'\] on cpu, got int32"):
        MLP([3, 2], backend="numpy", dtype="int32")
    with pytest.raises(TypeError, match=r"got float16"):
        MLP([3, 2], backend="numpy", dtype="float16")
