"""The error classes of deltaprop. Each message names the argument, what was expected and what came."""


class DeltapropError(Exception):
    """Base class of every error deltaprop raises on its own account."""


class BackendUnavailableError(DeltapropError, RuntimeError):
    """A backend was asked for by name but cannot run here (missing package, driver or device)."""


class CheckpointError(DeltapropError, ValueError):
    """A checkpoint file is truncated, corrupt, foreign or does not match what was asked for."""


class NonFiniteError(DeltapropError, FloatingPointError):
    """NaN or infinity where finite values are required."""


class NonFiniteLossError(NonFiniteError):
    """The loss became NaN or infinite (a diverging learning rate, or NaN in the inputs)."""


class NonFiniteInputError(NonFiniteError, ValueError):
    """An input array holds NaN or infinity (raised where a backend is asked to check its inputs)."""


class KernelCompileError(DeltapropError, RuntimeError):
    """A compiled kernel cannot be built: its source does not compile, or no instantiation matches."""


class DistributedError(DeltapropError, RuntimeError):
    """Data-parallel ranks disagree (network, data, seeds), or another rank died or stopped answering."""
