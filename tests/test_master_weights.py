"""float32 master weights for 16-bit parameters: many updates each below half a float16/bfloat16 ulp add up
in the optimizer's master copy, as in a float64 reference (kernels/reference.py), where a 16-bit
parameter updated in place would keep its value. The optimizers run on the NumPy reference backend,
whose update kernels see only the float32 master copy (the 16-bit types are a GPU's)."""

import numpy as np
import pytest

from deltaprop.backend import get_backend
from deltaprop.kernels import reference
from deltaprop.kernels.dtypes import DTYPES
from deltaprop.model.optim import get_optimizer

STEPS = 400
P = 64
# every update moves a parameter by at most 1e-4, well below half an ulp of [1, 2), where they stay
SETTINGS = {  # optimizer -> (lr, gradient scale)
    "sgd": (1e-3, 0.1),
    "momentum": (1e-4, 0.1),  # the velocity reaches 10 g: steps of 1e-4 * 10 * 0.1
    "adam": (1e-4, 0.1),  # Adam's steps are about lr whatever the gradient's scale
    "adamw": (1e-4, 0.1),
}
HALF_ULP = {"float16": 2.0**-11, "bfloat16": 2.0**-8}  # half the ulp of the numbers in [1, 2)


def reference_run(name, params, grads, lr):
    """The float64 parameters after STEPS updates of ``name`` with torch.optim's defaults."""
    p = params.astype(np.float64)
    velocity, m, v = np.zeros_like(p), np.zeros_like(p), np.zeros_like(p)
    for step, g in enumerate(grads, 1):
        if name == "sgd":
            p = reference.sgd_update(p, g, lr)
        elif name == "momentum":
            p, velocity = reference.momentum_update(p, g, velocity, lr, momentum=0.9)
        else:
            p, m, v = reference.adam_update(p, g, m, v, step, lr=lr, weight_decay=0.01 if name == "adamw" else 0.0,
                                            decoupled=name == "adamw")
    return p


@pytest.mark.parametrize("name", sorted(SETTINGS))
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_sub_ulp_updates_accumulate_in_the_master_copy(name, dtype):
    storage = DTYPES[dtype].numpy_dtype()
    backend = get_backend("numpy")
    lr, scale = SETTINGS[name]
    rng = np.random.default_rng(7)
    start = (1.5 + rng.uniform(0, 0.25, P)).astype(storage)  # the run stays in [1, 2)
    grads = [(scale * rng.uniform(0.5, 1.0, P)).astype(storage) for _ in range(STEPS)]  # positive: steps add up
    expected = reference_run(name, start, grads, lr)
    moved = np.abs(expected - start.astype(np.float64))
    assert moved.min() > 4 * HALF_ULP[dtype]  # the run moves every parameter by two ulps or more

    params = backend.asarray(start.copy())
    optimizer = get_optimizer(name, lr=lr).bind(backend, params)
    assert optimizer.master.dtype == np.float32
    for g in grads:
        optimizer.step(params, backend.asarray(g))

    # float32 rounding of STEPS updates, each of at most 2**-24 relative to parameters below 2
    master_error = np.abs(optimizer.master.astype(np.float64) - expected).max()
    assert master_error <= STEPS * 2.0**-23
    np.testing.assert_array_equal(params, optimizer.master.astype(storage))  # the rounded master copy
    rounding = np.abs(params.astype(np.float64) - expected)
    assert rounding.max() <= HALF_ULP[dtype] + master_error


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_16_bit_update_in_place_would_lose_them(dtype):
    """What the master copy is for: the same SGD update made in the 16-bit type rounds back every time."""
    storage = DTYPES[dtype].numpy_dtype()
    lr, scale = SETTINGS["sgd"]
    p = np.ones(P, storage)
    for _ in range(10):
        p = (p - storage.type(lr) * np.full(P, scale, storage)).astype(storage)
    np.testing.assert_array_equal(p, np.ones(P, storage))


def test_float32_parameters_keep_no_master_copy():
    backend = get_backend("numpy")
    params = backend.asarray(np.ones(P, np.float32))
    optimizer = get_optimizer("sgd", lr=0.5).bind(backend, params)
    assert optimizer.master is None
    optimizer.step(params, backend.asarray(np.ones(P, np.float32)))
    np.testing.assert_array_equal(params, np.full(P, 0.5, np.float32))


def test_each_bind_takes_the_master_copy_from_the_parameters():
    """Parameters written between fits (early stopping's restore, a user's edit) are what the next updates
    start from, not a stale master copy."""
    backend = get_backend("numpy")
    params = backend.asarray(np.ones(P, np.float16))
    optimizer = get_optimizer("sgd", lr=1e-3).bind(backend, params)
    optimizer.step(params, backend.asarray(np.full(P, 0.1, np.float16)))
    params[...] = 3.0
    optimizer.bind(backend, params)
    np.testing.assert_array_equal(optimizer.master, np.full(P, 3.0, np.float32))
