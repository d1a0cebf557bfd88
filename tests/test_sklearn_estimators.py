"""deltaprop.sklearn: scikit-learn's own estimator checks, every one, and the estimators inside Pipeline,
GridSearchCV, cross_val_score and clone, with labels of any type."""

import pickle
import subprocess
import sys

import numpy as np
import pytest

sklearn = pytest.importorskip("sklearn")

from sklearn.base import clone  # noqa: E402
import sklearn.neural_network  # noqa: E402
from sklearn.datasets import load_digits, load_iris, make_multilabel_classification  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.model_selection import GridSearchCV, cross_val_score, train_test_split  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

from deltaprop.errors import CheckpointError  # noqa: E402
from deltaprop.sklearn import MLPClassifier, MLPRegressor  # noqa: E402

# the checks fit with the default max_iter=200 on data some of which never converges: the warning is
# scikit-learn's expected behaviour, not a fault of the test run
pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")


@parametrize_with_checks([MLPClassifier(backend="numpy"), MLPRegressor(backend="numpy")])
def test_scikit_learn_estimator_checks(estimator, check):
    check(estimator)


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return train_test_split(X / 16.0, np.array([f"digit {v}" for v in y]), test_size=0.25, stratify=y,
                            random_state=0)


def test_grid_search_over_two_learning_rates_on_digits_predicts_string_labels(digits):
    X_train, X_test, y_train, y_test = digits
    search = GridSearchCV(MLPClassifier(hidden_layer_sizes=(32,), max_iter=15, backend="numpy", random_state=0),
                          {"learning_rate_init": [1e-3, 1e-2]}, cv=2)
    search.fit(X_train, y_train)
    assert search.best_params_["learning_rate_init"] in (1e-3, 1e-2)
    predicted = search.predict(X_test)
    assert predicted.dtype.kind == "U" and set(predicted) <= set(y_train)
    assert np.mean(predicted == y_test) > 0.9
    assert list(search.best_estimator_.classes_) == sorted(set(y_train))


def test_pipeline_and_cross_val_score():
    X, y = load_iris(return_X_y=True)
    pipeline = make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=(16,), learning_rate_init=0.01,
                                                             max_iter=100, backend="numpy", random_state=0))
    scores = cross_val_score(pipeline, X, y, cv=3)
    assert scores.shape == (3,) and scores.min() > 0.85


def test_clone_keeps_the_parameters_and_drops_the_fit():
    model = MLPClassifier(hidden_layer_sizes=(8, 4), alpha=0.1, backend="numpy", dtype="float32", random_state=3)
    model.fit(np.eye(4), [0, 1, 0, 1])
    twin = clone(model)
    assert twin.get_params() == model.get_params() and not hasattr(twin, "model_")


@pytest.mark.parametrize("labels", [np.array([3, 7, 9]), np.array(["cat", "dog", "emu"]), np.array([False, True])],
                         ids=["ints", "strings", "booleans"])
def test_any_label_type_comes_back(labels):
    X, y = load_iris(return_X_y=True)
    keep = y < len(labels)
    y_user = labels[y[keep]]
    model = MLPClassifier(hidden_layer_sizes=(16,), learning_rate_init=0.01, max_iter=60, backend="numpy",
                          random_state=0).fit(X[keep], y_user)
    assert np.array_equal(model.classes_, np.sort(labels)) and model.classes_.dtype == labels.dtype
    predicted = model.predict(X[keep])
    assert predicted.dtype == labels.dtype and np.mean(predicted == y_user) > 0.9
    probabilities = model.predict_proba(X[keep])
    assert np.array_equal(model.classes_[probabilities.argmax(axis=1)], predicted)
    np.testing.assert_allclose(model.predict_log_proba(X[keep]), np.log(probabilities))


def test_linear_regressor_reaches_the_least_squares_solution(rng):
    """No hidden layer and identity outputs: a linear model, whose optimum numpy's lstsq gives."""
    X = rng.standard_normal((200, 3))
    coef = np.array([[1.5, -2.0], [0.5, 0.0], [-1.0, 3.0]])
    Y = X @ coef + np.array([0.3, -0.7]) + 0.01 * rng.standard_normal((200, 2))
    model = MLPRegressor(hidden_layer_sizes=(), activation="identity", alpha=0.0, learning_rate_init=0.01,
                         batch_size=50, max_iter=300, tol=0.0, n_iter_no_change=300, backend="numpy",
                         random_state=0)
    with pytest.warns(ConvergenceWarning, match=r"Maximum iterations \(300\)"):
        model.fit(X, Y)
    solution, *_ = np.linalg.lstsq(np.hstack([X, np.ones((200, 1))]), Y, rcond=None)
    np.testing.assert_allclose(model.model_.weights[0].T, solution[:3], atol=2e-3)
    np.testing.assert_allclose(model.model_.biases[0], solution[3], atol=2e-3)
    assert model.predict(X).shape == (200, 2) and len(model.loss_curve_) == model.n_iter_ == 300


