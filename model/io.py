"""Checkpoints: an MLP (and its optimizer) in one .npz file, written atomically, read back with every check.

Keys of format version 2 (all plain arrays; nothing is pickled):

    magic              "deltaprop-checkpoint"            marks the file as ours
    format_version     2 (a file of version 1, which has no ``classes`` nor ``estimator``, loads too)
    sizes              int64 (L+1,)                      layer widths, input first
    activation, loss, dtype                              names (str)
    seed               int64 (); -1 when the network had none
    params             (P,) in ``dtype``                 the flat parameter buffer (W[l] row-major, then b[l], per layer)
    optimizer          str; "" when the network has none
    optimizer_hyper    JSON of the hyper-parameters; optimizer_schedule: JSON of the schedule
    optimizer_step     int64 ()                          updates made so far
    state/<name>       (P,) in float32 or float64         each flat state buffer (velocity, m, v), in ``dtype``'s
                                                         accumulation dtype (float32 for 16-bit ``dtype``)
    classes            (n_L,) ints, floats, booleans or str  the labels outputs 0..n_L-1 stand for (``net.classes``);
                                                         absent when the network has none
    estimator          JSON object, "{}" for none        what a deltaprop.sklearn estimator keeps beside the network

``save`` checks first that ``load`` will accept what it writes (finite parameters and state, a named
schedule), then writes through ``deltaprop.atomic.write_atomic``: a crash or a kill never leaves a
half-written checkpoint at ``path`` (the old file or the new one), and writes nothing on an error.
``load`` checks the file's ``sizes`` against its ``params`` before it allocates anything.
"""

from __future__ import annotations

import json
import os
import zipfile
import zlib

import numpy as np

from deltaprop.atomic import write_atomic
from deltaprop.backend import get_backend
from deltaprop.errors import CheckpointError
from deltaprop.kernels.dtypes import accumulation_dtype
from deltaprop.model.optim import OPTIMIZERS, SCHEDULES, get_schedule, schedule_spec

MAGIC = "deltaprop-checkpoint"
FORMAT_VERSION = 2
_OLDEST_READ = 1  # the first version this one reads
_REQUIRED = ("format_version", "sizes", "activation", "loss", "dtype", "seed", "params", "optimizer",
             "optimizer_hyper", "optimizer_schedule", "optimizer_step")


def save(net, path, estimator=None) -> None:
    """Writes ``net`` (with ``net.optimizer`` and ``net.classes``, when it has them) to ``path`` as .npz,
    atomically; ``estimator``: a JSON-able dict stored beside it (``read_estimator`` gives it back)."""
    backend = net.backend
    optimizer = net.optimizer
    arrays = {
        "magic": np.array(MAGIC),
        "format_version": np.array(FORMAT_VERSION, np.int64),
        "sizes": np.array(net.sizes, np.int64),
        "activation": np.array(net.activation),
        "loss": np.array(net.loss),
        "dtype": np.array(net.dtype.name),
        "seed": np.array(-1 if net.seed is None else int(net.seed), np.int64),
        "params": backend.to_numpy(net.params),
        "optimizer": np.array(optimizer.name if optimizer else ""),
        "optimizer_hyper": np.array(json.dumps(optimizer.hyper if optimizer else {})),
        "optimizer_schedule": np.array(json.dumps(_schedule_spec(optimizer.schedule) if optimizer else {})),
        "optimizer_step": np.array(optimizer.step_count if optimizer else 0, np.int64),
        "estimator": np.array(json.dumps(estimator or {})),
    }
    if net.classes is not None:
        arrays["classes"] = _classes_to_save(net)
    for key, buffer in (optimizer.state.items() if optimizer else ()):
        arrays[f"state/{key}"] = backend.to_numpy(buffer)
    for key in ["params", *(key for key in arrays if key.startswith("state/"))]:
        finite = np.isfinite(arrays[key])
        if not finite.all():
            raise ValueError(f"save: {key}: expected finite values (what load accepts), got NaN or inf in "
                             f"{int((~finite).sum())} of {finite.size}; nothing written")
    write_atomic(path, lambda file: np.savez(file, **arrays))


