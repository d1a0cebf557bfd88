"""The CuPy backend.

Without a device: the module imports no CuPy, the backend refuses with a reason that says what is
missing and what to install, overrides keep the base signatures, and the cuBLAS call plans are checked
by running them through a NumPy emulation of column-major cuBLAS.

With a device (marker ``gpu``): every kernel against kernels/reference.py, including sizes that no
single grid covers and buffers that start off a 16-byte boundary (bitwise the same results as aligned
ones), the 16-bit types against float64 within 1e-2, and whole training steps. Each of
these runs on the NumPy reference backend too (no marker), which checks the tests themselves on CPU CI.
"""

import importlib.util
import inspect
import subprocess
import sys

import numpy as np
import pytest
from numpy.lib.stride_tricks import as_strided

from deltaprop.backend import backend_status, get_backend
from deltaprop.backend.base import Backend
from deltaprop.backend.cupy_backend import THREADS, VECTOR_BYTES, CupyBackend, blas_layout, gemm_plan
from deltaprop.errors import BackendUnavailableError
from deltaprop.kernels import reference
from deltaprop.kernels.activations import ACTIVATIONS
from deltaprop.kernels.cuda.loader import KERNELS, LIBRARY_KERNELS
from deltaprop.kernels.dtypes import DTYPES, dtypes_for

CUPY_USABLE, CUPY_WHY_NOT = backend_status("cupy")
GPU = (pytest.mark.gpu, pytest.mark.skipif(not CUPY_USABLE, reason=f"cupy backend unusable: {CUPY_WHY_NOT}"))
# relative error, norm-wise (max abs error / max abs value), against float64 on the same inputs
TOLERANCE = {"float64": 1e-12, "float32": 1e-5, "float16": 1e-2, "bfloat16": 1e-2}


def backends_and_dtypes(dtypes=None):
    """(backend name, dtype) cases: the NumPy reference in its dtypes, cupy (marked gpu) in all of its own."""
    keep = (lambda d: True) if dtypes is None else (lambda d: d in dtypes)
    cases = [pytest.param("numpy", d, id=f"numpy-{d}") for d in dtypes_for("cpu") if keep(d)]
    return cases + [pytest.param("cupy", d, marks=GPU, id=f"cupy-{d}") for d in dtypes_for("cuda") if keep(d)]


CASES = backends_and_dtypes()
CASES_32_64 = backends_and_dtypes(("float32", "float64"))


# ---- helpers ------------------------------------------------------------------------------------------


def random(shape, dtype, seed=0, low=None, high=None):
    """Random values (never zeros) as a host array of ``dtype``."""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(shape) if low is None else rng.uniform(low, high, shape)
    return values.astype(DTYPES[dtype].numpy_dtype())


def host64(backend, x):
    """A float64 copy on the host (a copy: the NumPy backend's arrays are the inputs themselves)."""
    return np.array(backend.to_numpy(x), dtype=np.float64)


def assert_close(actual, expected, dtype):
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape
    error = np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), np.finfo(np.float64).tiny)
    assert error <= TOLERANCE[dtype], f"relative error {error:.3g} > {TOLERANCE[dtype]} ({dtype})"


def rows_beyond_one_grid(backend):
    """A row count that no single grid of ``backend`` covers, so every grid-stride loop wraps (the
    NumPy backend has no grid: a few thousand rows)."""
    return getattr(backend, "max_blocks", 8) * THREADS + 3


def elements_beyond_one_grid(backend, dtype):
    """A count of ``dtype`` elements that no single grid of a flat kernel of ``backend`` covers at 16 bytes
    per thread, ending in a partial 16-byte chunk (the NumPy backend has no grid: a few thousand)."""
    per_thread = VECTOR_BYTES // DTYPES[dtype].numpy_dtype().itemsize
    return getattr(backend, "max_blocks", 8) * THREADS * per_thread + 3


def labels_for(rows, classes, seed=1):
    return np.random.default_rng(seed).integers(0, classes, rows)


def address(x):
    """The address of a NumPy or CuPy array's first element."""
    return x.ctypes.data if isinstance(x, np.ndarray) else x.data.ptr


