"""`deltaprop warmup`: compile kernels ahead of time into the kernel cache (a container image, a cluster
node), so that no later run compiles.

    deltaprop warmup                                   relu, softmax cross-entropy, float32: what MLP's defaults run
    deltaprop warmup --activation relu,tanh --loss all --dtype all
    deltaprop warmup --for train_step --batch 32       only what MLP.train_step runs at batch 32

``CompileProgress`` is the progress line every command shows while it compiles.
"""

from __future__ import annotations

import argparse
import sys
import time

from deltaprop.backend.checks import WARMUP_USES
from deltaprop.cli import backend_for, positive_ints
from deltaprop.kernels.activations import ACTIVATIONS
from deltaprop.model.losses import LOSSES


class CompileProgress:
    """``Backend.warmup``'s ``progress`` on stderr: "compiling CPU kernels (first run only): 3/7 sgd_step ..."
    for each part that compiles (nothing for parts loaded from the cache), rewritten in place on a
    terminal; ``close`` ends it with the time spent. A context manager."""

    def __init__(self, backend, stream=None):
        self.stream = sys.stderr if stream is None else stream
        self.kind = "CUDA" if backend.device == "cuda" else "CPU"
        self.compiled, self.started = 0, time.perf_counter()
        self.in_place = self.stream.isatty()

    def __call__(self, done, total, what):
        self.compiled += 1
        line = f"compiling {self.kind} kernels (first run only): {done + 1}/{total} {what}"
        self.stream.write(f"\r\033[K{line}" if self.in_place else f"{line}\n")
        self.stream.flush()

    def close(self):
        if self.compiled:
            done = f"compiled {self.compiled} in {time.perf_counter() - self.started:.1f} s"
            self.stream.write(f", {done}\n" if self.in_place else f"{done}\n")
            self.stream.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _choices(known):
    """The type of a flag taking comma-separated names of ``known`` (or "all")."""

    def parse(text):
        names = [name.strip() for name in text.split(",") if name.strip()]
        if names == ["all"]:
            return list(known)
        unknown = [name for name in names if name not in known]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"expected comma-separated names among {', '.join(known)} (or all), "
                                             f"got {text!r}")
        return names

    parse.__name__ = "names"  # argparse's message: "invalid names value"
    return parse


def add_arguments(parser) -> None:
    parser.add_argument("--backend", default="numba", help="the backend whose kernels to compile (default: numba)")
    parser.add_argument("--dtype", type=_choices(("float32", "float64")), default=["float32"],
                        metavar="NAME,...", help="float32, float64 or all (default: float32)")
    parser.add_argument("--activation", type=_choices(sorted(ACTIVATIONS)), default=["relu"],
                        metavar="NAME,...", help=f"hidden-layer activations among {', '.join(sorted(ACTIVATIONS))}, "
                                                 "or all (default: relu)")
    parser.add_argument("--loss", type=_choices(sorted(LOSSES)), default=["softmax_cross_entropy"],
                        metavar="NAME,...", help=f"losses among {', '.join(sorted(LOSSES))}, or all "
                                                 "(default: softmax_cross_entropy)")
    parser.add_argument("--batch", type=positive_ints, metavar="B,...",
                        help="batch sizes to be ready for (default: every size)")
    parser.add_argument("--for", dest="uses", type=_choices(WARMUP_USES), metavar="USE,...",
                        help=f"what will run, among {', '.join(WARMUP_USES)} (default: all)")


def run(args) -> int:
    from deltaprop.model.losses import get_loss

    backend = backend_for("--backend", args.backend)
    with CompileProgress(backend) as progress:
        seconds = backend.warmup(args.dtype, args.activation, [get_loss(name).kernel for name in args.loss],
                                 args.batch, args.uses, progress=progress)
    compiled = progress.compiled
    print(f"ready in {seconds:.1f} s: " + (f"{compiled} part{'s' * (compiled != 1)} compiled, any others loaded from the cache" if compiled
                                          else "nothing needed compiling"))
    if backend.device == "cpu":
        from deltaprop.cli.cache import summary
        from deltaprop.kernels import cache

        print(f"kernel cache: {summary(cache.describe())}")
    return 0
