"""MLPEnsemble: member k of K stacked networks computes what MLP(seed=seed + k) computes alone on the same
batches and hyperparameters (bit-identical on numpy; within the parity tolerance elsewhere), the stacked
gradients match finite differences, and the stacked kernels match the reference on every backend."""

import numpy as np
import pytest
from helpers import host64, random_host

from deltaprop.backend import get_backend
from deltaprop.errors import CheckpointError, NonFiniteLossError
from deltaprop.kernels import reference
from deltaprop.model import MLP, MLPEnsemble
from deltaprop.model.optim import Adam, Momentum

SIZES = [6, 9, 7, 3]
K = 4
# the parity bound for a compiled backend: relative to the largest parameter
PARITY = {"float32": 1e-6, "float64": 1e-12}


def one_case_on_the_stand_in(request, dtype, optimizer, first):
    """The stand-in runs a fit test in float32 with its first optimizer only: a step there takes ~0.5 s, and
    the other cases run the same launches (the kernels' dtypes are covered by tests/test_cuda_sim.py)."""
    if request.node.get_closest_marker("cuda_sim") and (np.dtype(dtype) != np.float32 or optimizer != first):
        pytest.skip("the CUDA stand-in runs this fit in float32 with the first optimizer only")


def assert_members_equal(ensemble, nets, backend_name, dtype):
    for k, net in enumerate(nets):
        got, expected = host64(ensemble.backend, ensemble.params[k]), host64(net.backend, net.params)
        if backend_name == "numpy":
            assert np.array_equal(got, expected), f"member {k} differs from its MLP"
        else:
            error = np.abs(got - expected).max() / np.abs(expected).max()
            assert error <= PARITY[np.dtype(dtype).name], f"member {k}: relative difference {error:.3g} > {PARITY[np.dtype(dtype).name]}"


def batches(rng, dtype, steps, batch):
    """(x, y, shared) per step: a shared batch on even steps, one batch per member on odd ones."""
    for step in range(steps):
        shared = step % 2 == 0
        shape = (batch, SIZES[0]) if shared else (K, batch, SIZES[0])
        yield rng.standard_normal(shape).astype(dtype), rng.integers(0, SIZES[-1], shape[:-1]), shared


def test_members_start_as_their_networks(backend_name, dtype):
    ensemble = MLPEnsemble(K, SIZES, backend=backend_name, dtype=dtype, seed=7)
    for k in range(K):
        net = MLP(SIZES, backend=backend_name, dtype=dtype, seed=7 + k)
        assert np.array_equal(host64(ensemble.backend, ensemble.params[k]), host64(net.backend, net.params))


@pytest.mark.parametrize("batch", [3, 20])  # the small-batch loops and the GEMM step of a compiled backend
@pytest.mark.parametrize("fused", [True, False])
def test_train_step_matches_each_member_trained_alone(backend_name, dtype, batch, fused, rng):
    lrs = [0.1, 0.05, 0.2, 0.02]
    ensemble = MLPEnsemble(K, SIZES, backend=backend_name, dtype=dtype, seed=3)
    ensemble.use_fused_step = fused
    nets = [MLP(SIZES, backend=backend_name, dtype=dtype, seed=3 + k) for k in range(K)]
    for x, y, shared in batches(rng, dtype, 4, batch):
        losses = ensemble.train_step(x, y, lrs)
        alone = [net.train_step(x if shared else x[k], y if shared else y[k], lrs[k]) for k, net in enumerate(nets)]
        np.testing.assert_allclose(losses, alone, rtol=1e-5 if np.dtype(dtype) == np.float32 else 1e-12)
    assert_members_equal(ensemble, nets, backend_name, dtype)


def test_stacked_gradients_match_finite_differences(rng):
    ensemble = MLPEnsemble(3, SIZES, activation="tanh", backend="numpy", dtype="float64", seed=1)
    x = rng.standard_normal((3, 5, SIZES[0]))
    y = rng.integers(0, SIZES[-1], (3, 5))
    grads = ensemble.loss_and_grads(x, y)[1]
    flat = np.concatenate([np.concatenate([dW.reshape(3, -1), db], axis=1) for dW, db in grads], axis=1)
    eps = 1e-6
    for k, i in [(0, 0), (1, 17), (2, 60), (0, ensemble.params.shape[1] - 1), (1, 101)]:
        saved = ensemble.params[k, i]
        ensemble.params[k, i] = saved + eps
        up = ensemble.loss_and_grads(x, y)[0]
        ensemble.params[k, i] = saved - eps
        down = ensemble.loss_and_grads(x, y)[0]
        ensemble.params[k, i] = saved
        numeric = (up - down) / (2 * eps)
        assert abs(numeric[k] - flat[k, i]) <= 1e-7 * max(1.0, abs(numeric[k]))
        assert np.all(numeric[np.arange(3) != k] == 0)  # a member's parameters move no other member's loss


