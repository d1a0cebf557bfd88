"""fit / predict / predict_proba / evaluate against the float64 reference, determinism, and the digits target."""

import numpy as np
import pytest
from helpers import rel_err, tol

from deltaprop.backend import to_numpy
from deltaprop.kernels import reference
from deltaprop.model import MLP
from deltaprop.model.optim import get_optimizer


def host_params(net):
    return [to_numpy(W).copy() for W in net.weights], [to_numpy(b).copy() for b in net.biases]


def blobs(rng, n, features=5, classes=3):
    """Separable-ish clusters: class c around a random centre."""
    centres = rng.standard_normal((classes, features)) * 3
    y = rng.integers(0, classes, n)
    return centres[y] + rng.standard_normal((n, features)), y


def reference_epoch(weights, biases, X, y, order, batch_size, lr, activation="tanh"):
    """One epoch of plain SGD over the rows of X in ``order``, in float64, from the reference equations.
    Returns the new weights and biases, the batch-size-weighted mean loss and the running accuracy."""
    loss_sum, hits = 0.0, 0
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        zs, _ = reference.forward(weights, biases, X[rows], activation)
        hits += int((zs[-1].argmax(axis=1) == y[rows]).sum())
        loss, grads = reference.loss_and_grads(weights, biases, X[rows], y[rows], activation, "softmax_cross_entropy")
        loss_sum += loss * len(rows)
        weights = [W - lr * dW for W, (dW, _) in zip(weights, grads)]
        biases = [b - lr * db for b, (_, db) in zip(biases, grads)]
    return weights, biases, loss_sum / len(order), hits / len(order)


@pytest.mark.parametrize("shuffle", [False, True])
def test_fit_matches_reference_sgd_epochs(backend_name, dtype, shuffle, rng):
    """Two epochs of fit(optimizer="sgd") = the reference's minibatch SGD over the same batch order:
    row order 0..N-1, or default_rng(seed).permutation(N) per epoch; the last batch is partial."""
    X, y = blobs(rng, 53)
    X = X.astype(dtype)
    net = MLP([5, 8, 3], activation="tanh", backend=backend_name, dtype=dtype, seed=3)
    weights, biases = host_params(net)
    history = net.fit(X, y, epochs=2, batch_size=10, optimizer="sgd", lr=0.1, shuffle=shuffle, seed=9,
                      progress=False)
    order_rng = np.random.default_rng(9)
    for epoch in range(2):
        order = order_rng.permutation(len(y)) if shuffle else np.arange(len(y))
        weights, biases, loss, accuracy = reference_epoch(weights, biases, X, y, order, 10, 0.1)
        assert abs(history.loss[epoch] - loss) <= 10 * tol(dtype.name) * loss
        assert history.accuracy[epoch] == accuracy
    for W, rW in zip(net.weights, weights):
        assert rel_err(W, rW) <= 10 * tol(dtype.name)
    assert history.val_loss == [] and history.stopped_epoch is None


def test_validation_metrics_are_those_of_each_epochs_weights(backend_name, rng):
    X, y = blobs(rng, 60)
    X_val, y_val = blobs(rng, 25)
    net = MLP([5, 7, 3], backend=backend_name, dtype="float64", seed=1)
    snapshots = []
    history = net.fit(X, y, epochs=3, batch_size=16, validation_data=(X_val, y_val), progress=False,
                      callback=lambda epoch, logs: snapshots.append(host_params(net)))
    assert len(history.val_loss) == len(history.val_accuracy) == 3
    for (weights, biases), val_loss, val_accuracy in zip(snapshots, history.val_loss, history.val_accuracy):
        zs, _ = reference.forward(weights, biases, X_val, "relu")
        expected_loss, _ = reference.softmax_xent(zs[-1], y_val)
        assert abs(val_loss - expected_loss) <= tol("float64") * expected_loss
        assert val_accuracy == np.mean(zs[-1].argmax(axis=1) == y_val)


def test_early_stopping_restores_the_best_weights(backend_name, rng):
    """Random labels: the validation loss soon rises; fit stops ``patience`` epochs after its minimum and
    the network holds the weights of the best epoch."""
    X, y = rng.standard_normal((40, 6)), rng.integers(0, 4, 40)
    X_val, y_val = rng.standard_normal((40, 6)), rng.integers(0, 4, 40)
    net = MLP([6, 64, 4], backend=backend_name, dtype="float64", seed=0)
    snapshots = {}
    history = net.fit(X, y, epochs=200, batch_size=8, lr=0.01, validation_data=(X_val, y_val), patience=3,
                      progress=False, callback=lambda epoch, logs: snapshots.update({epoch: to_numpy(net.params).copy()}))
    best = int(np.argmin(history.val_loss)) + 1
    assert history.best_epoch == best
    assert history.stopped_epoch == best + 3 == history.epochs < 200
    assert np.array_equal(to_numpy(net.params), snapshots[best])