def placed(backend, host, offset):
    """``host`` in the backend's memory ``offset`` elements past the start of an allocation: a C-contiguous
    view, which the kernels read and write in place; 16-byte aligned at offset 0, and not at offsets of 1
    or 3 elements in any dtype."""
    padded = np.zeros(host.size + offset, host.dtype)
    padded[offset:] = host.reshape(-1)
    view = backend.asarray(padded)[offset:].reshape(host.shape)
    assert address(view) % 16 == offset * host.itemsize % 16
    return view


def check_alignments(name, run, offsets):
    """``run(offset)`` checks a kernel on inputs and outputs placed at ``offset`` and returns what it
    computed (floats, host arrays). On the device, all offsets give bitwise the same results: which thread
    adds which elements does not depend on the alignment, only whether a chunk is one 16-byte access
    does (common.cuh)."""
    first, *others = [run(offset) for offset in offsets]
    if name == "cupy":
        for other in others:
            for a, b in zip(first, other, strict=True):
                np.testing.assert_array_equal(a, b)


# ---- without a device ---------------------------------------------------------------------------------


def test_importing_the_backend_and_its_loader_imports_no_cupy():
    code = (
        "import sys, deltaprop.backend.cupy_backend, deltaprop.kernels.cuda.loader;"
        "assert 'cupy' not in sys.modules, 'cupy was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.skipif(CUPY_USABLE, reason="a device is usable here")
def test_get_backend_refuses_at_once_with_the_reason():
    with pytest.raises(BackendUnavailableError, match="install") as refused:
        get_backend("cupy")
    assert CUPY_WHY_NOT in str(refused.value)


def test_availability_names_a_missing_cupy_and_what_to_install(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cupy" else find_spec(name, *a))
    usable, why = CupyBackend.availability()
    assert not usable
    assert "CuPy is not installed" in why and "pip install 'deltaprop[cuda]'" in why


@pytest.mark.parametrize(
    ("driver", "devices", "expected"),
    [
        (0, 1, "no NVIDIA driver is installed"),
        (12080, 1, "the NVIDIA driver supports CUDA 12.8, CuPy needs 13.2: update the driver"),
        (13020, 0, "no CUDA device is visible"),
    ],
)
def test_availability_names_a_missing_driver_or_device(monkeypatch, driver, devices, expected):
    runtime = pytest.importorskip("cupy_backends.cuda.api.runtime")
    monkeypatch.setattr(runtime, "driverGetVersion", lambda: driver)
    monkeypatch.setattr(runtime, "runtimeGetVersion", lambda: 13020)
    monkeypatch.setattr(runtime, "getDeviceCount", lambda: devices)
    usable, why = CupyBackend.availability()
    assert not usable
    assert expected in why


def test_availability_reports_a_refusing_driver_without_raising(monkeypatch):
    runtime = pytest.importorskip("cupy_backends.cuda.api.runtime")

    def refuse():
        raise RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")

    monkeypatch.setattr(runtime, "driverGetVersion", lambda: 13020)
    monkeypatch.setattr(runtime, "runtimeGetVersion", lambda: 13020)
    monkeypatch.setattr(runtime, "getDeviceCount", refuse)
    usable, why = CupyBackend.availability()
    assert not usable
    assert "cudaErrorNoDevice" in why and "pip install" in why


def test_every_kernel_is_overridden_with_the_base_signature():
    kernels = (set(KERNELS) | set(LIBRARY_KERNELS)) & set(vars(Backend))
    for name in sorted(kernels) + ["check_loss_args"]:
        assert name in vars(CupyBackend), name
        override, base = (inspect.signature(getattr(cls, name)).parameters.values() for cls in (CupyBackend, Backend))
        assert [(p.name, p.kind, p.default) for p in override] == [(p.name, p.kind, p.default) for p in base], name


def test_blas_layout_refuses_what_no_leading_dimension_describes():
    x = np.zeros((3, 4), dtype=np.float32)
    assert blas_layout(x.shape, x.strides, x.itemsize) == (True, 4, 0)
    assert blas_layout(x.T.shape, x.T.strides, x.itemsize) == (False, 4, 0)
    for view in (x[:, ::2], x[::-1], np.broadcast_to(x[0], (3, 4))):
        assert blas_layout(view.shape, view.strides, view.itemsize) is None


def emulate_cublas(a, b, out, trans_a, trans_b, alpha, beta):
    """Run gemm_plan's call on NumPy arrays the way column-major cuBLAS reads memory."""
    plan = gemm_plan(a, b, out, trans_a, trans_b)
    first, second = (a, b) if plan.first_is_a else (b, a)

    def read(x, trans, lead, stride, rows, cols):  # op(X) of a column-major X of leading dimension `lead`
        stored = (cols, rows) if trans else (rows, cols)
        view = as_strided(x, (plan.batch, *stored), (stride * x.itemsize, x.itemsize, lead * x.itemsize),
                          writeable=False)
        return np.swapaxes(view, 1, 2) if trans else view

    op_first = read(first, plan.trans_first, plan.ld_first, plan.stride_first, plan.m, plan.k)
    op_second = read(second, plan.trans_second, plan.ld_second, plan.stride_second, plan.k, plan.n)
    c = as_strided(out, (plan.batch, plan.m, plan.n),
                   (plan.stride_out * out.itemsize, out.itemsize, plan.ld_out * out.itemsize))
    c[...] = alpha * (op_first @ op_second) + beta * c


def layouts(shape, stack, seed):
    """A matrix (or stack) of ``shape`` as row-major, column-major, and a slice of wider rows."""
    rng = np.random.default_rng(seed)
    row_major = rng.standard_normal(stack + shape)
    column_major = np.ascontiguousarray(np.swapaxes(row_major, -1, -2)).swapaxes(-1, -2)
    sliced = rng.standard_normal(stack + (shape[0], shape[1] + 3))[..., : shape[1]]
    return row_major, column_major, sliced


@pytest.mark.parametrize("stack", [(), (3,)], ids=["2d", "3d"])
@pytest.mark.parametrize("mkn", [(4, 5, 6), (1, 5, 6), (4, 1, 6), (4, 5, 1), (1, 1, 1)])
@pytest.mark.parametrize(("trans_a", "trans_b"), [(False, False), (True, False), (False, True), (True, True)])
def test_gemm_plan_computes_the_product_for_every_layout(stack, mkn, trans_a, trans_b):
    m, k, n = mkn
    for a in layouts((k, m) if trans_a else (m, k), stack, seed=1):
        for b in layouts((n, k) if trans_b else (k, n), stack, seed=2):
            for out in layouts((m, n), stack, seed=3):
                expected = reference.gemm(a, b, out, trans_a, trans_b, alpha=0.5, beta=2.0)
                emulate_cublas(a, b, out, trans_a, trans_b, alpha=0.5, beta=2.0)
                np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)


# ---- every kernel against the reference (cupy: gpu; numpy: the tests' own check) ----------------------

SMALL_SHAPES = [(1, 1), (1, 7), (5, 1), (33, 10), (64, 300)]


@pytest.mark.parametrize(("name", "dtype"), CASES)
@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=str)
def test_bias_act(name, dtype, act, shape):
    backend = get_backend(name)
    acc, b = random(shape, dtype, 1), random(shape[1:], dtype, 2)
    z, a = backend.bias_act(backend.asarray(acc), backend.asarray(b), act)
    z_ref, a_ref = reference.bias_act(acc, b, act)
    assert_close(host64(backend, z), z_ref, dtype)
    assert_close(host64(backend, a), a_ref, dtype)


