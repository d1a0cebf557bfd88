"""Nothing silent, nothing lost (issue 18): each bad input, fault or race either gives the right answer or
a clear error naming the argument, and leaves the model, its optimizer and the files on disk as they were."""

import copy
import glob
import os
import pickle
import re
import threading

import numpy as np
import pytest

from helpers import CPU_BACKENDS, rel_err
from deltaprop.atomic import write_atomic
from deltaprop.backend import to_numpy
from deltaprop.errors import CheckpointError, NonFiniteLossError
from deltaprop.kernels import reference
from deltaprop.model import MLP
from deltaprop.model.optim import get_optimizer

SIZES = [6, 16, 12, 4]


def blobs(n=60, seed=0):
    """n rows of 6 features in 4 separable classes."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    X = rng.standard_normal((n, 6)) * 0.3 + np.eye(4, 6)[y] * 3
    return X.astype(np.float32), y


def snapshot(net):
    """Host copies of everything a failed call must leave as it was."""
    optimizer = net.optimizer
    return {"params": to_numpy(net.params).copy(), "grads": to_numpy(net.grads).copy(),
            "optimizer": None if optimizer is None else (optimizer.name, optimizer.step_count, dict(optimizer.hyper),
                                                         {k: to_numpy(v).copy() for k, v in optimizer.state.items()})}


def assert_unchanged(net, before):
    after = snapshot(net)
    assert np.array_equal(after["params"], before["params"])
    assert np.array_equal(after["grads"], before["grads"])
    if before["optimizer"] is None:
        assert after["optimizer"] is None
    else:
        (name, step, hyper, state), (name2, step2, hyper2, state2) = before["optimizer"], after["optimizer"]
        assert (name, step, hyper) == (name2, step2, hyper2)
        assert state.keys() == state2.keys() and all(np.array_equal(state[k], state2[k]) for k in state)


def reference_proba(net, X):
    """softmax of the float64 reference forward pass with the network's flat parameters (per layer: W[l]
    row-major, then b[l])."""
    flat, weights, biases, at = to_numpy(net.params), [], [], 0
    for n_in, n_out in zip(net.sizes[:-1], net.sizes[1:]):
        weights.append(flat[at:at + n_out * n_in].reshape(n_out, n_in))
        biases.append(flat[at + n_out * n_in:at + (n_in + 1) * n_out])
        at += (n_in + 1) * n_out
    return reference.softmax(reference.forward(weights, biases, X, net.activation)[0][-1])


# ---- 1. threads --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("method", ["predict", "predict_proba"])
def test_inference_from_many_threads_gives_the_single_threaded_answers(backend_name, method):
    net = MLP([32, 64, 64, 10], backend=backend_name, seed=3)
    rng = np.random.default_rng(1)
    inputs = [rng.standard_normal((64, 32)).astype(np.float32) for _ in range(8)]  # one batch size: one workspace
    expected = [to_numpy(getattr(net, method)(x)).copy() for x in inputs]
    results, start = {}, threading.Barrier(4)

    def work(thread):
        start.wait()
        for round_ in range(40):
            k = (thread + round_) % len(inputs)
            results[thread, round_] = (k, to_numpy(getattr(net, method)(inputs[k])).copy())

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 160
    wrong = [key for key, (k, result) in results.items() if not np.array_equal(result, expected[k])]
    assert wrong == []


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_training_from_two_threads_is_serialised(backend_name):
    """Two threads making train_steps on one network give the network of all those steps made in turn."""
    x, y = blobs(64)
    net = MLP(SIZES, backend=backend_name, dtype="float64", seed=2)
    alone = MLP(SIZES, backend=backend_name, dtype="float64", seed=2)
    for _ in range(2 * 150):
        alone.train_step(x, y, lr=0.05)
    x64, start = x.astype(np.float64), threading.Barrier(2)

    def work():
        start.wait()
        for _ in range(150):
            net.train_step(x64, y, lr=0.05)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert rel_err(to_numpy(net.params), to_numpy(alone.params)) <= 1e-12


# ---- 2. train_step's learning rate --------------------------------------------------------------------


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("lr", [float("nan"), float("inf"), -0.1, 0.0, None, "0.1", True, [0.1]])
@pytest.mark.parametrize("first_call", [True, False], ids=["first call", "after a good call"])
def test_train_step_refuses_a_bad_learning_rate_and_changes_nothing(backend_name, lr, first_call):
    x, y = blobs(8)
    net = MLP(SIZES, backend=backend_name, seed=0)
    if not first_call:
        net.train_step(x, y, lr=0.1)  # the fast path has a cached lr now
    before = snapshot(net)
    with pytest.raises(ValueError, match=rf"train_step: lr: expected a finite real number > 0, got {re.escape(repr(lr))}"):
        net.train_step(x, y, lr=lr)
    assert_unchanged(net, before)
    assert net.train_step(x, y, lr=0.1) > 0  # and the next good call runs


def test_numpy_scalars_are_learning_rates_everywhere():
    x, y = blobs(8)
    net = MLP(SIZES, backend="numba", seed=0)
    net.train_step(x, y, lr=np.float32(0.1))
    net.fit(x, y, epochs=1, optimizer="sgd", lr=np.float32(0.1), progress=False)
    assert net.optimizer.hyper["lr"] == pytest.approx(0.1) and type(net.optimizer.hyper["lr"]) is float


# ---- 3, 4. divergence and non-finite validation in fit -----------------------------------------------


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # diverging on purpose
def test_divergence_restores_the_best_weights_and_keeps_the_history():
    X, y = blobs(60)
    X_val, y_val = blobs(20, seed=1)
    net = MLP(SIZES, backend="numba", seed=0)
    optimizer = get_optimizer("sgd", lr=0.05)
    kept = {}

    def callback(epoch, logs):
        kept[epoch] = (logs["val_loss"], to_numpy(net.params).copy())
        if epoch == 3:
            optimizer.hyper["lr"] = 1e30  # epoch 4 diverges

    with pytest.raises(NonFiniteLossError, match=r"at epoch 4, batch \d+ of 4; the weights of epoch \d") as caught:
        net.fit(X, y, epochs=10, batch_size=16, optimizer=optimizer, validation_data=(X_val, y_val),
                patience=5, callback=callback, progress=False)
    error = caught.value
    assert error.epoch == 4 and 1 <= error.batch <= 4
    assert error.history.epochs == 3 and error.history.val_loss == [kept[e][0] for e in (1, 2, 3)]
    best = min(kept, key=lambda e: kept[e][0])
    assert error.restored_epoch == best == error.history.best_epoch
    assert np.array_equal(to_numpy(net.params), kept[best][1])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_divergence_without_early_stopping_says_where_and_restores_nothing():
    X, y = blobs(60)
    net = MLP(SIZES, backend="numpy", seed=0)
    with pytest.raises(NonFiniteLossError, match=r"loss: expected a finite value, got .* at epoch 1, batch \d+ of 2$") as caught:
        net.fit(X, y, epochs=3, batch_size=32, optimizer="sgd", lr=1e30, progress=False)
    assert caught.value.restored_epoch is None and caught.value.history.epochs == 0


@pytest.mark.parametrize("where", ["X", "y"])
def test_non_finite_validation_data_is_refused_before_training(where):
    X, y = blobs(60)
    X_val, y_val = blobs(20, seed=1)
    y_val = np.eye(4, dtype=np.float32)[y_val]  # targets, so that y can hold a NaN
    (X_val if where == "X" else y_val)[[3, 11]] = np.nan
    net = MLP(SIZES, backend="numpy", seed=0)
    before = snapshot(net)
    with pytest.raises(ValueError, match=rf"validation_data {where}: expected finite values, got NaN or inf "
                                         rf"in 2 row\(s\), the first \[3, 11\]"):
        net.fit(X, y, epochs=2, validation_data=(X_val, y_val), patience=2, progress=False)
    assert_unchanged(net, before)


# ---- 5. non-finite rows at inference ------------------------------------------------------------------


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("method", ["predict", "predict_proba", "evaluate"])
def test_non_finite_rows_are_refused_by_index(backend_name, method):
    X, y = blobs(20)
    X[[7, 2, 13]] = [[np.nan] * 6, [np.inf] * 6, [-np.inf] * 6]
    net = MLP(SIZES, backend=backend_name, seed=0)
    call = (lambda: net.evaluate(X, y, chunk_size=5)) if method == "evaluate" else \
        (lambda: getattr(net, method)(X, chunk_size=5))
    with pytest.raises(ValueError, match=r"X: expected finite values, got NaN or inf in \d row\(s\), the first \[2"):
        call()


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # NumPy's, on purpose
def test_rows_whose_logits_overflow_are_refused():
    net = MLP([2, 3], backend="numpy", seed=0)
    net.params[...] = 1e30  # finite, but x @ W.T overflows float32
    X = np.array([[0.0, 0.0], [1e10, 1e10], [0.0, 0.0]], np.float32)
    with pytest.raises(ValueError, match=r"NaN or inf logits in 1 row\(s\), the first \[1\]: the network overflows"):
        net.predict(X)


# ---- 6, 7, 10. checkpoints ----------------------------------------------------------------------------


def test_save_refuses_what_load_would_refuse_and_writes_nothing(tmp_path):
    X, y = blobs(20)
    net = MLP(SIZES, backend="numpy", seed=0)
    path = tmp_path / "net.npz"
    net.save(path)
    old = path.read_bytes()
    net.params[5] = np.nan
    with pytest.raises(ValueError, match=r"save: params: expected finite values .*NaN or inf in 1 of 368; nothing written"):
        net.save(path)
    net.params[5] = 0
    net.fit(X, y, epochs=1, optimizer="sgd", schedule=type("Halving", (), {"factor": lambda self, t, n=None: 0.5})(),
            progress=False)
    with pytest.raises(ValueError, match=r"save: optimizer schedule: expected one of the named schedules .*custom"):
        net.save(path)
    assert path.read_bytes() == old
    assert sorted(os.listdir(tmp_path)) == ["net.npz"]


def test_save_to_a_missing_directory_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"path: expected a file path in an existing directory, got .*missing"):
        MLP(SIZES, backend="numpy").save(tmp_path / "missing" / "net.npz")


def rewritten(path, **changes):
    with np.load(path) as npz:
        arrays = dict(npz)
    arrays.update(changes)
    np.savez(path, **arrays)
    return path


def test_load_checks_sizes_against_params_before_allocating(tmp_path):
    path = tmp_path / "net.npz"
    MLP(SIZES, backend="numpy").save(path)
    rewritten(path, sizes=np.array([10**6, 10**5, 10**4], np.int64))  # 10**11 parameters if believed
    with pytest.raises(CheckpointError, match=r"params: expected float32 of shape \(101000110000,\) for these "
                                              r"sizes, got float32 of shape \(368,\)"):
        MLP.load(path, backend="numpy")
    rewritten(path, sizes=np.array([6, -4], np.int64))
    with pytest.raises(CheckpointError, match=r"sizes: expected at least two positive integer widths, got int64 \[6, -4\]"):
        MLP.load(path, backend="numpy")


def test_load_blames_a_bad_backend_argument_not_the_file(tmp_path):
    path = tmp_path / "net.npz"
    MLP(SIZES, backend="numpy").save(path)
    with pytest.raises(ValueError, match=r"^backend: expected 'auto' or one of") as caught:
        MLP.load(path, backend="bogus")
    assert not isinstance(caught.value, CheckpointError)


def test_load_on_a_network_is_refused(tmp_path):
    path = tmp_path / "net.npz"
    net = MLP(SIZES, backend="numpy", seed=0)
    net.save(path)
    with pytest.raises(TypeError, match=r"MLP.load makes a new network: call it on the class, net = MLP.load\(path\)"):
        net.load(path)
    assert isinstance(MLP.load(path, backend="numpy"), MLP)


def test_next_save_removes_the_orphans_of_interrupted_saves(tmp_path):
    path = tmp_path / "net.npz"
    dead = tmp_path / ".deltaprop-net.npz.999999999.abc.tmp"  # no such process: interrupted
    alive = tmp_path / f".deltaprop-net.npz.{os.getppid()}.abc.tmp"  # a running writer's: kept
    other = tmp_path / ".deltaprop-other.npz.999999999.abc.tmp"  # another target's: kept
    for orphan in (dead, alive, other):
        orphan.write_bytes(b"partial")
    MLP(SIZES, backend="numpy").save(path)
    assert sorted(os.listdir(tmp_path)) == sorted(["net.npz", alive.name, other.name])


def test_an_error_while_writing_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(b"old")

    def fail(file):
        file.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, fail)
    assert path.read_bytes() == b"old" and glob.glob(str(tmp_path / ".deltaprop-*")) == []


# ---- 9. unclear errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [-1, 2**63, 1.5, "7", True])
def test_a_bad_seed_is_named(seed):
    with pytest.raises(ValueError, match=rf"seed: expected None or an integer in \[0, 2\*\*63\), got {seed!r}"):
        MLP(SIZES, backend="numpy", seed=seed)


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_sizes_too_large_to_allocate_are_named(backend_name):
    with pytest.raises(MemoryError, match=r"sizes: \[10000000000, 10000000000\] need 100000000010000000000 parameters"):
        MLP([10**10, 10**10], backend=backend_name)


def test_fit_checks_every_argument_before_changing_anything():
    X, y = blobs(20)
    net = MLP(SIZES, backend="numpy", seed=0)
    net.fit(X, y, epochs=1, progress=False)
    before = snapshot(net)
    for bad, message in [({"patience": 0}, r"patience: expected an integer >= 1"),
                         ({"seed": -1}, r"seed: expected None or an integer"),
                         ({"callback": 3}, r"callback: expected None or a callable"),
                         ({"lr": -1.0}, r"adam: lr: expected a finite real number > 0"),
                         ({"optimizer": "sgd", "lr": float("nan")}, r"sgd: lr: expected a finite real number > 0")]:
        with pytest.raises((TypeError, ValueError), match=message):
            net.fit(X, y, epochs=1, progress=False, **bad)
        assert_unchanged(net, before)


def test_predictions_match_the_float64_reference():
    X, _ = blobs(30)
    net = MLP(SIZES, backend="numba", dtype="float64", seed=4)
    assert rel_err(to_numpy(net.predict_proba(X)), reference_proba(net, X)) <= 1e-12


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("duplicate", [copy.deepcopy, lambda net: pickle.loads(pickle.dumps(net))])
def test_a_copy_trains_on_its_own_buffers(backend_name, duplicate):
    X, y = blobs(20)
    net = MLP(SIZES, backend=backend_name, dtype="float64", seed=0)
    net.train_step(X.astype(np.float64), y, lr=0.1)
    before = snapshot(net)
    twin = duplicate(net)
    twin.train_step(X.astype(np.float64), y, lr=0.5)
    assert_unchanged(net, before)
    assert not np.array_equal(to_numpy(twin.params), before["params"])
    assert rel_err(to_numpy(twin.predict_proba(X)), reference_proba(twin, X)) <= 1e-12
