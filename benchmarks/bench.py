"""`deltaprop bench`: one training step (forward, loss, backward, SGD update) of an MLP on every usable
backend and on the peers (PyTorch, JAX), interleaved in one process; a table, JSON and a plot.

    deltaprop bench                                  the mlp preset, batches 1,32,256,2048, all that runs here
    deltaprop bench --quick                          a run under 20 s
    deltaprop bench --preset small --dtype float64 --backends numpy,torch --kernels --json r.json --plot r.png

Our step is ``MLP.train_step(x, y, lr)``, exactly what users call. Compile time (``backend.warmup()``)
and the first step at each batch size are measured apart and never inside a step time. The report is one
dict (the JSON of ``--json``, schema ``bench_schema.json``); the table and the plot are drawn from it.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace
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
from deltaprop.benchmarks.workload import (ACTIVATION, FLOPS_FORMULA, LEARNING_RATE, LOSS, PRESETS, SEED,
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


# ---- the command line ------------------------------------------------------------------------------


def _positive_ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers like 784,512,10, got {text!r}")
    return values


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    workload = parser.add_mutually_exclusive_group()
    workload.add_argument("--preset", choices=sorted(PRESETS), default="mlp",
                          help="network widths: " + "; ".join(f"{k} {'-'.join(map(str, v))}" for k, v in PRESETS.items())
                          + " (ReLU; default mlp)")
    workload.add_argument("--sizes", type=_positive_ints, metavar="N0,N1,...",
                          help="layer widths of a ReLU network instead of a preset, input first")
    parser.add_argument("--batch", type=_positive_ints, metavar="B,...",
                        help="batch sizes (default 1,32,256,2048; --quick 1,32,256)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--backends", type=_names, metavar="NAME,...",
                        help=f"our backends and peers ({', '.join(PEERS)}); default: every one usable here")
    parser.add_argument("--repeat", type=int, metavar="N", help="rounds per point, at most (default 30; --quick 5)")
    parser.add_argument("--max-time", type=float, metavar="S",
                        help="seconds per point after which rounds stop (default 8; --quick 0.5)")
    parser.add_argument("--kernels", action="store_true", help="also time each kernel of a step alone")
    parser.add_argument("--json", metavar="FILE", help="write every figure and the machine to FILE")
    parser.add_argument("--plot", metavar="FILE.png", help="draw samples/s against batch size (needs matplotlib)")
    parser.add_argument("--quick", action="store_true", help="fewer batches and rounds: under 20 s")


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

    def __init__(self, name, sizes, dtype, batches=None, kernels=True):
        from deltaprop.model import MLP

        self.backend = backends.get_backend(name)
        self.name, self.device, self.sizes, self.dtype = name, self.backend.device, list(sizes), dtype
        self.net = MLP(sizes, activation=ACTIVATION, loss=LOSS, backend=self.backend, dtype=dtype, seed=SEED)
        self.clock = clock_for(self.backend)
        self._inputs = {}
        self._needs = {"batches": batches, "uses": ["train_step", *(["kernels"] if kernels else [])]}

    def compile(self) -> float:
        """Compiles what the run times (the step at its batch sizes, the kernels alone where it times them)."""
        from deltaprop.cli.warmup import CompileProgress
        from deltaprop.model.losses import get_loss

        with CompileProgress(self.backend) as progress:
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


# ---- progress -------------------------------------------------------------------------------------


class Progress:
    """One unit per timed point: a tqdm bar on stderr when it is a terminal (and tqdm is installed),
    else one plain line per point."""

    def __init__(self, total: int):
        self.stream = sys.stderr
        self.total, self.done, self.started = total, 0, time.perf_counter()
        self.bar = None
        if self.stream.isatty() and importlib.util.find_spec("tqdm") is not None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, file=self.stream, unit="point", leave=False)

    def point(self, label: str, rounds: int):
        """Starts a point; returns its ``on_round`` callback."""
        self.label, self.point_start = label, time.perf_counter()
        if self.bar is None:
            return None
        self.bar.set_description(label)
        return lambda done: self.bar.set_postfix_str(f"round {done}/{rounds}")

    def finish(self, rounds_done: int) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update()
        else:
            print(f"deltaprop bench: [{self.done}/{self.total}] {self.label}: {rounds_done} rounds in "
                  f"{time.perf_counter() - self.point_start:.1f} s", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---- the run ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What one run measures."""

    preset: str | None
    sizes: tuple[int, ...]
    dtype: str
    subjects: list[str]
    not_run: dict[str, str]
    effort: Effort
    kernels: bool
    quick: bool

    @classmethod
    def from_args(cls, args) -> Plan:
        """The plan of parsed arguments; a ValueError says which argument is wrong and why."""
        effort = EFFORTS["quick" if args.quick else "full"]
        if args.batch:
            effort = replace(effort, batches=tuple(dict.fromkeys(args.batch)))
        if args.repeat is not None:
            if args.repeat < 1:
                raise ValueError(f"--repeat: expected a positive number of rounds, got {args.repeat}")
            effort = replace(effort, rounds=args.repeat, min_rounds=min(effort.min_rounds, args.repeat))
        if args.max_time is not None:
            if not args.max_time > 0:
                raise ValueError(f"--max-time: expected a positive number of seconds, got {args.max_time}")
            effort = replace(effort, max_time_s=args.max_time)
        if args.sizes is not None and len(args.sizes) < 2:
            raise ValueError(f"--sizes: expected at least two widths like 784,512,10, got {list(args.sizes)}")
        if args.plot and importlib.util.find_spec("matplotlib") is None:
            raise ValueError("--plot needs matplotlib, which is not installed: pip install 'deltaprop[plot]'")
        subjects, not_run = choose_subjects(args.backends)
        preset = None if args.sizes else args.preset
        return cls(preset, tuple(args.sizes or PRESETS[preset]), args.dtype, subjects, not_run, effort,
                   args.kernels, args.quick)


