"""Copies that are copies: copy.copy, copy.deepcopy, pickle and ``MLP.to`` give networks whose views view
their own buffers, that train without touching the original, and that carry on from the same state."""

import copy
import pickle
import subprocess
import sys

import numpy as np
import pytest
from helpers import CPU_BACKENDS, rel_err, tol

from deltaprop.backend import to_numpy
from deltaprop.kernels import reference
from deltaprop.model import MLP

COPIES = {
    "copy.copy": copy.copy,
    "copy.deepcopy": copy.deepcopy,
    "pickle": lambda net: pickle.loads(pickle.dumps(net)),
    "to(same backend)": lambda net: net.to(net.backend.name),
}


@pytest.fixture
def data(rng):
    return rng.standard_normal((24, 5)), rng.integers(0, 3, 24)


def trained_net(backend_name, data, dtype="float64"):
    net = MLP([5, 7, 3], activation="tanh", backend=backend_name, dtype=dtype, seed=1)
    net.fit(*data, epochs=2, batch_size=8, shuffle=False, progress=False)  # leaves Adam's state behind
    return net


def host_probabilities(net, X):
    """softmax of the float64 reference forward pass over the network's own weights and biases."""
    weights, biases = [to_numpy(W) for W in net.weights], [to_numpy(b) for b in net.biases]
    zs, _ = reference.forward(weights, biases, X, net.activation)
    return reference.softmax(zs[-1])


@pytest.mark.parametrize("how", sorted(COPIES))
def test_a_copy_trains_independently_and_carries_on_from_the_same_state(backend_name, data, how):
    net = trained_net(backend_name, data)
    before = to_numpy(net.params).copy()
    twin = COPIES[how](net)
    assert twin is not net and twin.backend is net.backend and twin.optimizer is not net.optimizer
    assert np.array_equal(to_numpy(twin.params), before)
    twin.fit(*data, epochs=1, batch_size=8, shuffle=False, progress=False)
    assert np.array_equal(to_numpy(net.params), before), "training the copy changed the original"
    # the copy predicts with the weights it trained (its views view its own buffer) ...
    assert rel_err(twin.predict_proba(data[0]), host_probabilities(twin, data[0])) <= tol("float64")
    assert not np.array_equal(to_numpy(twin.params), before)
    # ... and the original, trained the same way from the same optimizer state, reaches the same weights
    net.fit(*data, epochs=1, batch_size=8, shuffle=False, progress=False)
    assert rel_err(twin.params, to_numpy(net.params)) <= tol("float64")
    assert twin.optimizer.step_count == net.optimizer.step_count == 9


@pytest.mark.parametrize("how", sorted(COPIES))
def test_the_views_of_a_copy_view_its_own_buffers(data, how):
    net = trained_net("numpy", data)
    twin = COPIES[how](net)
    twin.params[...] = 0.0
    twin.grads[...] = 1.0
    assert all((W == 0).all() for W in twin.weights) and all((b == 0).all() for b in twin.biases)
    assert all((g == 1).all() for g in twin.grad_weights)
    assert not any((W == 0).all() for W in net.weights)
    assert all(np.shares_memory(W, twin.params) for W in twin.weights)
    assert not any(np.shares_memory(W, net.params) for W in twin.weights)
    assert all(not np.shares_memory(state, net.optimizer.state[key]) for key, state in twin.optimizer.state.items())
    assert twin.optimizer.hyper is not net.optimizer.hyper


@pytest.mark.parametrize(("source", "target"), [("numpy", "numba"), ("numba", "numpy")])
def test_to_moves_a_network_to_another_backend(data, source, target):
    net = trained_net(source, data)
    moved = net.to(target)
    assert moved.backend.name == target and net.backend.name == source
    assert np.array_equal(to_numpy(moved.params), to_numpy(net.params))
    assert rel_err(moved.predict_proba(data[0]), host_probabilities(net, data[0])) <= tol("float64")
    moved.fit(*data, epochs=1, batch_size=8, shuffle=False, progress=False)
    net.fit(*data, epochs=1, batch_size=8, shuffle=False, progress=False)  # the same state on the source
    assert rel_err(moved.params, to_numpy(net.params)) <= tol("float64")


@pytest.mark.gpu
def test_to_moves_a_network_between_the_host_and_the_gpu(data):
    pytest.importorskip("cupy")
    net = trained_net("numpy", data, dtype="float32")
    on_gpu = net.to("cupy")
    assert on_gpu.backend.name == "cupy" and type(on_gpu.params).__module__.startswith("cupy")
    assert rel_err(on_gpu.predict_proba(data[0]), host_probabilities(net, data[0])) <= tol("float32")
    back = pickle.loads(pickle.dumps(on_gpu)).to("numpy")
    assert np.array_equal(back.params, net.params)


def test_a_pickled_network_unpickles_in_another_process_on_its_backend(data, tmp_path):
    net = trained_net(CPU_BACKENDS[0], data)
    path = tmp_path / "net.pickle"
    path.write_bytes(pickle.dumps(net))
    np.save(tmp_path / "X.npy", data[0])
    code = ("import pickle, sys, numpy as np; net = pickle.loads(open(sys.argv[1], 'rb').read()); "
            "np.save(sys.argv[3], np.asarray(net.predict_proba(np.load(sys.argv[2])))); print(net.backend.name)")
    out = tmp_path / "p.npy"
    done = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "X.npy"), str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == CPU_BACKENDS[0]
    assert rel_err(np.load(out), host_probabilities(net, data[0])) <= tol("float64")
