"""`deltaprop train --members`: the sweep table, best first, and what --save/--save-ensemble write;
`deltaprop bench --ensemble`: a tiny measured case renders with the loop as its reference."""

import re

import numpy as np
import pytest

from deltaprop.backend import get_backend, to_numpy
from deltaprop.benchmarks import ensemble as ensemble_bench
from deltaprop.cli import main
from deltaprop.model import MLP, MLPEnsemble


def test_sweep_ranks_members_best_first_and_saves_the_best_refit_on_the_whole_training_split(tmp_path, capsys):
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    refit_path, all_path = tmp_path / "refit.npz", tmp_path / "all.npz"
    status = main(["train", "--dataset", "digits", "--backend", "numpy", "--epochs", "2", "--members", "4",
                   "--sizes", "64,32,10",
                   "--lr", "1e-3,1e-2", "--save", str(refit_path), "--save-ensemble", str(all_path)])
    out = capsys.readouterr().out
    assert status == 0
    rows = re.findall(r"^\s*(\d+)\s+(\S+)\s+(\d+)\s+(\d\.\d{4})\s+(\d\.\d{4})$", out, re.M)
    assert sorted(int(r[0]) for r in rows) == [0, 1, 2, 3]
    assert {int(r[0]): float(r[1]) for r in rows} == {0: 1e-3, 1: 1e-2, 2: 1e-3, 3: 1e-2}
    accuracies = [float(r[4]) for r in rows]
    assert accuracies == sorted(accuracies, reverse=True)
    best = int(rows[0][0])
    # the validation accuracy printed is the best member's, on the held-out quarter of the training split
    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X / 16, y, test_size=0.25, stratify=y, random_state=0)
    _, X_val, _, y_val = train_test_split(X_train, y_train, test_size=0.25, stratify=y_train, random_state=0)
    members = MLPEnsemble.load(all_path, backend="numpy")
    assert members.members == 4
    member_accuracy = np.mean(to_numpy(members.member(best).predict(X_val)) == y_val)
    assert float(rows[0][4]) == round(float(member_accuracy), 4)
    # the refit: the best configuration trained alone on the whole training split, validation quarter included
    alone = MLP([64, 32, 10], backend="numpy", seed=best)
    alone.fit(X_train, y_train, epochs=2, batch_size=32, optimizer="adam", lr=float(rows[0][1]), progress=False)
    refit = MLP.load(refit_path, backend="numpy")
    assert np.array_equal(refit.params, alone.params)
    assert np.array_equal(refit.classes, np.arange(10))
    correct = int((to_numpy(alone.predict(X_test)) == y_test).sum())
    assert re.search(rf"^refit: lr {rows[0][1]}, seed {best} retrained as one MLP on the whole training split "
                     rf"\(1347 samples, 2 epochs, .*\): test accuracy {correct / 450:.4f} \({correct}/450\)$", out, re.M)


def test_sweep_with_patience_refits_for_the_epochs_its_best_member_kept(tmp_path, capsys):
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    refit_path = tmp_path / "refit.npz"
    assert main(["train", "--dataset", "digits", "--backend", "numpy", "--epochs", "6", "--members", "2", "--sizes",
                 "64,16,10", "--lr", "0.3", "--patience", "1", "--save", str(refit_path)]) == 0
    out = capsys.readouterr().out
    refit_line = re.search(r"^refit: lr 0.3, seed (\d+) .* \(1347 samples, (\d+) epochs", out, re.M)
    best, epochs = map(int, refit_line.groups())
    X, y = load_digits(return_X_y=True)
    X_train, _, y_train, _ = train_test_split(X / 16, y, test_size=0.25, stratify=y, random_state=0)
    X_fit, X_val, y_fit, y_val = train_test_split(X_train, y_train, test_size=0.25, stratify=y_train, random_state=0)
    member = MLP([64, 16, 10], backend="numpy", seed=best)  # the ranked member, early-stopped alone
    kept = member.fit(X_fit, y_fit, epochs=6, optimizer="adam", lr=0.3, validation_data=(X_val, y_val), patience=1,
                      progress=False)
    assert kept.stopped_epoch is not None and epochs == kept.best_epoch < 6
    alone = MLP([64, 16, 10], backend="numpy", seed=best)
    alone.fit(X_train, y_train, epochs=epochs, optimizer="adam", lr=0.3, progress=False)
    assert np.array_equal(MLP.load(refit_path, backend="numpy").params, alone.params)


def test_several_learning_rates_need_members(capsys):
    assert main(["train", "--dataset", "digits", "--lr", "1e-3,1e-2"]) == 2
    assert "several learning rates (2) need --members" in capsys.readouterr().err


def test_bench_measures_and_renders_a_tiny_case():
    report = ensemble_bench.measure(get_backend("numpy"), [((4, 5, 3), 2, 4)], quick=True, peers=False)
    assert [row["subject"] for row in report["steps"]] == ["ensemble", "loop"]
    assert all(row["flops"] == 2 * 2 * 4 * (3 * (4 * 5 + 5 * 3) - 4 * 5) for row in report["steps"])
    text = ensemble_bench.render(report)
    assert re.search(r"^4-5-3\s+2\s+4\s", text, re.M) and "vs loop" in text
