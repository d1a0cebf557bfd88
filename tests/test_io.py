"""Checkpoints: round trips across backends, atomic writes, and a clear refusal of every bad file."""

import os

import numpy as np
import pytest
from helpers import rel_err, tol

from deltaprop.backend import to_numpy
from deltaprop.errors import CheckpointError
from deltaprop.kernels import reference
from deltaprop.model import MLP, io


@pytest.fixture
def data(rng):
    return rng.standard_normal((40, 6)), rng.integers(0, 4, 40)


@pytest.fixture
def trained(data):
    net = MLP([6, 10, 4], activation="tanh", backend="numpy", dtype="float64", seed=0)
    net.fit(*data, epochs=2, batch_size=8, optimizer="adamw", lr=0.01, schedule="cosine", progress=False)
    return net


@pytest.fixture
def saved(trained, tmp_path):
    path = tmp_path / "net.npz"
    trained.save(path)
    return path


def test_round_trip_keeps_everything(trained, saved):
    loaded = MLP.load(saved, backend="numpy")
    assert (loaded.sizes, loaded.activation, loaded.loss, loaded.dtype, loaded.seed) == (
        [6, 10, 4], "tanh", "softmax_cross_entropy", np.dtype("float64"), 0)
    assert np.array_equal(loaded.params, trained.params)
    assert np.shares_memory(loaded.weights[1], loaded.params)  # still views of the flat buffer
    opt, saved_opt = loaded.optimizer, trained.optimizer
    assert (opt.name, opt.hyper, opt.schedule, opt.step_count) == ("adamw", saved_opt.hyper, saved_opt.schedule, 10)
    for key in ("m", "v"):
        assert np.array_equal(opt.state[key], saved_opt.state[key])


def test_training_resumes_from_a_checkpoint_exactly(trained, saved, data):
    """Saving and loading in the middle of training changes nothing: same weights after more epochs."""
    loaded = MLP.load(saved, backend="numpy")
    for net in (trained, loaded):
        net.fit(*data, epochs=2, batch_size=8, shuffle=False, progress=False)
    assert np.array_equal(loaded.params, trained.params)


def test_saved_on_numpy_loads_on_every_backend(trained, saved, backend_name, data, dtype, tmp_path):
    """Same classes, and probabilities within the dtype's tolerance of the float64 reference."""
    X = data[0]
    net = MLP([6, 10, 4], activation="tanh", backend="numpy", dtype=dtype, seed=0)
    net.params[...] = trained.params.astype(dtype)
    path = tmp_path / f"net-{dtype}.npz"
    net.save(path)
    loaded = MLP.load(path, backend=backend_name)
    assert loaded.backend.name == backend_name and loaded.dtype == dtype
    zs, _ = reference.forward(*[[to_numpy(a) for a in arrays] for arrays in (net.weights, net.biases)],
                              X.astype(dtype), "tanh")
    assert rel_err(loaded.predict_proba(X), reference.softmax(zs[-1])) <= tol(dtype.name)
    assert np.array_equal(to_numpy(loaded.predict(X)), to_numpy(net.predict(X)))


def test_network_without_optimizer_round_trips(tmp_path):
    net = MLP([3, 2], loss="mse", backend="numpy", seed=None)
    net.save(tmp_path / "plain.npz")
    loaded = MLP.load(tmp_path / "plain.npz", backend="numpy")
    assert loaded.optimizer is None and loaded.seed is None and loaded.loss == "mse"
    assert np.array_equal(loaded.params, net.params)


def test_save_is_atomic(trained, saved, monkeypatch):
    """A save that fails half-way leaves the previous file intact and no temporary file behind."""
    before = saved.read_bytes()

    def crash(file, **arrays):
        file.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(OSError, match="disk full"):
        trained.save(saved)
    assert saved.read_bytes() == before
    assert os.listdir(saved.parent) == ["net.npz"]


# ---- refusals -----------------------------------------------------------------------------------------


def rewrite(saved, tmp_path, **changes):
    """A copy of the checkpoint at ``saved`` with keys replaced (or removed, for a value of None)."""
    with np.load(saved) as npz:
        arrays = {key: npz[key] for key in npz.files}
    for key, value in changes.items():
        if value is None:
            arrays.pop(key)
        else:
            arrays[key] = value
    path = tmp_path / "changed.npz"
    np.savez(path, **arrays)
    return path