@pytest.mark.parametrize(("name", "dtype"), CASES)
@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=str)
def test_act_backward(name, dtype, act, shape):
    backend = get_backend(name)
    g, z = random(shape, dtype, 3), random(shape, dtype, 4)
    out = backend.act_backward(backend.asarray(g), backend.asarray(z), act)
    assert_close(host64(backend, out), reference.act_backward(g, z, act), dtype)


@pytest.mark.parametrize(("name", "dtype"), CASES)
@pytest.mark.parametrize("act", ["identity", "gelu", "silu"])
def test_elementwise_kernels_in_place_beyond_one_grid(name, dtype, act):
    backend = get_backend(name)
    shape = (elements_beyond_one_grid(backend, dtype) // 3, 3)
    acc, b, g = random(shape, dtype, 5), random(shape[1:], dtype, 6), random(shape, dtype, 7)
    z_ref, a_ref = reference.bias_act(acc, b, act)
    acc_dev = backend.asarray(acc)
    a_out = backend.empty(shape, acc_dev.dtype)
    z, a = backend.bias_act(acc_dev, backend.asarray(b), act, z_out=acc_dev, a_out=a_out)
    assert z is acc_dev and a is a_out
    assert_close(host64(backend, z), z_ref, dtype)
    assert_close(host64(backend, a), a_ref, dtype)
    expected = reference.act_backward(g, host64(backend, z), act)
    g_dev = backend.asarray(g)
    assert backend.act_backward(g_dev, z, act, out=g_dev) is g_dev
    assert_close(host64(backend, g_dev), expected, dtype)


def row_shapes(backend):
    """Rows of every team (several rows per warp, a warp per row, a block per row with and without the
    row in shared memory), and row counts beyond one grid for short and long rows."""
    beyond = rows_beyond_one_grid(backend)
    return [(1, 1), (7, 2), (33, 10), (9, 32), (40, 33), (20, 1024), (6, 1100), (3, 13000),
            (beyond, 10), (getattr(backend, "max_blocks", 8) + 3, 1100)]


@pytest.mark.parametrize(("name", "dtype"), CASES)
def test_softmax(name, dtype):
    backend = get_backend(name)
    for shape in row_shapes(backend):
        z = random(shape, dtype, 8)
        assert_close(host64(backend, backend.softmax(backend.asarray(z))), reference.softmax(z), dtype)


def targets_of(kind, shape, dtype):
    """Int labels, or probability rows (each summing to 1) in ``dtype``."""
    if kind == "labels":
        return labels_for(*shape)
    weights = random(shape, "float64", 9, low=0.1, high=1.0)
    return (weights / weights.sum(axis=1, keepdims=True)).astype(DTYPES[dtype].numpy_dtype())


LOSSES = {  # contract kernel -> reference
    "softmax_xent": reference.softmax_xent,
    "sigmoid_xent": reference.sigmoid_xent,
    "squared_error": reference.mse,
}


@pytest.mark.parametrize(("name", "dtype"), CASES)
@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("kind", ["labels", "matrix"])
def test_loss_and_delta(name, dtype, loss, kind):
    backend = get_backend(name)
    for shape in row_shapes(backend):
        z, t = random(shape, dtype, 10), targets_of(kind, shape, dtype)
        z_dev = backend.asarray(z)
        delta = backend.empty(shape, z_dev.dtype)
        value = getattr(backend, loss)(z_dev, backend.asarray(t), delta_out=delta, scale=0.25)
        value_ref, delta_ref = LOSSES[loss](z, t, scale=0.25)
        assert isinstance(value, float)
        assert_close(value, value_ref, dtype)
        assert_close(host64(backend, delta), delta_ref, dtype)
        assert_close(float(getattr(backend, loss)(z_dev, backend.asarray(t))), value_ref, dtype)


@pytest.mark.parametrize(("name", "dtype"), CASES)
def test_softmax_xent_is_stable_for_extreme_logits(name, dtype):
    backend = get_backend(name)
    huge = 3e4 if dtype == "float16" else 1e4  # float16 ends at 65504
    for shape in [(64, 10), (4, 1100)]:
        z = (np.sign(random(shape, "float64", 11)) * huge).astype(DTYPES[dtype].numpy_dtype())
        labels = labels_for(*shape)
        delta = backend.empty(shape, backend.asarray(z).dtype)
        value = backend.softmax_xent(backend.asarray(z), backend.asarray(labels), delta_out=delta)
        value_ref, delta_ref = reference.softmax_xent(z, labels)
        assert np.isfinite(float(value))
        assert_close(float(value), value_ref, dtype)
        assert_close(host64(backend, delta), delta_ref, dtype)


# Rows of 10 classes (several rows per warp, element by element), and rows read by 16-byte chunks (a warp
# per row; a block per row with and without the row in shared memory) whose length is and is not a whole
# number of chunks; 9 rows, so that rows of odd length start at every alignment.
UNALIGNED_ROW_SHAPES = [(9, 10), (9, 33), (9, 1000), (9, 1003), (9, 4099), (3, 12289)]


@pytest.mark.parametrize(("name", "dtype"), CASES)
@pytest.mark.parametrize("shape", UNALIGNED_ROW_SHAPES, ids=str)
def test_softmax_on_unaligned_rows(name, dtype, shape):
    backend = get_backend(name)
    z = random(shape, dtype, 8)

    def run(offset):
        out = placed(backend, np.full_like(z, np.nan), offset)
        assert backend.softmax(placed(backend, z, offset), out=out) is out
        assert_close(host64(backend, out), reference.softmax(z), dtype)
        return [host64(backend, out)]

    check_alignments(name, run, offsets=(0, 1))


@pytest.mark.parametrize(("name", "dtype"), CASES)
@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("kind", ["labels", "matrix"])
@pytest.mark.parametrize("shape", UNALIGNED_ROW_SHAPES, ids=str)
def test_loss_and_delta_on_unaligned_rows(name, dtype, loss, kind, shape):
    """z, target rows and delta_out at an aligned start and one element past it (a view of a larger buffer)."""
    backend = get_backend(name)
    z, t = random(shape, dtype, 10), targets_of(kind, shape, dtype)
    value_ref, delta_ref = LOSSES[loss](z, t, scale=0.25)

    def run(offset):
        z_dev = placed(backend, z, offset)
        t_dev = placed(backend, t, offset) if kind == "matrix" else backend.asarray(t)
        delta = placed(backend, np.full_like(z, np.nan), offset)
        value = getattr(backend, loss)(z_dev, t_dev, delta_out=delta, scale=0.25)
        assert_close(value, value_ref, dtype)
        assert_close(host64(backend, delta), delta_ref, dtype)
        assert_close(getattr(backend, loss)(z_dev, t_dev, scale=0.25), value_ref, dtype)  # the loss alone
        return [value, host64(backend, delta)]

    check_alignments(name, run, offsets=(0, 1))


@pytest.mark.parametrize(("name", "dtype"), CASES)
def test_bias_grad(name, dtype):
    backend = get_backend(name)
    wide = getattr(backend, "max_blocks", 8) * 32 + 5  # more column tiles than one grid has blocks
    for shape in [(1, 1), (7, 3), (300, 33), (rows_beyond_one_grid(backend), 17), (3, wide)]:
        delta = random(shape, dtype, 12)
        assert_close(host64(backend, backend.bias_grad(backend.asarray(delta))), reference.bias_grad(delta), dtype)


UPDATES = {  # name -> (backend call, reference call, names of the state buffers)
    "sgd": (lambda be, p, g, s, k: be.sgd_update(p, g, 0.1, weight_decay=0.01),
            lambda p, g, s, k: (reference.sgd_update(p, g, 0.1, weight_decay=0.01),), ()),
    "momentum": (lambda be, p, g, s, k: be.momentum_update(p, g, *s, 0.1, momentum=0.9, weight_decay=0.01),
                 lambda p, g, s, k: reference.momentum_update(p, g, *s, 0.1, momentum=0.9, weight_decay=0.01),
                 ("velocity",)),
    "nesterov": (lambda be, p, g, s, k: be.momentum_update(p, g, *s, 0.1, momentum=0.9, nesterov=True),
                 lambda p, g, s, k: reference.momentum_update(p, g, *s, 0.1, momentum=0.9, nesterov=True),
                 ("velocity",)),
    "adam": (lambda be, p, g, s, k: be.adam_update(p, g, *s, k, lr=0.01, weight_decay=0.01),
             lambda p, g, s, k: reference.adam_update(p, g, *s, k, lr=0.01, weight_decay=0.01), ("m", "v")),
    "adamw": (lambda be, p, g, s, k: be.adam_update(p, g, *s, k, lr=0.01, weight_decay=0.01, decoupled=True),
              lambda p, g, s, k: reference.adam_update(p, g, *s, k, lr=0.01, weight_decay=0.01, decoupled=True),
              ("m", "v")),
}


@pytest.mark.parametrize(("name", "dtype"), CASES)
@pytest.mark.parametrize("update", sorted(UPDATES))
def test_optimizer_updates_beyond_one_grid(name, dtype, update):
    backend = get_backend(name)
    call, call_ref, state_names = UPDATES[update]
    size = elements_beyond_one_grid(backend, dtype)
    params = backend.asarray(random(size, dtype, 13))
    state = [backend.zeros(size, params.dtype) for _ in state_names]
    for step in (1, 2, 3):
        # each step is checked from what the backend stored before it (its rounding, not the reference's)
        params_before, *state_before = (host64(backend, x) for x in [params, *state])
        grads = random(size, dtype, 20 + step)
        call(backend, params, backend.asarray(grads), state, step)
        for got, expected in zip([params, *state], call_ref(params_before, grads, state_before, step)):
            assert_close(host64(backend, got), expected, dtype)


@pytest.mark.parametrize(("name", "dtype"), CASES)
@pytest.mark.parametrize("update", sorted(UPDATES))
def test_optimizer_updates_on_unaligned_buffers(name, dtype, update):
    """params, grads and the state each at its own alignment (offsets of 1, 0 and 3 elements)."""
    backend = get_backend(name)
    call, call_ref, state_names = UPDATES[update]
    size = 4 * THREADS + 5  # ends in a partial chunk
    params, grads = random(size, dtype, 13), random(size, dtype, 14)
    state = [random(size, dtype, 15 + i, low=0.1, high=1.0) for i in range(len(state_names))]
    expected = call_ref(params.astype(np.float64), grads, [x.astype(np.float64) for x in state], 3)

    def run(offsets):
        params_offset, grads_offset, state_offset = offsets
        params_dev = placed(backend, params, params_offset)
        state_dev = [placed(backend, x, state_offset) for x in state]
        call(backend, params_dev, placed(backend, grads, grads_offset), state_dev, 3)
        got = [host64(backend, x) for x in [params_dev, *state_dev]]
        for value, value_ref in zip(got, expected, strict=True):
            assert_close(value, value_ref, dtype)
        return got

    check_alignments(name, run, offsets=[(0, 0, 0), (1, 0, 3)])


@pytest.mark.parametrize(("name", "dtype"), CASES)
def test_act_backward_in_place_on_unaligned_buffers(name, dtype):
    backend = get_backend(name)
    g, z = random((7, 131), dtype, 3), random((7, 131), dtype, 4)
    expected = reference.act_backward(g, z, "gelu")

    def run(offsets):
        g_dev = placed(backend, g, offsets[0])
        assert backend.act_backward(g_dev, placed(backend, z, offsets[1]), "gelu", out=g_dev) is g_dev
        assert_close(host64(backend, g_dev), expected, dtype)
        return [host64(backend, g_dev)]

    check_alignments(name, run, offsets=[(0, 0), (1, 3)])


GEMM_CASES = [  # (m, k, n, stack)
    (1, 1, 1, ()), (7, 5, 3, ()), (64, 200, 48, ()), (4, 16, 8, (3,)),
]


@pytest.mark.parametrize(("name", "dtype"), CASES)
@pytest.mark.parametrize(("trans_a", "trans_b"), [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize(("m", "k", "n", "stack"), GEMM_CASES)
def test_gemm(name, dtype, trans_a, trans_b, m, k, n, stack):
    backend = get_backend(name)
    a = random(stack + ((k, m) if trans_a else (m, k)), dtype, 14)
    b = random(stack + ((n, k) if trans_b else (k, n)), dtype, 15)
    c = random(stack + (m, n), dtype, 16)
    assert_close(host64(backend, backend.gemm(backend.asarray(a), backend.asarray(b), trans_a=trans_a,
                                              trans_b=trans_b)),
                 reference.gemm(a, b, trans_a=trans_a, trans_b=trans_b), dtype)
    expected = reference.gemm(a, b, c, trans_a, trans_b, alpha=0.5, beta=-2.0)
    out = backend.asarray(c)
    result = backend.gemm(backend.asarray(a), backend.asarray(b), out, trans_a, trans_b, alpha=0.5, beta=-2.0)
    assert result is out
    assert_close(host64(backend, out), expected, dtype)


# ---- whole training steps, composed from the kernels ----------------------------------------------------


def train_step(backend, weights, biases, x, labels, activation, lr):
    """One SGD step of an MLP with a softmax cross-entropy loss, from the backend's kernels only.
    Returns the loss and [(dW, db)] before the update; updates weights and biases in place."""
    depth = len(weights)
    inputs, zs = [x], []
    for layer, (W, b) in enumerate(zip(weights, biases)):
        acc = backend.gemm(inputs[-1], W, trans_b=True)
        z, a = backend.bias_act(acc, b, activation if layer < depth - 1 else "identity", z_out=acc)
        zs.append(z)
        inputs.append(a)
    delta = backend.empty(zs[-1].shape, x.dtype)
    loss = backend.softmax_xent(zs[-1], labels, delta_out=delta)
    grads = [None] * depth
    for layer in reversed(range(depth)):
        grads[layer] = (backend.gemm(delta, inputs[layer], trans_a=True), backend.bias_grad(delta))
        if layer > 0:
            g = backend.gemm(delta, weights[layer])
            delta = backend.act_backward(g, zs[layer - 1], activation, out=g)
    for W, b, (dW, db) in zip(weights, biases, grads):
        backend.sgd_update(W.reshape(-1), dW.reshape(-1), lr)
        backend.sgd_update(b, db, lr)
    return loss, grads


@pytest.mark.parametrize(("name", "dtype"), CASES_32_64)
@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu"])
def test_training_steps_match_the_reference(name, dtype, activation):
    backend = get_backend(name)
    sizes, batch, lr = [20, 16, 12, 5], 24, 0.5
    weights = [random((n, m), dtype, 30 + i) / float(np.sqrt(m)) for i, (m, n) in enumerate(zip(sizes, sizes[1:]))]
    biases = [random(n, dtype, 40 + i) for i, n in enumerate(sizes[1:])]
    batches = [(random((batch, sizes[0]), dtype, 50 + s), labels_for(batch, sizes[-1], 60 + s)) for s in range(3)]
    weights_dev = [backend.asarray(W.copy()) for W in weights]  # updated in place
    biases_dev = [backend.asarray(b.copy()) for b in biases]
    _, grads_ref = reference.loss_and_grads(weights, biases, *batches[0], activation, "softmax_cross_entropy")
    losses = []
    for x, labels in batches:
        loss, grads = train_step(backend, weights_dev, biases_dev, backend.asarray(x), backend.asarray(labels),
                                 activation, lr)
        if not losses:
            for (dW, db), (dW_ref, db_ref) in zip(grads, grads_ref):
                assert_close(host64(backend, dW), dW_ref, dtype)
                assert_close(host64(backend, db), db_ref, dtype)
        losses.append(float(loss))
    weights_ref, biases_ref, losses_ref = reference.sgd_steps(weights, biases, batches, activation,
                                                              "softmax_cross_entropy", lr)
    assert_close(losses, losses_ref, dtype)
    for W, W_ref in zip(weights_dev, weights_ref):
        assert_close(host64(backend, W), W_ref, dtype)
    for b, b_ref in zip(biases_dev, biases_ref):
        assert_close(host64(backend, b), b_ref, dtype)


# ---- what only the device backend does ------------------------------------------------------------------


@pytest.fixture
def cupy_backend():
    backend = get_backend("cupy")
    yield backend
    backend.check_inputs = False


@pytest.mark.gpu
@pytest.mark.skipif(not CUPY_USABLE, reason=f"cupy backend unusable: {CUPY_WHY_NOT}")
class TestOnTheDevice:
    def test_gemm_reads_transposed_views_without_copies(self, cupy_backend):
        cp = cupy_backend.xp
        pool = cp.get_default_memory_pool()
        for stack in [(), (4,)]:
            a = cupy_backend.asarray(random(stack + (96, 64), "float32", 1))
            b = cupy_backend.asarray(random(stack + (80, 96), "float32", 2))
            out = cupy_backend.empty(stack + (64, 80), "float32")
            at, bt = cp.swapaxes(a, -1, -2), cp.swapaxes(b, -1, -2)  # (.., 64, 96) and (.., 96, 80) views
            cupy_backend.synchronize()
            used = pool.used_bytes()
            cupy_backend.gemm(at, bt, out)
            cupy_backend.gemm(a, b, out, trans_a=True, trans_b=True)
            cupy_backend.synchronize()
            assert pool.used_bytes() == used
            expected = reference.gemm(random(stack + (96, 64), "float32", 1), random(stack + (80, 96), "float32", 2),
                                      trans_a=True, trans_b=True)
            assert_close(host64(cupy_backend, out), expected, "float32")

    def test_bad_labels_raise_and_check_inputs_refuses_non_finite_logits(self, cupy_backend):
        z = cupy_backend.asarray(random((6, 10), "float32", 1))
        for loss in LOSSES:
            with pytest.raises(ValueError, match=r"labels: expected class labels in \[0, 9\], got 10"):
                getattr(cupy_backend, loss)(z, cupy_backend.asarray(np.array([0, 1, 2, 10, 4, 5])))
        infinite = z * np.float32(np.inf)
        assert np.isnan(cupy_backend.softmax_xent(infinite, labels_for(6, 10)))
        cupy_backend.check_inputs = True
        with pytest.raises(ValueError, match="softmax_xent: z: expected finite values"):
            cupy_backend.softmax_xent(infinite, labels_for(6, 10))

    def test_host_and_strided_outputs_are_written_through_a_device_copy(self, cupy_backend):
        cp = cupy_backend.xp
        acc, b = random((5, 3), "float32", 1), random(3, "float32", 2)
        z_ref, a_ref = reference.bias_act(acc, b, "tanh")
        a_host = np.empty((3, 5), np.float32).T  # a transposed host buffer
        z, a = cupy_backend.bias_act(acc, b, "tanh", a_out=a_host)
        assert a is a_host and isinstance(z, cp.ndarray)
        assert_close(a_host, a_ref, "float32")
        assert_close(host64(cupy_backend, z), z_ref, "float32")
        out = cp.empty((3, 5), dtype=np.float32).T  # a transposed device view
        assert cupy_backend.softmax(cupy_backend.asarray(acc), out=out) is out
        assert_close(host64(cupy_backend, out), reference.softmax(acc), "float32")

    def test_asarray_takes_numpy_cupy_and_dlpack(self, cupy_backend):
        cp = cupy_backend.xp
        host = random((5, 3), "float32")
        device = cupy_backend.asarray(host)
        assert isinstance(device, cp.ndarray) and device.flags.c_contiguous
        assert cupy_backend.asarray(device).data.ptr == device.data.ptr  # no copy
        assert cupy_backend.asarray(host, dtype="bfloat16").dtype.name == "bfloat16"
        np.testing.assert_array_equal(cupy_backend.to_numpy(cupy_backend.asarray(host.tolist())), host)
        torch = pytest.importorskip("torch")
        if torch.cuda.is_available():
            tensor = torch.arange(12, dtype=torch.float32, device="cuda").reshape(3, 4)
            shared = cupy_backend.asarray(tensor)
            assert shared.data.ptr == tensor.data_ptr()  # no copy
        np.testing.assert_array_equal(cupy_backend.to_numpy(cupy_backend.asarray(torch.ones(2, 2))), np.ones((2, 2)))

    def test_warmup_compiles_everything_and_describe_names_the_gpu(self, cupy_backend):
        assert cupy_backend.warmup() >= 0
        facts = cupy_backend.describe()
        assert facts["name"] == "cupy" and facts["gpu"] and facts["cupy"]
        assert {"driver_cuda", "cuda_runtime", "nvrtc", "compute_capability"} <= set(facts)
