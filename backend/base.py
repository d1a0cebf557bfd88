"""The backend contract, and its NumPy implementation: the reference backend ("numpy").

Every kernel is a method whose docstring gives the shapes and the semantics. A subclass (numba, cupy)
overrides only what it accelerates and keeps each signature exactly; ``tests/test_contract.py`` checks
that. Kernels take ``out=`` buffers so that a training step allocates nothing after its first call;
where ``out`` is None a new array is returned.

Argument checks that are cheap (shapes, dtypes, ranks) run on every call through the ``check_*``
helpers below, which every backend shares, so that each backend refuses bad input with the same message.
"""

from __future__ import annotations

import numpy as np

from deltaprop.kernels.activations import get_activation
from deltaprop.kernels.dtypes import SUPPORTED, dtypes_for, resolve_dtype

# Host buffers start on a cache line. NumPy aligns to 16 bytes only, and a 64-128-128-10 step at batch 1
# on numba ran 16% slower with its parameters 16 bytes past a 32-byte boundary (AVX2 loads of W's rows
# then straddle cache lines): which one a process got made the step's speed differ from run to run.
HOST_ALIGNMENT = 64

# the Backend methods that compute a loss with its delta
LOSS_KERNELS = ("softmax_xent", "sigmoid_xent", "squared_error")
# what Backend.warmup can prepare for: MLP.train_step; MLP.fit (the gradients step and the optimizer
# updates); predict and predict_proba (the forward pass and the output maps); evaluate (the forward pass
# and the losses); every kernel of the contract alone (the model's kernel-by-kernel loop, `deltaprop
# check`, `bench --kernels`)
WARMUP_USES = ("train_step", "fit", "predict", "evaluate", "kernels")


def warmup_selection(backend, dtypes, activations, losses, batches, uses):
    """``Backend.warmup``'s arguments checked, with their defaults: (dtypes, activations, losses, batches
    (None: every size), uses)."""
    def names(argument, given, known=None):
        if isinstance(given, str) or not all(isinstance(v, str) or argument == "dtypes" for v in given) or (
                known is not None and not set(given) <= set(known)):
            among = f" among {list(known)}" if known is not None else ""
            raise ValueError(f"warmup: {argument}: expected a list of names{among}, got {given!r}")
        return list(given)

    dtypes = [resolve_dtype(d, backend.device, "warmup: dtypes")
              for d in names("dtypes", backend.dtypes if dtypes is None else dtypes)]
    activations = [get_activation(a).name for a in names("activations", activations)]
    losses = names("losses", losses, LOSS_KERNELS)
    uses = names("uses", WARMUP_USES if uses is None else uses, WARMUP_USES)
    if batches is not None and (isinstance(batches, (str, int)) or not all(
            isinstance(b, (int, np.integer)) and not isinstance(b, bool) and b >= 1 for b in batches)):
        raise ValueError(f"warmup: batches: expected a list of positive integer batch sizes, got {batches!r}")
    return dtypes, activations, losses, batches, uses


# ---- the shared argument checks ----------------------------------------------------------------------


def _shape(x):
    return tuple(int(s) for s in x.shape)


def check_dtypes(kernel, device, **arrays):
    """All named arrays share one dtype that ``device`` computes in; returns it."""
    first_name = next(iter(arrays))
    dtype = arrays[first_name].dtype
    if dtype not in SUPPORTED[device]:
        resolve_dtype(dtype, device, f"{kernel}: {first_name}")  # raises, naming what is supported
    for name, a in arrays.items():
        if a is not None and a.dtype is not dtype and a.dtype != dtype:  # `is` first: dtypes are singletons
            raise TypeError(f"{kernel}: {name}: expected dtype {dtype} (the dtype of {first_name}), got {a.dtype}")
    return dtype


def check_shape(kernel, name, array, expected):
    """``array.shape == expected`` (a tuple), else a ValueError naming both."""
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


