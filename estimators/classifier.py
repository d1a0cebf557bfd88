"""MLPClassifier: labels of any type (ints, strings, booleans) in ``classes_``, softmax cross-entropy over
them; a multilabel indicator matrix y (n_samples, n_labels) trains sigmoid cross-entropy instead."""

from __future__ import annotations

import numpy as np
from sklearn.base import ClassifierMixin
from sklearn.metrics import accuracy_score
from sklearn.utils.multiclass import check_classification_targets, type_of_target, unique_labels
from sklearn.utils.validation import column_or_1d

from deltaprop.sklearn.base import BaseMLP

# what y is (sklearn's type_of_target) -> the MLP's loss; other kinds (continuous, multiclass-multioutput) are refused
LOSSES = {"binary": "softmax_cross_entropy", "multiclass": "softmax_cross_entropy",
          "multilabel-indicator": "sigmoid_cross_entropy"}


class MLPClassifier(ClassifierMixin, BaseMLP):
    """A multilayer perceptron classifier trained by a deltaprop MLP (see BaseMLP for the parameters).

    y: labels (n_samples,) of any type, kept sorted in ``classes_``; or a 0/1 indicator matrix
    (n_samples, n_labels) for multilabel classification (``classes_`` = 0..n_labels-1).
    """

    def _targets(self, X, y, first, classes):
        X, y = self._validate_Xy(X, y, reset=first)
        if y.ndim == 2 and y.shape[1] == 1:
            y = column_or_1d(y, warn=True)
        check_classification_targets(y)
        kind = type_of_target(y)
        if kind not in LOSSES:
            raise ValueError(f"y: expected class labels (n_samples,) or a multilabel indicator matrix, got {kind} "
                             f"targets of shape {y.shape}")
        multilabel = kind == "multilabel-indicator"
        if first:
            self.classes_ = np.arange(y.shape[1]) if multilabel else unique_labels(y if classes is None else classes)
        elif multilabel != (self.model_.loss == LOSSES["multilabel-indicator"]):
            raise ValueError(f"y: expected targets of the kind of the first fit, got {kind}")
        if multilabel:
            return X, y.astype(np.float64)
        return X, self._indices(y)

    def _indices(self, y):
        """Labels y as int64 indices into ``classes_``; a ValueError naming labels never seen before."""
        unseen = np.setdiff1d(unique_labels(y), self.classes_)
        if unseen.size:
            raise ValueError(f"y: expected labels among classes_ {self.classes_.tolist()} (from the first fit or "
                             f"partial_fit's classes=), got new labels {unseen.tolist()}")
        return np.searchsorted(self.classes_, y).astype(np.int64)

    def _loss_for(self, targets):
        return LOSSES["multiclass" if targets.ndim == 1 else "multilabel-indicator"]

    def _validation_score(self, X, targets):
        return accuracy_score(targets, self._decide(self._outputs(X), indices=True))

    def _decide(self, probabilities, indices=False):
        if self.model_.loss == LOSSES["multilabel-indicator"]:
            return (probabilities > 0.5).astype(np.int64)
        best = probabilities.argmax(axis=1)
        return best if indices else self.classes_[best]

    def partial_fit(self, X, y, classes=None):
        """One epoch over X and y. The first call needs ``classes`` (every label y will ever hold), unless
        y is a multilabel indicator matrix; later calls must not change them. Returns self."""
        if not hasattr(self, "model_"):
            if classes is None and type_of_target(y) != "multilabel-indicator":
                raise ValueError("partial_fit: expected classes= (every label) on the first call, got None")
            return self._fit(X, y, incremental=True, classes=classes)
        if classes is not None and not np.array_equal(unique_labels(classes), self.classes_):
            raise ValueError(f"partial_fit: classes: expected {self.classes_.tolist()} (as in the first call), "
                             f"got {unique_labels(classes).tolist()}")
        return self._fit(X, y, incremental=True)

    def predict(self, X):
        """Labels (n_samples,) from ``classes_``; 0/1 (n_samples, n_labels) for multilabel y."""
        return self._decide(self._checked_outputs(X))

    def predict_proba(self, X):
        """Class probabilities (n_samples, n_classes) in the order of ``classes_`` (independent label
        probabilities for multilabel y)."""
        return self._checked_outputs(X)

    def predict_log_proba(self, X):
        """log of ``predict_proba`` (-inf where a probability underflowed to 0)."""
        with np.errstate(divide="ignore"):
            return np.log(self.predict_proba(X))

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_label = True
        return tags
