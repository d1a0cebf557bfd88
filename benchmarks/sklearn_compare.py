"""deltaprop.sklearn.MLPClassifier beside sklearn.neural_network.MLPClassifier: same settings, same data,
accuracy and fit time measured in one run, the fits interleaved.

    python -m deltaprop.benchmarks.sklearn_compare [--backends numpy,numba] [--rounds 3] [--json FILE]
    OPENBLAS_NUM_THREADS=1 python -m deltaprop.benchmarks.sklearn_compare --rounds 5      (a busy machine)

Data: scikit-learn's digits scaled by 1/16 (1797 x 64, 10 classes), and make_classification(20000 x
100, 40 informative features, 5 classes, random_state 0) standardised; each split 75/25, stratified,
random_state 0; float32. Settings, both estimators: hidden_layer_sizes (100,), relu, adam,
learning_rate_init 1e-3, alpha 1e-4, batch_size "auto" (200), random_state 0, and every epoch of
max_iter run (tol 0, n_iter_no_change above max_iter): 50 epochs on digits, 10 on the larger set.
Each round fits every estimator on every dataset once, the order rotated from round to round; the
table gives the median fit time over the rounds (compile time spent in an untimed warm-up fit) and
the test accuracy. Timing a shared or busy machine is noisy: compare the ratios of one run, and there
set OPENBLAS_NUM_THREADS=1 (oversubscribed BLAS threads wait on each other, which slows scikit-learn
and the numpy backend far more than numba's serial kernels). Needs scikit-learn: pip install
'deltaprop[train]'.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import time
import warnings

import numpy as np

SETTINGS = dict(hidden_layer_sizes=(100,), activation="relu", solver="adam", learning_rate_init=1e-3, alpha=1e-4,
                batch_size="auto", random_state=0, tol=0.0)
EPOCHS = {"digits": 50, "classification 20000x100": 10}  # max_iter per dataset


def datasets() -> dict:
    """name -> (X_train, X_test, y_train, y_test), float32 features."""
    from sklearn.datasets import load_digits, make_classification
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    X_digits, y_digits = load_digits(return_X_y=True)
    X_big, y_big = make_classification(n_samples=20000, n_features=100, n_informative=40, n_classes=5,
                                       random_state=0)
    splits = {}
    for name, (X, y) in zip(EPOCHS, [(X_digits / 16.0, y_digits), (StandardScaler().fit_transform(X_big), y_big)]):
        X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, stratify=y, random_state=0)
        splits[name] = (X_train.astype(np.float32), X_test.astype(np.float32), y_train, y_test)
    return splits


def estimators(backends) -> dict:
    """label -> a function of max_iter giving a new, unfitted estimator with SETTINGS."""
    from sklearn.neural_network import MLPClassifier as SklearnMLP

    from deltaprop.sklearn import MLPClassifier

    def every_epoch(epochs):  # tol 0 and a patience beyond max_iter: every fit runs all its epochs
        return dict(SETTINGS, max_iter=epochs, n_iter_no_change=epochs + 1)

    made = {"sklearn": lambda epochs: SklearnMLP(**every_epoch(epochs))}
    for name in backends:
        made[f"deltaprop[{name}]"] = lambda epochs, name=name: MLPClassifier(backend=name, **every_epoch(epochs))
    return made


def timed_fit(make, epochs, X_train, X_test, y_train, y_test) -> tuple[float, float]:
    """(fit seconds, test accuracy) of a new estimator."""
    from sklearn.exceptions import ConvergenceWarning

    model = make(epochs)
    with warnings.catch_warnings():  # reaching max_iter is the plan, not a problem
        warnings.simplefilter("ignore", ConvergenceWarning)
        started = time.perf_counter()
        model.fit(X_train, y_train)
        seconds = time.perf_counter() - started
    return seconds, float(model.score(X_test, y_test))


def run(backends, rounds) -> dict:
    """{dataset: {estimator: {"seconds": [per round], "test_accuracy": ...}}}, the fits interleaved."""
    data, made = datasets(), estimators(backends)
    results = {name: {label: {"seconds": []} for label in made} for name in data}
    for name, split in data.items():  # warm-up: compiles the kernels each backend needs for these shapes
        for label, make in made.items():
            if label != "sklearn":
                timed_fit(make, 1, *split)
    labels = list(made)
    for round_ in range(rounds):
        order = labels[round_ % len(labels):] + labels[:round_ % len(labels)]
        for name, split in data.items():
            for label in order:
                seconds, accuracy = timed_fit(made[label], EPOCHS[name], *split)
                results[name][label]["seconds"].append(seconds)
                results[name][label]["test_accuracy"] = accuracy
    return results


def table(results) -> str:
    lines = ["| data | estimator | epochs | fit s (median) | test accuracy | speed vs sklearn |",
             "|---|---|---:|---:|---:|---:|"]
    for name, by_label in results.items():
        peer = statistics.median(by_label["sklearn"]["seconds"])
        for label, result in by_label.items():
            seconds = statistics.median(result["seconds"])
            lines.append(f"| {name} | {label} | {EPOCHS[name]} | {seconds:.3f} | {result['test_accuracy']:.4f} | "
                         f"{peer / seconds:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from deltaprop.backend import available_backends, backend_status, registered_backends
    from deltaprop.benchmarks.machine import describe_machine
    from deltaprop.cli import OneLineErrorParser, output_file

    parser = OneLineErrorParser(prog="python -m deltaprop.benchmarks.sklearn_compare",
                                description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default=",".join(b for b in available_backends() if b != "cupy"),
                        help="comma-separated deltaprop backends (default: the CPU ones usable here)")
    parser.add_argument("--rounds", type=int, default=3, metavar="N", help="interleaved rounds (default 3)")
    parser.add_argument("--json", type=output_file, metavar="FILE", help="also write the results here")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds: expected a positive integer, got {args.rounds}")
    if importlib.util.find_spec("sklearn") is None:
        parser.error("needs scikit-learn, not installed: pip install 'deltaprop[train]'")
    backends = args.backends.split(",")
    for name in backends:
        if name not in registered_backends() or not backend_status(name)[0]:
            parser.error(f"--backends: expected backends usable here among {available_backends()}, got {name!r}")
    machine = describe_machine()
    results = run(backends, args.rounds)
    print(f"{machine['cpu']}, {machine['cores']} cores, load average {machine['load_average']}")
    print(table(results))
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"machine": machine, "results": results}, file, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
