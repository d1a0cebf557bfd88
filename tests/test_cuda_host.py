"""The CUDA kernels executed on the CPU by the host harness (kernels/cuda/host) against the reference:
every instantiation of the module table in every CUDA dtype, on odd shapes and on buffers that are not
16-byte aligned, launched with the CuPy backend's geometry on a fake device of 4 multiprocessors and
with geometries that force the grid-stride loops. Then the harness itself: each fault a device run
would show is caught (each with a tiny kernel of its own), under AddressSanitizer and ThreadSanitizer
where that is what catches it.

The harness is built once per dtype (cached on disk by a hash of the sources and flags) and loaded once
per session; without a C++ compiler every test here is skipped with the reason. With
DELTAPROP_HOST_SANITIZER=address (and the runtime preloaded: host.sanitizer_environment) the kernel tests
run in an AddressSanitizer build, as test_every_kernel_runs_clean_under_address_sanitizer does.
"""

import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from helpers import rel_err, tol

from deltaprop.backend.cupy_backend import NULL  # the null pointer the backend passes; CupyBackend is not created
from deltaprop.kernels import reference
from deltaprop.kernels.cuda import host, launch, loader
from deltaprop.kernels.dtypes import DTYPES

pytestmark = pytest.mark.cuda_sim

FAKE_MULTIPROCESSORS = 4
GRID_LIMIT = launch.max_blocks(FAKE_MULTIPROCESSORS)
# a result stored in a 16-bit type is within half an ulp of the exact value: one ulp of the largest
# element, norm-wise; results in float32 and float64 (and every loss, kept in the compute type) as the
# dtype table
STORED_TOLERANCE = {**{dtype: tol(dtype) for dtype in loader.CUDA_DTYPES}, "float16": 2.0**-10, "bfloat16": 2.0**-7}
# rows of each length a row team serves (launch.row_team picks the team by the row length)
TEAM_COLUMNS = {"GroupTeam<1>": (1,), "GroupTeam<2>": (2,), "GroupTeam<4>": (3,), "GroupTeam<8>": (5,),
                "GroupTeam<16>": (13,), "GroupTeam<32>": (31, 32, 33), "BlockTeam": (1025,)}
FLAT_SIZES = (1, 3, 31, 33, 1025)
MATRIX_SHAPES = ((1, 1), (5, 3), (3, 31), (2, 32), (4, 33), (2, 1025))
LOSS_REFERENCE = {"softmax_xent": reference.softmax_xent, "sigmoid_xent": reference.sigmoid_xent,
                  "squared_error": reference.mse}


def instantiations(*kernels):
    """(dtype, kernel, variant, name expression) of every instantiation of ``kernels`` in every CUDA dtype."""
    return [
        pytest.param(dtype, kernel, variant, expression, id=f"{dtype}-{expression}")
        for dtype in loader.CUDA_DTYPES
        for source in loader.sources()
        for expression, (kernel, variant) in loader.name_expressions(source, dtype).items()
        if kernel in kernels
    ]


SANITIZER = os.environ.get("DELTAPROP_HOST_SANITIZER") or None  # "address": this suite in an ASan build
KERNEL_TESTS = ("test_bias_act", "test_act_backward", "test_optimizers", "test_column_sums", "test_mean_of_rows",
                "test_row_kernels")
ADDRESS_SANITIZER_DTYPES = ("float32", "bfloat16")  # a 4-byte type and the 2-byte struct, vectors of 4 and 8


def built(units, sanitizer=None):
    try:
        return host.build(units, sanitizer)
    except host.HarnessUnavailable as error:
        pytest.skip(str(error))


@pytest.fixture(scope="session")
def programs():
    """dtype -> the project's modules of that dtype in the harness, each built on first use."""
    cache = {}

    def program(dtype):
        if dtype not in cache:
            cache[dtype] = built(host.project_units([dtype]), SANITIZER)
        return cache[dtype]

    return program


def storage(dtype):
    return DTYPES[dtype].numpy_dtype()


def accum(dtype):
    return np.dtype(np.float64 if dtype == "float64" else np.float32)


def sample(rng, shape, dtype, spread=2.0):
    return (rng.standard_normal(shape) * spread).astype(storage(dtype))


def device(array, misaligned=False):
    """``array`` in a buffer of exactly its size; ``misaligned``: one element past a 16-byte boundary."""
    return host.exact_copy(array, array.itemsize if misaligned and array.itemsize < 16 else 0)


# ---- the backend's launch geometry (kernels/cuda/launch.py) with the grid limit of the fake device --------


def rows_launch(rows, cols, dtype, caches_row, grid_limit=GRID_LIMIT):
    """(launch, cache flag) of a row-wise kernel, as CupyBackend._launch_rows."""
    _, geometry, cache = launch.rows_launch(rows, cols, accum(dtype).itemsize, grid_limit, caches_row)
    return geometry, int(cache)


def one_member(arrays):
    """A 2-D call's stack arguments, as CupyBackend passes them: (one member,), a stride of 0 per array."""
    return (np.int64(1),), (np.int64(0),) * arrays


def launched(program, expression, geometry, args):
    """Run ``expression`` with ``geometry`` (a launch.Launch), as CupyBackend._launch."""
    program.launch(expression, geometry.grid, geometry.block, args, shared_mem=geometry.shared_mem)


def check(result, expected, tolerance, what):
    error = rel_err(np.asarray(result, np.float64), expected)
    assert error <= tolerance, f"{what}: relative error {error:.3g} > {tolerance:.3g}"


# ---- every instantiation against the reference ----------------------------------------------------------


