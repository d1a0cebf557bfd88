"""`deltaprop train`: train an MLP on a dataset and report its test accuracy and wall time.

    deltaprop train --dataset digits                      scikit-learn's bundled 8x8 digits (no download)
    deltaprop train --data FILE.npz                       arrays X (N, n0) and y (N,)
    deltaprop train --data FILE.csv                       one sample a row, the label in the last column
    deltaprop train --data FILE.csv --load NET.npz        the saved network on the test split, no training

Every dataset is split into 75% training and 25% test samples, stratified, with random_state 0;
--validation-fraction F holds out F of the training samples the same way as a validation set, whose
loss and accuracy each epoch prints (with the whole curve and its best epoch at the end). Digits
pixels are scaled by 1/16 into [0, 1]; other data is used as it is. Labels may be any integers; they
are numbered 0..C-1 in sorted order, and ``--save`` keeps them in the checkpoint, so that ``--load``
reports predictions in the data's own labels. Prints one line per epoch, then the test accuracy and the wall
time of the fit. Needs scikit-learn (the split, and the digits): pip install 'deltaprop[train]'. A bad
file, flag or missing package prints one line "deltaprop train: error: ..." to stderr and exits with
status 2, before any training; a diverging fit (non-finite loss) exits with status 1.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
import warnings
import zipfile

import numpy as np

from deltaprop.cli import UsageError, backend_for, output_file
from deltaprop.errors import DistributedError, NonFiniteLossError
from deltaprop.kernels.activations import ACTIVATIONS
from deltaprop.model.optim import OPTIMIZERS

TEST_FRACTION = 0.25
SPLIT_SEED = 0
DEFAULT_HIDDEN = (128, 128)


class DataError(UsageError):
    """The data file or the flags cannot give a training set; the message is the one line to print."""


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value > 0 and np.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return value


def _fraction(text):
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number strictly between 0 and 1, got {text!r}")
    return value


def _sizes(text):
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        sizes = []
    if len(sizes) < 2 or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected at least two comma-separated positive widths like 64,128,10, got {text!r}")
    return sizes


def add_arguments(parser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", choices=["digits"], help="a bundled dataset")
    source.add_argument("--data", metavar="FILE", help="a .npz file (arrays X and y) or a .csv file (label last)")
    parser.add_argument("--sizes", type=_sizes, metavar="N0,...,NL",
                        help="layer widths, input first (default: features,128,128,classes)")
    parser.add_argument("--activation", default="relu", choices=sorted(ACTIVATIONS))
    parser.add_argument("--optimizer", default="adam", choices=sorted(OPTIMIZERS))
    from deltaprop.cli import sweep  # here: sweep imports this module

    parser.add_argument("--lr", type=sweep.learning_rates, metavar="LR[,LR,...]",
                        help="learning rate (default: the optimizer's, 1e-3); several with --members: a sweep")
    parser.add_argument("--epochs", type=_positive_int, default=40)
    parser.add_argument("--batch-size", type=_positive_int, default=32)
    parser.add_argument("--backend", default="auto", help="auto, numpy, numba or cupy (default: auto)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--seed", type=int, default=0, help="initialisation and shuffling (default: 0)")
    parser.add_argument("--validation-fraction", type=_fraction, metavar="F",
                        help="hold out this fraction of the training samples (stratified) as a validation set, "
                             "reported each epoch; --patience then watches its loss")
    parser.add_argument("--patience", type=_positive_int,
                        help="early stopping on the validation loss (the training loss without --validation-fraction)")
    parser.add_argument("--save", type=output_file, metavar="FILE.npz", help="write the trained network here")
    parser.add_argument("--load", metavar="FILE.npz",
                        help="evaluate this saved network on the test split instead of training one")
    parser.add_argument("--distributed", action="store_true",
                        help="data parallel over the ranks of mpiexec -n N (MPI; NCCL on GPUs); rank 0 prints and saves")
    parser.add_argument("--members", type=_positive_int, metavar="K",
                        help="train K networks in one pass, member k with the k-th --lr (cyclically) and seed "
                             "seed+k; rank them on a held-out validation split, then refit the best on the whole training "
                             "split; --save writes that refit network (cli/sweep.py)")
    parser.add_argument("--save-ensemble", type=output_file, metavar="FILE.npz",
                        help="with --members: write the whole ensemble here")


# ---- data -----------------------------------------------------------------------------------------


def _load_digits():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    return X / 16.0, y


def _load_npz(path):
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [key for key in ("X", "y") if key not in npz.files]
            if missing:
                raise DataError(f"{path}: expected arrays 'X' and 'y', missing {missing} (found {npz.files})")
            return npz["X"], npz["y"]
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: expected a readable .npz file, got an unreadable one ({e})") from None


def _has_header(path):
    """Whether the first line of the CSV file at ``path`` is not all numbers (a header line)."""
    with open(path) as file:
        first = file.readline()
    try:
        [float(field) for field in first.split(",")]
    except ValueError:
        return bool(first.strip())
    return False


def _load_csv(path):
    try:
        with warnings.catch_warnings():  # an empty file: reported below, not warned about
            warnings.simplefilter("ignore", UserWarning)
            table = np.loadtxt(path, delimiter=",", ndmin=2, skiprows=int(_has_header(path)))
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: expected comma-separated numbers (an optional header line), got: {e}") from None
    if table.shape[1] < 2 or table.shape[0] == 0:
        raise DataError(f"{path}: expected rows of at least one feature and a label, got shape {table.shape}")
    return table[:, :-1], table[:, -1]


_LOADERS = {".npz": _load_npz, ".csv": _load_csv}


def _load_file(path):
    extension = os.path.splitext(path)[1].lower()
    if extension not in _LOADERS:
        raise DataError(f"--data: expected a .npz or .csv file, got {path!r}")
    if not os.path.isfile(path):
        raise DataError(f"--data: no such file: {path!r}")
    return _LOADERS[extension](path)


def _checked(X, y, source):
    """X as float64 (N, n0) and y as int labels 0..C-1 (N,); with the original class values."""
    X, y = np.asarray(X), np.asarray(y)
    if X.ndim != 2 or X.shape[0] < 2 or X.shape[1] < 1 or X.dtype.kind not in "iufb":
        raise DataError(f"{source}: X: expected a numeric 2-D array (samples, features), got {X.dtype} of shape {X.shape}")
    if y.shape != (X.shape[0],) or y.dtype.kind not in "iuf":
        raise DataError(f"{source}: y: expected {X.shape[0]} numeric labels (one per row of X), got {y.dtype} of shape {y.shape}")
    if not np.isfinite(X).all():
        raise DataError(f"{source}: X: expected finite values, got NaN or inf")
    if y.dtype.kind == "f" and not (np.isfinite(y).all() and np.array_equal(y, np.round(y))):
        raise DataError(f"{source}: y: expected integer class labels, got non-integer values such as {y[y != np.round(y)][:1]}")
    classes, labels = np.unique(y.astype(np.int64), return_inverse=True)
    if len(classes) < 2:
        raise DataError(f"{source}: y: expected at least two classes, got {classes.tolist()}")
    return X.astype(np.float64), labels, classes


def _split(X, y, source, fraction=TEST_FRACTION, part="test"):
    from sklearn.model_selection import train_test_split

    try:
        return train_test_split(X, y, test_size=fraction, stratify=y, random_state=SPLIT_SEED)
    except ValueError as e:  # e.g. a class with a single sample cannot be stratified
        raise DataError(f"{source}: cannot make a stratified {fraction:.0%} {part} split: {e}") from None


def _sizes_for(args, features, classes):
    sizes = args.sizes or [features, *DEFAULT_HIDDEN, classes]
    if sizes[0] != features or sizes[-1] != classes:
        raise DataError(f"--sizes: expected {features} inputs and {classes} outputs for this data "
                        f"(like {features},128,{classes}), got {','.join(map(str, sizes))}")
    return sizes


# ---- the command ----------------------------------------------------------------------------------


def _print_epoch(epochs):
    def report(epoch, logs):
        metrics = "  ".join(f"{key} {value:.4f}" for key, value in logs.items())
        print(f"epoch {epoch:>{len(str(epochs))}}/{epochs}  {metrics}", flush=True)

    return report


def _train(args):
    from deltaprop.model import MLP

    if importlib.util.find_spec("sklearn") is None:
        raise UsageError("needs scikit-learn (the digits and the test split), which is not installed: "
                         "pip install 'deltaprop[train]'")
    if args.load and args.save:
        raise UsageError("--load evaluates a saved network and trains none, so --save has nothing to write: give one")
    comm = _data_parallel(args)  # before the backend: it picks this rank's GPU
    backend = backend_for("--backend", args.backend)  # before the data, so that a bad name costs nothing
    source = "digits" if args.dataset else args.data
    X, y = _load_digits() if args.dataset else _load_file(args.data)
    X, y, classes = _checked(X, y, source)
    X_train, X_test, y_train, y_test = _split(X, y, source)
    if args.load:
        _evaluate_saved(args.load, backend, X_test, classes[y_test], source)
        return
    validation_data = None
    if args.validation_fraction is not None:
        X_train, X_val, y_train, y_val = _split(X_train, y_train, source, args.validation_fraction, "validation")
        validation_data = (X_val, y_val)
    try:
        net = MLP(_sizes_for(args, X.shape[1], len(classes)), activation=args.activation,
                  backend=backend, dtype=args.dtype, seed=args.seed)
    except (TypeError, ValueError) as e:
        raise DataError(str(e)) from None
    net.classes = classes
    held_out = f", {len(validation_data[1])} validation" if validation_data else ""
    print(f"{source}: {len(y_train)} training{held_out} and {len(y_test)} test samples, {X.shape[1]} features, "
          f"{len(classes)} classes; {net!r}", flush=True)
    warmup = _compile(net, ["fit"], [args.batch_size])  # fit runs its last, smaller batch with the same step
    started = time.perf_counter()
    history = net.fit(X_train, y_train, epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer,
                      lr=args.lr, validation_data=validation_data, patience=args.patience, seed=args.seed,
                      progress=False, callback=_print_epoch(args.epochs), comm=comm)
    net.backend.synchronize()
    wall = time.perf_counter() - started
    if validation_data:
        _print_validation_curve(history)
    warmup += _compile(net, ["predict"])
    predicted = net.backend.to_numpy(net.predict(X_test))
    correct = int((predicted == y_test).sum())
    print(f"test accuracy {correct / len(y_test):.4f} ({correct}/{len(y_test)})  "
          f"fit wall time {wall:.3f} s (backend {net.backend.name}, compile/warm-up {warmup:.3f} s, not timed)")
    if args.save and (comm is None or comm.is_root):
        net.save(args.save)
        print(f"saved {args.save}")


def _data_parallel(args):
    """The DataParallel hook of ``--distributed`` (None without it); a UsageError without mpi4py."""
    if not args.distributed:
        return None
    from deltaprop.model.distributed import session

    try:
        return session(args.backend)
    except DistributedError as e:
        raise UsageError(f"--distributed: {e}") from None


def _print_validation_curve(history):
    """The validation loss per epoch in one line, and its best epoch (the one kept, with --patience)."""
    best = history.best_epoch or 1 + min(range(history.epochs), key=history.val_loss.__getitem__)
    curve = " ".join(f"{value:.4f}" for value in history.val_loss)
    kept = " (its weights kept)" if history.best_epoch else ""
    print(f"validation loss by epoch: {curve}")
    print(f"best validation epoch {best}{kept}: val_loss {history.val_loss[best - 1]:.4f}  "
          f"val_accuracy {history.val_accuracy[best - 1]:.4f}", flush=True)
def _evaluate_saved(path, backend, X_test, labels_test, source):
    """Prints the test accuracy of the network saved at ``path`` and the labels it predicts, in the labels
    the checkpoint keeps (the indices 0..C-1 for a checkpoint without labels)."""
    from deltaprop.model import MLP

    net = MLP.load(path, backend=backend)
    classes = np.arange(net.sizes[-1]) if net.classes is None else net.classes
    if net.sizes[0] != X_test.shape[1]:
        raise DataError(f"--load: {path} expects {net.sizes[0]} features, {source} has {X_test.shape[1]}")
    unknown = np.setdiff1d(labels_test, classes)
    if unknown.size:
        raise DataError(f"--load: {path} knows the labels {classes.tolist()}, {source} has also {unknown.tolist()}")
    _compile(net, ["predict"])
    predicted = classes[net.backend.to_numpy(net.predict(X_test))]
    correct = int((predicted == labels_test).sum())
    counts = ", ".join(f"{label}: {count}" for label, count in zip(*np.unique(predicted, return_counts=True)))
    print(f"{path}: {net!r}")
    print(f"test accuracy {correct / len(labels_test):.4f} ({correct}/{len(labels_test)})  predicted labels {counts}")


def _compile(net, uses, batches=None) -> float:
    """Compiles what ``uses`` run (``Backend.warmup``) for batches of ``batches`` rows, with a progress
    line; returns the seconds."""
    from deltaprop.cli.warmup import CompileProgress
    from deltaprop.model.losses import get_loss

    with CompileProgress(net.backend) as progress:
        return net.backend.warmup([net.dtype], [net.activation], [get_loss(net.loss).kernel],
                                  batches, uses, progress=progress)


def run(args) -> int:
    from deltaprop.cli import sweep

    try:
        sweep.run(args) if sweep.wanted(args) else _train(args)
    except NonFiniteLossError as e:
        print(f"deltaprop train: error: training diverged: {e}; try a smaller --lr", file=sys.stderr)
        return 1
    except DistributedError as e:
        print(f"deltaprop train: error: {e}", file=sys.stderr)
        return 1
    return 0