def check_rows(kernel, device, x, b=None, **outs):
    """x is (B, n) and non-empty; b is (n,); every out is (B, n); one dtype for all."""
    check_matrix(kernel, "x" if kernel != "bias_act" else "acc", x)
    if b is not None:
        check_shape(kernel, "b", b, (x.shape[1],))
    for name, out in outs.items():
        check_shape(kernel, name, out, x.shape)
    return check_dtypes(kernel, device, x=x, b=b, **outs)


def check_targets(kernel, z, targets):
    """``targets`` is an int label vector (B,) with labels in [0, C), or a float (B, C) target matrix."""
    batch, classes = _shape(z)
    kind = targets.dtype.kind
    if targets.ndim == 1 and kind in "iu":
        if targets.shape[0] != batch:
            raise ValueError(f"{kernel}: labels: expected {batch} labels (one per row of z), got {targets.shape[0]}")
        return "labels"
    if targets.ndim == 2 and kind == "f":
        check_shape(kernel, "targets", targets, (batch, classes))
        if targets.dtype != z.dtype:
            raise TypeError(f"{kernel}: targets: expected dtype {z.dtype} (the dtype of z), got {targets.dtype}")
        return "matrix"
    raise TypeError(
        f"{kernel}: labels: expected integer class labels of shape ({batch},) or a {z.dtype} target matrix"
        f" of shape {(batch, classes)}, got {targets.dtype} of shape {_shape(targets)}"
    )


def check_label_range(kernel, labels, classes, xp=np):
    """Every label in [0, classes). A full pass over the labels: cheap on a CPU, a sync on a GPU."""
    low, high = int(xp.min(labels)), int(xp.max(labels))
    if low < 0 or high >= classes:
        bad = low if low < 0 else high
        raise ValueError(f"labels: expected class labels in [0, {classes - 1}], got {bad}")


def check_flat(kernel, device, **buffers):
    """Flat parameter-shaped buffers: 1-D, one size, one dtype."""
    named = list(buffers.items())
    first_name, first = named[0]
    for name, a in named:
        if a.ndim != 1:
            raise ValueError(f"{kernel}: {name}: expected a 1-D flat buffer, got shape {_shape(a)}")
        if a.shape != first.shape:
            raise ValueError(f"{kernel}: {name}: expected shape {_shape(first)} (that of {first_name}), got {_shape(a)}")
    return check_dtypes(kernel, device, **buffers)


# ---- the contract ---------------------------------------------------------------------------------