def _make_subject(name, plan, threads):
    if name in PEERS:
        return make_peer(name, plan.sizes, plan.dtype, threads)
    return BackendSubject(name, plan.sizes, plan.dtype, plan.effort.batches, plan.kernels)


def measure(plan: Plan) -> dict:
    """Runs the plan, showing progress on stderr; returns the report (the JSON of ``--json``)."""
    machine = describe_machine()
    subjects = [_make_subject(name, plan, machine["threads"]) for name in plan.subjects]
    compile_s = {s.name: s.compile() for s in subjects}
    devices = list(dict.fromkeys(s.device for s in subjects))
    peakers = {d: b for d in devices if (b := peak_backend(d, subjects)) is not None}
    effort = plan.effort
    progress = Progress(len(effort.batches) * (1 + plan.kernels))
    limits = dict(rounds=effort.rounds, min_rounds=effort.min_rounds, max_time_s=effort.max_time_s)

    def timed_point(label, timeds):
        timings = interleave(timeds, on_round=progress.point(label, limits["rounds"]), **limits)
        progress.finish(len(next(iter(timings.values())).samples))
        return timings

    # the peak GEMM is a subject of every batch's rounds: this shared machine's speed drifts by tens of
    # percent within a run, and a peak timed once at the start made "% peak" follow the drift
    peak_timeds = {("peak", d): peak_timed(b, effort.peak_sizes[d], plan.dtype) for d, b in peakers.items()}
    peaks, steps, kernels = [], [], []
    for batch in effort.batches:
        timeds = {s.name: s.step(batch) for s in subjects}
        first = {name: time_first_call(t.fn, t.clock) for name, t in timeds.items()}
        timings = timed_point(f"step, batch {batch}", {**timeds, **peak_timeds})
        for s in subjects:
            steps.append({"subject": s.name, "kind": s.kind, "device": s.device, "batch": batch,
                          "flops": step_flops(plan.sizes, batch), "first_step_ms": first[s.name] * 1e3,
                          "timing": timings[s.name].summary_ms()})
        for device, backend in peakers.items():
            n, timing = effort.peak_sizes[device], timings["peak", device]
            peaks.append({"device": device, "batch": batch, "backend": backend.name, "n": n, "dtype": plan.dtype,
                          "gflops": 2 * n**3 / timing.median / 1e9, "timing": timing.summary_ms()})
        if plan.kernels:
            calls = {(s.name, i): (s, call, t) for s in subjects if s.kind == "backend"
                     for i, (call, t) in enumerate(s.kernels(batch))}
            timings = timed_point(f"kernels, batch {batch}", {key: t for key, (_, _, t) in calls.items()})
            kernels += [{"subject": s.name, "device": s.device, "batch": batch, "kernel": call.kernel,
                         "role": call.role, "layer": call.layer, "shape": list(call.shape), "flops": call.flops,
                         "timing": timings[key].summary_ms()} for key, (s, call, _) in calls.items()]
    progress.close()
    return {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "workload": {"preset": plan.preset, "sizes": list(plan.sizes), "activation": ACTIVATION, "loss": LOSS,
                     "optimizer": "sgd", "learning_rate": LEARNING_RATE, "dtype": plan.dtype,
                     "batches": list(effort.batches), "flops_formula": FLOPS_FORMULA},
        "settings": {"quick": plan.quick, "rounds": effort.rounds, "min_rounds": effort.min_rounds,
                     "max_time_s": effort.max_time_s},
        "machine": machine,
        "subjects": [{"name": s.name, "kind": s.kind, "device": s.device, "compile_s": compile_s[s.name],
                      "describe": s.describe()} for s in subjects],
        "not_run": [{"name": name, "reason": why} for name, why in plan.not_run.items()],
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


# ---- output -----------------------------------------------------------------------------------------


def format_table(headers, rows, left=1) -> str:
    """Columns padded to their widest cell; the first ``left`` columns left-aligned, the others right-aligned."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    lines = []
    for cells in [headers, *rows]:
        lines.append("  ".join(str(c).ljust(w) if i < left else str(c).rjust(w)
                               for i, (c, w) in enumerate(zip(cells, widths))).rstrip())
    return "\n".join(lines)


def _ms(value: float) -> str:
    return f"{value:.3g}" if value < 1 else f"{value:,.1f}" if value < 1000 else f"{value:,.0f}"


def render(report: dict) -> str:
    """The report as text: the header, the step table, the kernel table (with --kernels) and the footnotes."""
    w, m = report["workload"], report["machine"]
    net = f"{w['preset']} " if w["preset"] else ""
    blas = "; ".join(f"{b['name']} {b['version']} ({b['threads']} threads)" for b in m["blas"])
    gpus = "; ".join(f"{g['name']} (driver {g['driver']})" for g in m["gpus"]) or "no GPU"
    lines = [
        f"deltaprop bench: {net}{'-'.join(map(str, w['sizes']))} {w['activation']}, softmax cross-entropy, SGD, {w['dtype']}",
        f"machine: {m['cpu']}, {m['cores']} cores, BLAS {blas}, {gpus}"
        + (f", load average {m['load_average'][0]:.1f} at the start" if m["load_average"] else ""),
    ]
    for device in dict.fromkeys(p["device"] for p in report["peaks"]):
        rows = [p for p in report["peaks"] if p["device"] == device]
        lines.append(f"GEMM peak, {device} ({rows[0]['backend']}, {rows[0]['dtype']} {rows[0]['n']}^3, in each batch's rounds): "
                     + ", ".join(f"{p['gflops']:,.1f} at batch {p['batch']}" for p in rows) + " GFLOP/s")
    compiled = [f"{s['name']} {s['compile_s']:.2f} s" for s in report["subjects"] if s["compile_s"] is not None]
    lines.append("compile (warmup(), not in any time below): " + ", ".join(compiled))
    if report["not_run"]:
        lines.append("not run here: " + "; ".join(f"{n['name']} ({n['reason']})" for n in report["not_run"]))
    headers = ["backend", "device", "batch", "ms/step", "IQR ms", "samples/s", "GFLOP/s", "% peak",
               "vs peer", "1st step ms"]
    rows = []
    for s in sorted(report["steps"], key=lambda r: (r["batch"], r["kind"] != "backend")):
        t = s["timing"]
        rows.append([s["subject"], s["device"], s["batch"], _ms(t["median_ms"]), f"{_ms(t['q1_ms'])}-{_ms(t['q3_ms'])}",
                     f"{s['samples_per_s']:,.0f}", f"{s['gflops']:,.1f}",
                     "" if s["peak_fraction"] is None else f"{100 * s['peak_fraction']:.0f}%",
                     "" if s["vs_fastest_peer"] is None else f"{s['vs_fastest_peer']:.2f}x",
                     _ms(s["first_step_ms"])])
    lines += ["", format_table(headers, rows, left=2)]
    if report["kernels"]:
        lines += ["", render_kernels(report)]
    sizes = w["sizes"]
    fewest, most = (f(s["timing"]["rounds"] for s in report["steps"]) for f in (min, max))
    lines += [
        "",
        f"ms/step: median of {fewest if fewest == most else f'{fewest}-{most}'} interleaved rounds (each sample the mean of several steps);"
        " IQR: its 25th-75th percentiles.",
        f"GFLOP/s: the FLOPs a step needs, 2*B*(3*sum(n_l*n_(l-1)) - n_0*n_1) = B * {step_flops(sizes, 1):,};"
        " the input gets no gradient, so the first layer has no input-gradient GEMM; elementwise work is not counted.",
        "% peak: GFLOP/s over the GEMM peak measured in the same rounds on the same device.",
        "vs peer: the fastest peer's (torch, jax) median on the same device divided by this median (above 1x: faster).",
        "1st step: the first step at this batch size (allocation, JAX's jit compile), apart from ms/step.",
    ]
    return "\n".join(lines)


def render_kernels(report: dict) -> str:
    """Per backend and batch, each kernel's summed median over its calls in a step, and its share of the step."""
    step_ms = {(s["subject"], s["batch"]): s["timing"]["median_ms"] for s in report["steps"]}
    groups = {}
    for k in report["kernels"]:
        key = (k["subject"], k["batch"], k["kernel"], k["role"])
        calls, ms, flops = groups.get(key, (0, 0.0, 0))
        groups[key] = (calls + 1, ms + k["timing"]["median_ms"], flops + (k["flops"] or 0))
    rows = [[name, batch, kernel, role, calls, _ms(ms), f"{flops / ms / 1e6:,.1f}" if flops else "",
             f"{100 * ms / step_ms[name, batch]:.0f}%"]
            for (name, batch, kernel, role), (calls, ms, flops) in groups.items()]
    for name, batch in step_ms:
        total = sum(ms for (n, b, _, _), (_, ms, _) in groups.items() if (n, b) == (name, batch))
        if total:
            rows.append([name, batch, "all kernels", "", "", _ms(total), "", f"{100 * total / step_ms[name, batch]:.0f}%"])
    rows.sort(key=lambda r: (r[0], r[1]))
    headers = ["backend", "batch", "kernel", "role", "calls", "ms", "GFLOP/s", "% of step"]
    return "each kernel alone (median ms summed over its calls in one step):\n" + format_table(headers, rows, left=4)


def _write_atomically(path: str, write) -> None:
    """``write(tmp_path)``, then the file renamed into place: never a half-written ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".deltaprop-bench-", suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_json(report: dict, path: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(report, f, indent=1, allow_nan=False)
            f.write("\n")

    _write_atomically(path, write)


def plot(report: dict, path: str) -> None:
    """samples/s against batch size, log axes, one line per backend (solid) and peer (dashed); a PNG at ``path``."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    for subject in report["subjects"]:
        rows = sorted((s for s in report["steps"] if s["subject"] == subject["name"]), key=lambda r: r["batch"])
        ax.plot([r["batch"] for r in rows], [r["samples_per_s"] for r in rows], marker="o",
                linestyle="-" if subject["kind"] == "backend" else "--", label=f"{subject['name']} ({subject['device']})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(report["workload"]["batches"], labels=[str(b) for b in report["workload"]["batches"]])
    ax.minorticks_off()
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("samples / s (training step)")
    w, m = report["workload"], report["machine"]
    gpus = ", ".join(g["name"] for g in m["gpus"])
    ax.set_title(f"{'-'.join(map(str, w['sizes']))} {w['activation']}, {w['dtype']}: {m['cpu']}, {m['cores']} cores"
                 + (f", {gpus}" if gpus else ""), fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    _write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def run(args) -> int:
    try:
        plan = Plan.from_args(args)
    except ValueError as e:
        print(f"deltaprop bench: {e}", file=sys.stderr)
        return 2
    report = measure(plan)
    print(render(report))
    if args.json:
        write_json(report, args.json)
    if args.plot:
        plot(report, args.plot)
    return 0
