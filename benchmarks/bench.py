"""The measuring side of `deltaprop bench`: one training step (forward, loss, backward, SGD update) of an
MLP on every usable backend and on the peers (PyTorch, JAX), interleaved in one process.

    measure(BenchSpec(...), progress)  ->  the report: one dict, the JSON of ``--json`` (schema ``bench_schema.json``)

Our step is ``MLP.train_step(x, y, lr)``, exactly what users call. Compile time (``backend.warmup()``)
and the first step at each batch size are measured apart and never inside a step time. The table, the
JSON file and the plot are drawn from the report by report.py; the command is deltaprop.cli.bench.
"""

from __future__ import annotations

import datetime
import os
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial

# Several BLAS users take turns in this process (NumPy's OpenBLAS, which numba's GEMMs call too, torch's):
# an idle OpenBLAS worker spins for 2^28 cycles (~0.1 s) after each call, stealing the cores of whichever
# library runs next, which slowed every subject here by up to 1.4x. 2^4 cycles lets workers sleep at
# once. It must be set before NumPy loads OpenBLAS; a value the user set wins, and the report records it.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

import numpy as np

from deltaprop import backend as backends
from deltaprop.benchmarks.machine import describe_machine
from deltaprop.benchmarks.peers import PEERS, make_peer, peer_status
from deltaprop.benchmarks.timing import HostClock, Timed, cupy_clock, interleave, time_first_call
from deltaprop.benchmarks.workload import (ACTIVATION, FLOPS_FORMULA, LEARNING_RATE, LOSS, SEED,
                                           host_batch, kernel_calls, step_flops)

SCHEMA = "deltaprop-bench/1"


@dataclass(frozen=True)
class Effort:
    """How long a run takes: the batch sizes, the rounds (at most ``rounds``; at least ``min_rounds``, and
    no more once a point has run ``max_time_s``), and the n of the square GEMM that measures each device's peak."""

    batches: tuple[int, ...]
    rounds: int
    min_rounds: int
    max_time_s: float
    peak_sizes: dict


EFFORTS = {
    "full": Effort((1, 32, 256, 2048), rounds=30, min_rounds=5, max_time_s=8.0,
                   peak_sizes={"cpu": 2048, "cuda": 8192}),
    "quick": Effort((1, 32, 256), rounds=5, min_rounds=3, max_time_s=0.5,
                    peak_sizes={"cpu": 1024, "cuda": 4096}),
}


def choose_subjects(requested) -> tuple[list[str], dict[str, str]]:
    """(names to run, {name: why not} for the usable-by-default ones that cannot run here).

    ``requested`` None: every usable backend and peer. Otherwise exactly those, and a ValueError where one
    is unknown or cannot run here (it never falls back silently).
    """
    ours = backends.registered_backends()
    status = {name: backends.backend_status(name) for name in ours}
    if requested is None:
        status.update((name, peer_status(name)) for name in PEERS)
        return [n for n, (ok, _) in status.items() if ok], {n: why for n, (ok, why) in status.items() if not ok}
    for name in requested:
        if name not in status and name not in PEERS:
            raise ValueError(f"--backends: expected names among {ours + list(PEERS)}, got {name!r}")
        ok, why = status[name] if name in status else peer_status(name)
        if not ok:
            raise ValueError(f"--backends: {name} cannot run here: {why}")
    return list(dict.fromkeys(requested)), {}


# ---- our backends as subjects of the bench (the peers are in peers.py) ---------------------------


def clock_for(backend):
    """CUDA events on a GPU backend, the host clock (then synchronize) on a CPU one."""
    return cupy_clock() if backend.device == "cuda" else HostClock(backend.synchronize)


