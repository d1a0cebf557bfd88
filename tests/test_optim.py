"""Optimizers and schedules against a NumPy transcription of PyTorch's algorithms and against torch.optim."""

import inspect
import math

import numpy as np
import pytest
from helpers import rel_err, tol

from deltaprop.backend import get_backend, to_numpy
from deltaprop.kernels import reference
from deltaprop.kernels.dtypes import DTYPES
from deltaprop.model.optim import OPTIMIZERS, SCHEDULES, get_optimizer, get_schedule

STEPS = 6
SIZE = 1000

# (optimizer name, hyper-parameters): every branch of every update kernel
CASES = [
    ("sgd", dict(lr=0.1)),
    ("sgd", dict(lr=0.05, weight_decay=0.01)),
    ("momentum", dict(lr=0.05)),
    ("momentum", dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.02)),
    ("adam", dict(lr=0.01)),
    ("adam", dict(lr=0.01, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.05)),
    ("adamw", dict(lr=0.01)),
    ("adamw", dict(lr=0.02, weight_decay=0.1)),
]


def reference_run(name, hyper, params, grad_list):
    """The optimizer over ``grad_list``, in float64, with kernels/reference.py's transcriptions of
    torch.optim's documented algorithms (SGD with momentum and dampening 0, Adam, AdamW)."""
    h = dict(OPTIMIZERS[name].defaults, **hyper)
    p = params.astype(np.float64)
    velocity, m, v = np.zeros_like(p), np.zeros_like(p), np.zeros_like(p)
    for step, g in enumerate(grad_list, start=1):
        if name in ("adam", "adamw"):
            p, m, v = reference.adam_update(p, g, m, v, step, h["lr"], h["beta1"], h["beta2"], h["eps"],
                                            h["weight_decay"], decoupled=name == "adamw")
        elif h["momentum"]:
            p, velocity = reference.momentum_update(p, g, velocity, h["lr"], h["momentum"], h["nesterov"],
                                                    h["weight_decay"])
        else:
            p = reference.sgd_update(p, g, h["lr"], h["weight_decay"])
    return p


def torch_run(name, hyper, params, grad_list, schedule_factory=None):
    """The same updates made by torch.optim itself, in float64."""
    torch = pytest.importorskip("torch")
    h = dict(OPTIMIZERS[name].defaults, **hyper)
    p = torch.tensor(params, dtype=torch.float64, requires_grad=True)
    if name in ("sgd", "momentum"):
        opt = torch.optim.SGD([p], lr=h["lr"], momentum=h["momentum"], nesterov=h["nesterov"],
                              weight_decay=h["weight_decay"])
    else:
        cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        opt = cls([p], lr=h["lr"], betas=(h["beta1"], h["beta2"]), eps=h["eps"], weight_decay=h["weight_decay"])
    scheduler = schedule_factory(opt) if schedule_factory else None
    for g in grad_list:
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        if scheduler is not None:
            scheduler.step()
    return p.detach().numpy()


def run_ours(backend, dtype, name, hyper, params, grad_list, schedule=None):
    flat = backend.asarray(params.copy(), dtype)  # asarray may alias a NumPy input
    optimizer = OPTIMIZERS[name](schedule=schedule, **hyper).bind(backend, flat)
    for g in grad_list:
        optimizer.step(flat, backend.asarray(g, dtype))
    assert optimizer.step_count == len(grad_list)
    return flat


def random_problem(rng, dtype):
    params = rng.standard_normal(SIZE).astype(dtype)
    grads = [rng.standard_normal(SIZE).astype(dtype) for _ in range(STEPS)]
    return params, grads


@pytest.mark.parametrize("name, hyper", CASES)
def test_updates_match_the_transcription_of_pytorchs_algorithm(backend, dtype, name, hyper, rng):
    params, grads = random_problem(rng, dtype)
    ours = run_ours(backend, dtype, name, hyper, params, grads)
    assert rel_err(ours, reference_run(name, hyper, params, grads)) <= tol(dtype.name)


@pytest.mark.parametrize("name, hyper", CASES)
def test_updates_match_torch_optim(backend, dtype, name, hyper, rng):
    params, grads = random_problem(rng, dtype)
    expected = torch_run(name, hyper, params, grads)
    assert rel_err(run_ours(backend, dtype, name, hyper, params, grads), expected) <= tol(dtype.name)


def test_defaults_are_pytorchs():
    torch = pytest.importorskip("torch")

    def defaults(cls):
        return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()}

    sgd, adam, adamw = defaults(torch.optim.SGD), defaults(torch.optim.Adam), defaults(torch.optim.AdamW)
    for name, torch_defaults in (("adam", adam), ("adamw", adamw)):
        ours = OPTIMIZERS[name].defaults
        assert (ours["lr"], (ours["beta1"], ours["beta2"]), ours["eps"], ours["weight_decay"]) == (
            torch_defaults["lr"], torch_defaults["betas"], torch_defaults["eps"], torch_defaults["weight_decay"])
    ours = OPTIMIZERS["sgd"].defaults
    assert (ours["lr"], ours["momentum"], ours["nesterov"], ours["weight_decay"]) == (
        sgd["lr"], sgd["momentum"], sgd["nesterov"], sgd["weight_decay"])
    assert OPTIMIZERS["momentum"].defaults["momentum"] == 0.9


def test_state_lives_in_flat_buffers_beside_the_parameters(backend, dtype):
    params = backend.asarray(np.ones(10), dtype)
    adam = get_optimizer("adam").bind(backend, params)
    assert sorted(adam.state) == ["m", "v"]
    for buffer in adam.state.values():
        assert buffer.shape == (10,) and buffer.dtype == dtype and type(buffer) is type(params)
        assert not to_numpy(buffer).any()
    assert list(get_optimizer("momentum").bind(backend, params).state) == ["velocity"]
    assert get_optimizer("sgd").bind(backend, params).state == {}


