"""Every kernel of every backend, in every dtype it computes in, against kernels/reference.py, at the
edges a device meets: sizes that no single grid covers (so every grid-stride loop wraps), buffers that
start off a 16-byte boundary (on the device bitwise the same results as aligned ones), the 16-bit types
(cupy) against float64, and whole training steps composed from the kernels.

The CPU backends run every case too, which checks the tests themselves where no device is (cupy cases
carry the ``gpu`` marker).
"""

import numpy as np
import pytest
from helpers import LOSS_REFERENCES, SIM, assert_close, host64, labels_for, random_host

from deltaprop.backend import backend_status, get_backend
from deltaprop.kernels import reference
from deltaprop.kernels.activations import ACTIVATIONS
from deltaprop.kernels.cuda.launch import THREADS, VECTOR_BYTES
from deltaprop.kernels.dtypes import DTYPES, accumulation_dtype, dtypes_for

CUPY_USABLE, CUPY_WHY_NOT = backend_status("cupy")
GPU = (pytest.mark.gpu, pytest.mark.skipif(not CUPY_USABLE, reason=f"cupy backend unusable: {CUPY_WHY_NOT}"))


# The host stand-in (a thread per CUDA thread) takes seconds on this file's large shapes: it runs them in
# bfloat16 (tests/test_kernels.py runs float32 and float64 on it, tests/test_cuda_sim.py float16).
SIM_DTYPES = ("bfloat16",)


def backends_and_dtypes(dtypes=None, sim_dtypes=SIM_DTYPES):
    """(backend name, dtype) cases: numpy and numba in the CPU's dtypes, cupy (marked gpu) in all of its own,
    and cupy on the host stand-in (marked cuda_sim) in ``sim_dtypes``."""
    keep = (lambda d: True) if dtypes is None else (lambda d: d in dtypes)
    cases = [pytest.param(name, d, id=f"{name}-{d}") for name in ("numpy", "numba") for d in dtypes_for("cpu")
             if keep(d)]
    cases += [pytest.param("cupy", d, marks=GPU, id=f"cupy-{d}") for d in dtypes_for("cuda") if keep(d)]
    return cases + [pytest.param("cupy", d, marks=SIM, id=f"cupy-sim-{d}") for d in sim_dtypes if keep(d)]


CASES = backends_and_dtypes()
CASES_32_64 = backends_and_dtypes(("float32", "float64"), sim_dtypes=("float32",))


# ---- helpers ------------------------------------------------------------------------------------------


def rows_beyond_one_grid(backend):
    """A row count that no single grid of ``backend`` covers, so every grid-stride loop wraps (the
    NumPy backend has no grid: a few thousand rows)."""
    return getattr(backend, "max_blocks", 8) * THREADS + 3


def elements_beyond_one_grid(backend, dtype):
    """A count of ``dtype`` elements that no single grid of a flat kernel of ``backend`` covers at 16 bytes
    per thread, ending in a partial 16-byte chunk (the NumPy backend has no grid: a few thousand)."""
    per_thread = VECTOR_BYTES // DTYPES[dtype].numpy_dtype().itemsize
    return getattr(backend, "max_blocks", 8) * THREADS * per_thread + 3


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


# ---- every kernel against the reference (cupy: gpu; numpy: the tests' own check) ----------------------

SMALL_SHAPES = [(1, 1), (1, 7), (5, 1), (33, 10), (64, 300)]


@pytest.mark.parametrize(("name", "dtype"), CASES)
@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=str)
def test_bias_act(name, dtype, act, shape):
    backend = get_backend(name)
    acc, b = random_host(shape, dtype, 1), random_host(shape[1:], dtype, 2)
    z, a = backend.bias_act(backend.asarray(acc), backend.asarray(b), act)
    z_ref, a_ref = reference.bias_act(acc, b, act)
    assert_close(host64(backend, z), z_ref, dtype)
    assert_close(host64(backend, a), a_ref, dtype)


