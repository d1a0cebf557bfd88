"""The `deltaprop` command: one subcommand per module of this package, imported only when chosen.

    deltaprop bench    time a training step and each kernel on every backend and peer (the main job)
    deltaprop check    every kernel and a whole step on each usable backend against the reference
    deltaprop info     version, backends usable here (and why the others are not), BLAS and threads
    deltaprop train    train an MLP on a dataset and report its test accuracy

Each module has ``add_arguments(parser)`` and ``run(args) -> exit status``. Bad flags exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from deltaprop import __version__

# subcommand -> (module of deltaprop.benchmarks, or a full module path; one-line help)
SUBCOMMANDS = {
    "bench": ("bench", "time a training step and each kernel on every backend and peer"),
    "check": ("check", "every kernel and a training step on each usable backend against the reference"),
    "info": ("info", "version, usable backends and why the others are not, BLAS and threads"),
    "train": ("train", "train an MLP on a dataset and report its test accuracy"),
    "cache": ("deltaprop.cli.cache", "where compiled kernels are cached, what is there; --clear empties it"),
    "warmup": ("deltaprop.cli.warmup", "compile kernels ahead of time into the cache (for container images)"),
}


class OneLineErrorParser(argparse.ArgumentParser):
    """A bad flag gets one line, "deltaprop COMMAND: error: ...", and exit status 2 (argparse's default
    prints the whole usage first). Subcommand parsers are of this class too."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(argv) -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="deltaprop", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"deltaprop {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((a for a in argv if a in SUBCOMMANDS), None)
    for name, (module, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == chosen:  # only the chosen subcommand's module is imported
            path = module if "." in module else f"deltaprop.benchmarks.{module}"
            sub.set_defaults(module=importlib.import_module(path))
            sub.get_default("module").add_arguments(sub)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    return args.module.run(args)


if __name__ == "__main__":
    sys.exit(main())
