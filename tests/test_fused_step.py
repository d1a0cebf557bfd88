"""The fused training step (``Backend.fused_sgd_step``) and the fused gradients step
(``Backend.fused_grads_step``) against the kernel-by-kernel loop and the reference: the same function at
every activation, loss and dtype, at batch 1, at the small-batch path's limit and past it (the GEMM path);
their layout; their errors; and no allocation after the first step."""

import math
import os
import subprocess
import sys
import threading
import tracemalloc

import numba
import numpy as np
import pytest
from helpers import host_params, rel_err, targets_for, tol

from deltaprop.backend import get_backend
from deltaprop.errors import NonFiniteLossError
from deltaprop.kernels import reference
from deltaprop.kernels.activations import ACTIVATIONS
from deltaprop.kernels.cpu.blas_threads import (
    SERIAL_BLAS_BELOW,
    enter_serial_blas,
    leave_serial_blas,
    register_blas_threads,
    restore_blas,
    serial_blas,
    set_blas_threads,
)
from deltaprop.kernels.cpu.step import SMALL_BATCH, largest_gemm
from deltaprop.kernels.layout import Layout
from deltaprop.model import LOSSES, MLP

BATCHES = (1, SMALL_BATCH, SMALL_BATCH + 5)  # the outer-product update, at its limit, and the GEMM path
# every activation with one loss and every loss with two activations, in both dtypes where it is cheap:
# each combination is a compilation of the whole step
CASES = [(act, "softmax_cross_entropy", "float64") for act in sorted(ACTIVATIONS)] + [
    (act, loss, dtype) for act in ("relu", "tanh") for loss in sorted(LOSSES) for dtype in ("float32", "float64")
]


def pair(sizes, activation, loss, dtype, seed=3):
    """The same network twice on numba: the fused step and the kernel-by-kernel loop."""
    fused = MLP(sizes, activation=activation, loss=loss, backend="numba", dtype=dtype, seed=seed)
    loop = MLP(sizes, activation=activation, loss=loss, backend="numba", dtype=dtype, seed=seed)
    loop.use_fused_step = False
    return fused, loop


@pytest.mark.parametrize("activation, loss, dtype", CASES)
def test_fused_step_is_the_loop_and_the_reference(activation, loss, dtype, rng):
    sizes = [7, 11, 9, 4]  # blocks of eight rows with tails of 3, 1 and 4; odd widths for the row pairs
    fused, loop = pair(sizes, activation, loss, dtype)
    assert fused.backend.fused_sgd_step(activation, "softmax_xent", dtype) is not None
    weights, biases = host_params(fused)
    batches = []
    for batch in BATCHES:
        for _ in range(2):
            y = targets_for(loss, rng, batch, sizes[-1])
            x = rng.standard_normal((batch, sizes[0])).astype(dtype)
            batches.append((x, y.astype(dtype) if y.ndim == 2 else y))
    fused_losses = [fused.train_step(x, y, lr=0.1) for x, y in batches]
    loop_losses = [loop.train_step(x, y, lr=0.1) for x, y in batches]
    ref_w, ref_b, ref_losses = reference.sgd_steps(weights, biases, batches, activation, loss, 0.1)
    tolerance = tol(dtype)
    np.testing.assert_allclose(fused_losses, ref_losses, rtol=tolerance * 10)
    np.testing.assert_allclose(fused_losses, loop_losses, rtol=tolerance * 10)
    for params, expected in ((fused.weights, ref_w), (fused.biases, ref_b), (fused.weights, loop.weights),
                             (fused.biases, loop.biases)):
        for p, e in zip(params, expected):
            assert rel_err(p, e) <= tolerance


def test_inputs_in_another_form_are_converted(rng):
    """float64 x for a float32 net, int32 labels, a strided x: converted, then the same step."""
    fused, loop = pair([5, 6, 3], "relu", "softmax_cross_entropy", "float32")
    x = rng.standard_normal((10, 5))
    y = rng.integers(0, 3, 10).astype(np.int32)
    for batch in (x[::2], np.asfortranarray(x[:5]), x[:5].tolist()):
        assert fused.train_step(batch, y[:5]) == pytest.approx(loop.train_step(batch, y[:5]), rel=1e-6)
    assert rel_err(fused.params, loop.params) <= tol("float32")


def test_learning_rates_and_batch_sizes_that_change_between_steps(rng):
    """train_step keeps the last learning rate as a scalar of the dtype and the last workspace: a new rate
    (an int, a NumPy scalar, a rate seen before) or a new batch size must still be the one used."""
    fused, loop = pair([6, 8, 3], "relu", "softmax_cross_entropy", "float32")
    steps = [(1, 0.1), (1, 0.1), (1, 0.05), (12, 0.05), (1, 1), (12, np.float64(0.3)), (12, 0.1), (1, np.float32(0.1))]
    for batch, lr in steps:
        x = rng.standard_normal((batch, 6)).astype(np.float32)
        y = rng.integers(0, 3, batch)
        assert fused.train_step(x, y, lr) == pytest.approx(loop.train_step(x, y, lr), rel=1e-5)
        assert rel_err(fused.params, loop.params) <= tol("float32")