@pytest.mark.parametrize("optimizer", [Momentum, Adam])
def test_fit_matches_each_member_fitted_alone(request, backend_name, dtype, optimizer):
    one_case_on_the_stand_in(request, dtype, optimizer, Momentum)
    data = np.random.default_rng(0)
    X = data.standard_normal((50, SIZES[0])).astype(dtype)
    y = data.integers(0, SIZES[-1], 50)
    X_val, y_val = X[:20], y[:20]
    lrs, decays = [0.05, 0.1, 0.02, 0.08], [0.0, 1e-3, 0.0, 1e-2]
    ensemble = MLPEnsemble(K, SIZES, backend=backend_name, dtype=dtype, seed=2)
    history = ensemble.fit(X, y, epochs=2, batch_size=16, optimizer=optimizer.name, lr=lrs, weight_decay=decays,
                           validation_data=(X_val, y_val))
    nets = [MLP(SIZES, backend=backend_name, dtype=dtype, seed=2 + k) for k in range(K)]
    for k, net in enumerate(nets):
        alone = net.fit(X, y, epochs=2, batch_size=16, optimizer=optimizer(lr=lrs[k], weight_decay=decays[k]),
                        validation_data=(X_val, y_val), progress=False)
        np.testing.assert_allclose([h[k] for h in history.loss], alone.loss, rtol=1e-5)
        np.testing.assert_allclose([h[k] for h in history.val_accuracy], alone.val_accuracy)
    assert_members_equal(ensemble, nets, backend_name, dtype)


@pytest.mark.parametrize("optimizer", ["adamw", "momentum"])
def test_fit_with_patience_stops_each_member_as_it_would_alone(request, backend_name, dtype, optimizer):
    one_case_on_the_stand_in(request, dtype, optimizer, "adamw")
    data = np.random.default_rng(0)
    X, y = data.standard_normal((60, SIZES[0])).astype(dtype), data.integers(0, SIZES[-1], 60)
    X_val, y_val = data.standard_normal((30, SIZES[0])).astype(dtype), data.integers(0, SIZES[-1], 30)
    lrs = [0.3, 0.05, 0.1, 0.003]  # members that stop at different epochs, and one that runs on
    ensemble = MLPEnsemble(K, SIZES, backend=backend_name, dtype=dtype, seed=2)
    snapshots = []  # each epoch's parameters: a stopped member's stay its kept (final) ones
    history = ensemble.fit(X, y, epochs=10, batch_size=16, optimizer=optimizer, lr=lrs, validation_data=(X_val, y_val),
                           patience=2, callback=lambda epoch, logs: snapshots.append(host64(ensemble.backend,
                                                                                             ensemble.params)))
    nets = [MLP(SIZES, backend=backend_name, dtype=dtype, seed=2 + k) for k in range(K)]
    final, stopped = host64(ensemble.backend, ensemble.params), []
    for k, net in enumerate(nets):
        alone = net.fit(X, y, epochs=10, batch_size=16, optimizer=optimizer, lr=lrs[k], validation_data=(X_val, y_val),
                        patience=2, progress=False)
        assert (history.best_epoch[k], history.stopped_epoch[k]) == (alone.best_epoch, alone.stopped_epoch)
        np.testing.assert_allclose([h[k] for h in history.val_loss[:alone.epochs]], alone.val_loss, rtol=1e-5)
        if alone.stopped_epoch is not None:
            stopped.append(k)
            for later in snapshots[alone.stopped_epoch:]:
                assert np.array_equal(later[k], final[k]), f"member {k} moved after stopping"
    assert stopped and len(stopped) < K  # the case tested: some members stop, at least one runs on
    assert history.epochs == 10
    assert_members_equal(ensemble, nets, backend_name, dtype)


