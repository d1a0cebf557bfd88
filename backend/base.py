"""The backend contract, and its reference implementation ("numpy"), written against ``self.xp``.

Every kernel is a method whose docstring gives the shapes and the semantics. The bodies use only
``self.xp`` (NumPy here), so a backend on another array module with NumPy's API (CuPy) gets a working
implementation of every kernel from this class and overrides only what it accelerates, keeping each
signature exactly (``tests/test_contract.py`` checks both). Kernels take ``out=`` buffers so that a
training step allocates nothing after its first call; where ``out`` is None a new array is returned.

The argument checks live in ``backend/checks.py``, one function per check, and every backend runs the
same ones, so that each refuses bad input with the same message.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import ModuleType
from typing import Any

import numpy as np

from deltaprop.arrays import Array, ArrayInput, DTypeLike, FusedSteps, WarmupProgress
from deltaprop.backend import checks
from deltaprop.backend.checks import (
    check_adam,
    check_bias_grad,
    check_flat,
    check_gemm,
    check_label_range,
    check_loss,
    check_rows,
    check_stacked,
    check_stacked_adam,
    check_stacked_bias_grad,
    check_stacked_sgd,
    check_stacked_targets,
    check_warmup,
)
from deltaprop.kernels.activations import get_activation
from deltaprop.kernels.dtypes import dtypes_for

# Host buffers start on a cache line: the vector loads of a row of W then never straddle two lines,
# whatever address the allocator returned (NumPy aligns to 16 bytes only).
HOST_ALIGNMENT = 64


def adam_bias_corrections(step, beta1, beta2) -> tuple[float, float]:
    """Adam's bias corrections (1 - beta1**step, 1 - beta2**step) in float64, for every backend."""
    return 1 - float(beta1) ** int(step), 1 - float(beta2) ** int(step)


def check_loss_kernel(caller, kernel) -> str:
    """``kernel`` when it names a loss kernel, else a ValueError naming ``caller``."""
    if kernel not in checks.LOSS_KERNELS:
        raise ValueError(f"{caller}: kernel: expected one of {list(checks.LOSS_KERNELS)}, got {kernel!r}")
    return kernel


# ---- the contract ---------------------------------------------------------------------------------