def test_layout_offsets_match_the_parameter_and_workspace_views():
    """The offsets a compiled step reads and the views the model uses are one layout."""
    net = MLP([6, 5, 4, 3], backend="numpy", seed=0)
    layout = Layout(net.sizes, 7)
    assert layout.n_params == net.n_params == Layout.parameter_count(net.sizes) == 6 * 5 + 5 + 5 * 4 + 4 + 4 * 3 + 3
    for row, W, b in zip(layout.offsets.tolist(), net.weights, net.biases):
        n_in, n_out, w_at, b_at = row[:4]
        assert W.shape == (n_out, n_in)
        assert W.__array_interface__["data"][0] == net.params[w_at:].__array_interface__["data"][0]
        assert b.__array_interface__["data"][0] == net.params[b_at:].__array_interface__["data"][0]
    assert layout.work_size == 7 * (5 + 4 + 3) * 2 + 7 * (5 + 4) + 2 * 6
    work = np.arange(layout.work_size, dtype=np.float64)
    views = layout.z(work) + layout.a(work) + layout.delta(work) + [layout.scratch(work)]
    assert [v.shape for v in views] == [(7, 5), (7, 4), (7, 3), (7, 5), (7, 4), (7, 5), (7, 4), (7, 3), (12,)]
    covered = np.concatenate([v.ravel() for v in views])
    assert np.array_equal(np.sort(covered), work)  # every element in exactly one view


def test_numpy_backend_has_no_fused_step():
    assert get_backend("numpy").fused_sgd_step("relu", "softmax_xent", "float64") is None


@pytest.mark.parametrize("step", ["train_step", "forward_backward"])
@pytest.mark.parametrize("batch", [1, 64])
def test_fused_steps_allocate_nothing_after_the_first(step, batch, rng):
    net = MLP([20, 32, 16, 5], backend="numba", dtype="float32", seed=0)
    x = rng.standard_normal((batch, 20)).astype(np.float32)
    y = rng.integers(0, 5, batch)
    call = getattr(net, step)
    call(x, y)  # compiles and allocates the workspace
    tracemalloc.start()
    try:
        call(x, y)
        before = tracemalloc.take_snapshot()
        for _ in range(50):
            call(x, y)
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename") if stat.size_diff > 0)
    assert grown < 50 * 16, f"{grown} bytes more after 50 steps"


def test_steps_cached_by_different_processes_keep_their_own_activation(tmp_path):
    """Each process compiles one step into the shared cache; a third loads both and each still computes its
    own activation (the builders' closures share a qualname: their symbols must not collide)."""
    def run(code):
        env = {**os.environ, "DELTAPROP_CACHE_DIR": str(tmp_path)}  # the kernel cache in tmp_path, whatever else is set
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        return result.stdout.split()

    script = (
        "import numpy as np; from deltaprop.model import MLP\n"
        "for act in {acts!r}:\n"
        "    fused, loop = (MLP([3, 4, 2], activation=act, backend='numba', dtype='float64', seed=0) for _ in 'ab')\n"
        "    loop.use_fused_step = False\n"
        "    x = -np.abs(np.random.default_rng(0).standard_normal((2, 3)))\n"
        "    for net in (fused, loop):\n"
        "        net.train_step(x, np.array([0, 1]))\n"
        "    print(float(np.abs(fused.params - loop.params).max()))\n"
    )
    run(script.format(acts=("elu",)))
    run(script.format(acts=("leaky_relu",)))
    assert all(float(error) < 1e-12 for error in run(script.format(acts=("elu", "leaky_relu"))))


GRADS_BATCHES = (1, 13, 40)  # the small-batch loops, and the GEMM path twice
GRADS_CASES = [(act, loss, dtype) for act in ("relu", "tanh") for loss in sorted(LOSSES)
               for dtype in ("float32", "float64")] + [("gelu", "softmax_cross_entropy", "float64")]


@pytest.mark.parametrize("activation, loss, dtype", GRADS_CASES)
def test_fused_grads_are_the_loop_and_the_reference(activation, loss, dtype, rng):
    sizes = [7, 12, 9, 4]
    fused, loop = pair(sizes, activation, loss, dtype)
    assert fused.backend.fused_grads_step(activation, "softmax_xent", dtype) is not None
    weights, biases = host_params(fused)
    tolerance = tol(dtype)
    for batch in GRADS_BATCHES:
        y = targets_for(loss, rng, batch, sizes[-1])
        y = y.astype(dtype) if y.ndim == 2 else y
        x = rng.standard_normal((batch, sizes[0])).astype(dtype)
        fused.grads[:] = np.nan  # every gradient must be written
        fused_loss, fused_grads = fused.loss_and_grads(x, y)
        loop_loss, loop_grads = loop.loss_and_grads(x, y)
        ref_loss, ref_grads = reference.loss_and_grads(weights, biases, x, y, activation, loss)
        assert fused_loss == pytest.approx(ref_loss, rel=tolerance * 10)
        assert fused_loss == pytest.approx(loop_loss, rel=tolerance * 10)
        for (dW, db), (loop_dW, loop_db), (ref_dW, ref_db) in zip(fused_grads, loop_grads, ref_grads):
            assert rel_err(dW, ref_dW) <= tolerance and rel_err(db, ref_db) <= tolerance
            assert rel_err(dW, loop_dW) <= tolerance and rel_err(db, loop_db) <= tolerance
        # the logits the fit loop scores are the forward pass's
        logits = fused.forward_backward(x, y)[1]
        assert rel_err(logits, loop.forward(x).logits) <= tolerance


