"""`deltaprop check` and `deltaprop info` as a user runs them."""

import numpy as np

from deltaprop.backend import Backend, available_backends, register_backend
from deltaprop.cli import main


def test_check_passes_on_every_usable_backend(capsys):
    assert main(["check"]) == 0
    out = capsys.readouterr().out
    for name in available_backends():
        assert f"\n{name:<7} float32  gemm " in out
        assert f"\n{name:<7} float64  train_step x3 (params)" in out
    assert "FAIL" not in out
    assert out.rstrip().endswith("all passed on " + ", ".join(available_backends()))


class _OffByOneUlpBiasGrad(Backend):
    """A backend whose bias gradient is wrong by a relative 1e-9: check must catch it in float64."""

    name = "skewed"

    def bias_grad(self, delta, out=None):
        out = super().bias_grad(delta, out)
        out *= 1 + 1e-9
        return out


def test_check_fails_a_wrong_kernel_and_exits_1(capsys):
    register_backend("skewed", _OffByOneUlpBiasGrad)
    try:
        assert main(["check", "--backends", "skewed", "--dtypes", "float64"]) == 1
    finally:
        from deltaprop.backend import _REGISTRY, _instances

        del _REGISTRY["skewed"]
        _instances.pop("skewed", None)
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    failed = [row for row in rows if row[-1] == "FAIL"]
    assert {row[2] for row in failed} == {"bias_grad", "train_step"}  # the step uses bias_grad too
    assert all(float(row[-3]) > 1e-12 for row in failed)


def test_check_refuses_an_unknown_backend(capsys):
    assert main(["check", "--backends", "tpu"]) == 2
    assert capsys.readouterr().err == ("deltaprop check: error: --backends: expected 'auto' or one of "
                                       "['cupy', 'numba', 'numpy'], got 'tpu'\n")


def test_check_refuses_a_dtype_the_backend_does_not_compute_in(capsys):
    assert main(["check", "--backends", "numpy", "--dtypes", "float16"]) == 2
    assert capsys.readouterr().err == ("deltaprop check: error: --dtypes: expected dtypes among "
                                       "['float32', 'float64'] for backend numpy, got 'float16'\n")


def test_info_names_every_backend_and_why(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "numpy  usable" in out
    for line in out.splitlines():
        if line.strip().startswith(("numba ", "cupy ")):
            assert "usable" in line  # "usable", or "unusable: <reason>"
            assert not line.strip().endswith("unusable:")
    assert f"numpy {np.__version__}" in out