@pytest.mark.parametrize(("name", "dtype"), CASES)
@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=str)
def test_act_backward(name, dtype, act, shape):
    backend = get_backend(name)
    g, z = random_host(shape, dtype, 3), random_host(shape, dtype, 4)
    out = backend.act_backward(backend.asarray(g), backend.asarray(z), act)
    assert_close(host64(backend, out), reference.act_backward(g, z, act), dtype)


@pytest.mark.parametrize(("name", "dtype"), CASES)
@pytest.mark.parametrize("act", ["identity", "gelu", "silu"])
def test_elementwise_kernels_in_place_beyond_one_grid(name, dtype, act):
    backend = get_backend(name)
    shape = (elements_beyond_one_grid(backend, dtype) // 3, 3)
    acc, b, g = random_host(shape, dtype, 5), random_host(shape[1:], dtype, 6), random_host(shape, dtype, 7)
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
        z = random_host(shape, dtype, 8)
        assert_close(host64(backend, backend.softmax(backend.asarray(z))), reference.softmax(z), dtype)


def targets_of(kind, shape, dtype):
    """Int labels, or probability rows (each summing to 1) in ``dtype``."""
    if kind == "labels":
        return labels_for(*shape)
    weights = random_host(shape, "float64", 9, low=0.1, high=1.0)
    return (weights / weights.sum(axis=1, keepdims=True)).astype(DTYPES[dtype].numpy_dtype())


@pytest.mark.parametrize(("name", "dtype"), CASES)
@pytest.mark.parametrize("loss", sorted(LOSS_REFERENCES))
@pytest.mark.parametrize("kind", ["labels", "matrix"])
def test_loss_and_delta(name, dtype, loss, kind):
    backend = get_backend(name)
    for shape in row_shapes(backend):
        z, t = random_host(shape, dtype, 10), targets_of(kind, shape, dtype)
        z_dev = backend.asarray(z)
        delta = backend.empty(shape, z_dev.dtype)
        value = getattr(backend, loss)(z_dev, backend.asarray(t), delta_out=delta, scale=0.25)
        value_ref, delta_ref = LOSS_REFERENCES[loss](z, t, scale=0.25)
        assert isinstance(value, float)
        assert_close(value, value_ref, dtype)
        assert_close(host64(backend, delta), delta_ref, dtype)
        assert_close(float(getattr(backend, loss)(z_dev, backend.asarray(t))), value_ref, dtype)


@pytest.mark.parametrize(("name", "dtype"), CASES)
def test_softmax_xent_is_stable_for_extreme_logits(name, dtype):
    backend = get_backend(name)
    huge = 3e4 if dtype == "float16" else 1e4  # float16 ends at 65504
    for shape in [(64, 10), (4, 1100)]:
        z = (np.sign(random_host(shape, "float64", 11)) * huge).astype(DTYPES[dtype].numpy_dtype())
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
    z = random_host(shape, dtype, 8)

    def run(offset):
        out = placed(backend, np.full_like(z, np.nan), offset)
        assert backend.softmax(placed(backend, z, offset), out=out) is out
        assert_close(host64(backend, out), reference.softmax(z), dtype)
        return [host64(backend, out)]

    check_alignments(name, run, offsets=(0, 1))


@pytest.mark.parametrize(("name", "dtype"), CASES)
@pytest.mark.parametrize("loss", sorted(LOSS_REFERENCES))
@pytest.mark.parametrize("kind", ["labels", "matrix"])
@pytest.mark.parametrize("shape", UNALIGNED_ROW_SHAPES, ids=str)
def test_loss_and_delta_on_unaligned_rows(name, dtype, loss, kind, shape):
    """z, target rows and delta_out at an aligned start and one element past it (a view of a larger buffer)."""
    backend = get_backend(name)
    z, t = random_host(shape, dtype, 10), targets_of(kind, shape, dtype)
    value_ref, delta_ref = LOSS_REFERENCES[loss](z, t, scale=0.25)

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
        delta = random_host(shape, dtype, 12)
        assert_close(host64(backend, backend.bias_grad(backend.asarray(delta))), reference.bias_grad(delta), dtype)


UPDATES = {  # name -> (backend call, reference call, names of the state buffers)
    "sgd": (lambda backend, p, g, s, k: backend.sgd_update(p, g, 0.1, weight_decay=0.01),
            lambda p, g, s, k: (reference.sgd_update(p, g, 0.1, weight_decay=0.01),), ()),
    "momentum": (lambda backend, p, g, s, k: backend.momentum_update(p, g, *s, 0.1, momentum=0.9, weight_decay=0.01),
                 lambda p, g, s, k: reference.momentum_update(p, g, *s, 0.1, momentum=0.9, weight_decay=0.01),
                 ("velocity",)),
    "nesterov": (lambda backend, p, g, s, k: backend.momentum_update(p, g, *s, 0.1, momentum=0.9, nesterov=True),
                 lambda p, g, s, k: reference.momentum_update(p, g, *s, 0.1, momentum=0.9, nesterov=True),
                 ("velocity",)),
    "adam": (lambda backend, p, g, s, k: backend.adam_update(p, g, *s, k, lr=0.01, weight_decay=0.01),
             lambda p, g, s, k: reference.adam_update(p, g, *s, k, lr=0.01, weight_decay=0.01), ("m", "v")),
    "adamw": (lambda backend, p, g, s, k: backend.adam_update(p, g, *s, k, lr=0.01, weight_decay=0.01, decoupled=True),
              lambda p, g, s, k: reference.adam_update(p, g, *s, k, lr=0.01, weight_decay=0.01, decoupled=True),
              ("m", "v")),
}


@pytest.mark.parametrize(("name", "dtype"), CASES)
@pytest.mark.parametrize("update", sorted(UPDATES))
def test_optimizer_updates_beyond_one_grid(name, dtype, update):
    backend = get_backend(name)
    call, call_ref, state_names = UPDATES[update]
    size = elements_beyond_one_grid(backend, dtype)
    params = backend.asarray(random_host(size, dtype, 13))
    state = [backend.zeros(size, accumulation_dtype(params.dtype)) for _ in state_names]
    for step in (1, 2, 3):
        # each step is checked from what the backend stored before it (its rounding, not the reference's)
        params_before, *state_before = (host64(backend, x) for x in [params, *state])
        grads = random_host(size, dtype, 20 + step)
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
    params, grads = random_host(size, dtype, 13), random_host(size, dtype, 14)
    state = [random_host(size, accumulation_dtype(dtype).name, 15 + i, low=0.1, high=1.0) for i in range(len(state_names))]
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
    g, z = random_host((7, 131), dtype, 3), random_host((7, 131), dtype, 4)
    expected = reference.act_backward(g, z, "gelu")

    def run(offsets):
        g_dev = placed(backend, g, offsets[0])
        assert backend.act_backward(g_dev, placed(backend, z, offsets[1]), "gelu", out=g_dev) is g_dev
        assert_close(host64(backend, g_dev), expected, dtype)
        return [host64(backend, g_dev)]

    check_alignments(name, run, offsets=[(0, 0), (1, 3)])


GEMM_CASES = [  # (m, k, n, stack)
    (1, 1, 1, ()), (7, 5, 3, ()), (64, 200, 48, ()), (4, 16, 8, (3,)),
    (256, 256, 128, (2,)),  # 2**23 multiply-adds a product: on numba the stack runs on BLAS's threads in turn
]


@pytest.mark.parametrize(("name", "dtype"), CASES)
@pytest.mark.parametrize(("trans_a", "trans_b"), [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize(("m", "k", "n", "stack"), GEMM_CASES)
def test_gemm(name, dtype, trans_a, trans_b, m, k, n, stack):
    backend = get_backend(name)
    a = random_host(stack + ((k, m) if trans_a else (m, k)), dtype, 14)
    b = random_host(stack + ((n, k) if trans_b else (k, n)), dtype, 15)
    c = random_host(stack + (m, n), dtype, 16)
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
    weights = [random_host((n, m), dtype, 30 + i) / float(np.sqrt(m)) for i, (m, n) in enumerate(zip(sizes, sizes[1:]))]
    biases = [random_host(n, dtype, 40 + i) for i, n in enumerate(sizes[1:])]
    batches = [(random_host((batch, sizes[0]), dtype, 50 + s), labels_for(batch, sizes[-1], 60 + s)) for s in range(3)]
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