@pytest.mark.parametrize("dtype, kernel, variant, expression", instantiations("bias_act"))
def test_bias_act(programs, dtype, kernel, variant, expression, rng):
    program = programs(dtype)
    act = variant[0].removeprefix("act_")
    tolerance = STORED_TOLERANCE[dtype]
    forced = launch.Launch((1, 1), (32, 8))  # one block of 32 x 8: both grid-stride loops turn
    for index, (rows, cols) in enumerate(MATRIX_SHAPES):
        acc, b = sample(rng, (rows, cols), dtype), sample(rng, (cols,), dtype)
        for geometry in [launch.bias_act_launch(1, rows, cols, GRID_LIMIT)] + ([forced] if cols == 33 else []):
            misaligned = index % 2 == 1
            z = device(np.full((rows, cols), np.nan, storage(dtype)), misaligned)
            a = device(np.full((rows, cols), np.nan, storage(dtype)))
            members, strides = one_member(4)
            launched(program, expression, geometry, (device(acc, misaligned), device(b, misaligned), z, a,
                                                     *members, np.int64(rows), np.int64(cols), *strides))
            z_expected, _ = reference.bias_act(acc, b, act)
            _, a_of_stored_z = reference.bias_act(z, np.zeros(cols), act)  # act of the stored z, as the kernel
            check(z, z_expected, tolerance, f"z of {rows}x{cols}, {geometry}")
            check(a, a_of_stored_z, tolerance, f"a of {rows}x{cols}, {geometry}")


def flat_cases(dtype):
    """(n, misaligned buffers, launch): the backend's geometry at every size, aligned and not, and one
    block of 32 threads (every thread walks several chunks)."""
    itemsize = storage(dtype).itemsize
    cases = [(n, False, launch.flat_launch(n, itemsize, GRID_LIMIT)) for n in FLAT_SIZES]
    cases += [(n, True, launch.flat_launch(n, itemsize, GRID_LIMIT)) for n in (33, 1025)]
    one_small_block = launch.Launch((1,), (32,))
    return cases + [(1025, True, one_small_block), (1025, False, one_small_block)]


@pytest.mark.parametrize("dtype, kernel, variant, expression", instantiations("act_backward"))
def test_act_backward(programs, dtype, kernel, variant, expression, rng):
    program = programs(dtype)
    act = variant[0].removeprefix("act_")
    for n, misaligned, geometry in flat_cases(dtype):
        g, z = sample(rng, n, dtype), sample(rng, n, dtype)
        out = device(np.full(n, np.nan, storage(dtype)), misaligned)
        members, strides = one_member(3)
        launched(program, expression, geometry, (device(g), device(z, misaligned), out, *members, np.int64(n), *strides))
        check(out, reference.act_backward(g, z, act), STORED_TOLERANCE[dtype], f"n={n}, {geometry}")


OPTIMIZER_SETTINGS = {
    "sgd_update": [dict(lr=0.1, weight_decay=0.01)],
    "momentum_update": [dict(lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=n) for n in (False, True)],
    "adam_update": [dict(step=3, lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, decoupled=d)
                    for d in (False, True)],
}


def optimizer_scalars(kernel, settings, dtype):
    """The scalar arguments as CupyBackend passes them (in the compute type; 1 - beta and the bias
    corrections computed in double first)."""
    t = accum(dtype).type
    if kernel == "sgd_update":
        return (t(settings["lr"]), t(settings["weight_decay"]))
    if kernel == "momentum_update":
        return (t(settings["lr"]), t(settings["momentum"]), t(settings["weight_decay"]), np.int32(settings["nesterov"]))
    beta1, beta2, step = settings["beta1"], settings["beta2"], settings["step"]
    return (t(settings["lr"]), t(beta1), t(beta2), t(1 - beta1), t(1 - beta2), t(settings["eps"]),
            t(settings["weight_decay"]), t(1 - beta1**step), t(1 - beta2**step), np.int32(settings["decoupled"]))


@pytest.mark.parametrize("dtype, kernel, variant, expression",
                         instantiations("sgd_update", "momentum_update", "adam_update"))
def test_optimizers(programs, dtype, kernel, variant, expression, rng):
    program = programs(dtype)
    update = getattr(reference, kernel)
    for settings in OPTIMIZER_SETTINGS[kernel]:
        for n, misaligned, geometry in flat_cases(dtype):
            params, grads = sample(rng, n, dtype), sample(rng, n, dtype)
            states = {"momentum_update": [sample(rng, n, dtype)],  # kept in the compute type
                      "adam_update": [sample(rng, n, dtype, 0.1), np.abs(sample(rng, n, dtype, 0.01))]}.get(kernel, [])
            states = [state.astype(accum(dtype)) for state in states]
            buffers = [device(x, misaligned and i % 2 == 0) for i, x in enumerate([params, grads, *states])]
            scalars = optimizer_scalars(kernel, settings, dtype)
            launched(program, expression, geometry, (*buffers, np.int64(n), *scalars))
            expected = update(params, grads, *states, **settings)
            expected = expected if isinstance(expected, tuple) else (expected,)
            written = [buffers[0], *buffers[2:]]  # params, then the state buffers in the reference's order
            bounds = (STORED_TOLERANCE[dtype], *[STORED_TOLERANCE[accum(dtype).name]] * len(states))
            for name, result, value, bound in zip(("params", "state 1", "state 2"), written, expected, bounds):
                check(result, value, bound, f"{kernel} {settings} {name}, n={n}, {geometry}")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_first_adam_step_on_16_bit_weights_moves_each_by_about_lr(programs, dtype):
    """Adam's first step moves a weight by lr * g / (|g| + eps), about lr, whatever the gradient's size.
    With g = 1e-4, (1 - beta2) * g^2 = 1e-11 is below float16's smallest subnormal: a v kept in float16
    would be 0 and the step lr * g / eps, 10^4 times lr. The state is float32, as the backend allocates it."""
    n, lr = 1000, 1e-2
    settings = dict(step=1, lr=lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=False)
    params = np.linspace(-1, 1, n).astype(storage(dtype))
    grads = np.full(n, 1e-4, storage(dtype))
    m, v = np.zeros(n, accum(dtype)), np.zeros(n, accum(dtype))
    buffers = [device(x) for x in (params, grads, m, v)]
    geometry = launch.flat_launch(n, params.itemsize, GRID_LIMIT)
    expression = next(e for e, (k, _) in loader.name_expressions("optim.cu", dtype).items() if k == "adam_update")
    launched(programs(dtype), expression, geometry,
             (*buffers, np.int64(n), *optimizer_scalars("adam_update", settings, dtype)))
    expected, _, _ = reference.adam_update(params, grads, m, v, **settings)
    moved = np.asarray(params, np.float64) - np.asarray(buffers[0], np.float64)
    assert np.allclose(moved, lr, rtol=0.05, atol=STORED_TOLERANCE[dtype]), f"moved by {moved.min()} to {moved.max()}"
    check(buffers[0], expected, STORED_TOLERANCE[dtype], "params")
    check(buffers[3], (1 - 0.999) * np.asarray(grads, np.float64) ** 2, tol("float32"), "v")


