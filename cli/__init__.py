"""The `deltaprop` command: one subcommand per module of this package, imported only when chosen.

    deltaprop bench    time a training step and each kernel on every backend and peer (the main job)
    deltaprop check    every kernel and a whole step on each usable backend against the reference
    deltaprop info     version, backends usable here (and why the others are not), BLAS and threads
    deltaprop train    train an MLP on a dataset and report its test accuracy
    deltaprop cache    where compiled kernels are cached and what is there; --clear empties it
    deltaprop warmup   compile kernels ahead of time into the cache (for container images)

Each module has ``add_arguments(parser)`` and ``run(args) -> exit status``; a new subcommand is a module
and one row of SUBCOMMANDS. Modules parse, call the model and the backends, and print; no math here.

Exit status: 0 done, 1 the work ran and failed (a check that failed, a fit that diverged), 2 a user
error (a bad flag, value, file or environment), always as one line "deltaprop COMMAND: error: ..." on
stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from deltaprop import __version__
from deltaprop.errors import BackendUnavailableError, CheckpointError

# subcommand -> one-line help; the module is deltaprop.cli.<subcommand>
SUBCOMMANDS = {
    "bench": "time a training step and each kernel on every backend and peer",
    "check": "every kernel and a training step on each usable backend against the reference",
    "info": "version, usable backends and why the others are not, BLAS and threads",
    "train": "train an MLP on a dataset and report its test accuracy",
    "cache": "where compiled kernels are cached, what is there; --clear empties it",
    "warmup": "compile kernels ahead of time into the cache (for container images)",
}

TOP_LEVEL_FLAGS = ("-h", "--help", "--version")  # the only flags that come before a COMMAND

# the errors that mean the user asked for something this machine or these files cannot give: exit 2
USER_ERRORS = (BackendUnavailableError, CheckpointError)


class UsageError(Exception):
    """A user error found by a command after parsing (a value out of range, a missing file or package);
    the message is the one line to print."""


def backend_for(flag: str, name: str):
    """The backend called ``name``, given on the command line as ``flag``; a UsageError naming the flag
    (not the library's argument name) for an unknown name or one that cannot run here."""
    from deltaprop.backend import get_backend

    try:
        return get_backend(name)
    except (BackendUnavailableError, ValueError) as e:
        message = str(e)
        raise UsageError(f"{flag}: {message.removeprefix('backend: ')}") from None


class OneLineErrorParser(argparse.ArgumentParser):
    """A bad flag gets one line, "deltaprop COMMAND: error: ...", and exit status 2 (argparse's default
    prints the whole usage first). Subcommand parsers are of this class too."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def output_file(path: str) -> str:
    """An argparse type for a file the command will write: refused before any work when its folder is
    missing or not writable, or when it names a folder."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"expected a file name, got the folder {path!r}")
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"expected a file in an existing folder, got {path!r} "
                                         f"({folder} does not exist)")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"expected a file in a writable folder, got {path!r} "
                                         f"({folder} is not writable)")
    return path


def positive_ints(text: str) -> tuple[int, ...]:
    """An argparse type for comma-separated positive integers ("1,32,256")."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers like 1,32, got {text!r}")
    return values


def build_parser(argv) -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="deltaprop", description="Backpropagation kernels for MLPs on GPUs and CPUs: "
                                "time them, check them against the reference, train a network.")
    parser.add_argument("--version", action="version", version=f"deltaprop {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((a for a in argv if a in SUBCOMMANDS), None)
    for name, help_text in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == chosen:  # only the chosen subcommand's module is imported
            module = importlib.import_module(f"deltaprop.cli.{name}")
            module.add_arguments(sub)
            sub.set_defaults(module=module, parser=sub)
    return parser


def main(argv=None) -> int:
    """Runs ``deltaprop ARGV`` and returns its exit status (bad flags raise SystemExit(2), as argparse does)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    if argv and argv[0].startswith("-") and argv[0] not in TOP_LEVEL_FLAGS:  # argparse would say "COMMAND is required"
        parser.error(f"unrecognized arguments: {argv[0]} (expected a COMMAND first: {', '.join(SUBCOMMANDS)})")
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said by the subcommand's parser, which names the subcommand
        args.parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.module.run(args)
    except (UsageError, *USER_ERRORS) as e:
        print(f"deltaprop {args.command}: error: {e}", file=sys.stderr)
        return 2
