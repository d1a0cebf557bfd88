"""`deltaprop bench`: one training step of an MLP on every usable backend and on the peers (PyTorch, JAX),
interleaved in one process; a table, and with flags a JSON report and a plot.

    deltaprop bench                                  the mlp preset, batches 1,32,256,2048, all that runs here
    deltaprop bench --quick                          a run under 20 s
    deltaprop bench --preset small --dtype float64 --backends numpy,torch --kernels --json r.json --plot r.png

Measuring is deltaprop.benchmarks.bench, the table, JSON and plot deltaprop.benchmarks.report; this
module parses, shows progress and prints.
"""

from __future__ import annotations

# first: bench sets OpenBLAS's thread timeout before anything loads NumPy
from deltaprop.benchmarks import bench  # isort: skip

import argparse
import importlib.util
import sys
import time
from dataclasses import replace

from deltaprop.benchmarks import report
from deltaprop.benchmarks.peers import PEERS
from deltaprop.benchmarks.workload import PRESETS
from deltaprop.cli import UsageError, output_file, positive_ints
from deltaprop.cli.warmup import CompileProgress


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    workload = parser.add_mutually_exclusive_group()
    workload.add_argument("--preset", choices=sorted(PRESETS), default="mlp",
                          help="network widths: " + "; ".join(f"{k} {'-'.join(map(str, v))}" for k, v in PRESETS.items())
                          + " (ReLU; default mlp)")
    workload.add_argument("--sizes", type=positive_ints, metavar="N0,N1,...",
                          help="layer widths of a ReLU network instead of a preset, input first")
    parser.add_argument("--batch", type=positive_ints, metavar="B,...",
                        help="batch sizes (default 1,32,256,2048; --quick 1,32,256)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--backends", type=_names, metavar="NAME,...",
                        help=f"our backends and peers ({', '.join(PEERS)}); default: every one usable here")
    parser.add_argument("--repeat", type=int, metavar="N", help="rounds per point, at most (default 30; --quick 5)")
    parser.add_argument("--max-time", type=float, metavar="S",
                        help="seconds per point after which rounds stop (default 8; --quick 0.5)")
    parser.add_argument("--kernels", action="store_true", help="also time each kernel of a step alone")
    parser.add_argument("--json", type=output_file, metavar="FILE", help="write every figure and the machine to FILE")
    parser.add_argument("--plot", type=output_file, metavar="FILE.png",
                        help="draw samples/s against batch size (needs matplotlib)")
    parser.add_argument("--quick", action="store_true", help="fewer batches and rounds: under 20 s")
    parser.add_argument("--ensemble", action="store_true",
                        help="K networks in one pass (MLPEnsemble) against a loop of K MLPs, a loop of K torch "
                             "models, torch.func.vmap and jax.vmap, K = 1..512 (--quick: K = 8, 64)")


def spec_from_args(args) -> bench.BenchSpec:
    """What the parsed arguments ask to measure; a UsageError says which argument is wrong and why."""
    effort = bench.EFFORTS["quick" if args.quick else "full"]
    if args.batch:
        effort = replace(effort, batches=tuple(dict.fromkeys(args.batch)))
    if args.repeat is not None:
        if args.repeat < 1:
            raise UsageError(f"--repeat: expected a positive number of rounds, got {args.repeat}")
        effort = replace(effort, rounds=args.repeat, min_rounds=min(effort.min_rounds, args.repeat))
    if args.max_time is not None:
        if not args.max_time > 0:
            raise UsageError(f"--max-time: expected a positive number of seconds, got {args.max_time}")
        effort = replace(effort, max_time_s=args.max_time)
    if args.sizes is not None and len(args.sizes) < 2:
        raise UsageError(f"--sizes: expected at least two widths like 784,512,10, got {list(args.sizes)}")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot needs matplotlib, which is not installed: pip install 'deltaprop[plot]'")
    try:
        subjects, not_run = bench.choose_subjects(args.backends)
    except ValueError as e:
        raise UsageError(str(e)) from None
    preset = None if args.sizes else args.preset
    return bench.BenchSpec(preset, tuple(args.sizes or PRESETS[preset]), args.dtype, subjects, not_run, effort,
                           args.kernels, args.quick)


class Progress:
    """One unit per timed point: a tqdm bar on stderr when it is a terminal, else one plain line per point."""

    def __init__(self, total: int):
        self.stream = sys.stderr
        self.total, self.done = total, 0
        self.bar = None
        if self.stream.isatty():
            from tqdm.auto import tqdm

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


def run(args) -> int:
    if args.ensemble:
        return run_ensemble(args)
    spec = spec_from_args(args)
    progress = Progress(spec.points)
    try:
        result = bench.measure(spec, progress, CompileProgress)
    finally:
        progress.close()
    print(report.render(result))
    _write_reports(args, result, report.plot)
    return 0


def _write_reports(args, result, plot) -> None:
    """The JSON report (--json) and the picture that ``plot`` draws (--plot), where they were asked for."""
    if args.json:
        report.write_json(result, args.json)
    if args.plot:
        plot(result, args.plot)


def run_ensemble(args) -> int:
    """``--ensemble``: the sweep of benchmarks/ensemble.py on the one backend of --backends (default numba)."""
    from deltaprop.backend import get_backend
    from deltaprop.benchmarks import ensemble

    names = args.backends or ("numba",)
    if len(names) != 1:
        raise UsageError(f"--ensemble: expected one of our backends in --backends, got {','.join(names)}")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot needs matplotlib, which is not installed: pip install 'deltaprop[plot]'")
    try:
        backend = get_backend(names[0])
    except Exception as e:  # an unknown or unusable backend: the registry's message
        raise UsageError(f"--backends: {e}") from None
    cases = ensemble.QUICK_CASES if args.quick else ensemble.CASES
    result = ensemble.measure(backend, cases, args.dtype, args.quick,
                              progress=lambda label: print(f"deltaprop bench --ensemble: {label}", file=sys.stderr,
                                                           flush=True))
    print(ensemble.render(result))
    _write_reports(args, result, ensemble.plot)
    return 0
