"""The error classes of deltaprop. Each message names the argument, what was expected and what came."""


class DeltapropError(Exception):
    """Base class of every error deltaprop raises on its own account."""


class BackendUnavailableError(DeltapropError, RuntimeError):
    """A backend was asked for by name but cannot run here (missing package, driver or device)."""


class CheckpointError(DeltapropError, ValueError):
    """A checkpoint file is truncated, corrupt, foreign or does not match what was asked for."""


class NonFiniteLossError(DeltapropError, FloatingPointError):
    """The loss became NaN or infinite (a diverging learning rate, or NaN in the inputs)."""
