"""The argument checks of the backend contract, each in one place, run by every backend on every call.

They are cheap (shapes, dtypes, ranks, scalars): no pass over an array's values, except
``check_label_range``, which a backend runs where its kernel cannot check the labels itself. Messages
read "kernel: argument: expected X, got Y", so that every backend refuses bad input with the same words.
"""

from __future__ import annotations

import numpy as np

from deltaprop.kernels.activations import get_activation
from deltaprop.kernels.dtypes import accumulation_dtype, floating, resolve_dtype, supports

# the Backend methods that compute a loss with its delta
LOSS_KERNELS = ("softmax_xent", "sigmoid_xent", "squared_error")
# what Backend.warmup can prepare for: MLP.train_step; MLP.fit (the gradients step and the optimizer
# updates); predict and predict_proba (the forward pass and the output maps); evaluate (the forward pass
# and the losses); every kernel of the contract alone (the model's kernel-by-kernel loop, `deltaprop
# check`, `bench --kernels`); MLPEnsemble's compiled steps (train_step and fit of K stacked networks)
WARMUP_USES = ("train_step", "fit", "predict", "evaluate", "kernels", "ensemble")


def _shape(x):
    return tuple(int(s) for s in x.shape)


def check_dtypes(kernel, device, **arrays):
    """All named arrays (None skipped) share one dtype that ``device`` computes in; returns it."""
    first_name = next(iter(arrays))
    dtype = arrays[first_name].dtype
    if not supports(device, dtype):
        resolve_dtype(dtype, device, f"{kernel}: {first_name}")  # raises, naming what is supported
    for name, a in arrays.items():
        if a is not None and a.dtype is not dtype and a.dtype != dtype:  # `is` first: dtypes are singletons
            raise TypeError(f"{kernel}: {name}: expected dtype {dtype} (the dtype of {first_name}), got {a.dtype}")
    return dtype


def check_shape(kernel, name, array, expected):
    """``array.shape == expected`` (a tuple), else a ValueError naming both; None passes."""
    if array is not None and array.shape != expected:
        raise ValueError(f"{kernel}: {name}: expected shape {tuple(expected)}, got {_shape(array)}")


def check_matrix(kernel, name, array, batch_ok=False):
    """``array`` is 2-D (or 3-D when ``batch_ok``) with no empty axis."""
    ranks = (2, 3) if batch_ok else (2,)
    if array.ndim not in ranks:
        expected = "a 2-D matrix or a 3-D stack of them" if batch_ok else "a 2-D (batch, features) array"
        raise ValueError(f"{kernel}: {name}: expected {expected}, got shape {_shape(array)}")
    if 0 in array.shape:
        raise ValueError(f"{kernel}: {name}: expected a non-empty array, got shape {_shape(array)}")


def check_gemm(a, b, out, trans_a, trans_b, device):
    """The shape of ``out`` = op(a) @ op(b); checks ranks, inner sizes and dtypes."""
    check_matrix("gemm", "a", a, batch_ok=True)
    check_matrix("gemm", "b", b, batch_ok=True)
    if a.ndim != b.ndim:
        raise ValueError(f"gemm: a and b: expected the same rank, got shapes {_shape(a)} and {_shape(b)}")
    m, k = (a.shape[-1], a.shape[-2]) if trans_a else (a.shape[-2], a.shape[-1])
    kb, n = (b.shape[-1], b.shape[-2]) if trans_b else (b.shape[-2], b.shape[-1])
    if k != kb:
        raise ValueError(
            f"gemm: inner sizes of op(a) and op(b) must agree, got op(a) {(m, k)} and op(b) {(kb, n)}"
            f" (a {_shape(a)}, trans_a={trans_a}; b {_shape(b)}, trans_b={trans_b})"
        )
    lead = ()
    if a.ndim == 3:
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"gemm: a and b: expected the same stack size, got {a.shape[0]} and {b.shape[0]}")
        lead = (int(a.shape[0]),)
    shape = lead + (int(m), int(n))
    check_shape("gemm", "out", out, shape)
    check_dtypes("gemm", device, a=a, b=b, out=out)
    return shape


def check_rows(kernel, device, b=None, **arrays):
    """The first of ``arrays`` is a non-empty (B, n) input, each other one (B, n) or None; b is (n,) or
    None; one dtype for all, which it returns. ``arrays`` are named as the kernel names them."""
    (name, x), *outs = arrays.items()
    check_matrix(kernel, name, x)
    check_shape(kernel, "b", b, (x.shape[1],))
    for out_name, out in outs:
        check_shape(kernel, out_name, out, x.shape)
    return check_dtypes(kernel, device, **{name: x}, b=b, **dict(outs))


