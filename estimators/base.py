"""The part the two estimators share: parameters, the epoch loop over a deltaprop MLP, early stopping.

The loop follows sklearn.neural_network's stochastic solvers, so that the same ``random_state`` gives the
same network: the initial draws, then minibatches of ``batch_size`` rows ("auto": min(200, n_samples)) in
a new order each epoch, all from ``random_state`` in scikit-learn's order; stop when the training loss
(or, with ``early_stopping``, the validation score) has not improved by ``tol`` for more than
``n_iter_no_change`` epochs, restoring the best weights of the validation score; a ConvergenceWarning
when ``max_iter`` epochs ran out. ``alpha`` is the L2 penalty on the mean loss, which adds
alpha * W / batch rows to the gradient: the optimizer's weight decay alpha / batch_size.
"""

from __future__ import annotations

import math
from abc import ABCMeta, abstractmethod
import os
import warnings
from numbers import Integral

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted, validate_data

from deltaprop.backend import to_numpy
from deltaprop.errors import CheckpointError
from deltaprop.model import MLP, io
from deltaprop.model.optim import OPTIMIZERS

# scikit-learn's activation names -> the activation table's
ACTIVATIONS = {"identity": "identity", "logistic": "sigmoid", "tanh": "tanh", "relu": "relu"}
# solver -> (optimizer of model/optim.py, its hyper-parameters): sklearn's "sgd" is Nesterov momentum 0.9
SOLVERS = {"adam": ("adam", {}), "sgd": ("sgd", {"momentum": 0.9, "nesterov": True})}
AUTO_BATCH = 200  # batch_size="auto": min(AUTO_BATCH, n_samples), as scikit-learn
# what a checkpoint keeps of a fitted estimator beside its network and its classes (JSON values)
FITTED = ("n_iter_", "t_", "loss_curve_", "best_loss_", "validation_scores_", "best_validation_score_",
          "n_features_in_", "n_outputs_", "n_layers_", "_no_improvement_count")


def _choice(name, value, table):
    if not isinstance(value, str) or value not in table:
        raise ValueError(f"{name}: expected one of {sorted(table)}, got {value!r}")
    return table[value]


def _hidden_layer_sizes(value):
    widths = [value] if isinstance(value, Integral) else list(value)
    if not all(isinstance(w, Integral) and not isinstance(w, bool) and w > 0 for w in widths):
        raise ValueError(f"hidden_layer_sizes: expected positive integers like (100,), got {value!r}")
    return [int(w) for w in widths]


