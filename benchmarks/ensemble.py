"""`deltaprop bench --ensemble`: one SGD step of K networks, interleaved in one run, on

    ensemble     MLPEnsemble.train_step on one of our backends (K stacked networks, one call)
    loop         K deltaprop MLPs, train_step on each
    torch-loop   K torch models, each with its own torch.optim.SGD (peers.TorchPeer)
    torch-vmap   torch.func.vmap of grad over functional_call on the stacked state, one SGD update
    jax-vmap     jax.vmap of the jitted step of peers.JaxPeer over stacked parameters

and a square GEMM of the device (``bench.peak_timed``), timed in every round, for the fraction of the
peak. The workload is ``workload.py``'s (ReLU, softmax cross-entropy, SGD at LEARNING_RATE) and every
member sees the same batch. Timing, tables and JSON reuse timing.py and report.py.
"""

from __future__ import annotations

import datetime
import importlib.util
from dataclasses import dataclass
from functools import partial

from deltaprop.benchmarks.bench import EFFORTS, clock_for, peak_timed
from deltaprop.benchmarks.machine import describe_machine
from deltaprop.benchmarks.peers import JaxPeer, TorchPeer
from deltaprop.benchmarks.report import format_table
from deltaprop.benchmarks.timing import HostClock, Timed, interleave
from deltaprop.benchmarks.workload import ACTIVATION, LEARNING_RATE, LOSS, SEED, host_batch, step_flops

SCHEMA = "deltaprop-bench-ensemble/1"
SUBJECTS = ("ensemble", "loop", "torch-loop", "torch-vmap", "jax-vmap")
# (sizes, members, batch): the sweep
CASES = tuple([((64, 128, 128, 10), k, b) for b in (32, 256) for k in (1, 8, 64, 512)]
              + [((784, 1024, 1024, 10), 8, 256)])
QUICK_CASES = (((64, 128, 128, 10), 8, 32), ((64, 128, 128, 10), 64, 32))


@dataclass(frozen=True)
class Case:
    sizes: tuple
    members: int
    batch: int

    @property
    def label(self) -> str:
        return f"{'-'.join(map(str, self.sizes))} K={self.members} batch {self.batch}"


def our_steps(backend, case, dtype):
    """(ensemble step, loop-of-MLPs step) as Timed, on ``backend``."""
    from deltaprop.model import MLP, MLPEnsemble

    x, y = (backend.asarray(a) for a in host_batch(case.sizes, case.batch, dtype))
    ensemble = MLPEnsemble(case.members, case.sizes, ACTIVATION, LOSS, backend, dtype, seed=SEED)
    nets = [MLP(case.sizes, ACTIVATION, LOSS, backend, dtype, seed=SEED + k) for k in range(case.members)]

    def loop():
        for net in nets:
            net.train_step(x, y, LEARNING_RATE)

    clock = clock_for(backend)
    return Timed(partial(ensemble.train_step, x, y, LEARNING_RATE), clock), Timed(loop, clock)


def _torch_loop(case, dtype, threads):
    steps = [TorchPeer("torch", "cpu", case.sizes, dtype, threads).step(case.batch) for _ in range(case.members)]

    def loop():
        for step in steps:
            step.fn()

    return Timed(loop, steps[0].clock)


def _torch_vmap(case, dtype, threads):
    """vmap(grad) over the stacked state of K TorchPeer models, then p -= lr * g on each stacked tensor."""
    import torch
    from torch.func import functional_call, grad, stack_module_state, vmap

    peers = [TorchPeer("torch", "cpu", case.sizes, dtype, threads) for _ in range(case.members)]
    params, buffers = stack_module_state([p.model for p in peers])
    base = peers[0].model

    def loss_of(p, b, x, y):
        return torch.nn.functional.cross_entropy(functional_call(base, (p, b), (x,)), y)

    grads_of = vmap(grad(loss_of), in_dims=(0, 0, None, None))
    x, y = (torch.from_numpy(a) for a in host_batch(case.sizes, case.batch, dtype))
    names = list(params)

    def step():
        grads = grads_of(params, buffers, x, y)
        with torch.no_grad():
            torch._foreach_add_([params[n] for n in names], [grads[n] for n in names], alpha=-LEARNING_RATE)

    return Timed(step, peers[0].clock)


def _jax_vmap(case, dtype, threads):
    """jax.jit(jax.vmap(JaxPeer's step)) over K stacked parameter sets, parameters donated."""
    import jax
    import jax.numpy as jnp

    peer = JaxPeer("jax", "cpu", case.sizes, dtype, threads)
    stacked = jax.tree.map(lambda p: jnp.stack([p] * case.members), peer.params)
    jitted = jax.jit(jax.vmap(JaxPeer._train_step, in_axes=(0, None, None)), donate_argnums=(0,))
    x, y = jax.device_put(host_batch(case.sizes, case.batch, dtype), peer.jax_device)
    state = {"params": stacked, "loss": None}

    def step():
        state["params"], state["loss"] = jitted(state["params"], x, y)

    return Timed(step, HostClock(lambda: jax.block_until_ready(state["params"])))