class Backend:
    """The kernel contract, implemented with NumPy (the reference backend, always available).

    Shapes: B is the batch (rows are samples), n a layer width, C the number of classes or outputs.
    Every array argument of one call shares one floating dtype, one of ``self.dtypes``.
    """

    name = "numpy"
    device = "cpu"  # the kind of device: "cpu" or "cuda" (a key of the dtype table's ``devices``)
    # whether reading a result (``device_loss``'s) costs nothing: False where it waits for a device
    results_on_host = True

    # ---- lifecycle and arrays ----

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        """(usable here, why not). Must be cheap and must not raise."""
        return True, ""

    @property
    def xp(self) -> ModuleType:
        """The array module of this backend's arrays (numpy, cupy)."""
        return np

    @property
    def dtypes(self) -> tuple[str, ...]:
        """The dtype names this backend computes in (from the dtype table)."""
        return dtypes_for(self.device)

    def asarray(self, x: ArrayInput, dtype: DTypeLike | None = None) -> Array:
        """``x`` as a C-contiguous array of this backend in ``dtype`` (copied only where it must be)."""
        xp = self.xp
        if not isinstance(x, xp.ndarray) and hasattr(x, "__dlpack__"):
            x = xp.from_dlpack(x)  # zero-copy from a DLPack producer on this backend's device (torch, jax)
        return xp.ascontiguousarray(x, dtype=dtype)

    def to_numpy(self, x: Array) -> np.ndarray:
        """``x`` as a NumPy array on the host."""
        return np.asarray(x)

    def empty(self, shape: int | tuple[int, ...], dtype: DTypeLike) -> Array:
        """An uninitialised C-contiguous host array whose data starts at a multiple of ``HOST_ALIGNMENT``
        bytes (a backend whose arrays live elsewhere overrides this)."""
        dtype = np.dtype(dtype)
        size = int(np.prod(shape)) * dtype.itemsize
        raw = np.empty(size + HOST_ALIGNMENT, np.uint8)
        start = -raw.ctypes.data % HOST_ALIGNMENT
        return raw[start:start + size].view(dtype).reshape(shape)

    def zeros(self, shape: int | tuple[int, ...], dtype: DTypeLike) -> Array:
        """``empty``, filled with zeros."""
        out = self.empty(shape, dtype)
        out[...] = 0
        return out

    def synchronize(self) -> None:
        """Wait until every kernel launched so far has finished (a no-op on the CPU)."""

    def warmup(self, dtypes: Iterable[DTypeLike] | None = None, activations: Iterable[str] = ("relu",),
               losses: Iterable[str] = ("softmax_xent",), batches: Iterable[int] | None = None,
               uses: Iterable[str] | None = None, progress: WarmupProgress | None = None) -> float:
        """Compiles up front what the chosen work runs, so that no later call compiles (benchmarks call it so
        that compile time is never timed); returns the seconds spent (0 for a backend that compiles nothing).

        dtypes: default every one of ``self.dtypes``; activations: of the hidden layers; losses: loss
        kernels ("softmax_xent", "sigmoid_xent", "squared_error"); batches: the batch sizes to be ready for
        (default every size: a backend may compile a step per class of sizes); uses: what will run, any of
        ``checks.WARMUP_USES`` (default all of them). progress: None, or ``progress(done, total, what)``, called before
        each part that has to be compiled (not for one loaded from a disk cache): ``what`` names the part,
        ``done`` counts the parts before it, of ``total``.
        """
        check_warmup(self, dtypes, activations, losses, batches, uses)  # the same errors on every backend
        return 0.0

    def describe(self) -> dict[str, Any]:
        """Facts about this backend for `deltaprop info` and benchmark reports."""
        return {"name": self.name, "device": self.device, "numpy": np.__version__}

    def fused_sgd_step(self, activation: str, loss: str, dtype: DTypeLike) -> FusedSteps:
        """Compiled whole SGD training steps by batch size, or None: then the model runs its kernel-by-kernel
        loop. ``steps[B]`` is the step for batches of B rows (a backend may compile one per class of batch
        sizes, each on first use; every one computes the same function at any batch size).

        activation: the hidden layers' activation; loss: the loss kernel's name ("softmax_xent",
        "sigmoid_xent", "squared_error"); dtype: the arrays' dtype. The callable,
        ``step(x, targets, params, work, offsets, lr) -> (summed loss, bad_row)``, computes the same
        function as forward, the loss kernel, backward and ``sgd_update`` (the gradients themselves are
        never stored): x (B, n0) C-contiguous; targets int64 labels (B,) or (B, n_L); params the flat
        (P,) parameter buffer; work the flat (``layout.work_size``,) workspace and offsets
        ``layout.offsets`` of the network's ``deltaprop.kernels.layout.Layout(sizes, B)``; lr a scalar
        of the dtype. It returns the loss
        summed over the batch and -1, or 0 and the first row whose label is outside [0, n_L); it changes
        nothing when a label is out of range or the loss is not finite.
        """
        return None

    def fused_grads_step(self, activation: str, loss: str, dtype: DTypeLike) -> FusedSteps:
        """Compiled forward + loss + backward steps that write the gradients, by batch size as for
        ``fused_sgd_step``, or None: then the model runs its kernel-by-kernel loop.

        Arguments as for ``fused_sgd_step``. The callable, ``step(x, targets, params, grads, work, offsets)
        -> (summed loss, bad_row)``, computes the same function as forward, the loss kernel and backward:
        dJ/dW[l] and dJ/db[l] go into the flat (P,) ``grads`` buffer at the parameters' offsets, for an
        optimizer's update kernel to apply; the logits are left in the workspace's z[L]. It returns the
        loss summed over the batch and -1, or 0 and the first row whose label is outside [0, n_L); it
        changes nothing in ``grads`` when a label is out of range or the loss is not finite.
        """
        return None

    # ---- kernels ----

    def gemm(self, a: Array, b: Array, out: Array | None = None, trans_a: bool = False, trans_b: bool = False,
             alpha: float = 1.0, beta: float = 0.0) -> Array:
        """out = alpha * op(a) @ op(b) + beta * out, where op(x) is x or its transpose.

        a: (m, k) or (k, m) when trans_a; b: (k, n) or (n, k) when trans_b; out: (m, n).
        3-D arguments are a stack of independent products (strided-batched): a (s, m, k), b (s, k, n),
        out (s, m, n). beta is ignored when out is None. Transposed views are never copied.
        """
        xp = self.xp
        shape = check_gemm(a, b, out, trans_a, trans_b, self.device)
        op_a = xp.swapaxes(a, -1, -2) if trans_a else a
        op_b = xp.swapaxes(b, -1, -2) if trans_b else b
        if out is None:
            out, beta = xp.empty(shape, dtype=a.dtype), 0.0
        if beta == 0.0 and alpha == 1.0:
            xp.matmul(op_a, op_b, out=out)
        else:
            product = xp.matmul(op_a, op_b)
            product *= a.dtype.type(alpha)
            if beta != 0.0:
                out *= a.dtype.type(beta)
                out += product
            else:
                out[...] = product
        return out

    def bias_act(self, acc: Array, b: Array, act: str, z_out: Array | None = None,
                 a_out: Array | None = None) -> tuple[Array, Array]:
        """z = acc + b (b broadcast over rows); a = act(z). Returns (z, a).

        acc: (B, n); b: (n,); z_out, a_out: (B, n) or None. z_out may be acc itself (in place).
        a_out may be z_out (an in-place activation); without a_out, a is a new array.
        """
        check_rows("bias_act", self.device, b, acc=acc, z_out=z_out, a_out=a_out)
        activation = get_activation(act)
        z = self.xp.add(acc, b, out=z_out)
        a = activation.forward(z)
        if a_out is None:
            return z, a
        a_out[...] = a
        return z, a_out

    def act_backward(self, g: Array, z: Array, act: str, out: Array | None = None) -> Array:
        """out = g * act'(z), elementwise. g, z, out: (B, n); out may be g (in place)."""
        check_rows("act_backward", self.device, g=g, z=z, out=out)
        return self.xp.multiply(g, get_activation(act).derivative(z), out=out)

    def softmax(self, z: Array, out: Array | None = None) -> Array:
        """Row-wise softmax, stable for any finite z. z, out: (B, C)."""
        xp = self.xp
        check_rows("softmax", self.device, z=z, out=out)
        out = xp.subtract(z, z.max(axis=1, keepdims=True), out=out)
        xp.exp(out, out=out)
        out /= out.sum(axis=1, keepdims=True)
        return out

    def softmax_xent(self, z: Array, labels: Array, delta_out: Array | None = None,
                     scale: float | None = None) -> float:
        """Softmax cross-entropy: returns the mean loss over the batch as a float, and writes
        delta = (softmax(z) - onehot(labels)) * scale (scale defaults to 1/B) into delta_out.

        z: (B, C) logits; labels: int (B,) in [0, C), or probability rows (B, C) of z's dtype (rows
        summing to 1); delta_out: (B, C) or None (then delta is computed and dropped). Uses the row
        max (log-sum-exp), so it is stable for any finite z and never takes log(0).
        """
        return self._loss("softmax_xent", z, labels, delta_out, scale)

    def sigmoid_xent(self, z: Array, targets: Array, delta_out: Array | None = None,
                     scale: float | None = None) -> float:
        """Multi-label sigmoid cross-entropy: returns the mean over the batch of the summed element
        losses, and writes delta = (sigmoid(z) - targets) * scale (default 1/B).

        z: (B, C) logits; targets: (B, C) in [0, 1], or int labels (B,) taken as one-hot rows.
        """
        return self._loss("sigmoid_xent", z, targets, delta_out, scale)

    def squared_error(self, y_hat: Array, targets: Array, delta_out: Array | None = None,
                      scale: float | None = None) -> float:
        """Returns the mean over the batch of 1/2 ||y_hat - targets||^2, and writes
        delta = (y_hat - targets) * scale (default 1/B).

        y_hat: (B, C) network outputs (identity output map); targets: (B, C), or int labels (B,) as one-hot.
        """
        return self._loss("squared_error", y_hat, targets, delta_out, scale, z_name="y_hat")

    def device_loss(self, kernel: str, z: Array, targets: Array, delta_out: Array | None = None) -> Array | float:
        """The loss kernel ``kernel`` ("softmax_xent", "sigmoid_xent", "squared_error") without the read of
        its value: writes delta_out as that kernel does (scale 1/B) and returns the mean loss over the
        batch where it was computed, for the caller to read when it needs it. With ``results_on_host``
        that is a float (this reference: the kernel itself); else a 0-d array of the device in the
        accumulation dtype, whose launches are queued and which nothing has copied to the host. A
        backend may reuse that array: it holds this loss until the calling thread's next one at the same
        shape. A label outside [0, C) raises as the kernel does where that check is free, and makes the
        loss NaN where it would wait for the device; the caller checks the labels of a NaN loss."""
        return getattr(self, check_loss_kernel("device_loss", kernel))(z, targets, delta_out)

    def bias_grad(self, delta: Array, out: Array | None = None) -> Array:
        """Column sums: out[j] = sum_i delta[i, j]. delta: (B, n); out: (n,)."""
        check_bias_grad(self.device, delta, out)
        return self.xp.sum(delta, axis=0, out=out)

    # ---- optimizer updates: one pass over the flat parameter buffer, in place (PyTorch's formulas) ----

    def sgd_update(self, params: Array, grads: Array, lr: float, weight_decay: float = 0.0) -> None:
        """params -= lr * (grads + weight_decay * params). params, grads: flat (P,) buffers."""
        scalar = check_flat("sgd_update", self.device, params=params, grads=grads).type
        lr, weight_decay = scalar(lr), scalar(weight_decay)
        if weight_decay:
            params *= 1 - lr * weight_decay
        params -= lr * grads

    def momentum_update(self, params: Array, grads: Array, velocity: Array, lr: float, momentum: float = 0.9,
                        nesterov: bool = False, weight_decay: float = 0.0) -> None:
        """SGD with momentum as torch.optim.SGD (dampening 0); velocity starts at zeros.

        g = grads + weight_decay * params; velocity = momentum * velocity + g;
        params -= lr * (g + momentum * velocity if nesterov else velocity). All flat (P,) buffers;
        velocity in the accumulation dtype of params (``kernels.dtypes.accumulation_dtype``: float32 for
        the 16-bit types).
        """
        scalar = check_flat("momentum_update", self.device, params=params, grads=grads, velocity=velocity).type
        lr, mu, wd = scalar(lr), scalar(momentum), scalar(weight_decay)
        g = grads + wd * params if wd else grads
        velocity *= mu
        velocity += g
        params -= lr * (g + mu * velocity if nesterov else velocity)

    def adam_update(self, params: Array, grads: Array, m: Array, v: Array, step: int, lr: float = 1e-3,
                    beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
                    decoupled: bool = False) -> None:
        """Adam (decoupled=False, L2 added to the gradient) or AdamW (decoupled=True), as torch.optim.

        step is the 1-based count of this update (for the bias corrections); m, v start at zeros.
        AdamW first scales params by (1 - lr * weight_decay). Then m = b1 m + (1 - b1) g,
        v = b2 v + (1 - b2) g^2, params -= lr / (1 - b1^step) * m / (sqrt(v / (1 - b2^step)) + eps).
        All flat (P,) buffers; m and v in the accumulation dtype of params (float32 for the 16-bit types).
        """
        scalar = check_adam(self.device, params, grads, m, v, step).type
        wd = scalar(weight_decay)
        self._adam(params, grads, m, v, step, scalar(lr), beta1, beta2, eps, wd, bool(wd), decoupled)

    def _adam(self, params, grads, m, v, step, lr, beta1, beta2, eps, wd, decays, decoupled):
        """Adam's formulas on params, grads, m, v of any shape; lr and wd scalars of the dtype or columns
        that broadcast over them (per member); ``decays``: whether any weight decay is not 0."""
        scalar = params.dtype.type
        b1, b2, eps = scalar(beta1), scalar(beta2), scalar(eps)
        g = grads
        if decays and decoupled:
            params *= 1 - lr * wd
        elif decays:
            g = grads + wd * params
        m *= b1
        m += scalar(1 - float(beta1)) * g  # 1 - beta in float64 first: 1 - float32(0.999) is 1.3e-5 off
        v *= b2
        v += scalar(1 - float(beta2)) * g * g
        bias1, bias2 = map(scalar, adam_bias_corrections(step, beta1, beta2))
        params -= (lr / bias1) * m / (self.xp.sqrt(v / bias2) + eps)

    # ---- stacked networks (an ensemble): the kernels over a leading member axis K, on strided views ----

    def fused_ensemble_step(self, activation: str, loss: str, dtype: DTypeLike, grads: bool = False) -> FusedSteps:
        """Compiled steps of K stacked networks by batch size, as ``fused_sgd_step`` (``grads`` False) or
        ``fused_grads_step`` (True), or None: then the ensemble runs the stacked kernel-by-kernel loop.

        The callable, ``step(x, targets, params, work, offsets, per_member, totals) -> bad_row``, runs member
        k's fused step on row k of the (K, P) ``params`` and (K, ``layout.work_size``) ``work``: x (1 or K,
        B, n0) (a stack of one: shared by every member), targets (1 or K, B) int64 labels or (1 or K, B,
        n_L), per_member the (K,) learning rates of the dtype (SGD step: params updated) or the (K, P)
        gradient buffer (gradients step); each member's summed loss goes into ``totals``, (K,) of the dtype.
        Members are independent: one whose loss is not finite, or whose labels leave [0, n_L), is left
        unchanged and the others are stepped; the call returns the first bad row of the first member with
        a bad label (-1 when none). A backend may run the members in any order or at once.
        """
        return None

    def stacked_bias_act(self, acc: Array, b: Array, act: str, z_out: Array | None = None,
                         a_out: Array | None = None) -> tuple[Array, Array]:
        """``bias_act`` of every member: z[k] = acc[k] + b[k]; a = act(z). acc, z_out, a_out: (K, B, n);
        b: (K, n). Returns (z, a)."""
        check_stacked("stacked_bias_act", self.device, b, acc=acc, z_out=z_out, a_out=a_out)
        z = self.xp.add(acc, b[:, None, :], out=z_out)
        a = get_activation(act).forward(z)
        if a_out is None:
            return z, a
        a_out[...] = a
        return z, a_out

    def stacked_act_backward(self, g: Array, z: Array, act: str, out: Array | None = None) -> Array:
        """``act_backward`` of every member: out = g * act'(z). g, z, out: (K, B, n); out may be g."""
        check_stacked("stacked_act_backward", self.device, g=g, z=z, out=out)
        return self.xp.multiply(g, get_activation(act).derivative(z), out=out)

    def stacked_loss(self, kernel: str, z: Array, targets: Array, delta_out: Array) -> Array:
        """Loss ``kernel`` ("softmax_xent", ...) of every member: z (K, B, C) logits, targets int labels
        (K, B) or (K, B, C); writes delta = (y_hat - targets) / B into delta_out (K, B, C) and returns
        the (K,) float64 array of each member's mean loss. A label outside [0, C) is a ValueError
        before anything is written."""
        xp = self.xp
        check_stacked(kernel, self.device, z=z, delta_out=delta_out)
        if check_stacked_targets(kernel, z, targets) == "labels":
            check_label_range(kernel, targets, z.shape[2], xp)
            targets = (targets[..., None] == xp.arange(z.shape[2])).astype(z.dtype)  # one-hot rows
        total, y_hat = getattr(self, f"_{kernel}_terms")(z, targets)
        delta_out[...] = y_hat - targets
        delta_out *= z.dtype.type(1.0 / z.shape[1])
        return xp.asarray(total, dtype=np.float64) / z.shape[1]

    def stacked_bias_grad(self, delta: Array, out: Array | None = None) -> Array:
        """``bias_grad`` of every member: out[k, j] = sum_i delta[k, i, j]. delta: (K, B, n); out: (K, n)."""
        check_stacked_bias_grad(self.device, delta, out)
        return self.xp.sum(delta, axis=1, out=out)

    def stacked_sgd_update(self, params: Array, grads: Array, lr: Array, weight_decay: Array,
                           velocity: Array | None = None, momentum: Array | None = None,
                           nesterov: bool = False) -> None:
        """``sgd_update`` (velocity None) or ``momentum_update`` of every member with its own
        hyperparameters: params, grads, velocity (K, P); lr, weight_decay, momentum (K,) arrays of the
        dtype (host NumPy arrays). Member k computes exactly what the flat update computes on row k."""
        xp = self.xp
        check_stacked_sgd(self.device, params, grads, lr, weight_decay, velocity, momentum)
        lr, wd = (xp.asarray(h, dtype=params.dtype)[:, None] for h in (lr, weight_decay))
        if velocity is None:
            if weight_decay.any():
                params *= 1 - lr * wd
            params -= lr * grads
            return
        mu = xp.asarray(momentum, dtype=params.dtype)[:, None]
        g = grads + wd * params if weight_decay.any() else grads
        velocity *= mu
        velocity += g
        params -= lr * (g + mu * velocity if nesterov else velocity)

    def stacked_adam_update(self, params: Array, grads: Array, m: Array, v: Array, step: int, lr: Array,
                            weight_decay: Array, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                            decoupled: bool = False) -> None:
        """``adam_update`` of every member with its own lr and weight_decay ((K,) host arrays): params,
        grads, m, v (K, P), m and v in the accumulation dtype. Row k computes what the flat update does."""
        check_stacked_adam(self.device, params, grads, m, v, step, lr, weight_decay)
        lr_column, wd_column = (self.xp.asarray(h, dtype=params.dtype)[:, None] for h in (lr, weight_decay))
        self._adam(params, grads, m, v, step, lr_column, beta1, beta2, eps, wd_column, bool(weight_decay.any()),
                   decoupled)

    # ---- the loss kernels' one body: a backend with loss kernels of its own overrides ``_loss`` ----

    def _loss(self, kernel: str, z: Array, targets: Array, delta_out: Array | None, scale: float | None,
              z_name: str = "z") -> float:
        """Loss ``kernel`` ("softmax_xent", ...) on z (B, C), named ``z_name`` in messages: checks the
        arguments, writes delta = (y_hat - targets) * scale into delta_out, returns the mean loss."""
        xp = self.xp
        kind, scale = check_loss(kernel, self.device, z, targets, delta_out, scale, z_name)
        if kind == "labels":
            check_label_range(kernel, targets, z.shape[1], xp)
            onehot = xp.zeros_like(z)
            onehot[xp.arange(z.shape[0]), targets] = 1
            targets = onehot
        total, y_hat = getattr(self, f"_{kernel}_terms")(z, targets)  # the terms of each loss, just below
        if delta_out is not None:
            delta_out[...] = y_hat - targets
            delta_out *= z.dtype.type(scale)
        return float(total) / z.shape[0]

    # The terms take (B, C) or a (K, B, C) stack and sum over the last two axes: per member of a stack.
    def _softmax_xent_terms(self, z, targets):
        """(the loss summed over the batch, softmax(z)); the row max keeps exp from overflowing."""
        xp = self.xp
        shifted = z - z.max(axis=-1, keepdims=True)
        log_softmax = shifted - xp.log(xp.exp(shifted).sum(axis=-1, keepdims=True))
        return -(targets * log_softmax).sum(axis=(-2, -1)), xp.exp(log_softmax)

    def _sigmoid_xent_terms(self, z, targets):
        """(the loss summed over the batch, sigmoid(z))."""
        xp = self.xp
        # -[t log s + (1 - t) log(1 - s)] = max(z, 0) - t z + log(1 + exp(-|z|)), stable for any finite z
        total = (xp.maximum(z, 0) - targets * z + xp.log1p(xp.exp(-xp.abs(z)))).sum(axis=(-2, -1))
        return total, get_activation("sigmoid").forward(z)

    def _squared_error_terms(self, y_hat, targets):
        """(the loss summed over the batch, y_hat)."""
        diff = y_hat - targets
        return 0.5 * (diff * diff).sum(axis=(-2, -1)), y_hat