def test_fit_makes_int_labels_one_hot_rows_for_sigmoid_cross_entropy(backend_name):
    data = np.random.default_rng(3)
    X, y = data.standard_normal((40, SIZES[0])), data.integers(0, SIZES[-1], 40)
    X_val, y_val = X[:15], y[:15]
    ensemble = MLPEnsemble(2, SIZES, loss="sigmoid_cross_entropy", backend=backend_name, dtype="float64", seed=5)
    history = ensemble.fit(X, y, epochs=3, batch_size=8, optimizer="adam", lr=[0.01, 0.03],
                           validation_data=(X_val, y_val))
    nets = [MLP(SIZES, loss="sigmoid_cross_entropy", backend=backend_name, dtype="float64", seed=5 + k)
            for k in range(2)]
    for k, net in enumerate(nets):
        alone = net.fit(X, y, epochs=3, batch_size=8, optimizer="adam", lr=[0.01, 0.03][k],
                        validation_data=(X_val, y_val), progress=False)
        np.testing.assert_allclose([h[k] for h in history.loss], alone.loss, rtol=1e-12)
        assert [h[k] for h in history.accuracy] == alone.accuracy  # exact-match rows, as MLP.fit counts them
        assert [h[k] for h in history.val_accuracy] == alone.val_accuracy
    assert_members_equal(ensemble, nets, backend_name, "float64")
    _, accuracies = ensemble.evaluate(X_val, y_val)
    rows = np.eye(SIZES[-1])[y_val]  # the one-hot rows, counted by hand against each member's 0/1 predictions
    expected = [np.mean((host64(net.backend, net.predict(X_val)) == rows).all(axis=1)) for net in nets]
    np.testing.assert_allclose(accuracies, expected)


def test_predictions_are_the_members_mean(backend_name, rng):
    ensemble = MLPEnsemble(K, SIZES, backend=backend_name, dtype="float64", seed=4)
    X = rng.standard_normal((11, SIZES[0]))
    members = np.stack([host64(ensemble.backend, ensemble.member(k).predict_proba(X)) for k in range(K)])
    np.testing.assert_allclose(host64(ensemble.backend, ensemble.predict_proba(X, reduce=None)), members, rtol=1e-12)
    np.testing.assert_allclose(host64(ensemble.backend, ensemble.predict_proba(X)), members.mean(axis=0), rtol=1e-12)
    assert np.array_equal(ensemble.backend.to_numpy(ensemble.predict(X)), members.mean(axis=0).argmax(axis=1))


def test_member_is_independent():
    ensemble = MLPEnsemble(2, SIZES, backend="numpy", seed=0)
    net = ensemble.member(1)
    before = ensemble.params[1].copy()
    net.params[...] = 0
    assert np.array_equal(ensemble.params[1], before)
    with pytest.raises(ValueError, match=r"member: k: expected an integer in \[0, 1\], got 2"):
        ensemble.member(2)


def test_save_and_load_round_trip(tmp_path, rng):
    ensemble = MLPEnsemble(3, SIZES, activation="tanh", loss="mse", backend="numpy", dtype="float64", seed=9)
    ensemble.train_step(rng.standard_normal((4, SIZES[0])), rng.standard_normal((4, SIZES[-1])), 0.1)
    path = tmp_path / "ensemble.npz"
    ensemble.save(path)
    loaded = MLPEnsemble.load(path, backend="numpy")
    assert (loaded.members, loaded.sizes, loaded.activation, loaded.loss) == (3, SIZES, "tanh", "mse")
    assert np.array_equal(loaded.params, ensemble.params)
    (tmp_path / "bad.npz").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="expected a deltaprop ensemble file"):
        MLPEnsemble.load(tmp_path / "bad.npz")


@pytest.mark.parametrize("backend_name", ["numpy", "numba"])
def test_bad_arguments_are_refused_and_change_nothing(backend_name, rng):
    ensemble = MLPEnsemble(K, SIZES, backend=backend_name, seed=0)
    before = ensemble.params.copy()
    x = rng.standard_normal((K, 5, SIZES[0])).astype(np.float32)
    labels = rng.integers(0, SIZES[-1], (K, 5))
    labels[2, 1] = SIZES[-1]
    with pytest.raises(ValueError, match=r"labels: expected class labels in \[0, 2\], got 3"):
        ensemble.train_step(x, labels, 0.1)
    with pytest.raises(ValueError, match=r"lr: expected a finite real number > 0.0 or 4 of them"):
        ensemble.train_step(x, labels % 3, [0.1, 0.2])
    with pytest.raises(ValueError, match=r"x: expected a non-empty batch of shape \(batch, 6\)"):
        ensemble.train_step(x[:2], labels[:2] % 3, 0.1)
    with pytest.raises(TypeError, match=r"y: expected int labels of shape \(5,\) or \(4, 5\)"):
        ensemble.train_step(x, labels[:2] % 3, 0.1)
    with pytest.raises(ValueError, match="members: expected an integer >= 1, got 0"):
        MLPEnsemble(0, SIZES)
    x[1, 0, 0] = np.nan
    with pytest.raises(NonFiniteLossError, match=r"member\(s\) \[1\]"):
        ensemble.train_step(x, labels % 3, 0.1)
    assert np.array_equal(ensemble.params[1], before[1])