def column_sums(program, dtype, delta, geometry, misaligned=False):
    """bias_grad as CupyBackend.bias_grad launches it with ``geometry`` (a launch.ColumnSumsLaunch)."""
    rows, cols = delta.shape
    first, second = (loader.KERNELS[k].name_expression(DTYPES[dtype].ctype, ()) for k in ("bias_grad", "column_sums_of_partials"))
    out = device(np.full(cols, np.nan, storage(dtype)), misaligned=misaligned)
    partial = None if geometry.second is None else device(np.full((geometry.chunks, cols), np.nan, accum(dtype)))
    members, (delta_stride, out_stride) = one_member(2)
    launched(program, first, geometry.first, (device(delta, misaligned), out, partial, *members, np.int64(rows),
                                              np.int64(cols), np.int64(geometry.chunk_rows), delta_stride, out_stride))
    if geometry.second is not None:
        launched(program, second, geometry.second,
                 (partial, out, *members, np.int64(geometry.chunks), np.int64(cols), out_stride))
    return out


@pytest.mark.parametrize("dtype, kernel, variant, expression", instantiations("bias_grad"))
def test_column_sums(programs, dtype, kernel, variant, expression, rng):
    program = programs(dtype)
    h200 = launch.max_blocks(132)
    cases = [((1, 1), GRID_LIMIT), ((3, 31), GRID_LIMIT), ((33, 32), GRID_LIMIT), ((5, 33), GRID_LIMIT),
             ((2, 100), GRID_LIMIT), ((37, 70), 1),  # one block for three tiles of 32 columns
             ((5000, 10), GRID_LIMIT), ((5000, 10), h200), ((1000, 70), h200), ((3, 1025), h200)]
    geometries = [((rows, cols), launch.column_sums_launch(1, rows, cols, limit)) for (rows, cols), limit in cases]
    # rows split by hand: 3 chunks of one row; chunks over a grid-stride of two blocks for three tiles
    geometries += [((3, 1025), launch.column_chunks_launch(1, 1025, 1, 3, 33)),
                   ((300, 70), launch.column_chunks_launch(1, 70, 7, 43, 2))]
    assert sum(geometry.chunks > 1 for _, geometry in geometries) >= 5
    for (rows, cols), geometry in geometries:
        delta = sample(rng, (rows, cols), dtype)
        out = column_sums(program, dtype, delta, geometry, misaligned=cols % 2 == 1)
        check(out, reference.bias_grad(delta), STORED_TOLERANCE[dtype], f"{rows}x{cols}, {geometry}")
        again = column_sums(program, dtype, delta, geometry)
        assert np.asarray(again).tobytes() == np.asarray(out).tobytes(), f"{rows}x{cols}: not bit-identical"


@pytest.mark.parametrize("dtype, kernel, variant, expression", instantiations("mean_of_rows"))
def test_mean_of_rows(programs, dtype, kernel, variant, expression, rng):
    program = programs(dtype)
    for rows in (1, 3, 1025, 2049):
        row_loss = rng.random(rows).astype(accum(dtype))
        out = device(np.full(1, np.nan, accum(dtype)))
        launched(program, expression, launch.mean_launch(1, GRID_LIMIT), (device(row_loss), np.int64(1), np.int64(rows), out))
        check(out[0], row_loss.astype(np.float64).mean(), tol(accum(dtype)), f"{rows} rows")


def row_targets(rng, kernel, targets, rows, cols, dtype):
    if targets.startswith("LabelTargets"):
        return rng.integers(0, cols, rows).astype(np.int64)
    if kernel == "softmax_xent":  # probability rows
        p = rng.random((rows, cols)) + 0.1
        return (p / p.sum(axis=1, keepdims=True)).astype(storage(dtype))
    if kernel == "sigmoid_xent":
        return rng.random((rows, cols)).astype(storage(dtype))
    return sample(rng, (rows, cols), dtype)


