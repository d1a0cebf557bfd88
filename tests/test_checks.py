"""The argument checks (backend/checks.py) on host arrays of every dtype of the table, bfloat16 included:
ml_dtypes' bfloat16 has NumPy kind 'V', and the checks must take it where the device computes in it."""

import numpy as np
import pytest

from deltaprop.backend import checks
from deltaprop.kernels.dtypes import DTYPES, floating, resolve_dtype, supports

ml_dtypes = pytest.importorskip("ml_dtypes")  # of the cuda extra
BFLOAT16 = np.dtype(ml_dtypes.bfloat16)


def test_bfloat16_arrays_are_a_floating_dtype_of_ours_on_cuda_only():
    assert BFLOAT16.kind == "V"  # why `kind == "f"` cannot be the test
    assert floating(BFLOAT16) is DTYPES["bfloat16"]
    assert supports("cuda", BFLOAT16) and not supports("cpu", BFLOAT16)
    assert resolve_dtype("bfloat16", "cuda") == BFLOAT16 and resolve_dtype(BFLOAT16, "cuda") == BFLOAT16
    assert floating(np.dtype("V2")) is None and floating(np.dtype(np.int16)) is None


def test_the_kernel_checks_take_bfloat16_arrays_on_cuda():
    z, delta = np.ones((4, 3), BFLOAT16), np.zeros((4, 3), BFLOAT16)
    bias, flat = np.zeros(3, BFLOAT16), np.zeros(7, BFLOAT16)
    assert checks.check_rows("bias_act", "cuda", b=bias, acc=z, out=delta) == BFLOAT16
    assert checks.check_bias_grad("cuda", delta, bias) == BFLOAT16
    assert checks.check_gemm(z, np.ones((3, 2), BFLOAT16), None, False, False, "cuda") == (4, 2)
    assert checks.check_flat("sgd_update", "cuda", params=flat, grads=flat) == BFLOAT16
    state = np.zeros(7, np.float32)  # optimizer state is kept in the accumulation dtype
    assert checks.check_adam("cuda", flat, flat, state, state, 1) == BFLOAT16
    targets = np.eye(4, 3).astype(BFLOAT16)
    assert checks.check_loss("squared_error", "cuda", z, targets, delta, None) == ("matrix", 0.25)
    assert checks.check_loss("softmax_xent", "cuda", z, np.array([0, 2, 1, 0]), delta, 2.0) == ("labels", 2.0)


def test_bfloat16_is_refused_on_the_cpu_and_beside_another_dtype_by_name():
    z = np.ones((4, 3), BFLOAT16)
    with pytest.raises(TypeError, match=r"bias_grad: delta: expected one of \['float32', 'float64'\] on cpu, got bfloat16"):
        checks.check_bias_grad("cpu", z, None)
    with pytest.raises(TypeError, match=r"squared_error: targets: expected dtype bfloat16 \(the dtype of z\), got float16"):
        checks.check_loss("squared_error", "cuda", z, np.ones((4, 3), np.float16), None, None)


def test_optimizer_state_of_16_bit_params_is_refused_unless_float32():
    flat = np.zeros(7, BFLOAT16)
    with pytest.raises(TypeError, match=r"adam_update: v: expected dtype float32 \(the optimizer state dtype of"
                                        r" bfloat16 params\), got bfloat16"):
        checks.check_adam("cuda", flat, flat, np.zeros(7, np.float32), flat, 1)
