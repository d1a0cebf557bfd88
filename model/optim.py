"""Optimizers over the flat parameter buffer, and learning-rate schedules: two tables looked up by name.

    OPTIMIZERS   "sgd" (SGD), "momentum" (SGD with momentum 0.9, optionally Nesterov), "adam", "adamw"
    SCHEDULES    "constant", "step" (StepLR), "cosine" (linear warm-up, then cosine annealing),
                 "one_cycle" (OneCycleLR); or a function of the update index (LambdaLR)

Each optimizer step is one launch of the backend's update kernel (``sgd_update``, ``momentum_update``
or ``adam_update``) over the whole flat (P,) parameter buffer, with the formulas and defaults of
torch.optim (see those kernels' docstrings). The optimizer's state (``velocity``, or Adam's ``m`` and
``v``) lives in flat (P,) buffers of the parameters' backend and accumulation dtype, allocated once by
``bind``; ``step_count`` counts the updates made (Adam's bias corrections use ``step_count`` + 1 for
the next). For 16-bit parameters the update applies to a float32 master copy (``master``), rounded
into the parameters after each step.

The learning rate of update t (0-based, t = ``step_count`` before the update) is
``lr * schedule.factor(t, total_steps)``; schedules count updates, not epochs.

Every optimizer takes ``max_grad_norm``: before each update the gradients are scaled so that their global
2-norm is at most that, as torch.nn.utils.clip_grad_norm_ does (None: no clipping). The norm stays a
value of the device (``grad_norm``), read by no one unless a caller asks.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from deltaprop.kernels.dtypes import accumulation_dtype

if TYPE_CHECKING:
    from deltaprop.arrays import Array
    from deltaprop.backend import Backend
from numbers import Integral, Real

# ---- learning-rate schedules ----------------------------------------------------------------------


class Schedule(Protocol):
    """What a learning-rate schedule object has: the factor of the base rate at update ``step``."""

    def factor(self, step: int, total_steps: int | None = None) -> float: ...


@dataclass(frozen=True)
class Constant:
    """factor(t) = 1."""

    name = "constant"

    def factor(self, step: int, total_steps: int | None = None) -> float:
        return 1.0


@dataclass(frozen=True)
class StepDecay:
    """factor(t) = gamma ** (t // step_size), as torch.optim.lr_scheduler.StepLR stepped once per update."""

    step_size: int
    gamma: float = 0.1
    name = "step"

    def __post_init__(self):
        check_count("step_size", self.step_size, minimum=1)

    def factor(self, step: int, total_steps: int | None = None) -> float:
        return self.gamma ** (step // self.step_size)


@dataclass(frozen=True)
class WarmupCosine:
    """Linear warm-up over ``warmup_steps`` updates, factor (t + 1) / warmup_steps (torch's LinearLR
    from 1/warmup_steps to 1); then cosine annealing from 1 to ``min_factor`` over the remaining
    ``total_steps - warmup_steps`` updates (torch's CosineAnnealingLR with eta_min = min_factor * lr).
    ``total_steps`` None means the number of updates the caller plans (``fit`` passes epochs x batches).
    """

    warmup_steps: int = 0
    total_steps: int | None = None
    min_factor: float = 0.0
    name = "cosine"

    def __post_init__(self):
        check_count("warmup_steps", self.warmup_steps, minimum=0)
        if self.total_steps is not None:
            check_count("total_steps", self.total_steps, minimum=self.warmup_steps + 1)

    def factor(self, step: int, total_steps: int | None = None) -> float:
        total = self.total_steps if self.total_steps is not None else total_steps
        if total is None:
            raise ValueError("cosine schedule: total_steps: expected the number of planned updates, got None")
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(total - self.warmup_steps, 1)
        progress = min(step - self.warmup_steps, span) / span
        return self.min_factor + (1.0 - self.min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class OneCycle:
    """torch.optim.lr_scheduler.OneCycleLR (cosine annealing, two phases) with max_lr = the base rate:
    from 1 / div_factor up to 1 over the first ``pct_start`` of ``total_steps`` updates, then down to
    1 / (div_factor * final_div_factor) at the last update (and there after it). Momentum is not cycled.
    ``total_steps`` None means the number of updates the caller plans (``fit`` passes epochs x batches).
    """

    total_steps: int | None = None
    pct_start: float = 0.3
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    name = "one_cycle"

    def __post_init__(self):
        if self.total_steps is not None:
            check_count("total_steps", self.total_steps, minimum=2)
        if not 0 < self.pct_start < 1:
            raise ValueError(f"one_cycle schedule: pct_start: expected a number in (0, 1), got {self.pct_start!r}")
        for key in ("div_factor", "final_div_factor"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"one_cycle schedule: {key}: expected a finite number > 0, got {value!r}")

    def factor(self, step: int, total_steps: int | None = None) -> float:
        total = self.total_steps if self.total_steps is not None else total_steps
        if total is None:
            raise ValueError("one_cycle schedule: total_steps: expected the number of planned updates, got None")
        initial = 1.0 / self.div_factor
        peak_at, end_at = self.pct_start * total - 1, total - 1  # torch's phase ends (float)
        if not 0 < peak_at < end_at:
            raise ValueError(f"one_cycle schedule: expected pct_start * total_steps in (1, total_steps), got "
                             f"{self.pct_start} * {total}")
        step = min(step, end_at)
        if step <= peak_at:
            return _cosine_between(initial, 1.0, step / peak_at)
        return _cosine_between(1.0, initial / self.final_div_factor, (step - peak_at) / (end_at - peak_at))


def _cosine_between(start: float, end: float, progress: float) -> float:
    """Cosine annealing from ``start`` (progress 0) to ``end`` (progress 1), torch's _annealing_cos."""
    return end + (start - end) / 2.0 * (math.cos(math.pi * progress) + 1)


@dataclass(frozen=True)
class LambdaSchedule:
    """A function of the update index t (0-based) giving the factor of the base rate (torch's LambdaLR
    stepped once per update); what ``get_schedule`` makes of a callable. Not storable in a checkpoint."""

    function: Callable[[int], float]
    name = "lambda"

    def factor(self, step: int, total_steps: int | None = None) -> float:
        value = self.function(step)
        if isinstance(value, bool) or not (isinstance(value, Real) and math.isfinite(value) and value >= 0):
            raise ValueError(f"schedule: expected the function to give a finite real number >= 0 at update "
                             f"{step}, got {value!r}")
        return float(value)


SCHEDULES: dict[str, type] = {cls.name: cls for cls in (Constant, StepDecay, WarmupCosine, OneCycle)}


def get_schedule(schedule: Schedule | str | None = None, **options: float) -> Schedule:
    """A schedule from its name (with ``options`` for its fields), a schedule passed through, or a function
    of the update index (0-based) giving the factor of the base rate; None is constant."""
    if schedule is None:
        schedule = "constant"
    if not isinstance(schedule, str):
        if hasattr(schedule, "factor"):
            return schedule
        if callable(schedule):
            return LambdaSchedule(schedule)
        raise TypeError(f"schedule: expected one of {sorted(SCHEDULES)}, a schedule object or a function of the "
                        f"update index, got {schedule!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {sorted(SCHEDULES)}, got {schedule!r}")
    try:
        return SCHEDULES[schedule](**options)
    except TypeError as e:
        raise TypeError(f"schedule {schedule!r}: {e}") from None


def schedule_spec(schedule) -> dict:
    """A schedule as {"name": ..., **fields} (what a checkpoint stores)."""
    return {"name": schedule.name, **asdict(schedule)}


def check_learning_rate(name, value) -> float:
    """``value`` as a float when it is a real number (not a bool), finite and > 0, else a ValueError naming
    ``name``. The one rule for every learning rate: ``fit``'s ``lr``, an optimizer's and ``train_step``'s."""
    if isinstance(value, bool) or not isinstance(value, Real) or not (math.isfinite(value) and float(value) > 0):
        raise ValueError(f"{name}: expected a finite real number > 0, got {value!r}")
    return float(value)


def check_seed(name, seed):
    """``seed`` as an int when it is None or an integer in [0, 2**63) (what a checkpoint stores), else a
    ValueError naming ``name``."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, Integral) or not 0 <= seed < 2**63):
        raise ValueError(f"{name}: expected None or an integer in [0, 2**63), got {seed!r}")
    return None if seed is None else int(seed)


def check_count(name, value, minimum):
    """``value`` is an int (not a bool) >= ``minimum``, else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")


# ---- optimizers -----------------------------------------------------------------------------------


class Optimizer(ABC):
    """Updates a flat (P,) parameter buffer in place from the flat (P,) gradient buffer.

    hyper-parameters: ``defaults`` of the subclass, overridden by keyword; ``lr`` is the base learning
    rate, which ``schedule`` (a name of SCHEDULES or a schedule object) scales per update.
    """

    name = ""
    defaults: dict = {}

    def __init__(self, lr: float | None = None, schedule: Schedule | str | None = None, **hyper: float) -> None:
        defaults = dict(self.defaults, max_grad_norm=None)
        unknown = sorted(set(hyper) - set(defaults))
        if unknown:
            raise TypeError(f"{self.name}: unknown hyper-parameter(s) {unknown}; expected some of {sorted(defaults)}")
        self.hyper = dict(defaults, **hyper)
        if lr is not None:
            self.hyper["lr"] = lr
        for key, value in self.hyper.items():
            if key == "lr":
                self.hyper[key] = check_learning_rate(f"{self.name}: lr", value)
            elif key == "max_grad_norm":
                if value is not None:
                    self.hyper[key] = check_learning_rate(f"{self.name}: max_grad_norm", value)
            elif key == "nesterov":
                if not isinstance(value, bool):
                    raise ValueError(f"{self.name}: nesterov: expected True or False, got {value!r}")
            else:
                if isinstance(value, bool) or not (isinstance(value, Real) and math.isfinite(value) and float(value) >= 0):
                    raise ValueError(f"{self.name}: {key}: expected a finite real number >= 0, got {value!r}")
                self.hyper[key] = float(value)
        self._check_hyper()
        self.schedule = get_schedule(schedule)
        self.step_count = 0
        self.total_steps = None  # the updates the caller plans (for a cosine schedule without its own)
        self.state: dict = {}
        self.backend: Backend | None = None  # set by bind
        self.last_lr: float | None = None  # the learning rate of the last update
        self.grad_norm = None  # with max_grad_norm: the last gradients' norm before clipping, on the device
        # 16-bit parameters: their float32 master copy, which the updates apply to, and the gradients' (bind)
        self.master: Array | None = None
        self._master_grads: Array | None = None

    def _check_hyper(self):
        """Subclass hook: cross-field checks of ``self.hyper``."""

    def state_names(self) -> tuple[str, ...]:
        """Names of the flat state buffers this optimizer keeps beside the parameters."""
        return ()

    def bind(self, backend: Backend, params: Array) -> Optimizer:
        """Allocates zeroed state buffers shaped like ``params`` (flat (P,)) on ``backend``, in the
        accumulation dtype of ``params`` (float32 for 16-bit parameters), unless the ones already held
        match in shape and dtype (then the state carries on). Returns self."""
        self.backend = backend
        state_dtype = accumulation_dtype(params.dtype)
        for key in self.state_names():
            held = self.state.get(key)
            if held is None or held.shape != params.shape or held.dtype != state_dtype:
                self.state[key] = backend.zeros(params.shape, state_dtype)
        self._bind_master(backend, params, state_dtype)
        return self

    def _bind_master(self, backend, params, master_dtype):
        """For parameters stored in fewer bits than they compute in (float16, bfloat16): a master copy of
        ``params`` in ``master_dtype`` (float32), taken anew at each bind, that every update applies to
        before rounding it into ``params``, as mixed-precision training does: an update below half a
        16-bit ulp is kept there instead of rounding away."""
        if master_dtype == params.dtype:
            self.master = self._master_grads = None
            return
        if self.master is None or self.master.shape != params.shape or self.master.dtype != master_dtype:
            self.master = backend.empty(params.shape, master_dtype)
            self._master_grads = backend.empty(params.shape, master_dtype)
        self.master[...] = params

    def current_lr(self) -> float:
        """The learning rate the next update uses."""
        return self.hyper["lr"] * self.schedule.factor(self.step_count, self.total_steps)

    def step(self, params: Array, grads: Array) -> None:
        """One update of ``params`` from ``grads`` (flat (P,) buffers of the bound backend), in place."""
        if self.backend is None:
            raise RuntimeError(f"{self.name}: call bind(backend, params) before step()")
        lr = self.current_lr()
        self.step_count += 1
        self.last_lr = lr
        if self.hyper["max_grad_norm"] is not None:
            self.grad_norm = clip_grad_norm(self.backend.xp, grads, self.hyper["max_grad_norm"])
        master, master_grads = self.master, self._master_grads
        if master is None or master_grads is None:
            self._update(params, grads, lr)
            return
        master_grads[...] = grads
        self._update(master, master_grads, lr)
        params[...] = master  # rounded to nearest even

    @abstractmethod
    def _update(self, params, grads, lr):
        """Apply one update with learning rate ``lr`` through the bound backend's update kernel."""

    def __repr__(self):
        fields = ", ".join(f"{k}={v!r}" for k, v in self.hyper.items())
        return f"{type(self).__name__}({fields}, schedule={self.schedule!r}, step_count={self.step_count})"


def clip_grad_norm(xp, grads: Array, max_norm: float) -> Array:
    """Scales the flat (P,) ``grads`` in place by min(1, max_norm / (norm + 1e-6)), norm being their 2-norm
    (computed in the accumulation dtype), as torch.nn.utils.clip_grad_norm_; returns that norm, a 0-d
    value of ``xp``'s device: nothing is brought to the host."""
    norm = xp.linalg.norm(grads.astype(accumulation_dtype(grads.dtype), copy=False))
    scale = xp.minimum(max_norm / (norm + 1e-6), 1.0)
    grads *= scale.astype(grads.dtype)
    return norm


class SGD(Optimizer):
    """torch.optim.SGD (dampening 0): plain, or with momentum (then optionally Nesterov)."""

    name = "sgd"
    defaults = {"lr": 1e-3, "momentum": 0.0, "nesterov": False, "weight_decay": 0.0}

    def _check_hyper(self):
        if self.hyper["nesterov"] and self.hyper["momentum"] <= 0:
            raise ValueError(f"{self.name}: nesterov: expected momentum > 0 with nesterov=True, "
                             f"got momentum={self.hyper['momentum']!r}")

    def state_names(self) -> tuple[str, ...]:
        return ("velocity",) if self.hyper["momentum"] else ()

    def _update(self, params, grads, lr):
        h = self.hyper
        if h["momentum"]:
            self.backend.momentum_update(params, grads, self.state["velocity"], lr, momentum=h["momentum"],
                                         nesterov=bool(h["nesterov"]), weight_decay=h["weight_decay"])
        else:
            self.backend.sgd_update(params, grads, lr, weight_decay=h["weight_decay"])


class Momentum(SGD):
    """SGD with momentum 0.9 by default (torch.optim.SGD(momentum=0.9)); ``nesterov=True`` for Nesterov."""

    name = "momentum"
    defaults = dict(SGD.defaults, momentum=0.9)


class Adam(Optimizer):
    """torch.optim.Adam: L2 weight decay added to the gradient."""

    name = "adam"
    defaults = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0}
    decoupled = False

    def __init__(self, lr: float | None = None, schedule: Schedule | str | None = None,
                 betas: tuple[float, float] | None = None, **hyper: float) -> None:
        """betas: (beta1, beta2), PyTorch's spelling of the ``beta1`` and ``beta2`` hyper-parameters."""
        if betas is not None:
            if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
                raise ValueError(f"{self.name}: betas: expected a pair (beta1, beta2), got {betas!r}")
            both = sorted({"beta1", "beta2"} & set(hyper))
            if both:
                raise TypeError(f"{self.name}: betas: expected either betas or {both}, got both")
            hyper.update(beta1=betas[0], beta2=betas[1])
        super().__init__(lr, schedule, **hyper)

    def _check_hyper(self):
        for key in ("beta1", "beta2"):
            if not self.hyper[key] < 1:
                raise ValueError(f"{self.name}: {key}: expected a number in [0, 1), got {self.hyper[key]!r}")

    @property
    def betas(self) -> tuple[float, float]:
        return self.hyper["beta1"], self.hyper["beta2"]

    def state_names(self) -> tuple[str, ...]:
        return ("m", "v")

    def _update(self, params, grads, lr):
        h = self.hyper
        self.backend.adam_update(params, grads, self.state["m"], self.state["v"], self.step_count, lr=lr,
                                 beta1=h["beta1"], beta2=h["beta2"], eps=h["eps"],
                                 weight_decay=h["weight_decay"], decoupled=self.decoupled)


class AdamW(Adam):
    """torch.optim.AdamW: decoupled weight decay (params *= 1 - lr * weight_decay), default 1e-2."""

    name = "adamw"
    defaults = dict(Adam.defaults, weight_decay=1e-2)
    decoupled = True


OPTIMIZERS: dict[str, type[Optimizer]] = {cls.name: cls for cls in (SGD, Momentum, Adam, AdamW)}


def get_optimizer(optimizer: str | Optimizer, lr: float | None = None,
                  schedule: Schedule | str | None = None) -> Optimizer:
    """A new optimizer from its name (``lr`` and ``schedule`` apply), or an Optimizer passed through
    (then ``lr`` and ``schedule`` must be None: they belong to the Optimizer already)."""
    if isinstance(optimizer, Optimizer):
        if lr is not None or schedule is not None:
            raise ValueError(f"lr/schedule: expected None with an Optimizer instance ({optimizer!r} has its own), "
                             f"got lr={lr!r}, schedule={schedule!r}")
        return optimizer
    if not isinstance(optimizer, str) or optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer: expected one of {sorted(OPTIMIZERS)} or an Optimizer, got {optimizer!r}")
    return OPTIMIZERS[optimizer](lr=lr, schedule=schedule)