def _classes_to_save(net):
    """``net.classes`` as the plain array a checkpoint stores; a ValueError (nothing written) otherwise."""
    classes = np.asarray(net.classes)
    if classes.dtype.kind not in _CLASS_KINDS or classes.shape != (net.sizes[-1],):
        raise ValueError(f"save: classes: expected {net.sizes[-1]} labels (one per output) of numbers, booleans "
                         f"or strings, got {classes.dtype} of shape {classes.shape}; nothing written")
    return classes


_CLASS_KINDS = "biufU"  # the dtype kinds a label array may have in a checkpoint (never objects: no pickle)


def _schedule_spec(schedule) -> dict:
    """The schedule as a checkpoint stores it; a ValueError for one that ``load`` could not rebuild."""
    if SCHEDULES.get(getattr(schedule, "name", "")) is not type(schedule):
        raise ValueError(f"save: optimizer schedule: expected one of the named schedules {sorted(SCHEDULES)} "
                         f"(a custom schedule object cannot be stored in a checkpoint), got {schedule!r}; "
                         f"nothing written")
    return schedule_spec(schedule)


def _read_all(path) -> dict:
    """Every array of the .npz at ``path``, read now (so that a truncated member fails here)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r}: no such file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path!r}: expected a readable .npz file, got a truncated or corrupt "
                              f"one ({type(e).__name__}: {e})") from e


def _text(arrays, key, path):
    value = arrays[key]
    if value.shape != () or value.dtype.kind != "U":
        raise CheckpointError(f"checkpoint {path!r}: {key}: expected a string, got {value.dtype} of shape {value.shape}")
    return str(value)


def _integer(arrays, key, path):
    value = arrays[key]
    if value.shape != () or value.dtype.kind not in "iu":
        raise CheckpointError(f"checkpoint {path!r}: {key}: expected an integer, got {value.dtype} of shape {value.shape}")
    return int(value)


def _json(arrays, key, path):
    try:
        value = json.loads(_text(arrays, key, path))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {path!r}: {key}: expected JSON, got {str(arrays[key])[:60]!r} ({e})") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"checkpoint {path!r}: {key}: expected a JSON object, got {value!r}")
    return value


def _flat(arrays, key, path, size, dtype):
    value = arrays[key]
    if value.shape != (size,) or value.dtype != dtype:
        raise CheckpointError(f"checkpoint {path!r}: {key}: expected {dtype} of shape ({size},) for these sizes, "
                              f"got {value.dtype} of shape {value.shape}")
    if not np.isfinite(value).all():
        raise CheckpointError(f"checkpoint {path!r}: {key}: expected finite values, got NaN or inf "
                              f"in {int((~np.isfinite(value)).sum())} of {size}")
    return value


def _optimizer(arrays, path, size, dtype):
    """The saved optimizer with its hyper-parameters, schedule, step count and host state; None if none."""
    name = _text(arrays, "optimizer", path)
    if not name:
        return None
    if name not in OPTIMIZERS:
        raise CheckpointError(f"checkpoint {path!r}: optimizer: expected one of {sorted(OPTIMIZERS)}, got {name!r}")
    schedule = dict(_json(arrays, "optimizer_schedule", path))
    try:
        optimizer = OPTIMIZERS[name](schedule=get_schedule(schedule.pop("name", None), **schedule),
                                     **_json(arrays, "optimizer_hyper", path))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path!r}: optimizer {name!r}: {e}") from e
    optimizer.step_count = _integer(arrays, "optimizer_step", path)
    if optimizer.step_count < 0:
        raise CheckpointError(f"checkpoint {path!r}: optimizer_step: expected >= 0, got {optimizer.step_count}")
    expected = {f"state/{key}" for key in optimizer.state_names()}
    found = {key for key in arrays if key.startswith("state/")}
    if found != expected:
        raise CheckpointError(f"checkpoint {path!r}: optimizer {name!r} state: expected {sorted(expected)}, "
                              f"got {sorted(found)}")
    state_dtype = accumulation_dtype(dtype)
    optimizer.state = {key[len("state/"):]: _flat(arrays, key, path, size, state_dtype) for key in sorted(expected)}
    return optimizer


def _sizes(arrays, path):
    """The layer widths, checked against the length of ``params`` before anything is allocated."""
    sizes, params = arrays["sizes"], arrays["params"]
    if sizes.ndim != 1 or sizes.dtype.kind not in "iu" or len(sizes) < 2 or (sizes < 1).any():
        raise CheckpointError(f"checkpoint {path!r}: sizes: expected at least two positive integer widths, "
                              f"got {sizes.dtype} {sizes.tolist() if sizes.size <= 16 else sizes.shape}")
    widths = sizes.tolist()
    n_params = sum((n_in + 1) * n_out for n_in, n_out in zip(widths[:-1], widths[1:]))
    if params.ndim != 1 or n_params != len(params):
        raise CheckpointError(f"checkpoint {path!r}: params: expected {_text(arrays, 'dtype', path)} of shape "
                              f"({n_params},) for these sizes, got {params.dtype} of shape {params.shape}")
    return widths


def _classes(arrays, path, outputs):
    """The saved labels (outputs,), or None when the file has none."""
    if "classes" not in arrays:
        return None
    classes = arrays["classes"]
    if classes.dtype.kind not in _CLASS_KINDS or classes.shape != (outputs,):
        raise CheckpointError(f"checkpoint {path!r}: classes: expected {outputs} labels (one per output) of "
                              f"numbers, booleans or strings, got {classes.dtype} of shape {classes.shape}")
    return classes


def read_estimator(path) -> dict:
    """The ``estimator`` dict a checkpoint holds ({} when none, or for a file of version 1)."""
    arrays = _read_all(os.fspath(path))
    return _json(arrays, "estimator", path) if "estimator" in arrays else {}


def load(cls, path, backend="auto"):
    """The network saved at ``path``, on ``backend``, with its optimizer (state on that backend), if any.

    Raises CheckpointError, naming the file and what is wrong, for a missing, truncated, corrupt,
    foreign, newer-format or inconsistent file.
    """
    backend = get_backend(backend)  # an unknown or unavailable backend is the argument's fault, not the file's
    path = os.fspath(path)
    arrays = _read_all(path)
    if "magic" not in arrays or arrays["magic"].dtype.kind != "U" or str(arrays["magic"]) != MAGIC:
        raise CheckpointError(f"checkpoint {path!r}: expected a deltaprop checkpoint (key 'magic' = {MAGIC!r}), "
                              f"got a foreign .npz with keys {sorted(arrays)[:8]}")
    missing = [key for key in _REQUIRED if key not in arrays]
    if missing:
        raise CheckpointError(f"checkpoint {path!r}: expected keys {list(_REQUIRED)}, missing {missing}")
    version = _integer(arrays, "format_version", path)
    if version > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path!r}: format_version {version} was written by a newer deltaprop; "
                              f"this one reads versions {_OLDEST_READ} to {FORMAT_VERSION}: upgrade deltaprop")
    if version < _OLDEST_READ:
        raise CheckpointError(f"checkpoint {path!r}: format_version: expected {_OLDEST_READ} to {FORMAT_VERSION}, "
                              f"got {version}")
    seed = _integer(arrays, "seed", path)
    sizes = _sizes(arrays, path)
    try:
        net = cls(sizes, activation=_text(arrays, "activation", path),
                  loss=_text(arrays, "loss", path), backend=backend, dtype=_text(arrays, "dtype", path),
                  seed=None if seed < 0 else seed)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path!r}: {e}") from e
    params = _flat(arrays, "params", path, net.n_params, net.dtype)
    net.params[...] = net.backend.asarray(params)
    net.classes = _classes(arrays, path, net.sizes[-1])
    if "estimator" in arrays:  # read by read_estimator; checked here, so that a loaded file is a whole file
        _json(arrays, "estimator", path)
    optimizer = _optimizer(arrays, path, net.n_params, net.dtype)
    if optimizer is not None:
        host_state = optimizer.state
        optimizer.state = {key: net.backend.asarray(value) for key, value in host_state.items()}
        net.optimizer = optimizer.bind(net.backend, net.params)
    return net
