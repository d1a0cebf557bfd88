"""`deltaprop train --members K`: a sweep of K networks of one shape trained in one pass (MLPEnsemble),
then the best configuration refit on the whole training split (as scikit-learn's GridSearchCV(refit=True)).

    deltaprop train --dataset digits --members 16 --lr 1e-3,3e-3,1e-2,3e-2

Member k trains with learning rate lr[k % len(lr)] and seed seed + k (its initialisation and its
shuffling), on the same data as `deltaprop train` (the same 75/25 test split) less --validation-fraction
(default a quarter) of the training split (stratified, random_state 0), held out to rank the members.
Prints each member's hyperparameters with its validation loss and accuracy, best first, and the best
member's test accuracy. Then the ranking's winner (its lr and seed) is refit as one MLP on the whole
training split, validation quarter included, for the same epochs (with --patience: the epochs its
member kept), and its test accuracy printed: the number to compare with `deltaprop train`. --save
writes that refit network, --save-ensemble the ranked ensemble.
"""

from __future__ import annotations

import time

import numpy as np

from deltaprop.benchmarks.report import format_table
from deltaprop.cli import UsageError, backend_for
from deltaprop.cli.train import (TEST_FRACTION, _checked, _compile, _load_digits, _load_file, _positive_float,
                                 _sizes_for, _split)
from deltaprop.model.ensemble import OPTIMIZERS
from deltaprop.model.optim import OPTIMIZERS as OPTIMIZER_CLASSES


def learning_rates(text):
    """--lr: one positive number (a float), or several, comma-separated (a tuple: a sweep)."""
    values = tuple(_positive_float(part) for part in text.split(","))
    return values[0] if len(values) == 1 else values


def wanted(args) -> bool:
    """Whether the command line asks for a sweep (--members, or several --lr)."""
    return args.members is not None or isinstance(args.lr, tuple)


def _member_table(ensemble, lrs, losses, accuracies):
    order = sorted(range(ensemble.members), key=lambda k: (-accuracies[k], losses[k], k))
    rows = [[k, f"{lrs[k]:g}", ensemble.seed + k, f"{losses[k]:.4f}", f"{accuracies[k]:.4f}"] for k in order]
    return order, format_table(["member", "lr", "seed", "val loss", "val accuracy"], rows, left=0)


def _test_accuracy(net, X_test, y_test):
    """'0.9844 (443/450)': the accuracy of ``net``'s predictions on the test split."""
    correct = int((net.backend.to_numpy(net.predict(X_test)) == y_test).sum())
    return f"{correct / len(y_test):.4f} ({correct}/{len(y_test)})"


def run(args) -> int:
    from deltaprop.model import MLP, MLPEnsemble

    if args.members is None:
        raise UsageError(f"--lr: several learning rates ({len(args.lr)}) need --members, one network per member")
    if args.optimizer not in OPTIMIZERS:
        raise UsageError(f"--optimizer: an ensemble trains with one of {sorted(OPTIMIZERS)}, got {args.optimizer}")
    for flag, given in (("--load", args.load), ("--distributed", args.distributed)):
        if given:
            raise UsageError(f"{flag}: not available with --members")
    backend = backend_for("--backend", args.backend)
    source = "digits" if args.dataset else args.data
    X, y = _load_digits() if args.dataset else _load_file(args.data)
    X, y, classes = _checked(X, y, source)
    X_train, X_test, y_train, y_test = _split(X, y, source)
    X_fit, X_val, y_fit, y_val = _split(X_train, y_train, source, args.validation_fraction or TEST_FRACTION,
                                        "validation")
    default_lr = OPTIMIZER_CLASSES[args.optimizer].defaults["lr"]
    grid = args.lr if isinstance(args.lr, tuple) else (default_lr if args.lr is None else args.lr,)
    lrs = np.array([grid[k % len(grid)] for k in range(args.members)])
    sizes = _sizes_for(args, X.shape[1], len(classes))
    try:
        ensemble = MLPEnsemble(args.members, sizes, args.activation, backend=backend, dtype=args.dtype, seed=args.seed)
    except (TypeError, ValueError) as e:
        raise UsageError(str(e)) from None
    print(f"{source}: {len(y_fit)} training, {len(y_val)} validation and {len(y_test)} test samples; {ensemble!r}, "
          f"{args.optimizer}, lr {', '.join(f'{v:g}' for v in grid)}", flush=True)
    started = time.perf_counter()
    history = ensemble.fit(X_fit, y_fit, epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer,
                           lr=lrs, validation_data=(X_val, y_val), patience=args.patience)
    ensemble.backend.synchronize()
    wall = time.perf_counter() - started
    losses, accuracies = ensemble.evaluate(X_val, y_val)
    order, table = _member_table(ensemble, lrs, losses, accuracies)
    best = order[0]
    epochs = args.epochs if args.patience is None else history.best_epoch[best]  # the epochs its weights had
    stopped = "" if args.patience is None else \
        f", each early-stopped at its best validation loss (patience {args.patience})"
    print(f"ranked: {ensemble.members} members trained on {len(y_fit)} samples{stopped}, by accuracy on the "
          f"{len(y_val)} held-out validation samples (fit of all members {wall:.3f} s, backend "
          f"{ensemble.backend.name})")
    print(table)
    print(f"best member {best} (lr {lrs[best]:g}, seed {args.seed + best}), trained on {len(y_fit)} samples: "
          f"test accuracy {_test_accuracy(ensemble.member(best), X_test, y_test)}")
    refit = MLP(sizes, args.activation, backend=backend, dtype=args.dtype, seed=args.seed + best)
    refit.classes = classes
    _compile(refit, ["fit"], [args.batch_size])
    started = time.perf_counter()
    refit.fit(X_train, y_train, epochs=epochs, batch_size=args.batch_size, optimizer=args.optimizer,
              lr=float(lrs[best]), progress=False)
    refit.backend.synchronize()
    print(f"refit: lr {lrs[best]:g}, seed {args.seed + best} retrained as one MLP on the whole training split "
          f"({len(y_train)} samples, {epochs} epochs, {time.perf_counter() - started:.3f} s after compiling): "
          f"test accuracy "
          f"{_test_accuracy(refit, X_test, y_test)}")
    if args.save:
        refit.save(args.save)
        print(f"saved the refit network to {args.save}")
    if args.save_ensemble:
        ensemble.save(args.save_ensemble)
        print(f"saved the ranked ensemble to {args.save_ensemble}")
    return 0
