"""The host stand-in of the CUDA runtime (kernels/cuda/host/standin.py, DELTAPROP_CUDA_SIM=1) itself: the
switch, its log of what crosses the host/device boundary, device arrays that refuse implicit transfers,
launches checked against the kernels' C signatures, the cuBLAS emulation's argument rules, the commands
on it, and an MLP trained on digits to the numba backend's accuracy.

The suites' cupy cases run on the stand-in as ``cupy-sim`` (tests/conftest.py, test_kernel_edges.py).
"""

import numpy as np
import pytest
from helpers import LOSS_REFERENCES, SIM_VARIABLE, assert_close, labels_for, random_host

from deltaprop.backend import backend_status, get_backend, to_numpy
from deltaprop.kernels import reference
from deltaprop.kernels.cuda.cublas import cublas_gemm
from deltaprop.kernels.cuda.host import cublas_emulation, standin

pytestmark = pytest.mark.cuda_sim  # conftest sets DELTAPROP_CUDA_SIM=1 for each test


def test_the_variable_switches_cupy_onto_the_stand_in_and_auto_never_picks_it(sim, monkeypatch):
    assert sim.describe()["simulated"] is True and "simulator" in sim.describe()["gpu"]
    assert isinstance(sim.asarray(np.ones(3)), standin.DeviceArray)
    assert get_backend("auto").name != "cupy"
    monkeypatch.setenv(SIM_VARIABLE, "yes")
    assert backend_status("cupy") == (False, f"environment variable {SIM_VARIABLE}: expected 1 (simulate CUDA on the"
                                             " host) or 0, got 'yes'")
    monkeypatch.setenv(SIM_VARIABLE, "0")
    assert backend_status("cupy")[1] != standin.DESCRIPTION  # the real device's answer again


def test_the_log_shows_launches_gemms_and_each_copy_across_the_boundary(sim):
    z_host = np.arange(12, dtype=np.float32).reshape(4, 3)
    with standin.recording() as log:
        z = sim.asarray(z_host)
        out = sim.gemm(z, z, trans_b=True)
        loss = sim.softmax_xent(out, sim.asarray(np.array([0, 1, 2, 3])))
        total = z.sum()
        host = to_numpy(out)
    assert isinstance(loss, float) and isinstance(total, standin.DeviceArray) and total.ndim == 0
    assert [(e.kind, e.name, e.nbytes) for e in log] == [
        ("to_device", "ascontiguousarray", 48),
        ("gemm", "gemmStridedBatchedEx", 64),
        ("to_device", "ascontiguousarray", 32),
        ("launch", "softmax_rows<float, LabelTargets<float>, GroupTeam<4>>", 64 + 32 + 16),
        ("launch", "mean_of_rows<float>", 16 + 4),
        ("to_host", "float", 4),  # the loss: the one sync of the call
        ("to_host", "get", 64),
    ]
    np.testing.assert_allclose(host, z_host @ z_host.T, rtol=1e-6)
    with standin.recording() as log:
        assert float(total) == 66.0 and int(z[1, 1]) == 4 and bool(z[0, 1]) and f"{z[2, 0]:.0f}" == "6"
        z.item(5), z.tolist(), standin.asnumpy(z)
    assert [e.name for e in log] == ["float", "int", "bool", "format", "item", "tolist", "get"]
    assert {e.kind for e in log} == {"to_host"}


def test_device_arrays_refuse_an_implicit_transfer_as_cupy_does(sim):
    device, host = sim.asarray(np.ones(3)), np.ones(3)
    for mixed in (lambda: device + host, lambda: np.add(host, device), lambda: standin.xp.maximum(device, host),
                  lambda: np.concatenate([device, host]), lambda: standin.xp.isfinite(host)):
        with pytest.raises(TypeError, match="a NumPy \\(host\\) array and a device array in one call"):
            mixed()
    assert isinstance(device + np.float64(1), standin.DeviceArray)  # a NumPy scalar is a value, not a transfer