def test_fit_continues_with_the_optimizer_state(backend_name, rng):
    """fit(1 epoch) twice = fit(2 epochs) without shuffling: the second fit carries on with Adam's m, v, step."""
    X, y = blobs(rng, 30)
    once = MLP([5, 6, 3], backend=backend_name, dtype="float64", seed=2)
    twice = MLP([5, 6, 3], backend=backend_name, dtype="float64", seed=2)
    once.fit(X, y, epochs=2, batch_size=8, shuffle=False, progress=False)
    twice.fit(X, y, epochs=1, batch_size=8, shuffle=False, progress=False)
    twice.fit(X, y, epochs=1, batch_size=8, shuffle=False, progress=False)
    assert twice.optimizer.step_count == 8
    assert np.array_equal(to_numpy(once.params), to_numpy(twice.params))


@pytest.fixture
def fixed_threads(backend_name):
    """On numba, a fixed thread count (2, or fewer if fewer are available) for the test, restored after."""
    if backend_name != "numba":
        yield
        return
    numba = pytest.importorskip("numba")
    previous = numba.get_num_threads()
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    yield
    numba.set_num_threads(previous)


@pytest.mark.usefixtures("fixed_threads")
def test_same_seed_gives_bitwise_identical_weights(backend_name, rng):
    X, y = blobs(rng, 100)

    def trained(seed):
        net = MLP([5, 16, 16, 3], backend=backend_name, dtype="float32", seed=seed)
        net.fit(X, y, epochs=3, batch_size=16, progress=False)
        return to_numpy(net.params).copy()

    first = trained(4)
    assert np.array_equal(first, trained(4))
    assert not np.array_equal(first, trained(5))


# ---- inference --------------------------------------------------------------------------------------

OUTPUTS = {
    "softmax_cross_entropy": (reference.softmax, lambda z: z.argmax(axis=1)),
    "sigmoid_cross_entropy": (lambda z: 1 / (1 + np.exp(-z)), lambda z: (z > 0).astype(np.int64)),
    "mse": (lambda z: z, lambda z: z),
}


@pytest.mark.parametrize("loss", sorted(OUTPUTS))
def test_predict_and_predict_proba_match_reference_in_chunks(backend_name, dtype, loss, rng):
    net = MLP([5, 9, 4], activation="tanh", loss=loss, backend=backend_name, dtype=dtype, seed=6)
    X = rng.standard_normal((50, 5)).astype(dtype)
    zs, _ = reference.forward(*host_params(net), X, "tanh")
    output_map, decision = OUTPUTS[loss]
    proba = net.predict_proba(X, chunk_size=7)
    assert proba.shape == (50, 4) and proba.dtype == dtype
    assert rel_err(proba, output_map(zs[-1])) <= tol(dtype.name)
    predicted = to_numpy(net.predict(X, chunk_size=7))
    if loss == "mse":
        assert rel_err(predicted, zs[-1]) <= tol(dtype.name)
    else:
        assert np.array_equal(predicted, decision(zs[-1]))


@pytest.mark.parametrize("loss", sorted(OUTPUTS))
def test_evaluate_matches_reference(backend_name, loss, rng):
    net = MLP([5, 9, 4], activation="tanh", loss=loss, backend=backend_name, dtype="float64", seed=6)
    X = rng.standard_normal((45, 5))
    y = rng.integers(0, 4, 45)
    zs, _ = reference.forward(*host_params(net), X, "tanh")
    result = net.evaluate(X, y, chunk_size=16)
    expected_loss, _ = reference.LOSSES[loss](zs[-1], y)
    assert abs(result.loss - expected_loss) <= tol("float64") * expected_loss
    onehot = reference.onehot(y, 4)
    expected_accuracy = {"softmax_cross_entropy": np.mean(zs[-1].argmax(axis=1) == y),
                         "sigmoid_cross_entropy": np.mean(((zs[-1] > 0) == onehot).all(axis=1)),
                         "mse": None}[loss]
    assert result.accuracy == expected_accuracy