PEER_MAKERS = {"torch-loop": ("torch", _torch_loop), "torch-vmap": ("torch", _torch_vmap),
               "jax-vmap": ("jax", _jax_vmap)}


def available_subjects() -> tuple[list[str], dict[str, str]]:
    """(subjects that run here, {subject: why not})."""
    missing = {name: f"{module} is not installed" for name, (module, _) in PEER_MAKERS.items()
               if importlib.util.find_spec(module) is None}
    return [s for s in SUBJECTS if s not in missing], missing


def measure(backend, cases, dtype="float32", quick=False, progress=None, peers=True) -> dict:
    """Times every subject (ours only when ``peers`` is False) on every case, interleaved per case, with
    the GEMM peak of ``backend``'s device; returns the report (the JSON of ``--json``). progress(label)
    is called before each case."""
    effort = EFFORTS["quick" if quick else "full"]
    machine = describe_machine()
    subjects, not_run = available_subjects()
    if not peers:
        subjects, not_run = subjects[:2], {name: "not asked for" for name in PEER_MAKERS}
    peak_n = effort.peak_sizes[backend.device]
    rows = []
    for sizes, members, batch in cases:
        case = Case(tuple(sizes), members, batch)
        if progress is not None:
            progress(case.label)
        timeds = dict(zip(("ensemble", "loop"), our_steps(backend, case, dtype)))
        for name in subjects[2:]:
            timeds[name] = PEER_MAKERS[name][1](case, dtype, machine["threads"])
        timeds["peak"] = peak_timed(backend, peak_n, dtype)
        timings = interleave(timeds, rounds=effort.rounds, min_rounds=effort.min_rounds, max_time_s=effort.max_time_s)
        flops = members * step_flops(case.sizes, batch)
        peak_gflops = 2 * peak_n**3 / timings["peak"].median / 1e9
        for name in timeds:
            if name == "peak":
                continue
            median_s = timings[name].median
            rows.append({"subject": name, "sizes": list(case.sizes), "members": members, "batch": batch,
                         "flops": flops, "per_member_us": median_s / members * 1e6,
                         "peak_gflops": peak_gflops, "peak_fraction": flops / median_s / 1e9 / peak_gflops,
                         "timing": timings[name].summary_ms()})
    return {"schema": SCHEMA, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "workload": {"activation": ACTIVATION, "loss": LOSS, "optimizer": "sgd", "learning_rate": LEARNING_RATE,
                         "dtype": dtype, "backend": backend.name, "peak_n": peak_n},
            "settings": {"quick": quick, "rounds": effort.rounds, "max_time_s": effort.max_time_s},
            "machine": machine, "not_run": [{"name": n, "reason": why} for n, why in not_run.items()],
            "steps": rows}


def _cases(report):
    return list(dict.fromkeys((tuple(r["sizes"]), r["members"], r["batch"]) for r in report["steps"]))


def render(report: dict) -> str:
    """One row per case: each subject's median ms per step, the ensemble's speed-ups over the loop and
    over the faster vmap peer, and its fraction of the GEMM peak measured in the same rounds."""
    by = {(tuple(r["sizes"]), r["members"], r["batch"], r["subject"]): r for r in report["steps"]}
    names = list(dict.fromkeys(r["subject"] for r in report["steps"]))
    rows = []
    for sizes, members, batch in _cases(report):
        ms = {n: by[sizes, members, batch, n]["timing"]["median_ms"] for n in names}
        vmaps = [ms[n] for n in ("torch-vmap", "jax-vmap") if n in ms]
        ours = by[sizes, members, batch, "ensemble"]
        rows.append(["-".join(map(str, sizes)), members, batch, *(f"{ms[n]:.3g}" for n in names),
                     f"{ms['loop'] / ms['ensemble']:.2f}x", f"{min(vmaps) / ms['ensemble']:.2f}x" if vmaps else "-",
                     f"{100 * ours['peak_fraction']:.0f}%"])
    headers = ["sizes", "K", "batch", *(f"{n} ms" for n in names), "vs loop", "vs vmap", "% peak"]
    w = report["workload"]
    lines = [f"deltaprop bench --ensemble: {w['backend']}, {w['dtype']}, SGD; median ms per step of all K members",
             format_table(headers, rows, left=1)]
    lines += [f"not run: {n['name']} ({n['reason']})" for n in report["not_run"]]
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    """Step time per member against K, log axes, one line per subject and (sizes, batch); a PNG at ``path``."""
    from matplotlib.figure import Figure

    from deltaprop.atomic import write_atomic

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    series = {}
    for r in report["steps"]:
        key = (r["subject"], "-".join(map(str, r["sizes"])), r["batch"])
        series.setdefault(key, []).append((r["members"], r["per_member_us"]))
    for (subject, sizes, batch), points in series.items():
        points.sort()
        ax.plot(*zip(*points), marker="o", linestyle="-" if subject in ("ensemble", "loop") else "--",
                label=f"{subject} {sizes} b{batch}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("members K")
    ax.set_ylabel("µs per member per step")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6)
    write_atomic(path, lambda file: fig.savefig(file, format="png", dpi=120), argument="--plot")