class BackendSubject:
    """One of our backends running ``MLP.train_step``: the subject interface of peers.py."""

    kind = "backend"

    def __init__(self, name, sizes, dtype, batches=None, kernels=True, compile_progress=None):
        from deltaprop.model import MLP

        self.backend = backends.get_backend(name)
        self.name, self.device, self.sizes, self.dtype = name, self.backend.device, list(sizes), dtype
        self.net = MLP(sizes, activation=ACTIVATION, loss=LOSS, backend=self.backend, dtype=dtype, seed=SEED)
        self.clock = clock_for(self.backend)
        self._inputs = {}
        self._needs = {"batches": batches, "uses": ["train_step", *(["kernels"] if kernels else [])]}
        self._compile_progress = compile_progress

    def compile(self) -> float:
        """Compiles what the run times (the step at its batch sizes, the kernels alone where it times them),
        told to ``compile_progress(backend)``'s context (a ``Backend.warmup`` progress) where given."""
        from deltaprop.model.losses import get_loss

        reporter = nullcontext() if self._compile_progress is None else self._compile_progress(self.backend)
        with reporter as progress:
            return self.backend.warmup([self.dtype], [ACTIVATION], [get_loss(LOSS).kernel], progress=progress,
                                       **self._needs)

    def inputs(self, batch):
        """x (B, n0) and labels y (B,) on the backend's device, made once per batch size."""
        if batch not in self._inputs:
            x, y = host_batch(self.sizes, batch, self.dtype)
            self._inputs[batch] = self.backend.asarray(x, self.dtype), self.backend.asarray(y)
        return self._inputs[batch]

    def step(self, batch) -> Timed:
        x, y = self.inputs(batch)
        return Timed(partial(self.net.train_step, x, y, LEARNING_RATE), self.clock)

    def kernels(self, batch):
        """[(KernelCall, Timed)] for every kernel call of a step at ``batch``."""
        return [(call, Timed(call.run, self.clock)) for call in kernel_calls(self.net, *self.inputs(batch))]

    def describe(self) -> dict:
        return self.backend.describe()


def peak_timed(backend, n: int, dtype: str) -> Timed:
    """A square (n, n) @ (n, n) product with the backend's array module (BLAS on a CPU, cuBLAS on a GPU)."""
    rng = np.random.default_rng(SEED)
    a, b = (backend.asarray(rng.standard_normal((n, n)), dtype) for _ in range(2))
    out = backend.empty((n, n), dtype)
    return Timed(partial(backend.xp.matmul, a, b, out=out), clock_for(backend))


def peak_backend(device: str, subjects):
    """The backend that measures ``device``'s GEMM peak: ours on that device in this run, else any usable one."""
    for subject in subjects:
        if subject.kind == "backend" and subject.device == device:
            return subject.backend
    for name in backends.available_backends():
        candidate = backends.get_backend(name)
        if candidate.device == device:
            return candidate
    return None


# ---- the run ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchSpec:
    """What one run measures."""

    preset: str | None
    sizes: tuple[int, ...]
    dtype: str
    subjects: list[str]
    not_run: dict[str, str]
    effort: Effort
    kernels: bool
    quick: bool

    @property
    def points(self) -> int:
        """How many timed points the run has: one per batch size, two with ``kernels``."""
        return len(self.effort.batches) * (1 + self.kernels)


def _make_subject(name, spec, threads, compile_progress):
    if name in PEERS:
        return make_peer(name, spec.sizes, spec.dtype, threads)
    return BackendSubject(name, spec.sizes, spec.dtype, spec.effort.batches, spec.kernels, compile_progress)