def row_cases(team, dtype, caches_row):
    """(rows, cols, misaligned, launch, cache): for each row length the team serves, 1 row and 9 rows
    (misaligned) with the backend's geometry; then the backend's geometry on a device of one block, with
    rows enough for the team to walk its rows several times, and for a block per row the row cache
    switched off (the geometry of a kernel that does not cache) on a device of two blocks."""
    cases = []
    for cols in TEAM_COLUMNS[team]:
        assert launch.row_team(cols)[0] == team
        for rows, misaligned in ((1, False), (9, True)):
            cases.append((rows, cols, misaligned, *rows_launch(rows, cols, dtype, caches_row)))
    cols = TEAM_COLUMNS[team][-1]
    lanes = launch.row_team(cols)[1]
    rows = 2 * (launch.THREADS // lanes if lanes else 1) + 3  # a block serves THREADS // lanes rows at once
    cases.append((rows, cols, False, *rows_launch(rows, cols, dtype, caches_row, grid_limit=1)))
    if cases[-1][-1]:
        cases.append((3, cols, True, *rows_launch(3, cols, dtype, caches_row=False, grid_limit=2)))
    return cases


@pytest.mark.parametrize("dtype, kernel, variant, expression",
                         instantiations("softmax", "softmax_xent", "sigmoid_xent", "squared_error"))
def test_row_kernels(programs, dtype, kernel, variant, expression, rng):
    program = programs(dtype)
    team, targets = variant[-1], variant[-2]
    caches_row = kernel in ("softmax", "softmax_xent")  # softmax_rows takes the cache flag
    for rows, cols, misaligned, geometry, cache in row_cases(team, dtype, caches_row):
        z = sample(rng, (rows, cols), dtype)
        delta = device(np.full((rows, cols), np.nan, storage(dtype)), misaligned)
        where = f"{rows}x{cols}, {geometry}, cache {cache}"
        tail = (np.int32(cache),) if caches_row else ()
        members, strides = one_member(3)
        if kernel == "softmax":
            launched(program, expression, geometry, (device(z, misaligned), NULL, delta, NULL, *members, np.int64(rows),
                                                     np.int64(cols), *strides, accum(dtype).type(1), *tail))
            check(delta, reference.softmax(z), STORED_TOLERANCE[dtype], where)
            continue
        t = row_targets(rng, kernel, targets, rows, cols, dtype)
        row_loss = device(np.full(rows, np.nan, accum(dtype)))
        scale = accum(dtype).type(1.0 / rows)
        launched(program, expression, geometry, (device(z, misaligned), device(t, misaligned and t.ndim == 2), delta,
                                                 row_loss, *members, np.int64(rows), np.int64(cols), *strides, scale,
                                                 *tail))
        loss = LOSS_REFERENCE[kernel]
        check(delta, loss(z, t, scale=float(scale))[1], STORED_TOLERANCE[dtype], f"delta of {where}")
        expected_rows = [loss(z[r:r + 1], t[r:r + 1])[0] for r in range(rows)]
        check(row_loss, expected_rows, tol(accum(dtype)), f"row losses of {where}")


@pytest.mark.parametrize("team", ["GroupTeam<4>", "BlockTeam"])
def test_a_label_outside_the_classes_makes_its_row_loss_nan(programs, team, rng):
    cols = TEAM_COLUMNS[team][0]
    z, labels = sample(rng, (3, cols), "float32"), np.array([0, cols, -1], np.int64)
    row_loss = np.zeros(3, np.float32)
    geometry, cache = rows_launch(3, cols, "float32", True)
    members, strides = one_member(3)
    launched(programs("float32"), f"softmax_rows<float, LabelTargets<float>, {team}>", geometry,
             (z, labels, NULL, row_loss, *members, np.int64(3), np.int64(cols), *strides, np.float32(1), np.int32(cache)))
    assert np.isfinite(row_loss[0]) and np.isnan(row_loss[1:]).all()
    check(row_loss[:1], [reference.softmax_xent(z[:1], labels[:1])[0]], tol("float32"), "the good row")


def test_stacked_launches_walk_every_member_beyond_the_grid(programs, rng):
    """Five members at padded member strides (one input shared at stride 0) on a grid of two z slices (two
    blocks for mean_of_rows): every member's result is the reference's, and no padding is written."""
    program, members, rows, cols, pad = programs("float32"), 5, 3, 33, 7
    stride = rows * cols + pad

    def stack(values=None):
        """A buffer of the members at ``stride``, NaN in the padding (and everywhere, without values)."""
        buffer = np.full((members, stride), np.nan, np.float32)
        if values is not None:
            buffer[:, :rows * cols] = values.reshape(members, -1)
        return device(buffer.reshape(-1))

    def members_of(buffer):
        matrices = np.asarray(buffer).reshape(members, stride)
        assert np.isnan(matrices[:, rows * cols:]).all(), "a write into the padding"
        return matrices[:, :rows * cols].reshape(members, rows, cols)

    acc, shared = sample(rng, (members, rows, cols), "float32"), sample(rng, (rows, cols), "float32")
    b = sample(rng, cols, "float32")
    z, a = stack(), stack()
    as_stack = (np.int64(members), np.int64(rows), np.int64(cols))
    launched(program, "bias_act<float, act_tanh>", launch.Launch((1, 1, 2), (32, 8)),
             (stack(acc), device(b), z, a, *as_stack, np.int64(stride), np.int64(0), np.int64(stride), np.int64(stride)))
    z_expected, a_expected = reference.bias_act(acc, b, "tanh")
    check(members_of(z), z_expected, tol("float32"), "bias_act z")
    check(members_of(a), a_expected, tol("float32"), "bias_act a")

    out = stack()
    launched(program, "act_backward<float, act_relu>", launch.Launch((1, 1, 2), (32,)),
             (stack(acc), device(shared), out, np.int64(members), np.int64(rows * cols), np.int64(stride), np.int64(0),
              np.int64(stride)))
    check(members_of(out), reference.act_backward(acc, shared, "relu"), tol("float32"), "act_backward")

    sums, block = device(np.full((members, cols + pad), np.nan, np.float32).reshape(-1)), (32, 32)
    partial = device(np.full((members, rows, cols), np.nan, np.float32))
    launched(program, "column_sums<float>", launch.Launch((1, rows, 2), block),
             (stack(acc), sums, partial, *as_stack, np.int64(1), np.int64(stride), np.int64(cols + pad)))
    launched(program, "column_sums_of_partials<float>", launch.Launch((1, 1, 2), block),
             (partial, sums, np.int64(members), np.int64(rows), np.int64(cols), np.int64(cols + pad)))
    sums = np.asarray(sums).reshape(members, cols + pad)
    assert np.isnan(sums[:, cols:]).all()
    check(sums[:, :cols], acc.astype(np.float64).sum(axis=1), tol("float32"), "column sums")

    delta, row_loss, means = stack(), device(np.full(members * rows, np.nan, np.float32)), device(np.full(members, np.nan, np.float32))
    geometry, _ = rows_launch(members * rows, cols, "float32", caches_row=False, grid_limit=1)
    launched(program, "elementwise_loss_rows<float, SquaredError, MatrixTargets<float>, GroupTeam<32>>", geometry,
             (stack(acc), device(shared), delta, row_loss, *as_stack, np.int64(stride), np.int64(0), np.int64(stride),
              np.float32(1 / rows)))
    launched(program, "mean_of_rows<float>", launch.Launch((2,), (128,)), (row_loss, *as_stack[:2], means))
    for k in range(members):
        loss, delta_k = reference.mse(acc[k], shared, scale=1 / rows)
        check(means[k:k + 1], [loss], tol("float32"), f"the mean loss of member {k}")
        check(members_of(delta)[k], delta_k, tol("float32"), f"the delta of member {k}")


# ---- the harness itself: each fault is caught ------------------------------------------------------------

TINY = textwrap.dedent("""\
    __global__ void copy_bounded(const float* x, float* y, long long n) {
        const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
        if (i < n) y[i] = x[i];
    }
    __global__ void copy_off_by_one(const float* x, float* y, long long n) {
        const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
        if (i <= n) y[i] = x[i];
    }
    __global__ void early_return(float* out) {
        if (threadIdx.x == 5) return;
        __syncthreads();
        out[threadIdx.x] = 1.0f;
    }
    __global__ void divergent_barriers(float* out) {
        if (threadIdx.x < 64) {
            __syncthreads();
        } else {
            __syncthreads();
        }
        out[threadIdx.x] = 1.0f;
    }
    __global__ void half_warp_sum(const float* x, float* out) {
        float v = x[threadIdx.x];
        if (threadIdx.x < 16) v += __shfl_xor_sync(0xffffffffu, v, 1);  // lanes 16..31 never arrive
        out[threadIdx.x] = v;
    }
    __global__ void mask_without_self(const float* x, float* out) {
        out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, x[threadIdx.x], 1, 16);  // lanes 16..31 are not in it
    }
    __global__ void warp_sum(const float* x, float* out) {
        float v = x[threadIdx.x];
        for (int d = 16; d > 0; d /= 2) v += __shfl_xor_sync(0xffffffffu, v, d);
        out[threadIdx.x] = v + static_cast<float>(__ballot_sync(0xffffffffu, threadIdx.x % 2) == 0xaaaaaaaau);
    }
    __global__ void shuffles(const float* x, float* out) {
        const float v = x[threadIdx.x];
        out[4 * threadIdx.x] = __shfl_sync(0xffffffffu, v, 3, 8);
        out[4 * threadIdx.x + 1] = __shfl_up_sync(0xffffffffu, v, 1, 8);
        out[4 * threadIdx.x + 2] = __shfl_down_sync(0xffffffffu, v, 2, 8);
        out[4 * threadIdx.x + 3] = __shfl_xor_sync(0xffffffffu, v, 5);
    }
    __global__ void vector_load(const float* x, float* out, int misaligned_thread) {
        const float* p = x + 4 * threadIdx.x + (static_cast<int>(threadIdx.x) == misaligned_thread ? 1 : 0);
        const float4 v = *reinterpret_cast<const float4*>(p);
        out[threadIdx.x] = v.x + v.y + v.z + v.w;
    }
    __global__ void read_shared(float* out) {
        __shared__ float written[64];
        extern __shared__ __align__(16) unsigned char dynamic[];
        float* second = reinterpret_cast<float*>(dynamic);
        if (threadIdx.x < 32) {
            written[threadIdx.x] = 1.0f;
            second[threadIdx.x] = 2.0f;
        }
        __syncthreads();
        out[threadIdx.x] = written[threadIdx.x];
        out[64 + threadIdx.x] = second[threadIdx.x];
    }
    __global__ void count(int* total, float* sum, float* largest, const float* x) {
        atomicAdd(total, 1);
        atomicAdd(sum, x[threadIdx.x]);
        atomicMax(largest, x[threadIdx.x] * (blockIdx.x + 1));
    }
    __global__ void takes(const double* x, float* out, int count, long long n, float scale) {}
    """)
TINY_KERNELS = ("copy_bounded", "copy_off_by_one", "early_return", "divergent_barriers", "half_warp_sum",
                "mask_without_self", "warp_sum", "shuffles", "vector_load", "read_shared", "count",
                "takes")


def tiny_unit():
    return host.Unit("tiny.cu", (("tiny.cu", TINY),), TINY_KERNELS)


@pytest.fixture(scope="session")
def tiny():
    return built([tiny_unit()])


def sanitized_environment(sanitizer):
    try:
        return {**os.environ, **host.sanitizer_environment(sanitizer), "OPENBLAS_NUM_THREADS": "1"}
    except host.HarnessUnavailable as error:
        pytest.skip(str(error))


def run_sanitized(sanitizer, script):
    """Run ``script`` (Python, with np, host and this module as t) in a process with the ``sanitizer``
    runtime preloaded; returns (status, stdout, stderr)."""
    env = sanitized_environment(sanitizer)
    prelude = (f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
               "import numpy as np\nfrom deltaprop.kernels.cuda import host\nimport test_cuda_host as t\n")
    done = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(script)], env=env, capture_output=True,
                          text=True, timeout=300)
    return done.returncode, done.stdout, done.stderr