class Backend:
    """The kernel contract, implemented with NumPy (the reference backend, always available).

    Shapes: B is the batch (rows are samples), n a layer width, C the number of classes or outputs.
    Every array argument of one call shares one floating dtype, one of ``self.dtypes``.
    """

    name = "numpy"
    device = "cpu"  # the kind of device: "cpu" or "cuda" (a key of the dtype table's ``devices``)

    # ---- lifecycle and arrays ----

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        """(usable here, why not). Must be cheap and must not raise."""
        return True, ""

    @property
    def xp(self):
        """The array module of this backend's arrays (numpy, cupy)."""
        return np

    @property
    def dtypes(self) -> tuple[str, ...]:
        """The dtype names this backend computes in (from the dtype table)."""
        return dtypes_for(self.device)

    def asarray(self, x, dtype=None):
        """``x`` as a C-contiguous array of this backend in ``dtype`` (copied only where it must be)."""
        if not isinstance(x, np.ndarray) and hasattr(x, "__dlpack__"):
            x = np.from_dlpack(x)  # zero-copy from any CPU DLPack producer (torch, jax)
        return np.ascontiguousarray(x, dtype=dtype)

    def to_numpy(self, x) -> np.ndarray:
        """``x`` as a NumPy array on the host."""
        return np.asarray(x)

    def empty(self, shape, dtype):
        """An uninitialised C-contiguous array whose data starts at a multiple of ``HOST_ALIGNMENT`` bytes."""
        dtype = np.dtype(dtype)
        size = int(np.prod(shape)) * dtype.itemsize
        raw = np.empty(size + HOST_ALIGNMENT, np.uint8)
        start = -raw.ctypes.data % HOST_ALIGNMENT
        return raw[start:start + size].view(dtype).reshape(shape)

    def zeros(self, shape, dtype):
        out = self.empty(shape, dtype)
        out[...] = 0
        return out

    def synchronize(self) -> None:
        """Wait until every kernel launched so far has finished (a no-op on the CPU)."""

    def warmup(self, dtypes=None, activations=("relu",), losses=("softmax_xent",), batches=None, uses=None,
               progress=None) -> float:
        """Compiles up front what the chosen work runs, so that no later call compiles (benchmarks call it so
        that compile time is never timed); returns the seconds spent (0 for a backend that compiles nothing).

        dtypes: default every one of ``self.dtypes``; activations: of the hidden layers; losses: loss
        kernels ("softmax_xent", "sigmoid_xent", "squared_error"); batches: the batch sizes to be ready for
        (default every size: a backend may compile a step per class of sizes); uses: what will run, any of
        WARMUP_USES (default all of them). progress: None, or ``progress(done, total, what)``, called before
        each part that has to be compiled (not for one loaded from a disk cache): ``what`` names the part,
        ``done`` counts the parts before it, of ``total``.
        """
        warmup_selection(self, dtypes, activations, losses, batches, uses)  # the same errors on every backend
        return 0.0

    def describe(self) -> dict:
        """Facts about this backend for `deltaprop info` and benchmark reports."""
        return {"name": self.name, "device": self.device, "numpy": np.__version__}

    def fused_sgd_step(self, activation, loss, dtype):
        """Compiled whole SGD training steps by batch size, or None: then the model runs its kernel-by-kernel
        loop. ``steps[B]`` is the step for batches of B rows (a backend may compile one per class of batch
        sizes, each on first use; every one computes the same function at any batch size).

        activation: the hidden layers' activation; loss: the loss kernel's name ("softmax_xent",
        "sigmoid_xent", "squared_error"); dtype: the arrays' dtype. The callable,
        ``step(x, targets, params, work, plan, lr) -> (summed loss, bad_row)``, computes the same
        function as forward, the loss kernel, backward and ``sgd_update`` (the gradients themselves are
        never stored): x (B, n0) C-contiguous; targets int64 labels (B,) or (B, n_L); params the flat
        (P,) parameter buffer; work a flat workspace and plan its layout, from
        ``deltaprop.kernels.plan.step_plan(sizes, B)``; lr a scalar of the dtype. It returns the loss
        summed over the batch and -1, or 0 and the first row whose label is outside [0, n_L); it changes
        nothing when a label is out of range or the loss is not finite.
        """
        return None

    def fused_grads_step(self, activation, loss, dtype):
        """Compiled forward + loss + backward steps that write the gradients, by batch size as for
        ``fused_sgd_step``, or None: then the model runs its kernel-by-kernel loop.

        Arguments as for ``fused_sgd_step``. The callable, ``step(x, targets, params, grads, work, plan)
        -> (summed loss, bad_row)``, computes the same function as forward, the loss kernel and backward:
        dJ/dW[l] and dJ/db[l] go into the flat (P,) ``grads`` buffer at the parameters' offsets, for an
        optimizer's update kernel to apply; the logits are left in the workspace's z[L]. It returns the
        loss summed over the batch and -1, or 0 and the first row whose label is outside [0, n_L); it
        changes nothing in ``grads`` when a label is out of range or the loss is not finite.
        """
        return None

    # ---- kernels ----

    def gemm(self, a, b, out=None, trans_a=False, trans_b=False, alpha=1.0, beta=0.0):
        """out = alpha * op(a) @ op(b) + beta * out, where op(x) is x or its transpose.

        a: (m, k) or (k, m) when trans_a; b: (k, n) or (n, k) when trans_b; out: (m, n).
        3-D arguments are a stack of independent products (strided-batched): a (s, m, k), b (s, k, n),
        out (s, m, n). beta is ignored when out is None. Transposed views are never copied.
        """
        shape = check_gemm(a, b, out, trans_a, trans_b, self.device)
        op_a = np.swapaxes(a, -1, -2) if trans_a else a
        op_b = np.swapaxes(b, -1, -2) if trans_b else b
        if out is None:
            out, beta = np.empty(shape, dtype=a.dtype), 0.0
        if beta == 0.0 and alpha == 1.0:
            np.matmul(op_a, op_b, out=out)
        else:
            product = np.matmul(op_a, op_b)
            product *= a.dtype.type(alpha)
            if beta != 0.0:
                out *= a.dtype.type(beta)
                out += product
            else:
                out[...] = product
        return out

    def bias_act(self, acc, b, act, z_out=None, a_out=None):
        """z = acc + b (b broadcast over rows); a = act(z). Returns (z, a).

        acc: (B, n); b: (n,); z_out, a_out: (B, n) or None. z_out may be acc itself (in place).
        a_out may be z_out (an in-place activation); without a_out, a is a new array.
        """
        check_rows("bias_act", self.device, acc, b, z_out=z_out, a_out=a_out)
        activation = get_activation(act)
        z = np.add(acc, b, out=z_out)
        a = activation.forward(z)
        if a_out is None:
            return z, a
        a_out[...] = a
        return z, a_out

    def act_backward(self, g, z, act, out=None):
        """out = g * act'(z), elementwise. g, z, out: (B, n); out may be g (in place)."""
        check_rows("act_backward", self.device, g, z=z, out=out)
        return np.multiply(g, get_activation(act).derivative(z), out=out)

    def softmax(self, z, out=None):
        """Row-wise softmax, stable for any finite z. z, out: (B, C)."""
        check_rows("softmax", self.device, z, out=out)
        out = np.subtract(z, z.max(axis=1, keepdims=True), out=out)
        np.exp(out, out=out)
        out /= out.sum(axis=1, keepdims=True)
        return out

    def softmax_xent(self, z, labels, delta_out=None, scale=None):
        """Softmax cross-entropy: returns the mean loss over the batch as a float, and writes
        delta = (softmax(z) - onehot(labels)) * scale (scale defaults to 1/B) into delta_out.

        z: (B, C) logits; labels: int (B,) in [0, C), or probability rows (B, C) of z's dtype (rows
        summing to 1); delta_out: (B, C) or None (then delta is computed and dropped). Uses the row
        max (log-sum-exp), so it is stable for any finite z and never takes log(0).
        """
        t, scale = self._loss_targets("softmax_xent", z, labels, delta_out, scale)
        shifted = z - z.max(axis=1, keepdims=True)
        log_softmax = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        return self._loss_result(-(t * log_softmax).sum(), np.exp(log_softmax), t, delta_out, scale)

    def sigmoid_xent(self, z, targets, delta_out=None, scale=None):
        """Multi-label sigmoid cross-entropy: returns the mean over the batch of the summed element
        losses, and writes delta = (sigmoid(z) - targets) * scale (default 1/B).

        z: (B, C) logits; targets: (B, C) in [0, 1], or int labels (B,) taken as one-hot rows.
        """
        t, scale = self._loss_targets("sigmoid_xent", z, targets, delta_out, scale)
        # -[t log s + (1 - t) log(1 - s)] = max(z, 0) - t z + log(1 + exp(-|z|)), stable for any finite z
        total = (np.maximum(z, 0) - t * z + np.log1p(np.exp(-np.abs(z)))).sum()
        return self._loss_result(total, get_activation("sigmoid").forward(z), t, delta_out, scale)

    def squared_error(self, y_hat, targets, delta_out=None, scale=None):
        """Returns the mean over the batch of 1/2 ||y_hat - targets||^2, and writes
        delta = (y_hat - targets) * scale (default 1/B).

        y_hat: (B, C) network outputs (identity output map); targets: (B, C), or int labels (B,) as one-hot.
        """
        t, scale = self._loss_targets("squared_error", y_hat, targets, delta_out, scale)
        diff = y_hat - t
        return self._loss_result(0.5 * (diff * diff).sum(), y_hat, t, delta_out, scale)

    def bias_grad(self, delta, out=None):
        """Column sums: out[j] = sum_i delta[i, j]. delta: (B, n); out: (n,)."""
        check_matrix("bias_grad", "delta", delta)
        check_shape("bias_grad", "out", out, (delta.shape[1],))
        check_dtypes("bias_grad", self.device, delta=delta, out=out)
        return np.sum(delta, axis=0, out=out)

    # ---- optimizer updates: one pass over the flat parameter buffer, in place (PyTorch's formulas) ----

    def sgd_update(self, params, grads, lr, weight_decay=0.0):
        """params -= lr * (grads + weight_decay * params). params, grads: flat (P,) buffers."""
        dtype = check_flat("sgd_update", self.device, params=params, grads=grads)
        lr, weight_decay = dtype.type(lr), dtype.type(weight_decay)
        if weight_decay:
            params *= 1 - lr * weight_decay
        params -= lr * grads

    def momentum_update(self, params, grads, velocity, lr, momentum=0.9, nesterov=False, weight_decay=0.0):
        """SGD with momentum as torch.optim.SGD (dampening 0); velocity starts at zeros.

        g = grads + weight_decay * params; velocity = momentum * velocity + g;
        params -= lr * (g + momentum * velocity if nesterov else velocity). All flat (P,) buffers.
        """
        dtype = check_flat("momentum_update", self.device, params=params, grads=grads, velocity=velocity)
        lr, mu, wd = dtype.type(lr), dtype.type(momentum), dtype.type(weight_decay)
        g = grads + wd * params if wd else grads
        velocity *= mu
        velocity += g
        params -= lr * (g + mu * velocity if nesterov else velocity)

    def adam_update(self, params, grads, m, v, step, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                    weight_decay=0.0, decoupled=False):
        """Adam (decoupled=False, L2 added to the gradient) or AdamW (decoupled=True), as torch.optim.

        step is the 1-based count of this update (for the bias corrections); m, v start at zeros.
        AdamW first scales params by (1 - lr * weight_decay). Then m = b1 m + (1 - b1) g,
        v = b2 v + (1 - b2) g^2, params -= lr / (1 - b1^step) * m / (sqrt(v / (1 - b2^step)) + eps).
        All flat (P,) buffers.
        """
        dtype = check_flat("adam_update", self.device, params=params, grads=grads, m=m, v=v)
        if int(step) < 1:
            raise ValueError(f"adam_update: step: expected the 1-based update count (>= 1), got {step}")
        t = dtype.type
        lr, b1, b2, eps, wd = t(lr), t(beta1), t(beta2), t(eps), t(weight_decay)
        g = grads
        if wd and decoupled:
            params *= 1 - lr * wd
        elif wd:
            g = grads + wd * params
        m *= b1
        m += t(1 - float(beta1)) * g  # 1 - beta in float64 first: 1 - float32(0.999) is 1.3e-5 off
        v *= b2
        v += t(1 - float(beta2)) * g * g
        bias1, bias2 = t(1 - float(beta1) ** int(step)), t(1 - float(beta2) ** int(step))
        params -= (lr / bias1) * m / (np.sqrt(v / bias2) + eps)

    # ---- the loss kernels share their checks and their NumPy body ----

    def check_loss_args(self, kernel, z, targets, delta_out, scale):
        """The shared checks of the loss kernels; returns (kind of targets, scale as z's dtype)."""
        check_rows(kernel, self.device, z, delta_out=delta_out)
        kind = check_targets(kernel, z, targets)
        if kind == "labels":
            check_label_range(kernel, targets, z.shape[1], self.xp)
        return kind, z.dtype.type(1.0 / z.shape[0] if scale is None else scale)

    def _loss_targets(self, kernel, z, targets, delta_out, scale):
        """Checked targets as a (B, C) matrix (one-hot for labels), and the scale in z's dtype."""
        kind, scale = self.check_loss_args(kernel, z, targets, delta_out, scale)
        if kind == "matrix":
            return targets, scale
        onehot = np.zeros_like(z)
        onehot[np.arange(z.shape[0]), targets] = 1
        return onehot, scale

    @staticmethod
    def _loss_result(total, y_hat, t, delta_out, scale):
        """Writes delta = (y_hat - t) * scale; returns the mean loss over the batch."""
        if delta_out is not None:
            np.subtract(y_hat, t, out=delta_out)
            delta_out *= scale
        return float(total) / y_hat.shape[0]