def test_multilabel_trains_sigmoid_outputs_as_well_as_scikit_learns_mlp():
    X, Y = make_multilabel_classification(n_samples=150, n_features=6, n_classes=3, random_state=0)
    settings = dict(hidden_layer_sizes=(32,), learning_rate_init=0.01, max_iter=150, random_state=0)
    model = MLPClassifier(backend="numpy", **settings).fit(X, Y)
    peer = sklearn.neural_network.MLPClassifier(**settings).fit(X, Y)
    assert model.model_.loss == "sigmoid_cross_entropy" and list(model.classes_) == [0, 1, 2]
    probabilities = model.predict_proba(X)
    assert probabilities.shape == (150, 3) and np.array_equal(model.predict(X), (probabilities > 0.5).astype(int))
    assert np.mean(model.predict(X) == Y) > np.mean(peer.predict(X) == Y) - 0.05


def test_partial_fit_needs_the_classes_first_and_keeps_them():
    X, y = load_iris(return_X_y=True)
    model = MLPClassifier(hidden_layer_sizes=(8,), backend="numpy", random_state=0)
    with pytest.raises(ValueError, match="expected classes= .* on the first call"):
        model.partial_fit(X[:50], y[:50])
    model.partial_fit(X[:50], y[:50], classes=[0, 1, 2, 5])  # the first 50 rows are all class 0
    assert list(model.classes_) == [0, 1, 2, 5] and model.predict_proba(X[:2]).shape == (2, 4)
    model.partial_fit(X[50:], y[50:])
    assert model.n_iter_ == 1 and len(model.loss_curve_) == 2 and model.t_ == 150
    with pytest.raises(ValueError, match=r"expected labels among classes_ \[0, 1, 2, 5\].*new labels \[7\]"):
        model.partial_fit(X[:3], [0, 1, 7])
    with pytest.raises(ValueError, match="classes: expected"):
        model.partial_fit(X[:3], [0, 1, 2], classes=[0, 1, 2])


def test_early_stopping_keeps_the_best_validation_score(digits):
    X_train, _, y_train, _ = digits
    model = MLPClassifier(hidden_layer_sizes=(32,), early_stopping=True, n_iter_no_change=3, max_iter=200,
                          backend="numpy", random_state=0).fit(X_train, y_train)
    assert model.n_iter_ < 200 and len(model.validation_scores_) == model.n_iter_
    assert model.best_validation_score_ == max(model.validation_scores_) and model.best_loss_ is None
    # stopped because n_iter_no_change + 1 epochs after the best one did not improve on it by tol
    assert model.validation_scores_.index(model.best_validation_score_) <= model.n_iter_ - 4


def test_warm_start_carries_on_and_float32_data_trains_in_float32(digits):
    X_train, _, y_train, _ = digits
    model = MLPClassifier(hidden_layer_sizes=(16,), max_iter=3, warm_start=True, backend="numpy", random_state=0)
    model.fit(X_train.astype(np.float32), y_train)
    first = model.model_
    model.fit(X_train.astype(np.float32), y_train)
    assert model.model_ is first and model.model_.dtype == np.float32 and len(model.loss_curve_) == 6
    assert model.loss_curve_[5] < model.loss_curve_[0]


def test_a_pickled_estimator_predicts_the_same_labels_and_trains_apart(digits):
    X_train, X_test, y_train, _ = digits
    model = MLPClassifier(hidden_layer_sizes=(16,), max_iter=5, backend="numpy", random_state=0).fit(X_train, y_train)
    twin = pickle.loads(pickle.dumps(model))
    assert np.array_equal(twin.predict(X_test), model.predict(X_test))
    before = model.predict_proba(X_test)
    twin.partial_fit(X_train, y_train)
    assert np.array_equal(model.predict_proba(X_test), before)
    assert not np.array_equal(twin.predict_proba(X_test), before)


def test_feature_names_are_kept():
    pandas = pytest.importorskip("pandas")
    X, y = load_iris(return_X_y=True, as_frame=True)
    model = MLPRegressor(hidden_layer_sizes=(4,), max_iter=5, backend="numpy", random_state=0).fit(X, y)
    assert list(model.feature_names_in_) == list(X.columns) and model.n_features_in_ == 4
    with pytest.raises(ValueError, match="Feature names"):
        model.predict(pandas.DataFrame(X.to_numpy(), columns=["a", "b", "c", "d"]))


def test_unknown_settings_are_refused_with_the_choices():
    X, y = np.eye(4), [0, 1, 0, 1]
    with pytest.raises(ValueError, match=r"solver: expected one of \['adam', 'sgd'\], got 'lbfgs'"):
        MLPClassifier(solver="lbfgs", backend="numpy").fit(X, y)
    with pytest.raises(ValueError, match=r"activation: expected one of .*got 'gelu'"):
        MLPClassifier(activation="gelu", backend="numpy").fit(X, y)
    with pytest.raises(ValueError, match=r"hidden_layer_sizes: expected positive integers"):
        MLPClassifier(hidden_layer_sizes=(4, 0), backend="numpy").fit(X, y)