class BaseMLP(BaseEstimator, metaclass=ABCMeta):
    """Parameters as sklearn.neural_network.MLPClassifier/MLPRegressor, plus ``backend`` (a deltaprop
    backend name: "auto", "numpy", "numba", "cupy") and ``dtype`` (None: float32 for float32 X, else
    float64). Fitted: ``model_`` (the deltaprop MLP), ``n_iter_``, ``t_``, ``loss_curve_``, ``best_loss_``
    (None with early stopping), ``validation_scores_`` and ``best_validation_score_`` (None without),
    ``n_features_in_``, ``feature_names_in_`` (for a DataFrame X), ``n_outputs_``, ``n_layers_``."""

    def __init__(self, hidden_layer_sizes=(100,), activation="relu", *, solver="adam", alpha=0.0001,
                 batch_size="auto", learning_rate_init=0.001, max_iter=200, shuffle=True, random_state=None,
                 tol=1e-4, verbose=False, warm_start=False, early_stopping=False, validation_fraction=0.1,
                 n_iter_no_change=10, backend="auto", dtype=None):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.solver = solver
        self.alpha = alpha
        self.batch_size = batch_size
        self.learning_rate_init = learning_rate_init
        self.max_iter = max_iter
        self.shuffle = shuffle
        self.random_state = random_state
        self.tol = tol
        self.verbose = verbose
        self.warm_start = warm_start
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change
        self.backend = backend
        self.dtype = dtype

    # ---- subclass hooks ----

    @abstractmethod
    def _targets(self, X, y, first, classes):
        """(X, targets) checked, targets as the MLP takes them (int64 labels or a float matrix); classes:
        partial_fit's, or None."""

    @abstractmethod
    def _loss_for(self, targets):
        """The MLP's loss for targets as ``_targets`` returns them."""

    def _reported_loss(self, loss):
        """An epoch's mean loss as ``loss_curve_`` (and ``tol``) take it: scikit-learn's definition."""
        return loss

    @abstractmethod
    def _validation_score(self, X, targets):
        """The score (higher is better) on held-out rows whose targets are as ``_targets`` returned them."""

    # ---- fit ----

    def _validate_X(self, X, reset):
        return validate_data(self, X, reset=reset, dtype=(np.float64, np.float32))

    def _validate_Xy(self, X, y, reset, **options):
        return validate_data(self, X, y, reset=reset, dtype=(np.float64, np.float32), multi_output=True, **options)

    def _fit(self, X, y, incremental, classes=None):
        widths = _hidden_layer_sizes(self.hidden_layer_sizes)
        activation = _choice("activation", self.activation, ACTIVATIONS)
        _choice("solver", self.solver, SOLVERS)
        if self.early_stopping and incremental:
            raise ValueError("partial_fit: expected early_stopping=False (a validation split of one batch "
                             "means nothing), got early_stopping=True")
        first = not hasattr(self, "model_") or (not self.warm_start and not incremental)
        X, targets = self._targets(X, y, first, classes)
        n_outputs = len(self.classes_) if targets.ndim == 1 else targets.shape[1]
        rng = check_random_state(self.random_state)
        if first:
            self.model_ = MLP([X.shape[1], *widths, n_outputs], activation=activation, loss=self._loss_for(targets),
                              backend=self.backend, dtype=self.dtype or X.dtype, seed=None)
            self._initialize(rng)
            self.model_.classes = getattr(self, "classes_", None)  # the labels its checkpoints keep
            self.n_outputs_, self.n_layers_ = n_outputs, len(widths) + 2
            self.t_, self.loss_curve_ = 0, []
            self._no_improvement_count = 0
            self.best_loss_ = None if self.early_stopping else math.inf
            self.validation_scores_ = [] if self.early_stopping else None
            self.best_validation_score_ = -math.inf if self.early_stopping else None
        elif self.model_.sizes[-1] != n_outputs:
            raise ValueError(f"y: expected {self.model_.sizes[-1]} outputs (as in the first fit), got {n_outputs}")
        new_optimizer = first or not incremental or self.model_.optimizer is None  # partial_fit carries on
        self._epochs(X, targets, rng, incremental, SOLVERS[self.solver] if new_optimizer else None)
        return self

    def _initialize(self, rng):
        """Draws the parameters as scikit-learn does, from the same generator in the same order, so that
        the same random_state starts from the same network: per layer, W (fan_in, fan_out) then b, uniform
        in +-sqrt(factor / (fan_in + fan_out)), factor 2 for the logistic activation, else 6 (Glorot)."""
        net = self.model_
        factor = 2.0 if self.activation == "logistic" else 6.0
        for W, b in zip(net.weights, net.biases):
            fan_out, fan_in = W.shape
            bound = math.sqrt(factor / (fan_in + fan_out))
            W[...] = net.backend.asarray(rng.uniform(-bound, bound, (fan_in, fan_out)).T, net.dtype)
            b[...] = net.backend.asarray(rng.uniform(-bound, bound, fan_out), net.dtype)

    def _batch_size(self, n_samples):
        if self.batch_size == "auto":
            return min(AUTO_BATCH, n_samples)
        if not isinstance(self.batch_size, Integral) or isinstance(self.batch_size, bool):
            raise ValueError(f"batch_size: expected 'auto' or a positive integer, got {self.batch_size!r}")
        if not 1 <= self.batch_size <= n_samples:
            warnings.warn(f"batch_size: expected 1..{n_samples} (the number of samples), got {self.batch_size}; "
                          f"clipped", UserWarning, stacklevel=3)
        return int(np.clip(self.batch_size, 1, n_samples))

    def _split(self, X, targets, rng):
        """(training rows, validation rows or None), as scikit-learn splits for early stopping."""
        if not self.early_stopping:
            return (X, targets), None
        stratify = targets if targets.ndim == 1 else None
        X_train, X_val, y_train, y_val = train_test_split(X, targets, random_state=rng,
                                                          test_size=self.validation_fraction, stratify=stratify)
        if X_val.shape[0] < 2:
            raise ValueError(f"validation_fraction: {self.validation_fraction} of {X.shape[0]} samples leaves "
                             f"{X_val.shape[0]} for validation; expected at least 2 (raise it, or give more data)")
        return (X_train, y_train), (X_val, y_val)

    def _epochs(self, X, targets, rng, incremental, solver):
        """max_iter epochs (one for partial_fit) over the training rows, with the stopping rules; solver:
        (optimizer name, hyper-parameters) of a new optimizer, None to carry on with the network's."""
        net = self.model_
        (X_train, y_train), validation = self._split(X, targets, rng)
        backend, xp = net.backend, net.backend.xp
        X_train = net.as_inputs(X_train)
        y_train = backend.asarray(y_train, np.int64 if y_train.ndim == 1 else net.dtype)
        n = X_train.shape[0]
        batch = self._batch_size(n)
        if solver is not None:
            name, hyper = solver
            net.optimizer = OPTIMIZERS[name](lr=self.learning_rate_init, weight_decay=self.alpha / batch,
                                             **hyper).bind(backend, net.params)
        best_params, self.n_iter_ = None, 0  # epochs of this call; t_ and loss_curve_ run on, as scikit-learn's
        shuffled = np.arange(n)
        for _ in range(1 if incremental else self.max_iter):
            if self.shuffle:  # each epoch permutes the last epoch's order, as scikit-learn does
                shuffled = shuffled[rng.permutation(n)]
            order = backend.asarray(shuffled) if self.shuffle else None
            loss_sum = 0.0
            for start in range(0, n, batch):
                if order is None:
                    x, y = X_train[start:start + batch], y_train[start:start + batch]
                else:
                    rows = order[start:start + batch]
                    x, y = xp.take(X_train, rows, axis=0), xp.take(y_train, rows, axis=0)
                loss, _ = net.forward_backward(x, y, batch)
                loss_sum += loss * x.shape[0]
                net.optimizer.step(net.params, net.grads)
            self.n_iter_ += 1
            self.t_ += n
            self.loss_curve_.append(self._reported_loss(loss_sum / n))
            if self.verbose:
                print(f"Iteration {self.n_iter_}, loss = {self.loss_curve_[-1]:.8f}")
            if validation is None:
                self._training_loss_improved()
            elif self._validation_improved(*validation):
                best_params = xp.array(net.params, copy=True)
            if self._no_improvement_count > self.n_iter_no_change:
                if self.verbose:
                    print(f"{'Validation score' if validation else 'Training loss'} did not improve more than "
                          f"tol={self.tol} for {self.n_iter_no_change} consecutive epochs. Stopping.")
                break
            if not incremental and self.n_iter_ == self.max_iter:
                warnings.warn(f"Stochastic Optimizer: Maximum iterations ({self.max_iter}) reached and the "
                              f"optimization hasn't converged yet.", ConvergenceWarning, stacklevel=4)
        if best_params is not None:
            net.params[...] = best_params

    def _validation_improved(self, X_val, y_val) -> bool:
        score = self._validation_score(X_val, y_val)
        self.validation_scores_.append(score)
        if self.verbose:
            print(f"Validation score: {score:f}")
        stalled = score < self.best_validation_score_ + self.tol
        self._no_improvement_count = self._no_improvement_count + 1 if stalled else 0
        if score > self.best_validation_score_:
            self.best_validation_score_ = score
            return True
        return False

    def _training_loss_improved(self):
        loss = self.loss_curve_[-1]
        self._no_improvement_count = self._no_improvement_count + 1 if loss > self.best_loss_ - self.tol else 0
        self.best_loss_ = min(self.best_loss_, loss)

    def fit(self, X, y):
        """Trains a new network on X (n_samples, n_features) and y (see the class), or, with warm_start,
        carries on with the last one. Returns self."""
        return self._fit(X, y, incremental=False)

    # ---- checkpoints ----

    def save(self, path):
        """Writes the fitted estimator to ``path`` (.npz, atomically): its network with the class labels,
        and its parameters and fitted attributes as JSON. ``load`` reads it back; so does pickle."""
        check_is_fitted(self)
        params = self.get_params()
        params["backend"] = getattr(self.backend, "name", self.backend)
        params["dtype"] = None if self.dtype is None else np.dtype(self.dtype).name
        fitted = {name: getattr(self, name) for name in FITTED}
        if hasattr(self, "feature_names_in_"):
            fitted["feature_names_in_"] = self.feature_names_in_.tolist()
        io.save(self.model_, path, estimator={"class": type(self).__name__, "params": params, "fitted": fitted})

    @classmethod
    def load(cls, path, backend=None):
        """The estimator ``save`` wrote to ``path``, its network on ``backend`` (None: the saved setting).
        CheckpointError for a file that holds no estimator of this class."""
        saved = io.read_estimator(path)
        if saved.get("class") != cls.__name__ or not {"params", "fitted"} <= set(saved):
            raise CheckpointError(f"checkpoint {os.fspath(path)!r}: expected a saved {cls.__name__}, got "
                                  f"{saved.get('class') or 'a network without an estimator'}")
        params = dict(saved["params"], **({} if backend is None else {"backend": backend}))
        estimator = cls(**params)
        estimator.model_ = MLP.load(path, backend=estimator.backend)
        for name, value in saved["fitted"].items():
            setattr(estimator, name, np.array(value, dtype=object) if name == "feature_names_in_" else value)
        if estimator.model_.classes is not None:
            estimator.classes_ = estimator.model_.classes
        return estimator

    # ---- inference ----

    def _outputs(self, X):
        """The network's output map (softmax, sigmoid or identity) of validated X, on the host."""
        return to_numpy(self.model_.predict_proba(X))

    def _checked_outputs(self, X):
        check_is_fitted(self)
        return self._outputs(self._validate_X(X, reset=False))

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags
