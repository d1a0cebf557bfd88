"""The `deltaprop` command's manners: every subcommand answers a user error with one line on stderr and
exit status 2 (a check that ran and failed is 1), before any work starts; `python -m deltaprop` is
`deltaprop`."""

import importlib.util
import os
import subprocess
import sys

import pytest

from deltaprop.cli import SUBCOMMANDS, main


def run_deltaprop(*argv, env=None):
    """``python -m deltaprop ARGV`` in a fresh process: (exit status, stdout, stderr)."""
    result = subprocess.run([sys.executable, "-m", "deltaprop", *argv], capture_output=True, text=True,
                            env={**os.environ, **(env or {})}, timeout=120)
    return result.returncode, result.stdout, result.stderr


def status_of(argv):
    """main(argv)'s exit status, whether it returns it or argparse exits with it."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def assert_one_line_error(capsys, status, command, message):
    captured = capsys.readouterr()
    assert status == 2, captured
    assert captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith(f"deltaprop {command}: error: "), captured.err
    assert message in captured.err


def test_python_m_deltaprop_is_the_command():
    status, out, err = run_deltaprop("--help")
    assert status == 0 and err == ""
    for name in SUBCOMMANDS:
        assert name in out
    status, out, _ = run_deltaprop("--version")
    from deltaprop import __version__

    assert (status, out) == (0, f"deltaprop {__version__}\n")


# what a subcommand needs besides the flag under test
REQUIRED = {"train": ["--dataset", "digits"]}


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_an_unknown_flag_is_one_line_and_status_2_from_the_shell(command):
    status, out, err = run_deltaprop(command, *REQUIRED.get(command, []), "--no-such-flag")
    assert (status, out) == (2, "")
    assert err == f"deltaprop {command}: error: unrecognized arguments: --no-such-flag (see deltaprop {command} --help)\n"


@pytest.mark.parametrize("argv", [["--no-such-flag"], ["--no-such-flag", "bench"]])
def test_an_unknown_flag_before_the_command_is_named_with_the_commands(argv):
    status, out, err = run_deltaprop(*argv)
    assert (status, out) == (2, "")
    assert err == ("deltaprop: error: unrecognized arguments: --no-such-flag (expected a COMMAND first: "
                   f"{', '.join(SUBCOMMANDS)}) (see deltaprop --help)\n")


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_every_subcommand_has_help(command):
    status, out, err = run_deltaprop(command, "--help")
    assert (status, err) == (0, "")
    assert out.startswith(f"usage: deltaprop {command}")


BAD_VALUES = {
    "bench repeat": (["bench", "--repeat", "zero"], "argument --repeat: invalid int value: 'zero'"),
    "bench batch": (["bench", "--batch", "0,1"], "argument --batch: expected comma-separated positive integers"),
    "bench dtype": (["bench", "--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),
    "check seed": (["check", "--seed", "x"], "argument --seed: invalid int value: 'x'"),
    "train epochs": (["train", "--dataset", "digits", "--epochs", "-3"], "argument --epochs: expected a positive integer"),
    # a backend name is refused naming the flag, once: "--backend: expected", never "--backend: backend: ..."
    "check backend": (["check", "--backends", "tpu"], "error: --backends: expected 'auto' or one of"),
    "train backend": (["train", "--dataset", "digits", "--backend", "tpu"], "error: --backend: expected 'auto' or one of"),
    "warmup backend": (["warmup", "--backend", "tpu"], "error: --backend: expected 'auto' or one of"),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_a_bad_value_is_one_line_and_status_2(capsys, case):
    argv, message = BAD_VALUES[case]
    assert_one_line_error(capsys, status_of(argv), argv[0], message)


# ---- output paths: refused before the work starts ----------------------------------------------------


@pytest.fixture
def no_work(monkeypatch):
    """Makes measuring or training fail loudly, so that a test passing proves the refusal came first."""
    from deltaprop.benchmarks import bench
    from deltaprop.model import MLP

    def refuse(*args, **kwargs):
        raise AssertionError("the work started before the output path was checked")

    monkeypatch.setattr(bench, "measure", refuse)
    monkeypatch.setattr(MLP, "fit", refuse)


def output_path_cases(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    return {
        "missing folder": (str(tmp_path / "no" / "such" / "out"), "(" + str(tmp_path / "no" / "such") + " does not exist)"),
        "a folder": (str(tmp_path), f"expected a file name, got the folder '{tmp_path}'"),
        "unwritable folder": (str(locked / "out"), f"({locked} is not writable)"),
    }


@pytest.mark.parametrize("flag", [["bench", "--json"], ["bench", "--plot"], ["train", "--dataset", "digits", "--save"]])
@pytest.mark.parametrize("case", ["missing folder", "a folder", "unwritable folder"])
def test_an_output_path_is_checked_before_the_work(tmp_path, capsys, no_work, flag, case):
    if case == "unwritable folder" and os.geteuid() == 0:
        pytest.skip("root writes into any folder")
    path, message = output_path_cases(tmp_path)[case]
    status = status_of([*flag, path])
    captured = capsys.readouterr()
    assert status == 2 and captured.out == ""
    assert captured.err.startswith(f"deltaprop {flag[0]}: error: argument {flag[-1]}: "), captured.err
    assert message in captured.err and captured.err.count("\n") == 1, captured.err


# ---- the environment and missing packages -----------------------------------------------------------


def test_a_bogus_backend_variable_names_itself_and_the_valid_values():
    status, out, err = run_deltaprop("info", env={"DELTAPROP_BACKEND": "bogus"})
    assert (status, out) == (2, "")
    assert err == ("deltaprop info: error: environment variable DELTAPROP_BACKEND: expected 'auto' or one of "
                   "['cupy', 'numba', 'numpy'], got 'bogus'\n")


def test_the_backend_variable_is_checked_where_auto_is_resolved(monkeypatch):
    from deltaprop.backend import get_backend

    monkeypatch.setenv("DELTAPROP_BACKEND", "nunpy")
    with pytest.raises(ValueError, match=r"^environment variable DELTAPROP_BACKEND: expected 'auto' or one of "
                                         r"\['cupy', 'numba', 'numpy'\], got 'nunpy'$"):
        get_backend("auto")


def test_info_shows_a_valid_backend_variable(capsys, monkeypatch):
    monkeypatch.setenv("DELTAPROP_BACKEND", "numpy")
    assert main(["info"]) == 0
    assert "DELTAPROP_BACKEND=numpy" in capsys.readouterr().out


def test_train_without_scikit_learn_says_what_to_install(monkeypatch, capsys, no_work):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sklearn" else real_find_spec(name, *a))
    assert_one_line_error(capsys, main(["train", "--dataset", "digits"]), "train", "pip install 'deltaprop[train]'")
