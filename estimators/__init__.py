"""scikit-learn estimators over the deltaprop MLP: ``from deltaprop.sklearn import MLPClassifier``.

Needs scikit-learn (pip install 'deltaprop[train]'); importing ``deltaprop`` alone never imports it.
"""

from deltaprop.sklearn.classifier import MLPClassifier
from deltaprop.sklearn.regressor import MLPRegressor

__all__ = ["MLPClassifier", "MLPRegressor"]
