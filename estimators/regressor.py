"""MLPRegressor: real targets (n_samples,) or (n_samples, n_outputs), squared error with identity outputs."""

from __future__ import annotations

from sklearn.base import RegressorMixin
from sklearn.metrics import r2_score
from sklearn.utils.validation import column_or_1d

from deltaprop.sklearn.base import BaseMLP


class MLPRegressor(RegressorMixin, BaseMLP):
    """A multilayer perceptron regressor trained by a deltaprop MLP (see BaseMLP for the parameters).

    y: (n_samples,) or (n_samples, n_outputs) real targets; predict returns the same shape.
    """

    def _targets(self, X, y, first, classes):
        X, y = self._validate_Xy(X, y, reset=first, y_numeric=True)
        if y.ndim == 2 and y.shape[1] == 1:
            y = column_or_1d(y, warn=True)
        return X, y.reshape(len(y), -1).astype(X.dtype)

    def _loss_for(self, targets):
        return "mse"

    def _reported_loss(self, loss):
        return loss / self.n_outputs_  # scikit-learn's squared error averages over the outputs too

    def _validation_score(self, X, targets):
        return r2_score(targets, self._outputs(X))

    def partial_fit(self, X, y):
        """One epoch over X and y (a new network on the first call). Returns self."""
        return self._fit(X, y, incremental=True)

    def predict(self, X):
        """Outputs (n_samples,) for a single target, else (n_samples, n_outputs)."""
        outputs = self._checked_outputs(X)
        return outputs.ravel() if outputs.shape[1] == 1 else outputs