# ---- the stacked kernels of the contract, against the reference, on every backend ----


def test_stacked_kernels_match_the_reference(backend, dtype, rng):
    K_, B, n, dtype = 3, 5, 4, np.dtype(dtype).name
    acc, z_host = random_host((K_, B, n), dtype, 1), random_host((K_, B, n), dtype, 2)
    b = random_host((K_, n), dtype, 3)
    xp = backend.asarray
    z, a = backend.stacked_bias_act(xp(acc), xp(b), "tanh")
    expected = acc.astype(np.float64) + b[:, None, :]
    np.testing.assert_allclose(host64(backend, z), expected, rtol=1e-6)
    np.testing.assert_allclose(host64(backend, a), np.tanh(expected), rtol=1e-5)
    g = backend.stacked_act_backward(xp(acc), xp(z_host), "relu")
    np.testing.assert_allclose(host64(backend, g), acc * (z_host > 0), rtol=1e-6)
    np.testing.assert_allclose(host64(backend, backend.stacked_bias_grad(xp(acc))), acc.astype(np.float64).sum(axis=1),
                               rtol=1e-5)
    labels = rng.integers(0, n, (K_, B))
    delta = backend.zeros((K_, B, n), dtype)
    losses = backend.to_numpy(backend.stacked_loss("softmax_xent", xp(z_host), xp(labels), delta))
    for k in range(K_):
        loss_k, delta_k = reference.softmax_xent(z_host[k].astype(np.float64), labels[k])
        assert losses[k] == pytest.approx(loss_k, rel=1e-5)
        np.testing.assert_allclose(host64(backend, delta[k]), delta_k, rtol=1e-4, atol=1e-7)


def test_stacked_bias_grad_refuses_an_out_of_another_dtype_or_shape(backend):
    delta = backend.zeros((3, 5, 4), "float32")
    with pytest.raises(TypeError, match=r"stacked_bias_grad: out: expected dtype float32 \(the dtype of delta\), got float64"):
        backend.stacked_bias_grad(delta, out=backend.zeros((3, 4), "float64"))
    with pytest.raises(ValueError, match=r"stacked_bias_grad: out: expected shape \(3, 4\)"):
        backend.stacked_bias_grad(delta, out=backend.zeros((3, 5), "float32"))


@pytest.mark.parametrize("update", ["sgd", "momentum", "nesterov", "adam", "adamw"])
def test_stacked_updates_are_each_rows_flat_update(backend, dtype, update):
    dtype = np.dtype(dtype).name
    params, grads = random_host((3, 7), dtype, 1), random_host((3, 7), dtype, 2)
    lr, wd, mu = (np.array(v, dtype) for v in ([0.1, 0.2, 0.3], [0.0, 0.01, 0.1], [0.9, 0.5, 0.0]))
    adam, nesterov, decoupled = update.startswith("adam"), update == "nesterov", update == "adamw"
    states = 2 if adam else int(update != "sgd")  # (m, v), (velocity,) or none
    stacked, stacked_states = backend.asarray(params.copy()), [backend.zeros((3, 7), dtype) for _ in range(states)]
    rows, row_states = params.copy(), [np.zeros((3, 7), dtype) for _ in range(states)]
    flat = get_backend("numpy")
    for step in (1, 2):  # the second step reads the states the first one left
        if adam:
            backend.stacked_adam_update(stacked, backend.asarray(grads), *stacked_states, step, lr, wd, decoupled=decoupled)
        else:
            velocity = {"velocity": stacked_states[0], "momentum": mu} if states else {}
            backend.stacked_sgd_update(stacked, backend.asarray(grads), lr, wd, nesterov=nesterov, **velocity)
        for k in range(3):
            state = [s[k] for s in row_states]
            if adam:
                flat.adam_update(rows[k], grads[k], *state, step, lr=lr[k], weight_decay=wd[k], decoupled=decoupled)
            elif states:
                flat.momentum_update(rows[k], grads[k], *state, lr[k], momentum=mu[k], nesterov=nesterov, weight_decay=wd[k])
            else:
                flat.sgd_update(rows[k], grads[k], lr[k], weight_decay=wd[k])
    np.testing.assert_allclose(host64(backend, stacked), rows, rtol=1e-6)