BAD_CHANGES = {
    "newer version": (dict(format_version=np.array(3)), r"format_version 3 was written by a newer deltaprop; this "
                                                         r"one reads versions 1 to 2: upgrade deltaprop"),
    "version 0": (dict(format_version=np.array(0)), r"format_version: expected 1 to 2, got 0"),
    "classes of another length": (dict(classes=np.array([1, 2])), r"classes: expected 4 labels \(one per output\).*got int64 of shape \(2,\)"),
    "classes not labels": (dict(classes=np.zeros((4, 2))), r"classes: expected 4 labels.*got float64 of shape \(4, 2\)"),
    "estimator not a JSON object": (dict(estimator=np.array("[1]")), r"estimator: expected a JSON object"),
    "params too short": (dict(params=np.zeros(10)), r"params: expected float64 of shape \(114,\) for these sizes, got float64 of shape \(10,\)"),
    "params in another dtype": (dict(params=np.zeros(114, np.float32)), r"params: expected float64 of shape \(114,\).*got float32"),
    "sizes not matching params": (dict(sizes=np.array([6, 11, 4])), r"params: expected float64 of shape \(125,\)"),
    "bad sizes": (dict(sizes=np.array([6])), r"sizes: expected at least two positive integer widths"),
    "unknown activation": (dict(activation=np.array("swish")), r"activation: expected one of .*got 'swish'"),
    "unknown dtype": (dict(dtype=np.array("int8")), r"dtype: expected one of \['float32', 'float64'\] on cpu, got int8"),
    "missing key": (dict(loss=None), r"expected keys .*missing \['loss'\]"),
    "non-finite weights": (dict(params=np.full(114, np.nan)), r"params: expected finite values, got NaN or inf in 114 of 114"),
    "unknown optimizer": (dict(optimizer=np.array("lion")), r"optimizer: expected one of .*got 'lion'"),
    "optimizer state missing": ({"state/v": None}, r"optimizer 'adamw' state: expected \['state/m', 'state/v'\], got \['state/m'\]"),
    "optimizer state wrong size": ({"state/m": np.zeros(3)}, r"state/m: expected float64 of shape \(114,\)"),
    "bad hyper JSON": (dict(optimizer_hyper=np.array("{lr: 1")), r"optimizer_hyper: expected JSON"),
    "unknown hyper-parameter": (dict(optimizer_hyper=np.array('{"gamma": 1}')), r"optimizer 'adamw': adamw: unknown hyper-parameter"),
    "negative step": (dict(optimizer_step=np.array(-1)), r"optimizer_step: expected >= 0, got -1"),
    "step not an integer": (dict(optimizer_step=np.array(1.5)), r"optimizer_step: expected an integer, got float64"),
}


@pytest.mark.parametrize("case", sorted(BAD_CHANGES))
def test_inconsistent_checkpoints_are_refused(saved, tmp_path, case):
    changes, message = BAD_CHANGES[case]
    with pytest.raises(CheckpointError, match=message):
        MLP.load(rewrite(saved, tmp_path, **changes), backend="numpy")


def test_foreign_npz_is_refused(tmp_path):
    np.savez(tmp_path / "other.npz", X=np.zeros(3), y=np.zeros(3))
    with pytest.raises(CheckpointError, match=r"expected a deltaprop checkpoint .*got a foreign .npz with keys \['X', 'y'\]"):
        MLP.load(tmp_path / "other.npz")


@pytest.mark.parametrize("damage", ["truncated", "corrupt", "empty", "text"])
def test_unreadable_files_are_refused(saved, damage):
    content = saved.read_bytes()
    middle = len(content) // 2
    saved.write_bytes({"truncated": content[:middle],
                       "corrupt": content[:middle] + bytes(b ^ 0xFF for b in content[middle:middle + 64]) + content[middle + 64:],
                       "empty": b"",
                       "text": b"not a zip at all\n"}[damage])
    with pytest.raises(CheckpointError, match=r"expected a readable .npz file, got a truncated or corrupt one"):
        MLP.load(saved, backend="numpy")


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match=r"checkpoint '.*nothing.npz': no such file"):
        MLP.load(tmp_path / "nothing.npz")


