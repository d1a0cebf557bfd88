"""One error type per kind of failure, in one hierarchy, each also the builtin type callers caught before."""

import pytest

from deltaprop.errors import (
    DeltapropError,
    KernelCompileError,
    NonFiniteError,
    NonFiniteInputError,
    NonFiniteLossError,
)


@pytest.mark.parametrize(("error", "builtin"), [
    (NonFiniteLossError, FloatingPointError),
    (NonFiniteInputError, ValueError),  # the cupy backend's check_inputs raised a plain ValueError
    (KernelCompileError, RuntimeError),  # the CUDA loader raised a plain RuntimeError
])
def test_each_failure_is_a_deltaprop_error_and_its_builtin(error, builtin):
    with pytest.raises(DeltapropError):
        raise error("x")
    with pytest.raises(builtin):
        raise error("x")


def test_one_except_clause_catches_every_non_finite_value():
    for error in (NonFiniteLossError, NonFiniteInputError):
        with pytest.raises(NonFiniteError):
            raise error("loss: expected a finite value, got nan")