def test_dlpack_inputs_give_the_same_results(rng):
    torch = pytest.importorskip("torch")
    X, y = blobs(rng, 40)
    net = MLP([5, 6, 3], backend="numpy", dtype="float32", seed=0)
    expected = net.predict_proba(X)
    assert np.array_equal(net.predict_proba(torch.from_numpy(X)), expected)
    assert net.evaluate(torch.from_numpy(X), torch.from_numpy(y)) == net.evaluate(X, y)
    a = MLP([5, 6, 3], backend="numpy", seed=0)
    b = MLP([5, 6, 3], backend="numpy", seed=0)
    a.fit(X, y, epochs=2, progress=False)
    b.fit(torch.from_numpy(X), torch.from_numpy(y), epochs=2, progress=False)
    assert np.array_equal(a.params, b.params)


# ---- progress -----------------------------------------------------------------------------------------


def test_progress_bar_on_request_and_off_without_a_terminal(rng, capsys):
    pytest.importorskip("tqdm")
    X, y = blobs(rng, 20)
    net = MLP([5, 4, 3], backend="numpy", seed=0)
    net.fit(X, y, epochs=2, progress=None)  # pytest's captured stderr is no terminal
    assert capsys.readouterr().err == ""
    net.fit(X, y, epochs=2, progress=True)
    assert "2/2" in capsys.readouterr().err


# ---- refusals -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(epochs=0), ValueError, r"epochs: expected an integer >= 1, got 0"),
        (dict(batch_size=2.5), ValueError, r"batch_size: expected an integer >= 1, got 2.5"),
        (dict(patience=0), ValueError, r"patience: expected an integer >= 1, got 0"),
        (dict(optimizer="lbfgs"), ValueError, r"optimizer: expected one of \['adam', 'adamw', 'momentum', 'sgd'\]"),
        (dict(validation_data=np.zeros((3, 4))), TypeError, r"validation_data: expected a pair \(X_val, y_val\), got ndarray"),
        (dict(validation_data=(np.zeros((3, 5)), np.zeros(3, int))), ValueError,
         r"validation_data X: expected a non-empty 2-D array of shape \(n_samples, 4\), got shape \(3, 5\)"),
        (dict(X=np.zeros((6, 3))), ValueError, r"X: expected a non-empty 2-D array of shape \(n_samples, 4\), got shape \(6, 3\)"),
        (dict(y=np.array([0, 1, 2, 3, 1, 0])), ValueError, r"labels in \[0, 2\], got 3"),
        (dict(y=np.zeros(5, int)), ValueError, r"y: expected 6 rows \(one per row of x\), got 5"),
    ],
)
def test_fit_refuses_bad_arguments_before_touching_the_weights(kwargs, error, message):
    net = MLP([4, 5, 3], backend="numpy", dtype="float64", seed=0)
    before = net.params.copy()
    args = dict(X=np.ones((6, 4)), y=np.array([0, 1, 2, 0, 1, 2]), progress=False) | kwargs
    with pytest.raises(error, match=message):
        net.fit(**args)
    assert np.array_equal(net.params, before)


def test_lr_with_an_optimizer_instance_is_refused():
    net = MLP([4, 3], backend="numpy", seed=0)
    with pytest.raises(ValueError, match=r"lr/schedule: expected None with an Optimizer instance"):
        net.fit(np.ones((2, 4)), np.array([0, 1]), optimizer=get_optimizer("sgd"), lr=0.1, progress=False)


def test_predict_refuses_a_wrong_width():
    net = MLP([4, 3], backend="numpy", seed=0)
    with pytest.raises(ValueError, match=r"X: expected a non-empty 2-D array of shape \(n_samples, 4\), got shape \(2, 3\)"):
        net.predict(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"chunk_size: expected an integer >= 1, got 0"):
        net.predict(np.ones((2, 4)), chunk_size=0)


# ---- the target ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_digits_reaches_97_5_percent():
    """The issue's recipe: 64-128-128-10 ReLU, Adam lr 1e-3, batch 32, 40 epochs, seed 0, on the
    stratified 25% test split (random_state 0) of scikit-learn's digits scaled to [0, 1]."""
    datasets = pytest.importorskip("sklearn.datasets")
    model_selection = pytest.importorskip("sklearn.model_selection")
    X, y = datasets.load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = model_selection.train_test_split(X / 16, y, test_size=0.25, stratify=y,
                                                                        random_state=0)
    net = MLP([64, 128, 128, 10], activation="relu", backend="numpy", dtype="float32", seed=0)
    net.fit(X_train, y_train, epochs=40, batch_size=32, optimizer="adam", lr=1e-3, progress=False)
    accuracy = np.mean(to_numpy(net.predict(X_test)) == y_test)
    assert accuracy >= 0.975, accuracy
