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
        if h.get("max_grad_norm") is not None:
            torch.nn.utils.clip_grad_norm_([p], h["max_grad_norm"])
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


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_betas_are_torchs_spelling_of_beta1_and_beta2(backend, dtype, name, rng):
    params, grads = random_problem(rng, dtype)
    expected = torch_run(name, dict(lr=0.01, beta1=0.7, beta2=0.95), params, grads)
    assert rel_err(run_ours(backend, dtype, name, dict(lr=0.01, betas=(0.7, 0.95)), params, grads), expected) <= tol(dtype.name)
    assert OPTIMIZERS[name](betas=(0.7, 0.95)).betas == (0.7, 0.95)


@pytest.mark.parametrize("name, hyper", [("sgd", dict(lr=0.1, max_grad_norm=5.0)),
                                         ("adam", dict(lr=0.01, max_grad_norm=20.0)),
                                         ("momentum", dict(lr=0.05, max_grad_norm=1e3))])  # 1e3: never clips
def test_clipping_by_global_norm_matches_torch(backend, dtype, name, hyper, rng):
    params, grads = random_problem(rng, dtype)
    grads = [g * scale for g, scale in zip(grads, (0.1, 1.0, 3.0, 0.5, 2.0, 0.05))]  # norms 3 to 95
    expected = torch_run(name, hyper, params, grads)
    assert rel_err(run_ours(backend, dtype, name, hyper, params, grads), expected) <= tol(dtype.name)


def test_clipping_scales_the_gradients_in_place_and_keeps_the_norm_on_the_device(backend, dtype, rng):
    grads = rng.standard_normal(SIZE).astype(dtype)
    flat_grads, flat_params = backend.asarray(grads.copy(), dtype), backend.asarray(np.zeros(SIZE), dtype)
    optimizer = get_optimizer(OPTIMIZERS["sgd"](lr=1.0, max_grad_norm=2.0)).bind(backend, flat_params)
    optimizer.step(flat_params, flat_grads)
    norm = np.linalg.norm(grads.astype(np.float64))
    assert type(optimizer.grad_norm) is not float and hasattr(optimizer.grad_norm, "dtype")  # an array, not a float
    assert abs(float(optimizer.grad_norm) - norm) <= tol(dtype.name) * norm
    assert rel_err(flat_grads, grads * (2.0 / (norm + 1e-6))) <= tol(dtype.name)
    assert rel_err(flat_params, -grads * (2.0 / (norm + 1e-6))) <= tol(dtype.name)


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


@pytest.mark.parametrize("total, options", [(30, {}), (40, dict(pct_start=0.25, div_factor=10.0, final_div_factor=100.0))])
def test_one_cycle_matches_torch_onecyclelr(total, options):
    ours = get_schedule("one_cycle", **options)
    expected = torch_lrs(lambda s, opt: s.OneCycleLR(opt, max_lr=1.0, total_steps=total, cycle_momentum=False,
                                                      **options), total)
    np.testing.assert_allclose([ours.factor(t, total) for t in range(total)], expected, rtol=1e-12, atol=1e-15)
    assert ours.factor(total + 5, total) == ours.factor(total - 1, total)  # stays at the floor after the cycle


def test_a_function_is_a_schedule_as_torchs_lambdalr():
    def decay(step):
        return 0.9 ** step

    expected = torch_lrs(lambda s, opt: s.LambdaLR(opt, decay), 12)
    np.testing.assert_allclose([get_schedule(decay).factor(t) for t in range(12)], expected, rtol=1e-12)
    with pytest.raises(ValueError, match=r"schedule: expected the function to give a finite real number >= 0 "
                                         r"at update 3, got nan"):
        get_schedule(lambda step: math.nan if step == 3 else 1.0).factor(3)


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
        (lambda: get_schedule("one_cycle", pct_start=1.0), ValueError, r"pct_start: expected a number in \(0, 1\), got 1.0"),
        (lambda: get_schedule("one_cycle").factor(0, 3), ValueError, r"expected pct_start \* total_steps in \(1, total_steps\)"),
        (lambda: get_schedule(3), TypeError, r"schedule: expected one of .* or a function of the update index, got 3"),
        (lambda: OPTIMIZERS["adam"](betas=(0.9,)), ValueError, r"adam: betas: expected a pair \(beta1, beta2\)"),
        (lambda: OPTIMIZERS["adamw"](betas=(0.9, 1.0)), ValueError, r"adamw: beta2: expected a number in \[0, 1\), got 1.0"),
        (lambda: OPTIMIZERS["adam"](betas=(0.9, 0.9), beta1=0.8), TypeError, r"adam: betas: expected either betas or \['beta1'\]"),
        (lambda: OPTIMIZERS["sgd"](max_grad_norm=0.0), ValueError, r"sgd: max_grad_norm: expected a finite real number > 0"),
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