def test_fit_with_the_fused_grads_is_the_loop(rng):
    """Adam over a few epochs with a partial last batch: the same parameters and history either way."""
    x = rng.standard_normal((45, 6)).astype(np.float32)
    y = rng.integers(0, 3, 45)
    fused, loop = pair([6, 10, 3], "relu", "softmax_cross_entropy", "float32")
    histories = [net.fit(x, y, epochs=3, batch_size=16, optimizer="adam", progress=False) for net in (fused, loop)]
    assert rel_err(fused.params, loop.params) <= 10 * tol("float32")
    np.testing.assert_allclose(histories[0].loss, histories[1].loss, rtol=1e-5)
    assert histories[0].accuracy == histories[1].accuracy


@pytest.mark.parametrize("batch", [3, 20])
def test_fused_grads_errors_leave_the_grads(batch, rng):
    net = MLP([5, 6, 3], backend="numba", dtype="float64", seed=0)
    x = rng.standard_normal((batch, 5))
    y = rng.integers(0, 3, batch)
    net.loss_and_grads(x, y)
    before = net.grads.copy()
    bad = y.copy()
    bad[-1] = 3
    with pytest.raises(ValueError, match=r"labels: expected class labels in \[0, 2\], got 3"):
        net.loss_and_grads(x, bad)
    x_nan = x.copy()
    x_nan[0, 0] = np.nan
    with pytest.raises(NonFiniteLossError, match="loss: expected a finite value"):
        net.loss_and_grads(x_nan, y)
    np.testing.assert_array_equal(net.grads, before)


def test_numpy_backend_has_no_fused_grads_step():
    assert get_backend("numpy").fused_grads_step("relu", "softmax_xent", "float64") is None


@numba.njit
def _swap_blas_threads(n):
    return set_blas_threads(n)


def blas_threads():
    """The thread count of the BLAS that Numba calls, read through the setter the fused steps use."""
    count = _swap_blas_threads(np.intc(1))
    _swap_blas_threads(count)
    return count


def test_blas_thread_setter_is_found_and_sets_the_count():
    assert register_blas_threads()  # SciPy's OpenBLAS (or MKL) has one: else the steps cannot go serial
    before = blas_threads()
    assert _swap_blas_threads(np.intc(1)) == before
    assert _swap_blas_threads(before) == 1
    assert blas_threads() == before


@pytest.mark.parametrize("sizes, batch, serial", [
    ([64, 128, 128, 10], SMALL_BATCH, False),  # no GEMM at all
    ([64, 128, 128, 10], 32, True),
    ([64, 128, 128, 10], SERIAL_BLAS_BELOW // (128 * 128) - 1, True),
    ([64, 128, 128, 10], SERIAL_BLAS_BELOW // (128 * 128), False),
    ([784, 1024, 1024, 10], 16, False),
])
def test_only_steps_with_small_gemms_run_blas_on_one_thread(sizes, batch, serial):
    before = blas_threads()
    multiply_adds = numba.njit(largest_gemm)(batch, Layout(sizes, batch).offsets)
    went_serial = numba.njit(serial_blas)(multiply_adds)
    try:
        assert (went_serial, blas_threads()) == (serial, 1 if serial else before)
    finally:
        numba.njit(restore_blas)(went_serial)
    assert blas_threads() == before


@numba.njit(nogil=True)
def _serial_sections(times, spin):
    total = 0.0
    for _ in range(times):
        enter_serial_blas()
        for k in range(spin):  # work that overlaps the other threads' sections (a sum of k would fold away)
            total += math.sin(k)
        leave_serial_blas()
    return total


def test_serial_blas_sections_in_concurrent_threads_put_the_count_back():
    """nogil steps may run in several threads at once, while the BLAS's count is process-wide: the first
    section in must keep the count and the last one out restore it, however they interleave. (Each
    section saving and restoring the count itself left it at 1 in three runs of three.)"""
    before = blas_threads()
    _serial_sections(1, 1)
    threads = [threading.Thread(target=_serial_sections, args=(2000, 200 * (i + 1))) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert blas_threads() == before


@pytest.mark.parametrize("step", ["train_step", "forward_backward"])
def test_fused_steps_put_the_blas_threads_back(step, rng):
    """Also when the step refuses a label after its forward GEMMs ran on one thread."""
    net = MLP([20, 16, 5], backend="numba", dtype="float32", seed=0)
    x = rng.standard_normal((32, 20)).astype(np.float32)
    before = blas_threads()
    getattr(net, step)(x, rng.integers(0, 5, 32))
    assert blas_threads() == before
    with pytest.raises(ValueError):
        getattr(net, step)(x, np.full(32, 5))
    assert blas_threads() == before