def measure(spec: BenchSpec, progress=None, compile_progress=None) -> dict:
    """Runs ``spec``; returns the report (the JSON of ``--json``).

    ``progress``, when given, is told of each timed point: ``progress.point(label, rounds)`` as it starts
    (it returns a callback for each round done, or None), ``progress.finish(rounds_done)`` as it ends.
    ``compile_progress(backend)``, when given, is a context manager whose value is the ``progress`` of
    ``Backend.warmup``, told of what each backend compiles before the timing starts.
    """
    machine = describe_machine()
    subjects = [_make_subject(name, spec, machine["threads"], compile_progress) for name in spec.subjects]
    compile_s = {s.name: s.compile() for s in subjects}
    devices = list(dict.fromkeys(s.device for s in subjects))
    peakers = {d: b for d in devices if (b := peak_backend(d, subjects)) is not None}
    effort = spec.effort
    limits = dict(rounds=effort.rounds, min_rounds=effort.min_rounds, max_time_s=effort.max_time_s)

    def timed_point(label, timeds):
        on_round = progress.point(label, limits["rounds"]) if progress else None
        timings = interleave(timeds, on_round=on_round, **limits)
        if progress:
            progress.finish(len(next(iter(timings.values())).samples))
        return timings

    # the peak GEMM is a subject of every batch's rounds: this shared machine's speed drifts by tens of
    # percent within a run, and a peak timed once at the start made "% peak" follow the drift
    peak_timeds = {("peak", d): peak_timed(b, effort.peak_sizes[d], spec.dtype) for d, b in peakers.items()}
    peaks, steps, kernels = [], [], []
    for batch in effort.batches:
        timeds = {s.name: s.step(batch) for s in subjects}
        first = {name: time_first_call(t.fn, t.clock) for name, t in timeds.items()}
        timings = timed_point(f"step, batch {batch}", {**timeds, **peak_timeds})
        for s in subjects:
            steps.append({"subject": s.name, "kind": s.kind, "device": s.device, "batch": batch,
                          "flops": step_flops(spec.sizes, batch), "first_step_ms": first[s.name] * 1e3,
                          "timing": timings[s.name].summary_ms()})
        for device, backend in peakers.items():
            n, timing = effort.peak_sizes[device], timings["peak", device]
            peaks.append({"device": device, "batch": batch, "backend": backend.name, "n": n, "dtype": spec.dtype,
                          "gflops": 2 * n**3 / timing.median / 1e9, "timing": timing.summary_ms()})
        if spec.kernels:
            calls = {(s.name, i): (s, call, t) for s in subjects if s.kind == "backend"
                     for i, (call, t) in enumerate(s.kernels(batch))}
            timings = timed_point(f"kernels, batch {batch}", {key: t for key, (_, _, t) in calls.items()})
            kernels += [{"subject": s.name, "device": s.device, "batch": batch, "kernel": call.kernel,
                         "role": call.role, "layer": call.layer, "shape": list(call.shape), "flops": call.flops,
                         "timing": timings[key].summary_ms()} for key, (s, call, _) in calls.items()]
    return {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "workload": {"preset": spec.preset, "sizes": list(spec.sizes), "activation": ACTIVATION, "loss": LOSS,
                     "optimizer": "sgd", "learning_rate": LEARNING_RATE, "dtype": spec.dtype,
                     "batches": list(effort.batches), "flops_formula": FLOPS_FORMULA},
        "settings": {"quick": spec.quick, "rounds": effort.rounds, "min_rounds": effort.min_rounds,
                     "max_time_s": effort.max_time_s},
        "machine": machine,
        "subjects": [{"name": s.name, "kind": s.kind, "device": s.device, "compile_s": compile_s[s.name],
                      "describe": s.describe()} for s in subjects],
        "not_run": [{"name": name, "reason": why} for name, why in spec.not_run.items()],
        "peaks": peaks,
        "steps": _with_derived(steps, peaks),
        "kernels": kernels,
    }


def _with_derived(steps, peaks):
    """Each step row with samples/s, GFLOP/s, the fraction of its device's GEMM peak (None without a peak),
    and the fastest peer on its device at its batch with the ratio of that peer's median to its own."""
    peak = {(p["device"], p["batch"]): p["gflops"] for p in peaks}
    for row in steps:
        median_s = row["timing"]["median_ms"] / 1e3
        row["samples_per_s"] = row["batch"] / median_s
        row["gflops"] = row["flops"] / median_s / 1e9
        device_peak = peak.get((row["device"], row["batch"]))
        row["peak_fraction"] = None if device_peak is None else row["gflops"] / device_peak
        peers = [p for p in steps if p["kind"] == "peer" and p["device"] == row["device"] and p["batch"] == row["batch"]]
        fastest = min(peers, key=lambda p: p["timing"]["median_ms"], default=None)
        row["fastest_peer"] = fastest and fastest["subject"]
        row["vs_fastest_peer"] = fastest and fastest["timing"]["median_ms"] / row["timing"]["median_ms"]
    return steps