def test_object_arrays_are_never_unpickled(saved, tmp_path):
    path = rewrite(saved, tmp_path, activation=np.array([{"evil": 1}], dtype=object))
    with pytest.raises(CheckpointError, match="expected a readable .npz file"):
        io.load(MLP, path, backend="numpy")


# ---- class labels ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("classes", [np.array([3, 7, 9, 11]), np.array(["ant", "bee", "cat", "dog"]),
                                     np.array([0.5, 1.5, 2.5, 3.5])], ids=["ints", "strings", "floats"])
def test_class_labels_and_estimator_settings_round_trip(trained, tmp_path, classes):
    trained.classes = classes
    path = tmp_path / "labelled.npz"
    io.save(trained, path, estimator={"class": "MLPClassifier", "params": {"alpha": 0.5, "hidden_layer_sizes": [10]}})
    loaded = MLP.load(path, backend="numpy")
    assert loaded.classes.dtype == classes.dtype and np.array_equal(loaded.classes, classes)
    assert io.read_estimator(path) == {"class": "MLPClassifier", "params": {"alpha": 0.5, "hidden_layer_sizes": [10]}}


def test_a_version_1_file_loads_without_labels(saved, tmp_path):
    old = rewrite(saved, tmp_path, format_version=np.array(1, np.int64), estimator=None)
    loaded = MLP.load(old, backend="numpy")
    assert loaded.classes is None and io.read_estimator(old) == {}
    assert np.array_equal(loaded.params, MLP.load(saved, backend="numpy").params)


def test_labels_that_cannot_be_stored_are_refused_before_writing(trained, tmp_path):
    trained.classes = np.array([1, 2, 3])  # the network has 4 outputs
    with pytest.raises(ValueError, match=r"save: classes: expected 4 labels.*got int64 of shape \(3,\); nothing written"):
        trained.save(tmp_path / "net.npz")
    trained.classes = np.array([None, 1, 2, 3], dtype=object)
    with pytest.raises(ValueError, match=r"save: classes: expected 4 labels.*got object"):
        trained.save(tmp_path / "net.npz")
    assert not os.listdir(tmp_path)


def test_train_save_then_load_reports_the_files_own_labels(tmp_path, capsys):
    pytest.importorskip("sklearn")
    from deltaprop.cli import main

    rng = np.random.default_rng(0)
    labels = np.repeat([3, 7, 9], 40)
    X = rng.standard_normal((120, 4)) + 3.0 * np.eye(4)[np.searchsorted([3, 7, 9], labels)]  # a blob per label
    data = tmp_path / "f.csv"
    np.savetxt(data, np.column_stack([X, labels]), delimiter=",")
    saved = tmp_path / "m.npz"
    common = ["train", "--data", str(data), "--backend", "numpy"]
    assert main([*common, "--epochs", "20", "--sizes", "4,16,3", "--lr", "0.01", "--save", str(saved)]) == 0
    trained = capsys.readouterr().out
    assert np.array_equal(MLP.load(saved, backend="numpy").classes, [3, 7, 9])
    assert main([*common, "--load", str(saved)]) == 0
    out = capsys.readouterr().out
    accuracy = trained.split("test accuracy ")[1].split()[0]
    assert f"test accuracy {accuracy}" in out and float(accuracy) > 0.9
    counts = dict(part.split(": ") for part in out.split("predicted labels ")[1].strip().split(", "))
    assert set(counts) <= {"3", "7", "9"} and sum(map(int, counts.values())) == 30


def test_load_refuses_data_with_labels_the_checkpoint_does_not_know(trained, tmp_path, capsys):
    pytest.importorskip("sklearn")
    from deltaprop.cli import main

    trained.classes = np.array([0, 1, 2, 3])
    trained.save(tmp_path / "m.npz")
    rng = np.random.default_rng(1)
    np.savetxt(tmp_path / "f.csv", np.column_stack([rng.standard_normal((40, 6)), np.repeat([0, 5], 20)]), delimiter=",")
    assert main(["train", "--data", str(tmp_path / "f.csv"), "--backend", "numpy", "--load", str(tmp_path / "m.npz")]) == 2
    assert "knows the labels [0, 1, 2, 3]" in capsys.readouterr().err
    assert main(["train", "--dataset", "digits", "--load", str(tmp_path / "m.npz"), "--save", str(tmp_path / "n.npz")]) == 2
    assert "--save has nothing to write" in capsys.readouterr().err