def test_an_off_by_one_bound_is_caught_by_address_sanitizer():
    built([tiny_unit()], sanitizer="address")  # built here, loaded by the sanitized process
    status, out, err = run_sanitized("address", """
        program = host.build([t.tiny_unit()], sanitizer="address")
        x = host.exact_copy(np.arange(100, dtype=np.float32))
        y = host.exact_copy(np.zeros(100, np.float32))
        program.launch("copy_bounded", (1,), (128,), (x, y, np.int64(100)))
        assert (y == x).all()
        print("bounded copy clean", flush=True)
        program.launch("copy_off_by_one", (1,), (128,), (x, y, np.int64(100)))
        """)
    assert "bounded copy clean" in out, err[-3000:]
    assert status != 0 and "heap-buffer-overflow" in err and "copy_off_by_one" in err, err[-3000:]


def test_every_kernel_runs_clean_under_address_sanitizer():
    """The kernel tests above, for ADDRESS_SANITIZER_DTYPES, in an AddressSanitizer + UBSan build: no read or
    write outside a buffer of exactly its size, no undefined behaviour (a report fails the process)."""
    for dtype in ADDRESS_SANITIZER_DTYPES:
        built(host.project_units([dtype]), sanitizer="address")
    env = {**sanitized_environment("address"), "DELTAPROP_HOST_SANITIZER": "address"}
    tests = [f"{__file__}::{name}" for name in KERNEL_TESTS]
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests,
                           "-k", " or ".join(ADDRESS_SANITIZER_DTYPES)], env=env, capture_output=True, text=True,
                          timeout=600)
    report = done.stdout[-3000:] + done.stderr[-3000:]
    every_instantiation = sum(kernel != "column_sums_of_partials"  # bias_grad's second pass: in test_column_sums
                              for dtype in ADDRESS_SANITIZER_DTYPES for source in loader.sources()
                              for kernel, _ in loader.name_expressions(source, dtype).values())
    assert done.returncode == 0 and f"{every_instantiation} passed" in done.stdout, report
    assert "Sanitizer" not in report, report


