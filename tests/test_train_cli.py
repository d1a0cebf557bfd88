"""`deltaprop train`: the digits run, .npz and .csv data, and a one-line error with exit status 2 for
every bad file and bad flag."""

import re
import subprocess
import sys

import numpy as np
import pytest

from deltaprop.backend import to_numpy
from deltaprop.cli import main
from deltaprop.model import MLP

pytest.importorskip("sklearn")


def blobs(n=80, classes=(3, 7), seed=0):
    """Two well separated clusters in 4-D, labelled with the (non-contiguous) ``classes``."""
    rng = np.random.default_rng(seed)
    y = np.array(classes)[rng.integers(0, len(classes), n)]
    X = rng.standard_normal((n, 4)) + 6.0 * (y == classes[0])[:, None]
    return X, y


def test_digits_run_reports_epochs_and_a_test_accuracy_that_matches_the_saved_network(tmp_path, capsys):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    saved = tmp_path / "digits.npz"
    status = main(["train", "--dataset", "digits", "--backend", "numpy", "--epochs", "3", "--save", str(saved)])
    out = capsys.readouterr().out
    assert status == 0
    assert len(re.findall(r"^epoch [1-3]/3  loss \d\.\d{4}  accuracy \d\.\d{4}$", out, re.M)) == 3
    reported = float(re.search(r"test accuracy (\d\.\d{4}) \((\d+)/450\)  fit wall time \d+\.\d{3} s", out).group(1))
    X, y = load_digits(return_X_y=True)
    _, X_test, _, y_test = train_test_split(X / 16, y, test_size=0.25, stratify=y, random_state=0)
    net = MLP.load(saved, backend="numpy")
    assert net.sizes == [64, 128, 128, 10] and net.optimizer.name == "adam" and net.optimizer.step_count == 3 * 43
    assert reported == round(float(np.mean(to_numpy(net.predict(X_test)) == y_test)), 4)


@pytest.mark.parametrize("suffix", ["npz", "csv", "csv-with-header"])
def test_data_files(tmp_path, capsys, suffix):
    X, y = blobs()
    path = tmp_path / f"data.{suffix[:3]}"
    if suffix == "npz":
        np.savez(path, X=X, y=y)
    else:
        header = "a,b,c,d,label" if suffix == "csv-with-header" else ""
        np.savetxt(path, np.column_stack([X, y]), delimiter=",", header=header, comments="")
    status = main(["train", "--data", str(path), "--sizes", "4,8,2", "--optimizer", "sgd", "--lr", "0.1",
                   "--epochs", "5", "--batch-size", "16", "--backend", "numpy"])
    out = capsys.readouterr().out
    assert status == 0
    assert "60 training and 20 test samples, 4 features, 2 classes" in out
    assert "test accuracy 1.0000 (20/20)" in out  # the clusters are 6 standard deviations apart


def test_validation_fraction_holds_out_a_stratified_validation_set_and_reports_its_curve(tmp_path, capsys):
    """The validation loss printed each epoch and in the curve is that of the saved network's weights
    (the last epoch's, without --patience) on the held-out rows, recomputed here from the same split."""
    from sklearn.model_selection import train_test_split

    X, y = blobs(n=100)
    path, saved = tmp_path / "data.npz", tmp_path / "net.npz"
    np.savez(path, X=X, y=y)
    status = main(["train", "--data", str(path), "--sizes", "4,8,2", "--optimizer", "sgd", "--lr", "0.05",
                   "--epochs", "3", "--batch-size", "16", "--backend", "numpy", "--validation-fraction", "0.2",
                   "--save", str(saved)])
    out = capsys.readouterr().out
    assert status == 0
    assert "60 training, 15 validation and 25 test samples" in out
    epochs = re.findall(r"^epoch [1-3]/3  loss \S+  accuracy \S+  val_loss (\S+)  val_accuracy \S+$", out, re.M)
    curve = re.search(r"^validation loss by epoch: (.*)$", out, re.M).group(1).split()
    assert len(epochs) == 3 and curve == epochs
    assert re.search(r"^best validation epoch [1-3]: val_loss \d\.\d{4}  val_accuracy \d\.\d{4}$", out, re.M)
    labels = (y == 7).astype(int)
    X_train, _, y_train, _ = train_test_split(X, labels, test_size=0.25, stratify=labels, random_state=0)
    _, X_val, _, y_val = train_test_split(X_train, y_train, test_size=0.2, stratify=y_train, random_state=0)
    net = MLP.load(saved, backend="numpy")
    assert f"{net.evaluate(X_val, y_val).loss:.4f}" == curve[-1]