def check_bias_grad(device, delta, out):
    """delta is a non-empty (B, n) matrix and out (n,) or None, of one dtype, which it returns."""
    check_matrix("bias_grad", "delta", delta)
    check_shape("bias_grad", "out", out, (delta.shape[1],))
    return check_dtypes("bias_grad", device, delta=delta, out=out)


def check_targets(kernel, z, targets):
    """``targets`` is an int label vector (B,), or a (B, C) target matrix of z's dtype; returns "labels"
    or "matrix"."""
    batch, classes = _shape(z)
    if targets.ndim == 1 and targets.dtype.kind in "iu":
        if targets.shape[0] != batch:
            raise ValueError(f"{kernel}: labels: expected {batch} labels (one per row of z), got {targets.shape[0]}")
        return "labels"
    if targets.ndim == 2 and floating(targets.dtype):
        check_shape(kernel, "targets", targets, (batch, classes))
        if targets.dtype != z.dtype:
            raise TypeError(f"{kernel}: targets: expected dtype {z.dtype} (the dtype of z), got {targets.dtype}")
        return "matrix"
    raise TypeError(
        f"{kernel}: labels: expected integer class labels of shape ({batch},) or a {z.dtype} target matrix"
        f" of shape {(batch, classes)}, got {targets.dtype} of shape {_shape(targets)}"
    )


def check_loss(kernel, device, z, targets, delta_out, scale, z_name="z"):
    """The checks of a loss kernel (not the label range: see ``check_label_range``); returns (kind of
    targets, "labels" or "matrix", and the scale of delta as a float: 1/B unless given)."""
    check_rows(kernel, device, **{z_name: z}, delta_out=delta_out)
    kind = check_targets(kernel, z, targets)
    return kind, 1.0 / z.shape[0] if scale is None else float(scale)


def check_label_range(kernel, labels, classes, xp=np):
    """Every label in [0, classes). A full pass over the labels: cheap on a CPU, a sync on a GPU."""
    low, high = int(xp.min(labels)), int(xp.max(labels))
    if low < 0 or high >= classes:
        bad = low if low < 0 else high
        raise ValueError(f"{kernel}: labels: expected class labels in [0, {classes - 1}], got {bad}")


def check_flat(kernel, device, params, grads, **states):
    """The flat (P,) buffers of an optimizer update: params and grads of one dtype, which it returns, and
    the named optimizer ``states`` in that dtype's accumulation dtype (float32 for the 16-bit types)."""
    for name, a in {"params": params, "grads": grads, **states}.items():
        if a.ndim != 1:
            raise ValueError(f"{kernel}: {name}: expected a 1-D flat buffer, got shape {_shape(a)}")
        if a.shape != params.shape:
            raise ValueError(f"{kernel}: {name}: expected shape {_shape(params)} (that of params), got {_shape(a)}")
    if params.shape == (0,):  # a zero-size launch is an error on CUDA: refused on every backend alike
        raise ValueError(f"{kernel}: params: expected a non-empty flat buffer, got shape (0,)")
    dtype = check_dtypes(kernel, device, params=params, grads=grads)
    state_dtype = accumulation_dtype(dtype)
    for name, a in states.items():
        if a.dtype != state_dtype:
            raise TypeError(f"{kernel}: {name}: expected dtype {state_dtype} (the optimizer state dtype of {dtype}"
                            f" params), got {a.dtype}")
    return dtype


def check_adam(device, params, grads, m, v, step):
    """The buffers of ``adam_update`` (as ``check_flat``) and its 1-based ``step``; returns the dtype."""
    dtype = check_flat("adam_update", device, params=params, grads=grads, m=m, v=v)
    check_adam_step("adam_update", step)
    return dtype


def check_adam_step(kernel, step):
    """An Adam update's ``step``: the 1-based update count."""
    if int(step) < 1:
        raise ValueError(f"{kernel}: step: expected the 1-based update count (>= 1), got {step}")


def check_stacked(kernel, device, b=None, **arrays):
    """The stacked form of ``check_rows``: the first of ``arrays`` a non-empty (K, B, n) stack, each other
    one (K, B, n) or None, b (K, n) or None; one dtype for all, which it returns."""
    (name, x), *outs = arrays.items()
    if x.ndim != 3 or 0 in x.shape:
        raise ValueError(f"{kernel}: {name}: expected a non-empty (members, batch, features) stack, "
                         f"got shape {_shape(x)}")
    check_shape(kernel, "b", b, (x.shape[0], x.shape[2]))
    for out_name, out in outs:
        check_shape(kernel, out_name, out, x.shape)
    return check_dtypes(kernel, device, **{name: x}, b=b, **dict(outs))