# the second barrier of BlockTeam::reduce: each warp's lane 0 writes per_warp, then every thread reads it
SECOND_BARRIER = "        __syncthreads();\n        A total = per_warp[0];"


def reduction_unit(intact: bool):
    """mean_of_rows<float> of rows.cu, on common.cuh as it is or without BlockTeam's second barrier."""
    rows = next(unit for unit in host.project_units(["float32"]) if unit.name.startswith("rows.cu"))
    parts = tuple((name, text.replace(SECOND_BARRIER, "        A total = per_warp[0];") if not intact else text)
                  for name, text in rows.parts)
    return host.Unit(f"mean_of_rows of {rows.name}{'' if intact else ' without its second barrier'}", parts,
                     ("mean_of_rows<float>",))


def test_a_missing_syncthreads_in_the_block_reduction_is_caught_by_thread_sanitizer():
    assert SECOND_BARRIER in (loader.HERE / "common.cuh").read_text()
    for intact in (True, False):
        built([reduction_unit(intact)], sanitizer="thread")
    status, out, err = run_sanitized("thread", """
        for intact in (True, False):
            program = host.build([t.reduction_unit(intact)], sanitizer="thread")
            out = np.zeros(1, np.float32)
            program.launch("mean_of_rows<float>", (1,), (128,), (np.ones(300, np.float32), np.int64(1), np.int64(300),
                                                                out))
            assert out[0] == 1.0, out
            print("reduction clean", flush=True)
        """)
    assert out.count("reduction clean") == 1, err[-3000:]  # the intact one, not the one without the barrier
    assert status != 0 and "ThreadSanitizer: data race" in err, err[-3000:]


# the kernels that share memory within a block (barriers, shuffles, the row cache), one case each
THREAD_SANITIZER_CASES = ("softmax_rows<float, LabelTargets<float>, BlockTeam>",
                          "softmax_rows<float, NoTargets<float>, GroupTeam<32>>", "column_sums<float>",
                          "mean_of_rows<float>")


def thread_sanitizer_units():
    return [host.Unit(f"{unit.name} (thread sanitizer cases)", unit.parts,
                      tuple(e for e in unit.expressions if e in THREAD_SANITIZER_CASES))
            for unit in host.project_units(["float32"]) if set(unit.expressions) & set(THREAD_SANITIZER_CASES)]


