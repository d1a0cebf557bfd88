"""Property-based robustness of the model's public API on every CPU backend (hypothesis, derandomized).

The rule every test checks: an outcome is either correct (against the float64 reference of
kernels/reference.py) or a clear error naming the argument, and a refused call changes nothing.
"""

import math
import re
import threading

import numpy as np
import pytest

pytest.importorskip("hypothesis")  # of the test extra: without it this module is skipped, the rest collected

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from helpers import CPU_BACKENDS, rel_err  # noqa: E402
from deltaprop.backend import to_numpy  # noqa: E402
from deltaprop.kernels import reference  # noqa: E402
from deltaprop.model import MLP  # noqa: E402

# small and fixed: the suite runs in CI on two cores; derandomize makes each run try the same examples
PROPERTIES = settings(max_examples=12, derandomize=True, deadline=None,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

backends = st.sampled_from(CPU_BACKENDS)
sizes_lists = st.lists(st.integers(1, 9), min_size=2, max_size=4)


def reference_logits(net, X):
    weights = [to_numpy(W) for W in net.weights]
    biases = [to_numpy(b) for b in net.biases]
    return reference.forward(weights, biases, np.asarray(X, np.float64), net.activation)[0][-1]


def in_layout(X, layout):
    """X (N, n) as an array of the same values in another memory layout."""
    if layout == "fortran":
        return np.asfortranarray(X)
    if layout == "strided":  # every other row of a larger array
        wide = np.zeros((2 * X.shape[0], X.shape[1]), X.dtype)
        wide[::2] = X
        return wide[::2]
    if layout == "transposed":  # the transpose of a C-ordered (n, N) array
        return np.ascontiguousarray(X.T).T
    return X


@PROPERTIES
@given(backend_name=backends, sizes=sizes_lists, batch=st.integers(1, 17), seed=st.integers(0, 2**32 - 1),
       activation=st.sampled_from(["relu", "tanh", "sigmoid"]),
       input_dtype=st.sampled_from(["float16", "float32", "float64", "int32"]),
       layout=st.sampled_from(["C", "fortran", "strided", "transposed"]), chunk_size=st.integers(1, 20))
def test_predict_proba_is_the_reference_for_any_shape_dtype_and_layout(backend_name, sizes, batch, seed, activation,
                                                                       input_dtype, layout, chunk_size):
    net = MLP(sizes, activation=activation, backend=backend_name, dtype="float64", seed=seed % 1000)
    rng = np.random.default_rng(seed)
    X = in_layout((rng.standard_normal((batch, sizes[0])) * 3).astype(input_dtype), layout)
    expected = reference.softmax(reference_logits(net, X))
    proba = to_numpy(net.predict_proba(X, chunk_size=chunk_size))
    assert proba.shape == (batch, sizes[-1])
    assert rel_err(proba, expected) <= 1e-12
    labels = to_numpy(net.predict(X, chunk_size=chunk_size))
    clear = np.sort(expected, axis=1)[:, -1] - (np.sort(expected, axis=1)[:, -2] if sizes[-1] > 1 else 0) > 1e-9
    assert np.array_equal(labels[clear], expected.argmax(axis=1)[clear])


@PROPERTIES
@given(backend_name=backends, batch=st.integers(1, 30), data=st.data(), chunk_size=st.integers(1, 12),
       method=st.sampled_from(["predict", "predict_proba", "evaluate"]))
def test_non_finite_rows_are_named_wherever_they_are(backend_name, batch, data, chunk_size, method):
    net = MLP([5, 7, 3], backend=backend_name, seed=0)
    rng = np.random.default_rng(batch)
    X = rng.standard_normal((batch, 5)).astype(np.float32)
    bad = sorted(data.draw(st.sets(st.integers(0, batch - 1), min_size=1, max_size=batch), label="bad rows"))
    for row in bad:
        X[row, data.draw(st.integers(0, 4), label="column")] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    y = rng.integers(0, 3, batch)
    message = (rf"X: expected finite values, got NaN or inf in {len(bad)} row\(s\), the first "
               + re.escape(str(bad[:5])))
    with pytest.raises(ValueError, match=message):
        if method == "evaluate":
            net.evaluate(X, y, chunk_size=chunk_size)
        else:
            getattr(net, method)(X, chunk_size=chunk_size)


@PROPERTIES
@given(backend_name=backends, labels=st.lists(st.integers(-3, 6), min_size=1, max_size=20),
       method=st.sampled_from(["fit", "evaluate", "train_step"]))
def test_labels_out_of_range_are_refused_and_change_nothing(backend_name, labels, method):
    net = MLP([4, 6, 4], backend=backend_name, dtype="float64", seed=1)
    X = np.random.default_rng(len(labels)).standard_normal((len(labels), 4))
    y = np.array(labels, np.int64)
    params, grads = to_numpy(net.params).copy(), to_numpy(net.grads).copy()
    run = {"fit": lambda: net.fit(X, y, epochs=1, progress=False), "evaluate": lambda: net.evaluate(X, y),
           "train_step": lambda: net.train_step(X, y, lr=0.1)}[method]
    if all(0 <= label < 4 for label in labels):
        run()
        return
    with pytest.raises(ValueError, match=r"labels: expected class labels in \[0, 3\], got -?\d"):
        run()
    assert np.array_equal(to_numpy(net.params), params) and np.array_equal(to_numpy(net.grads), grads)
    assert net.optimizer is None


@PROPERTIES
@given(backend_name=backends, lr=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2, 2)))
def test_train_step_is_sgd_or_refuses_the_learning_rate(backend_name, lr):
    net = MLP([4, 5, 3], backend=backend_name, dtype="float64", seed=2)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((6, 4)), rng.integers(0, 3, 6)
    weights = [to_numpy(W).copy() for W in net.weights]
    biases = [to_numpy(b).copy() for b in net.biases]
    params = to_numpy(net.params).copy()
    valid = math.isfinite(lr) and lr > 0 and abs(lr) < 1e3  # a huge lr may diverge: the loss is checked then
    if not (math.isfinite(lr) and lr > 0):
        with pytest.raises(ValueError, match=r"train_step: lr: expected a finite real number > 0"):
            net.train_step(x, y, lr=lr)
        assert np.array_equal(to_numpy(net.params), params)
        return
    loss = net.train_step(x, y, lr=lr)
    if valid:
        new_weights, new_biases, losses = reference.sgd_steps(weights, biases, [(x, y)], "relu",
                                                              "softmax_cross_entropy", lr)
        assert loss == pytest.approx(losses[0], rel=1e-12)
        for W, b, ref_W, ref_b in zip(net.weights, net.biases, new_weights, new_biases):
            assert rel_err(to_numpy(W), ref_W) <= 1e-12 and rel_err(to_numpy(b), ref_b) <= 1e-12


@PROPERTIES
@given(backend_name=backends, n_threads=st.integers(2, 6), batch=st.sampled_from([1, 7, 64]))
def test_any_number_of_threads_predicts_as_one(backend_name, n_threads, batch):
    net = MLP([16, 32, 8], backend=backend_name, seed=5)
    rng = np.random.default_rng(n_threads)
    inputs = [rng.standard_normal((batch, 16)).astype(np.float32) for _ in range(n_threads)]
    expected = [to_numpy(net.predict_proba(x)).copy() for x in inputs]
    results, start = [None] * n_threads, threading.Barrier(n_threads)

    def work(k):
        start.wait()
        results[k] = [to_numpy(net.predict_proba(inputs[(k + r) % n_threads])).copy() for r in range(20)]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(n_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for k, got in enumerate(results):
        assert all(np.array_equal(g, expected[(k + r) % n_threads]) for r, g in enumerate(got))