@pytest.mark.parametrize("shuffle", [True, False])
def test_fit_with_one_order_for_all_matches_each_member_with_that_seed(shuffle):
    data = np.random.default_rng(1)
    X, y = data.standard_normal((30, SIZES[0])), data.integers(0, SIZES[-1], 30)
    ensemble = MLPEnsemble(3, SIZES, backend="numpy", dtype="float64", seed=6)
    history = ensemble.fit(X, y, epochs=2, batch_size=8, optimizer="sgd", lr=[0.1, 0.2, 0.3], shuffle=shuffle, seed=5)
    for k in range(3):
        net = MLP(SIZES, backend="numpy", dtype="float64", seed=6 + k)
        alone = net.fit(X, y, epochs=2, batch_size=8, optimizer="sgd", lr=[0.1, 0.2, 0.3][k], shuffle=shuffle,
                        seed=5, progress=False)
        assert np.array_equal(ensemble.params[k], net.params)
        np.testing.assert_allclose([h[k] for h in history.accuracy], alone.accuracy)


# ---- the compiled ensemble step on numba: members on Numba's threads, or one after the other ----


@pytest.mark.parametrize(("sizes", "batch", "parallel"), [
    ([64, 96, 10], 20, True),  # GEMMs that run BLAS on one thread: the members on Numba's threads
    ([64, 128, 10], 1024, False),  # a 2**23 multiply-add GEMM runs BLAS threaded: one member at a time
])
def test_members_on_threads_or_in_turn_match_each_member_alone(sizes, batch, parallel, rng):
    from deltaprop.kernels.cpu.ensemble import members_in_parallel
    from deltaprop.kernels.layout import Layout

    assert members_in_parallel(batch, Layout(sizes, batch).offsets) == parallel
    ensemble = MLPEnsemble(3, sizes, backend="numba", seed=4)
    nets = [MLP(sizes, backend="numba", seed=4 + k) for k in range(3)]
    x, y = rng.standard_normal((3, batch, sizes[0])).astype(np.float32), rng.integers(0, sizes[-1], (3, batch))
    losses = ensemble.train_step(x, y, [0.1, 0.2, 0.05])
    alone = [net.train_step(x[k], y[k], lr) for k, (net, lr) in enumerate(zip(nets, [0.1, 0.2, 0.05]))]
    np.testing.assert_allclose(losses, alone, rtol=1e-6)
    assert_members_equal(ensemble, nets, "numba", "float32")


@pytest.mark.parametrize("batch", [3, 20, 1024])  # the small variant, members on threads, members in turn
def test_compiled_step_leaves_each_member_with_a_bad_label_unchanged(batch, rng):
    """The kernel contract: a member whose labels are out of range is not stepped, the others are, and the
    step returns the first bad row of the first such member (the model checks per-member labels first)."""
    backend, sizes = get_backend("numba"), [64, 128, 10]
    from deltaprop.kernels.layout import Layout

    layout = Layout(sizes, batch)
    ensemble = MLPEnsemble(4, sizes, backend="numba", seed=0)
    params, before = ensemble.params, ensemble.params.copy()
    x = rng.standard_normal((4, batch, sizes[0])).astype(np.float32)
    y = rng.integers(0, sizes[-1], (4, batch))
    y[1, batch - 1], y[3, 0] = sizes[-1], -1
    step = backend.fused_ensemble_step("relu", "softmax_xent", "float32")[batch]
    work = np.empty((4, layout.work_size), np.float32)
    bad_row = step(x, y, params, work, layout.offsets, np.full(4, 0.1, np.float32), np.empty(4, np.float32))
    assert bad_row == batch - 1
    changed = [not np.array_equal(params[k], before[k]) for k in range(4)]
    assert changed == [True, False, True, False]
    net = MLP(sizes, backend="numba", seed=2)
    net.train_step(x[2], y[2], 0.1)
    assert np.array_equal(params[2], net.params)