def test_validation_fraction_outside_0_1_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--dataset", "digits", "--validation-fraction", "1.5"])
    assert exit_.value.code == 2
    assert "--validation-fraction: expected a number strictly between 0 and 1, got '1.5'" in capsys.readouterr().err


def write(path, content):
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


BAD_FILES = {
    "missing file": (lambda d: str(d / "absent.csv"), r"--data: no such file: '.*absent.csv'"),
    "unknown extension": (lambda d: write(d / "data.txt", "1,2\n"), r"--data: expected a .npz or .csv file, got '.*data.txt'"),
    "empty csv": (lambda d: write(d / "e.csv", ""), r"expected rows of at least one feature and a label, got shape \(0, 1\)"),
    "header only": (lambda d: write(d / "h.csv", "a,b,label\n"), r"expected rows of at least one feature and a label"),
    "text in csv": (lambda d: write(d / "t.csv", "a,b,1\nc,d,0\nx,y,1\n"), r"expected comma-separated numbers"),
    "ragged csv": (lambda d: write(d / "r.csv", "1,2,0\n1,0\n"), r"expected comma-separated numbers"),
    "one column": (lambda d: write(d / "o.csv", "1\n0\n1\n"), r"expected rows of at least one feature and a label, got shape \(3, 1\)"),
    "non-integer labels": (lambda d: write(d / "f.csv", "1,0.5\n2,1\n3,0\n"), r"y: expected integer class labels, got non-integer values"),
    "one class": (lambda d: write(d / "c.csv", "1,1\n2,1\n3,1\n4,1\n"), r"y: expected at least two classes, got \[1\]"),
    "class of one sample": (lambda d: write(d / "s.csv", "1,0\n2,0\n3,0\n4,1\n"), r"cannot make a stratified 25% test split"),
    "nan feature": (lambda d: write(d / "n.csv", "nan,0\n2,1\n3,0\n4,1\n"), r"X: expected finite values, got NaN or inf"),
    "truncated npz": (lambda d: write(d / "t.npz", b"PK\x03\x04\x14\x00\x00"), r"expected a readable .npz file, got an unreadable one"),
    "npz without y": (lambda d: (np.savez(d / "x.npz", X=np.zeros((4, 2))), str(d / "x.npz"))[1],
                      r"expected arrays 'X' and 'y', missing \['y'\] \(found \['X'\]\)"),
    "npz X not 2-D": (lambda d: (np.savez(d / "v.npz", X=np.zeros(4), y=np.zeros(4)), str(d / "v.npz"))[1],
                      r"X: expected a numeric 2-D array \(samples, features\), got float64 of shape \(4,\)"),
    "npz y length": (lambda d: (np.savez(d / "l.npz", X=np.zeros((4, 2)), y=np.zeros(3)), str(d / "l.npz"))[1],
                     r"y: expected 4 numeric labels \(one per row of X\), got float64 of shape \(3,\)"),
    "npz of objects": (lambda d: (np.savez(d / "p.npz", X=np.array([None, 1], dtype=object), y=np.zeros(2)), str(d / "p.npz"))[1],
                       r"expected a readable .npz file"),
}