# ---- schedules --------------------------------------------------------------------------------------


def torch_lrs(make_scheduler, steps, lr=1.0):
    """The learning rates torch's scheduler gives to ``steps`` consecutive updates."""
    torch = pytest.importorskip("torch")
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    scheduler = make_scheduler(torch.optim.lr_scheduler, opt)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return np.array(lrs)


def test_step_schedule_matches_torch_steplr():
    ours = get_schedule("step", step_size=4, gamma=0.5)
    expected = torch_lrs(lambda s, opt: s.StepLR(opt, step_size=4, gamma=0.5), 20)
    np.testing.assert_allclose([ours.factor(t) for t in range(20)], expected, rtol=1e-12)


@pytest.mark.parametrize("warmup, min_factor", [(5, 0.0), (3, 0.1), (0, 0.0)])
def test_cosine_with_warmup_matches_torch(warmup, min_factor):
    total = 30

    def torch_schedule(s, opt):
        cosine = s.CosineAnnealingLR(opt, T_max=total - warmup, eta_min=min_factor)
        if not warmup:
            return cosine
        linear = s.LinearLR(opt, start_factor=1 / warmup, end_factor=1.0, total_iters=warmup - 1)
        return s.SequentialLR(opt, [linear, cosine], milestones=[warmup])

    ours = get_schedule("cosine", warmup_steps=warmup, min_factor=min_factor)
    expected = torch_lrs(torch_schedule, total)
    np.testing.assert_allclose([ours.factor(t, total) for t in range(total)], expected, rtol=1e-12, atol=1e-15)


def test_cosine_formula():
    """The warm-up climbs linearly to 1, the cosine falls to min_factor at total_steps and stays there."""
    schedule = get_schedule("cosine", warmup_steps=4, total_steps=14, min_factor=0.2)
    assert [schedule.factor(t) for t in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert schedule.factor(9) == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * 5 / 10)), rel=1e-15)
    assert schedule.factor(14) == schedule.factor(20) == pytest.approx(0.2, rel=1e-15)


def test_optimizer_follows_its_schedule_like_torch(backend, rng):
    params, grads = random_problem(rng, np.dtype(np.float64))
    hyper = dict(lr=0.1, momentum=0.9)
    ours = run_ours(backend, np.dtype(np.float64), "momentum", hyper, params, grads,
                    schedule=get_schedule("step", step_size=2, gamma=0.3))
    torch = pytest.importorskip("torch")
    expected = torch_run("momentum", hyper, params, grads,
                         lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.3))
    assert rel_err(ours, expected) <= tol("float64")


def test_tables_hold_every_name():
    assert sorted(OPTIMIZERS) == ["adam", "adamw", "momentum", "sgd"]
    assert sorted(SCHEDULES) == ["constant", "cosine", "one_cycle", "step"]


# ---- refusals ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: get_optimizer("rmsprop"), ValueError, r"optimizer: expected one of \['adam', 'adamw', 'momentum', 'sgd'\]"),
        (lambda: OPTIMIZERS["adam"](amsgrad=True), TypeError, r"adam: unknown hyper-parameter\(s\) \['amsgrad'\]"),
        (lambda: OPTIMIZERS["sgd"](lr=-1.0), ValueError, r"sgd: lr: expected a finite real number > 0, got -1.0"),
        (lambda: OPTIMIZERS["adam"](lr=float("nan")), ValueError, r"adam: lr: expected a finite real number > 0, got nan"),
        (lambda: OPTIMIZERS["sgd"](nesterov=True), ValueError, r"sgd: nesterov: expected momentum > 0"),
        (lambda: get_optimizer(get_optimizer("adam"), lr=0.1), ValueError, r"lr/schedule: expected None with an Optimizer"),
        (lambda: get_schedule("linear"), ValueError, r"schedule: expected one of \['constant', 'cosine', 'one_cycle', 'step'\], got 'linear'"),
        (lambda: get_schedule("step", step_size=0), ValueError, r"step_size: expected an integer >= 1, got 0"),
        (lambda: get_schedule("step", size=3), TypeError, r"schedule 'step': .*unexpected keyword argument 'size'"),
        (lambda: get_schedule("cosine").factor(0), ValueError, r"total_steps: expected the number of planned updates"),
        (lambda: get_schedule("cosine", warmup_steps=5, total_steps=5), ValueError, r"total_steps: expected an integer >= 6"),
    ],
)
def test_refusals_name_the_argument(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_step_before_bind_is_refused():
    with pytest.raises(RuntimeError, match=r"adam: call bind\(backend, params\) before step\(\)"):
        get_optimizer("adam").step(np.zeros(3), np.zeros(3))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_optimizer_state_is_kept_in_the_accumulation_dtype(dtype):
    """Mixed precision: the state of 16-bit parameters is float32 (an fp16 Adam v underflows), of the
    others their own dtype. bind only allocates, so the reference backend's host arrays serve any dtype."""
    storage = DTYPES[dtype].numpy_dtype()
    if storage is None:
        pytest.skip(f"{dtype} needs {DTYPES[dtype].extension}")
    params = np.zeros(5, storage)
    for optimizer in (get_optimizer(name) for name in OPTIMIZERS):
        optimizer.bind(get_backend("numpy"), params)
        expected = np.float64 if dtype == "float64" else np.float32
        assert {key: state.dtype for key, state in optimizer.state.items()} == dict.fromkeys(optimizer.state_names(), expected)