def test_a_launch_is_checked_against_the_kernels_c_signature(sim):
    kernel = sim._modules.function("sgd_update", "float32")
    p, g = sim.asarray(np.ones(5, np.float32)), sim.asarray(np.ones(5, np.float32))
    with pytest.raises(TypeError, match=r"argument 3 \(float lr\): expected float32 \(4 bytes\), got float 0.1 "
                                        r"\(float64, 8 bytes, as CuPy passes a Python float\)"):
        kernel((1,), (256,), (p, g, np.int64(5), 0.1, np.float32(0)))
    with pytest.raises(TypeError, match=r"argument 2 \(long long n\): expected int64 \(8 bytes\), got numpy.int32"):
        kernel((1,), (256,), (p, g, np.int32(5), np.float32(0.1), np.float32(0)))
    with pytest.raises(TypeError, match="expected 5 arguments"):
        kernel((1,), (256,), (p, g, np.int64(5), np.float32(0.1)))
    with pytest.raises(TypeError, match="argument 1: a NumPy \\(host\\) array"):
        kernel((1,), (256,), (p, np.ones(5, np.float32), np.int64(5), np.float32(0.1), np.float32(0)))
    kernel((1,), (256,), (p, g, np.int64(5), np.float32(0.5), np.float32(0)))
    np.testing.assert_array_equal(to_numpy(p), np.full(5, 0.5, np.float32))


# ---- every instantiation of the row and column kernels, through the backend ------------------------------

# rows of these lengths take every row team (launch.row_team): GroupTeam<1, 2, 4, 8, 16, 32>, then BlockTeam
TEAM_COLUMNS = (1, 2, 3, 5, 13, 31, 32, 33, 1025)
SIM_DTYPES = ("float32", "float64", "float16", "bfloat16")


@pytest.mark.parametrize("dtype", SIM_DTYPES)
def test_every_row_team_of_softmax_and_the_losses_in_every_dtype(sim, dtype):
    """One row and three rows of each team's lengths, labels and target rows: every softmax_rows and
    elementwise_loss_rows instantiation (the suites' shapes leave some teams out), against the reference."""
    for cols in TEAM_COLUMNS:
        for rows in (1, 3):
            z = random_host((rows, cols), dtype, cols)
            assert_close(to_numpy(sim.softmax(sim.asarray(z))), reference.softmax(z), dtype)
            labels = labels_for(rows, cols)
            probabilities = reference.softmax(random_host((rows, cols), "float64", cols + 100)).astype(z.dtype)
            for loss, expected in LOSS_REFERENCES.items():
                for targets in (labels, probabilities):
                    delta = sim.empty((rows, cols), z.dtype)
                    value = getattr(sim, loss)(sim.asarray(z), sim.asarray(targets), delta_out=delta)
                    value_ref, delta_ref = expected(z, targets)
                    assert_close(value, value_ref, dtype)
                    assert_close(to_numpy(delta), delta_ref, dtype)


@pytest.mark.parametrize("dtype", SIM_DTYPES)
def test_bias_grad_in_row_chunks_in_every_dtype(sim, dtype):
    """Rows enough for column_sums to split them into chunks (then column_sums_of_partials adds them)."""
    delta = random_host((300, 5), dtype, 4)
    assert_close(to_numpy(sim.bias_grad(sim.asarray(delta))), reference.bias_grad(delta), dtype)


# ---- the cuBLAS emulation -----------------------------------------------------------------------------------


def _gemm_arguments(sim, a, b, out, **changes):
    """The arguments CupyBackend passes for out = a @ b (after the handle), with ``changes`` by name."""
    call = cublas_gemm(a, b, out, False, False)
    first, second = (a, b) if call.first_is_a else (b, a)
    scalars = np.array([1.0, 0.0], np.float32)
    named = dict(transa=int(call.trans_first), transb=int(call.trans_second), m=call.m, n=call.n, k=call.k,
                 alpha=scalars.ctypes.data, a=first.data.ptr, atype=0, lda=call.ld_first, stride_a=call.stride_first,
                 b=second.data.ptr, btype=0, ldb=call.ld_second, stride_b=call.stride_second,
                 beta=scalars.ctypes.data + 4, c=out.data.ptr, ctype=0, ldc=call.ld_out, stride_c=call.stride_out,
                 batch=call.batch, compute=68, algo=-1)
    named.update(changes)
    return scalars, tuple(named.values())