def test_the_kernels_that_share_memory_have_no_data_race_under_thread_sanitizer():
    built(thread_sanitizer_units(), sanitizer="thread")
    status, out, err = run_sanitized("thread", """
        from deltaprop.kernels.cuda import launch
        program = host.build(t.thread_sanitizer_units(), sanitizer="thread")
        rng = np.random.default_rng(5)
        z, labels = rng.standard_normal((3, 1025)).astype(np.float32), np.array([0, 7, 1024])
        delta, row_loss = np.empty_like(z), np.empty(3, np.float32)
        geometry, cache = t.rows_launch(3, 1025, "float32", True, grid_limit=2)  # two blocks, the row cached
        members, strides = t.one_member(3)
        t.launched(program, t.THREAD_SANITIZER_CASES[0], geometry, (z, labels, delta, row_loss, *members, np.int64(3),
                   np.int64(1025), *strides, np.float32(1 / 3), np.int32(cache)))
        z = rng.standard_normal((9, 33)).astype(np.float32)
        geometry, cache = t.rows_launch(9, 33, "float32", True, grid_limit=1)
        t.launched(program, t.THREAD_SANITIZER_CASES[1], geometry, (z, None, np.empty_like(z), None, *members,
                   np.int64(9), np.int64(33), *strides, np.float32(1), np.int32(cache)))
        d = rng.standard_normal((37, 70)).astype(np.float32)
        t.launched(program, t.THREAD_SANITIZER_CASES[2], launch.column_sums_launch(1, 37, 70, 1).first,
                   (d, np.empty(70, np.float32), None, *members, np.int64(37), np.int64(70), np.int64(37),
                    *strides[:2]))
        t.launched(program, t.THREAD_SANITIZER_CASES[3], launch.mean_launch(1, 1),
                   (np.ones(3000, np.float32), *members, np.int64(3000), np.empty(1, np.float32)))
        print("no race", flush=True)
        """)
    assert status == 0 and "no race" in out and "ThreadSanitizer" not in err, err[-3000:]


@pytest.mark.parametrize("kernel, expected", [
    ("early_return", "thread (5,0,0): returned"),
    ("divergent_barriers", "while other threads wait at another"),
])
def test_a_barrier_that_not_every_thread_reaches_is_a_fault(tiny, kernel, expected):
    with pytest.raises(host.KernelFault, match=r"kernel " + kernel + r", block \(0,0,0\)") as caught:
        tiny.launch(kernel, (1,), (128,), (np.zeros(128, np.float32),))
    assert expected in str(caught.value) and "__syncthreads" in str(caught.value)


@pytest.mark.parametrize("kernel, expected", [
    ("half_warp_sum",  # lanes 0..15 find the others returned, or wait until the last of them returns
     r"__shfl_xor_sync with mask 0xffffffff names lane (1[6-9]|2\d|3[01]), which has returned$|"
     r"threads \(0,0,0\)..\(15,0,0\): wait at __shfl_xor_sync with mask 0xffffffff \(tiny.cu:24\)\n"
     r"  threads \(16,0,0\)..\(31,0,0\): returned$"),
    ("mask_without_self",  # whichever of lanes 16..31 comes first
     r"thread \((1[6-9]|2\d|3[01]),0,0\): __shfl_xor_sync with mask 0x0000ffff, which does not name its own lane \1$"),
])
def test_a_shuffle_whose_mask_names_a_lane_that_does_not_take_part_is_a_fault(tiny, kernel, expected):
    with pytest.raises(host.KernelFault, match=r"kernel " + kernel + r", block \(0,0,0\)") as caught:
        tiny.launch(kernel, (1,), (32,), (np.arange(32, dtype=np.float32), np.zeros(32, np.float32)))
    assert re.search(expected, str(caught.value))


def test_shuffles_and_votes_exchange_in_lockstep(tiny):
    x = np.arange(64, dtype=np.float32)
    out = np.zeros(64, np.float32)
    tiny.launch("warp_sum", (1,), (64,), (x, out))
    expected = np.repeat([x[:32].sum(), x[32:].sum()], 32) + 1  # + 1: the ballot of the odd lanes is 0xaaaaaaaa
    np.testing.assert_array_equal(out, expected)


def test_atomics_from_every_thread_of_every_block_add_up(tiny):
    x = np.arange(64, dtype=np.float32)
    total, total_sum, largest = np.zeros(1, np.int32), np.zeros(1, np.float32), np.zeros(1, np.float32)
    tiny.launch("count", (3,), (64,), (total, total_sum, largest, x))
    assert (total[0], total_sum[0], largest[0]) == (3 * 64, 3 * x.sum(), 3 * x.max())


def test_shuffles_read_the_lanes_cuda_documents(tiny):
    x = np.arange(100, 164, dtype=np.float32)
    out = np.zeros((64, 4), np.float32)
    tiny.launch("shuffles", (1,), (64,), (x, out))
    lane = np.arange(64) % 32
    base = np.arange(64) - lane  # the warp's first thread
    segment = lane - lane % 8  # width 8: lanes 0-7, 8-15, ... of each warp
    np.testing.assert_array_equal(out[:, 0], x[base + segment + 3])
    # up and down: a lane whose source falls outside its segment keeps its own value
    np.testing.assert_array_equal(out[:, 1], x[base + np.where(lane % 8 >= 1, lane - 1, lane)])
    np.testing.assert_array_equal(out[:, 2], x[base + np.where(lane % 8 < 6, lane + 2, lane)])
    np.testing.assert_array_equal(out[:, 3], x[base + (lane ^ 5)])


def test_a_misaligned_vector_load_is_a_fault_naming_the_thread(tiny):
    x = host.exact_copy(np.arange(64, dtype=np.float32))
    out = np.zeros(8, np.float32)
    tiny.launch("vector_load", (1,), (8,), (x, out, np.int32(-1)))  # every thread 16-byte aligned
    np.testing.assert_array_equal(out, [4 * (4 * i) + 6 for i in range(8)])
    with pytest.raises(host.KernelFault, match=r"kernel vector_load, block \(0,0,0\): thread \(1,0,0\): "
                                               r"misaligned access .*float4.*16-byte alignment"):
        tiny.launch("vector_load", (1,), (8,), (x, out, np.int32(1)))  # thread 1 reads 4 bytes past