def test_importing_deltaprop_does_not_import_scikit_learn():
    code = "import sys, deltaprop, deltaprop.model, deltaprop.cli; print('sklearn' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


@pytest.mark.parametrize("estimator_class", [MLPClassifier, MLPRegressor])
def test_a_saved_estimator_loads_with_its_labels_and_parameters(digits, tmp_path, estimator_class):
    X_train, X_test, y_train, _ = digits
    y = y_train if estimator_class is MLPClassifier else np.char.str_len(y_train).astype(float) + X_train[:, 10]
    model = estimator_class(hidden_layer_sizes=(12,), alpha=0.01, max_iter=4, backend="numpy", random_state=0)
    model.fit(X_train, y)
    model.save(tmp_path / "model.npz")
    loaded = estimator_class.load(tmp_path / "model.npz")
    assert loaded.get_params() == dict(model.get_params(), hidden_layer_sizes=[12])  # JSON keeps lists
    assert np.array_equal(loaded.predict(X_test), model.predict(X_test))
    assert loaded.loss_curve_ == model.loss_curve_ and loaded.n_features_in_ == 64
    other = MLPRegressor if estimator_class is MLPClassifier else MLPClassifier
    with pytest.raises(CheckpointError, match=f"expected a saved {other.__name__}, got {estimator_class.__name__}"):
        other.load(tmp_path / "model.npz")


def test_solver_and_alpha_map_to_the_optimizer_scikit_learn_describes():
    """sgd: Nesterov momentum 0.9; alpha: the L2 penalty alpha/2 ||W||^2 on the summed loss, whose gradient
    on the mean over a batch is alpha/batch_size * W."""
    model = MLPClassifier(solver="sgd", alpha=0.5, batch_size=4, learning_rate_init=0.1, max_iter=1, backend="numpy")
    with pytest.warns(ConvergenceWarning):
        model.fit(np.eye(8), [0, 1] * 4)
    assert model.model_.optimizer.hyper == {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.125,
                                            "max_grad_norm": None}


@pytest.mark.parametrize("estimator_class", [MLPClassifier, MLPRegressor])
def test_the_same_random_state_trains_the_same_network_as_scikit_learns(estimator_class, rng):
    """Same initial draws, same batch order, same updates: scikit-learn's own MLP is the reference
    (float64, alpha 0; three classes, since scikit-learn gives two classes one logistic output). Solver
    sgd: scikit-learn's Nesterov momentum is PyTorch's (ours) rewritten; its Adam adds eps to sqrt(v)
    before the bias correction where PyTorch's adds it after, so Adam agrees only to about 1e-4."""
    X = rng.standard_normal((50, 4))
    y = rng.integers(0, 3, 50) if estimator_class is MLPClassifier else rng.standard_normal((50, 2))
    settings = dict(hidden_layer_sizes=(6, 5), activation="tanh", solver="sgd", alpha=0.0, batch_size=16,
                    learning_rate_init=0.05, max_iter=4, random_state=7, tol=0.0, n_iter_no_change=10)
    peer_class = getattr(sklearn.neural_network, estimator_class.__name__)
    with pytest.warns(ConvergenceWarning):
        model = estimator_class(backend="numpy", **settings).fit(X, y)
    with pytest.warns(ConvergenceWarning):
        peer = peer_class(**settings).fit(X, y)
    for W, b, coef, intercept in zip(model.model_.weights, model.model_.biases, peer.coefs_, peer.intercepts_):
        np.testing.assert_allclose(W.T, coef, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(b, intercept, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(model.loss_curve_, peer.loss_curve_, rtol=1e-12)
    np.testing.assert_allclose(model.predict(X), peer.predict(X), rtol=1e-12)


def test_the_comparison_script_fits_each_estimator_once_a_round(monkeypatch, digits):
    from deltaprop.benchmarks import sklearn_compare

    X_train, X_test, y_train, y_test = digits
    split = (X_train[:300].astype(np.float32), X_test[:100].astype(np.float32), y_train[:300], y_test[:100])
    monkeypatch.setattr(sklearn_compare, "datasets", lambda: {"small digits": split})
    monkeypatch.setattr(sklearn_compare, "EPOCHS", {"small digits": 3})
    results = sklearn_compare.run(["numpy"], rounds=2)
    assert list(results["small digits"]) == ["sklearn", "deltaprop[numpy]"]
    for result in results["small digits"].values():
        assert len(result["seconds"]) == 2 and min(result["seconds"]) > 0
    # same settings and random_state: the same network up to Adam's eps placement, so the same accuracy
    assert abs(results["small digits"]["sklearn"]["test_accuracy"]
               - results["small digits"]["deltaprop[numpy]"]["test_accuracy"]) <= 0.02
    assert "| small digits | sklearn | 3 |" in sklearn_compare.table(results)
