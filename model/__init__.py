"""The model: the L-layer perceptron and what trains it. Imports no backend until one is used."""

from deltaprop.model.losses import LOSSES, get_loss
from deltaprop.model.ensemble import MLPEnsemble
from deltaprop.model.mlp import MLP

__all__ = ["LOSSES", "MLP", "MLPEnsemble", "get_loss"]