def assert_one_line_error(capsys, status, message):
    captured = capsys.readouterr()
    assert status == 2
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("deltaprop train: error: "), captured.err
    assert re.search(message, lines[0]), lines[0]


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_files_exit_2_with_one_line(tmp_path, capsys, case):
    make, message = BAD_FILES[case]
    status = main(["train", "--data", make(tmp_path), "--backend", "numpy", "--epochs", "1"])
    assert_one_line_error(capsys, status, message)


BAD_FLAGS = {
    "no data": ([], r"one of the arguments --dataset --data is required"),
    "both sources": (["--dataset", "digits", "--data", "x.csv"], r"argument --data: not allowed with argument --dataset"),
    "unknown dataset": (["--dataset", "mnist"], r"argument --dataset: invalid choice: 'mnist'"),
    "zero epochs": (["--dataset", "digits", "--epochs", "0"], r"argument --epochs: expected a positive integer, got '0'"),
    "text batch size": (["--dataset", "digits", "--batch-size", "big"], r"argument --batch-size: expected a positive integer, got 'big'"),
    "negative lr": (["--dataset", "digits", "--lr", "-1"], r"argument --lr: expected a positive finite number, got '-1'"),
    "nan lr": (["--dataset", "digits", "--lr", "nan"], r"argument --lr: expected a positive finite number, got 'nan'"),
    "unknown optimizer": (["--dataset", "digits", "--optimizer", "lbfgs"], r"argument --optimizer: invalid choice: 'lbfgs'"),
    "unknown activation": (["--dataset", "digits", "--activation", "swish"], r"argument --activation: invalid choice: 'swish'"),
    "bad sizes": (["--dataset", "digits", "--sizes", "64,a,10"], r"argument --sizes: expected at least two comma-separated positive widths"),
    "sizes not fitting the data": (["--dataset", "digits", "--sizes", "64,32,5"],
                                   r"--sizes: expected 64 inputs and 10 outputs for this data \(like 64,128,10\), got 64,32,5"),
    "unknown backend": (["--dataset", "digits", "--backend", "tpu"], r"backend: expected 'auto' or one of .*got 'tpu'"),
    "save into a missing directory": (["--dataset", "digits", "--save", "/no/such/dir/net.npz"],
                                      r"argument --save: expected a file in an existing folder, got '/no/such/dir/net.npz'"),
}


@pytest.mark.parametrize("case", sorted(BAD_FLAGS))
def test_bad_flags_exit_2_with_one_line(capsys, case):
    flags, message = BAD_FLAGS[case]
    try:
        status = main(["train", *flags])
    except SystemExit as e:  # argparse's own refusals exit from inside parse_args
        status = e.code
    assert_one_line_error(capsys, status, message)


def test_unavailable_gpu_backend_is_a_one_line_error(capsys):
    from deltaprop.backend import backend_status

    if backend_status("cupy")[0]:
        pytest.skip("a CUDA device is usable here")
    status = main(["train", "--dataset", "digits", "--backend", "cupy"])
    assert_one_line_error(capsys, status, r"backend 'cupy'")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # diverging on purpose: overflow, inf - inf
def test_diverging_fit_exits_1_with_one_line(tmp_path, capsys):
    X, y = blobs()
    np.savez(tmp_path / "d.npz", X=X * 1e15, y=y)
    status = main(["train", "--data", str(tmp_path / "d.npz"), "--backend", "numpy", "--epochs", "1",
                   "--optimizer", "sgd", "--lr", "1e10"])
    captured = capsys.readouterr()
    assert status == 1
    assert captured.err.splitlines() == [captured.err.strip()]
    assert "deltaprop train: error: training diverged: loss: expected a finite value" in captured.err


def test_unknown_flag_from_the_shell_exits_2_with_one_line():
    result = subprocess.run([sys.executable, "-m", "deltaprop", "train", "--dataset", "digits",
                             "--bogus"], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["deltaprop train: error: unrecognized arguments: --bogus "
                                          "(see deltaprop train --help)"]