def check_stacked_targets(kernel, z, targets):
    """``targets`` of a stacked loss on z (K, B, C): int labels (K, B) or a (K, B, C) matrix of z's dtype;
    returns "labels" or "matrix"."""
    if targets.ndim == 2 and targets.dtype.kind in "iu" and targets.shape == z.shape[:2]:
        return "labels"
    if targets.ndim == 3 and targets.dtype == z.dtype and targets.shape == z.shape:
        return "matrix"
    raise TypeError(f"{kernel}: targets: expected int labels of shape {_shape(z)[:2]} or a {z.dtype} target "
                    f"stack of shape {_shape(z)}, got {targets.dtype} of shape {_shape(targets)}")


def check_stacked_flat(kernel, device, params, grads, hyper, **states):
    """The (K, P) buffers of a stacked optimizer update (params, grads and the named ``states``, as
    ``check_flat`` checks them row by row) and its per-member ``hyper`` parameters, each (K,); returns
    the dtype."""
    if params.ndim != 2:
        raise ValueError(f"{kernel}: params: expected a (members, parameters) stack, got shape {_shape(params)}")
    dtype = check_flat(kernel, device, params=params.reshape(-1), grads=grads.reshape(-1),
                       **{name: a.reshape(-1) for name, a in states.items()})
    for name, a in {"grads": grads, **states}.items():
        check_shape(kernel, name, a, params.shape)
    for name, value in hyper.items():
        check_shape(kernel, name, value, params.shape[:1])
    return dtype


def check_stacked_sgd(device, params, grads, lr, weight_decay, velocity, momentum):
    """The arguments of ``stacked_sgd_update`` (velocity and momentum for the momentum update, both None
    for plain SGD), as ``check_stacked_flat``; returns the dtype."""
    hyper = {"lr": lr, "weight_decay": weight_decay, **({} if velocity is None else {"momentum": momentum})}
    states = {} if velocity is None else {"velocity": velocity}
    return check_stacked_flat("stacked_sgd_update", device, params, grads, hyper, **states)


def check_stacked_adam(device, params, grads, m, v, step, lr, weight_decay):
    """The arguments of ``stacked_adam_update``, as ``check_stacked_flat`` and ``check_adam_step``; returns
    the dtype."""
    dtype = check_stacked_flat("stacked_adam_update", device, params, grads, {"lr": lr, "weight_decay": weight_decay},
                               m=m, v=v)
    check_adam_step("stacked_adam_update", step)
    return dtype


def check_stacked_bias_grad(device, delta, out):
    """delta a (K, B, n) stack, out None or (K, n) of its dtype; returns the dtype."""
    dtype = check_stacked("stacked_bias_grad", device, delta=delta)
    check_shape("stacked_bias_grad", "out", out, (delta.shape[0], delta.shape[2]))
    check_dtypes("stacked_bias_grad", device, delta=delta, out=out)
    return dtype


def _names(argument, given, known=None):
    """``given`` as a list of names (of ``known`` where given), else a ValueError naming ``argument``."""
    if isinstance(given, str) or not all(isinstance(v, str) or argument == "dtypes" for v in given) or (
            known is not None and not set(given) <= set(known)):
        among = f" among {list(known)}" if known is not None else ""
        raise ValueError(f"warmup: {argument}: expected a list of names{among}, got {given!r}")
    return list(given)


def check_warmup(backend, dtypes, activations, losses, batches, uses):
    """``Backend.warmup``'s arguments checked, with their defaults: (dtypes, activations, losses, batches
    (None: every size), uses)."""
    dtypes = [resolve_dtype(d, backend.device, "warmup: dtypes")
              for d in _names("dtypes", backend.dtypes if dtypes is None else dtypes)]
    activations = [get_activation(a).name for a in _names("activations", activations)]
    losses = _names("losses", losses, LOSS_KERNELS)
    uses = _names("uses", WARMUP_USES if uses is None else uses, WARMUP_USES)
    if batches is not None and (isinstance(batches, (str, int)) or not all(
            isinstance(b, (int, np.integer)) and not isinstance(b, bool) and b >= 1 for b in batches)):
        raise ValueError(f"warmup: batches: expected a list of positive integer batch sizes, got {batches!r}")
    return dtypes, activations, losses, batches, uses