@pytest.mark.parametrize(("changes", "status", "message"), [
    # out (4, 5) is row-major: cuBLAS writes out.T (5 x 4) = b.T (5 x 3, stored as b) @ a.T (3 x 4)
    ({"lda": 2}, "INVALID_VALUE", r"lda = 2: expected >= max\(1, 5\)"),
    ({"ldb": 0}, "INVALID_VALUE", r"ldb = 0: expected >= max\(1, 3\)"),
    ({"ldc": 4}, "INVALID_VALUE", r"ldc = 4: expected >= max\(1, 5\)"),
    ({"transa": 3}, "INVALID_VALUE", r"transa = 3: expected CUBLAS_OP_N"),
    ({"k": -1}, "INVALID_VALUE", r"k = -1: expected >= 0"),
    ({"stride_c": 10, "batch": 2}, "INVALID_VALUE", r"strideC = 10: the 2 outputs .* overlap"),
    ({"stride_a": -4, "batch": 2, "stride_c": 40}, "INVALID_VALUE", r"strideA = -4: expected >= 0"),
    ({"batch": 2, "stride_c": 40}, "INVALID_VALUE", r"matrix C: 240 bytes .* leave its allocation of 80 bytes"),
    ({"atype": 1}, "NOT_SUPPORTED", r"Atype 1, Btype 0, Ctype 0"),
    ({"compute": 70}, "NOT_SUPPORTED", r"Atype 0, Btype 0, Ctype 0 with computeType 70"),
])
def test_cublas_refuses_what_cublas_refuses(sim, changes, status, message):
    a, b = sim.asarray(np.ones((4, 3), np.float32)), sim.asarray(np.ones((3, 5), np.float32))
    out = sim.empty((4, 5), np.float32)
    scalars, args = _gemm_arguments(sim, a, b, out, **changes)
    with pytest.raises(cublas_emulation.CublasError, match=f"^CUBLAS_STATUS_{status}: {message}"):
        standin.cublas.gemmStridedBatchedEx(1, *args)


def test_cublas_computes_a_batched_product_in_place_and_reads_c_only_with_a_nonzero_beta(sim):
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((3, 4, 6)), rng.standard_normal((3, 5, 6))
    out = sim.asarray(np.full((3, 4, 5), np.nan))
    assert sim.gemm(sim.asarray(a), sim.asarray(b), out=out, trans_b=True) is out
    assert_close(to_numpy(out), reference.gemm(a, b, trans_b=True), "float64")
    c = rng.standard_normal((4, 5))
    out = sim.asarray(c)
    sim.gemm(sim.asarray(a[0]), sim.asarray(b[0]), out=out, trans_b=True, alpha=0.5, beta=-2.0)
    assert_close(to_numpy(out), reference.gemm(a[0], b[0], c, trans_b=True, alpha=0.5, beta=-2.0), "float64")


def test_cublas_refuses_an_address_outside_every_allocation(sim):
    a, b = sim.asarray(np.ones((4, 3), np.float32)), sim.asarray(np.ones((3, 5), np.float32))
    out = sim.empty((4, 5), np.float32)
    scalars, args = _gemm_arguments(sim, a, b, out, c=8)
    with pytest.raises(cublas_emulation.CublasError, match="address 0x8 is in no device allocation"):
        standin.cublas.gemmStridedBatchedEx(1, *args)


# ---- the commands and the model on the stand-in -------------------------------------------------------------


def test_info_and_check_say_it_is_the_simulator_and_check_runs_the_16_bit_types(sim, capsys):
    """`deltaprop check` in float16 and bfloat16: every kernel (every activation, loss and optimizer) and
    three training steps through the backend, against the reference."""
    from deltaprop.cli import main

    assert main(["info"]) == 0
    assert "DELTAPROP_CUDA_SIM=1: cupy runs on the host simulator" in capsys.readouterr().out
    assert main(["check", "--backends", "cupy", "--dtypes", "float16,bfloat16"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"cupy: {standin.DESCRIPTION}\n")
    for dtype in ("float16", "bfloat16"):
        assert f"cupy    {dtype:<8} train_step x3 (params)" in out
    assert out.rstrip().endswith("all passed on cupy")


def test_check_offers_bfloat16_on_cupy():
    from argparse import Namespace

    from deltaprop.cli.check import _backends_and_dtypes

    (backend, dtypes), = _backends_and_dtypes(Namespace(backends=["cupy"], dtypes=None))
    assert dtypes == ["float32", "float64", "float16", "bfloat16"]


def test_an_mlp_trains_on_digits_to_the_numba_backends_accuracy(sim):
    """The same recipe on both backends: a smaller network than the digits target's, in few large batches
    (a step on the stand-in takes a good part of a second)."""
    datasets = pytest.importorskip("sklearn.datasets")
    model_selection = pytest.importorskip("sklearn.model_selection")
    from deltaprop.model import MLP

    X, y = datasets.load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = model_selection.train_test_split(X / 16, y, test_size=0.25, stratify=y,
                                                                        random_state=0)
    accuracy = {}
    for name in ("numba", "cupy"):
        net = MLP([64, 32, 10], activation="relu", backend=name, dtype="float32", seed=0)
        net.fit(X_train, y_train, epochs=8, batch_size=512, optimizer="adam", lr=3e-2, progress=False)
        accuracy[name] = float(np.mean(to_numpy(net.predict(X_test)) == y_test))
    assert accuracy["numba"] >= 0.9, accuracy
    assert accuracy["cupy"] >= accuracy["numba"] - 0.01, accuracy
