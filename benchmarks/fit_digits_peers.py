"""The digits fit timed beside its peers (PyTorch, scikit-learn), one recipe, in one process, one run each.

    python -m deltaprop.benchmarks.fit_digits_peers [--backends numpy,numba] [--json FILE]

Recipe: scikit-learn's digits scaled by 1/16, stratified 25% test split (random_state 0); a
64-128-128-10 ReLU network, softmax cross-entropy, Adam (lr 1e-3, PyTorch's betas and eps, no weight
decay), minibatches of 32 reshuffled every epoch, 40 epochs, float32. Peers:

    deltaprop    MLP.fit on each backend asked for (compile time spent in warmup, not timed)
    torch        a plain PyTorch CPU loop: nn.Sequential, torch.optim.Adam, F.cross_entropy, randperm batches
    sklearn      MLPClassifier(solver="adam", alpha=0, batch_size=32, max_iter=40, run for all 40 epochs)

Wall time covers the training loop only (not data loading, not evaluation). Prints a table and
optionally writes JSON. Timing a shared or busy machine is noisy: run it on a quiet one. Needs
scikit-learn and PyTorch: pip install 'deltaprop[train,peers]'.
"""

from __future__ import annotations

import importlib.util
import json
import time
import warnings

import numpy as np

EPOCHS, BATCH, LR, HIDDEN, SEED = 40, 32, 1e-3, (128, 128), 0


def digits_split():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X / 16.0, y, test_size=0.25, stratify=y, random_state=0)
    return X_train.astype(np.float32), X_test.astype(np.float32), y_train, y_test


def fit_deltaprop(backend, X_train, X_test, y_train, y_test):
    from deltaprop.backend import to_numpy
    from deltaprop.model import MLP

    net = MLP([X_train.shape[1], *HIDDEN, 10], activation="relu", backend=backend, dtype="float32", seed=SEED)
    net.backend.warmup(["float32"])
    started = time.perf_counter()
    net.fit(X_train, y_train, epochs=EPOCHS, batch_size=BATCH, optimizer="adam", lr=LR, progress=False)
    net.backend.synchronize()
    seconds = time.perf_counter() - started
    return seconds, float(np.mean(to_numpy(net.predict(X_test)) == y_test))


def fit_torch(X_train, X_test, y_train, y_test):
    import torch
    from torch import nn

    torch.manual_seed(SEED)
    widths = [X_train.shape[1], *HIDDEN]
    layers = [module for n_in, n_out in zip(widths[:-1], widths[1:]) for module in (nn.Linear(n_in, n_out), nn.ReLU())]
    model = nn.Sequential(*layers, nn.Linear(widths[-1], 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    X, y = torch.from_numpy(X_train), torch.from_numpy(y_train)
    generator = torch.Generator().manual_seed(SEED)
    started = time.perf_counter()
    for _ in range(EPOCHS):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), BATCH):
            rows = order[start:start + BATCH]
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(X[rows]), y[rows]).backward()
            optimizer.step()
    seconds = time.perf_counter() - started
    with torch.no_grad():
        predicted = model(torch.from_numpy(X_test)).argmax(dim=1).numpy()
    return seconds, float(np.mean(predicted == y_test))


def fit_sklearn(X_train, X_test, y_train, y_test):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    model = MLPClassifier(hidden_layer_sizes=HIDDEN, activation="relu", solver="adam", alpha=0.0, batch_size=BATCH,
                          learning_rate_init=LR, max_iter=EPOCHS, shuffle=True, random_state=SEED, tol=0.0,
                          n_iter_no_change=EPOCHS + 1)
    started = time.perf_counter()
    with warnings.catch_warnings():  # max_iter reached is the plan, not a problem
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(X_train, y_train)
    seconds = time.perf_counter() - started
    return seconds, float(model.score(X_test, y_test))


def main(argv=None) -> int:
    from deltaprop.backend import available_backends, backend_status, registered_backends
    from deltaprop.cli import OneLineErrorParser, output_file

    parser = OneLineErrorParser(prog="python -m deltaprop.benchmarks.fit_digits_peers",
                                description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default=",".join(b for b in available_backends() if b != "cupy"),
                        help="comma-separated deltaprop backends (default: the CPU ones usable here)")
    parser.add_argument("--json", type=output_file, metavar="FILE", help="also write the results here")
    args = parser.parse_args(argv)
    missing = [name for module, name in (("sklearn", "scikit-learn"), ("torch", "PyTorch"))
               if importlib.util.find_spec(module) is None]
    if missing:
        parser.error(f"needs {' and '.join(missing)}, not installed: pip install 'deltaprop[train,peers]'")
    for name in args.backends.split(","):
        if name not in registered_backends() or not backend_status(name)[0]:
            parser.error(f"--backends: expected backends usable here among {available_backends()}, got {name!r}")
    data = digits_split()
    runs = {f"deltaprop[{name}]": (lambda name=name: fit_deltaprop(name, *data)) for name in args.backends.split(",")}
    runs |= {"torch (CPU loop)": lambda: fit_torch(*data), "sklearn MLPClassifier": lambda: fit_sklearn(*data)}
    results = {}
    for label, run in runs.items():
        seconds, accuracy = run()
        results[label] = {"seconds": seconds, "test_accuracy": accuracy}
    torch_seconds = results["torch (CPU loop)"]["seconds"]
    print(f"digits 64-128-128-10 relu, adam lr {LR}, batch {BATCH}, {EPOCHS} epochs, float32")
    print(f"{'':24} {'fit s':>8} {'test acc':>9} {'vs torch':>9}")
    for label, result in results.items():
        print(f"{label:24} {result['seconds']:8.3f} {result['test_accuracy']:9.4f} "
              f"{torch_seconds / result['seconds']:8.2f}x")
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