def test_shared_memory_no_thread_wrote_reads_as_nan(tiny):
    out = np.zeros(128, np.float32)
    tiny.launch("read_shared", (2,), (64,), (out,), shared_mem=64 * 4)
    np.testing.assert_array_equal(out[:32], 1.0)
    np.testing.assert_array_equal(out[64:96], 2.0)
    assert np.isnan(out[32:64]).all() and np.isnan(out[96:]).all()


@pytest.mark.parametrize("args, expected", [
    ((np.zeros(2), np.zeros(2, np.float32), np.int32(1), np.int64(2)), r"expected 5 arguments \(const double\* x,"),
    ((np.zeros(2), np.zeros(2, np.float32), np.int64(1), np.int64(2), np.float32(1)),
     r"argument 2 \(int count\): expected int32 \(4 bytes\), got numpy.int64"),
    ((np.zeros(2), np.zeros(2, np.float32), 1, np.int64(2), np.float32(1)),
     r"argument 2 \(int count\): expected int32 \(4 bytes\), got int 1 \(int64, 8 bytes, as CuPy passes a Python int"),
    ((np.zeros(2), np.zeros(2, np.float32), np.int32(1), np.int64(2), 0.5),
     r"argument 4 \(float scale\): expected float32 \(4 bytes\), got float 0.5 \(float64, 8 bytes, as CuPy passes"),
    ((np.zeros(2, np.float32), np.zeros(2, np.float32), np.int32(1), np.int64(2), np.float32(1)),
     r"argument 0 \(const double\* x\): expected an array of float64"),
    ((np.zeros(2), np.float32(0), np.int32(1), np.int64(2), np.float32(1)),
     r"argument 1 \(float\* out\): expected an array, None or a numpy.uint64 address"),
    ((np.zeros(2), np.zeros(2, np.float32), np.zeros(1, np.int32), np.int64(2), np.float32(1)),
     r"argument 2 \(int count\): expected a scalar of int32, got a numpy.ndarray"),
    ((np.zeros(2), np.zeros((2, 2), np.float32)[:, 0], np.int32(1), np.int64(2), np.float32(1)),
     r"argument 1 \(float\* out\): expected a C-contiguous array"),
])
def test_every_argument_is_checked_against_the_kernel_signature(tiny, args, expected):
    with pytest.raises(TypeError, match=expected):
        tiny.launch("takes", (1,), (1,), args)


def test_a_python_int_is_a_long_long_and_none_a_null_pointer(tiny):
    tiny.launch("takes", (1,), (1,), (None, np.zeros(1, np.float32), np.int32(1), 5, np.float32(1)))


@pytest.mark.parametrize("grid, block, shared_mem, expected", [
    ((1,), (1025,), 0, r"block: invalid configuration argument: x = 1025"),
    ((1,), (32, 32, 2), 0, r"is more than 1024 threads"),
    ((1, 65536), (1,), 0, r"grid: invalid configuration argument: y = 65536"),
    ((0,), (1,), 0, r"grid: invalid configuration argument: x = 0"),
    ((1,), (1,), 48 * 1024 + 1, r"shared_mem: expected 0 to 49152 bytes"),
])
def test_a_launch_configuration_cuda_refuses_is_refused(tiny, grid, block, shared_mem, expected):
    with pytest.raises(ValueError, match=expected):
        tiny.launch("early_return", grid, block, (np.zeros(1, np.float32),), shared_mem=shared_mem)


def test_the_kernel_signatures_are_read_from_the_cpp_declarations(programs):
    params = programs("bfloat16").signature("softmax_rows<__nv_bfloat16, LabelTargets<__nv_bfloat16>, BlockTeam>")
    assert [str(p) for p in params] == [
        "const __nv_bfloat16* z", "const void* targets", "__nv_bfloat16* delta", "float* row_loss",
        "long long members", "long long rows", "long long cols", "long long z_stride", "long long targets_stride",
        "long long delta_stride", "float scale", "int cache"]


@pytest.mark.parametrize("dtype", loader.CUDA_DTYPES)
def test_every_instantiation_of_the_table_is_in_the_harness(programs, dtype):
    expected = {e for source in loader.sources() for e in loader.name_expressions(source, dtype)}
    assert set(programs(dtype).expressions) == expected


def test_a_source_that_does_not_compile_names_its_unit(tiny):
    with pytest.raises(host.BuildError, match=r"(?s)does not compile broken.cu:\n.*broken.cu:1:"):
        host.build([host.Unit("broken.cu", (("broken.cu", "__global__ void k(float* x) { x[0] = y; }"),), ("k",))])


def test_without_a_compiler_the_harness_says_what_to_install(monkeypatch):
    monkeypatch.setattr(host, "COMPILER", "no-such-compiler-deltaprop")
    with pytest.raises(host.HarnessUnavailable, match=r"needs a C\+\+17 compiler: 'no-such-compiler-deltaprop'"):
        host.build([tiny_unit()])


def test_exact_copy_is_exact_and_misaligned_on_request():
    x = np.arange(5, dtype=np.float32)
    for misalign in (0, 4, 12):
        copy = host.exact_copy(x, misalign)
        assert copy.ctypes.data % 16 == misalign and copy.nbytes == x.nbytes
        np.testing.assert_array_equal(copy, x)
    with pytest.raises(ValueError, match="misalign: expected a multiple of 4 below 16, got 2"):
        host.exact_copy(x, 2)
