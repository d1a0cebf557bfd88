"""The peers: the same training step in PyTorch and in JAX, timed beside our backends.

Same network (the workload's widths, ReLU), same loss (softmax cross-entropy, mean over the batch), same
update (plain SGD, one learning rate), same dtype, inputs made once per batch size on the peer's device.
PyTorch runs the loop as its users write it (``zero_grad``, forward, ``backward``, ``step``) with
``torch.set_num_threads`` equal to our CPU threads; JAX runs one ``jax.jit`` of the whole step
(value_and_grad and the update, parameters donated) with its own thread pool. Neither library is
imported until a peer is made or its device is asked about.

A peer is a subject of the bench, like our backends: ``name``, ``kind`` ("peer"), ``device`` ("cpu" or
"cuda"), ``compile()`` (seconds of up-front compilation, or None), ``step(batch)`` (a ``Timed`` of one
training step on inputs made for ``batch``), ``describe()`` (library, version, device, threads).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from deltaprop.benchmarks.timing import HostClock, Timed, torch_cuda_clock
from deltaprop.benchmarks.workload import LEARNING_RATE, host_batch


class TorchPeer:
    """``torch.nn.Sequential`` of Linear and ReLU, CrossEntropyLoss and ``torch.optim.SGD``."""

    kind = "peer"

    def __init__(self, name, device, sizes, dtype, threads):
        import torch

        self.name, self.device, self.sizes, self.dtype = name, device, list(sizes), dtype
        self.torch_device = torch.device(device)
        torch.set_num_threads(threads)
        layers = []
        for n_in, n_out in zip(self.sizes[:-1], self.sizes[1:]):
            layers += [torch.nn.Linear(n_in, n_out), torch.nn.ReLU()]
        self.model = torch.nn.Sequential(*layers[:-1]).to(device=self.torch_device, dtype=getattr(torch, dtype))
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=LEARNING_RATE)
        self.loss = torch.nn.CrossEntropyLoss()
        self.clock = torch_cuda_clock() if device == "cuda" else HostClock()

    def compile(self):
        return None  # eager: nothing is compiled up front

    def step(self, batch) -> Timed:
        import torch

        x, y = (torch.from_numpy(a).to(self.torch_device) for a in host_batch(self.sizes, batch, self.dtype))

        def train_step():
            self.optimizer.zero_grad()
            loss = self.loss(self.model(x), y)
            loss.backward()
            self.optimizer.step()
            return loss

        return Timed(train_step, self.clock)

    def describe(self) -> dict:
        import torch

        facts = {"library": "torch", "version": torch.__version__, "device": self.device,
                 "threads": torch.get_num_threads()}
        if self.device == "cuda":
            facts["device_name"] = torch.cuda.get_device_name()
        return facts


class JaxPeer:
    """A ``jax.jit`` of the whole step: value_and_grad of the mean softmax cross-entropy, then p - lr * g."""

    kind = "peer"

    def __init__(self, name, device, sizes, dtype, threads):
        import jax
        import numpy as np

        if dtype == "float64":
            jax.config.update("jax_enable_x64", True)
        self.name, self.device, self.sizes, self.dtype = name, device, list(sizes), dtype
        self.jax_device = jax.devices("gpu" if device == "cuda" else "cpu")[0]
        rng = np.random.default_rng(0)
        # [(W (n_out, n_in), b (n_out,))], He-initialised like our MLP
        self.params = jax.device_put(
            [(rng.normal(0, np.sqrt(2 / n_in), (n_out, n_in)).astype(dtype), np.zeros(n_out, dtype))
             for n_in, n_out in zip(self.sizes[:-1], self.sizes[1:])],
            self.jax_device)
        self.last = self.params
        self.jitted = jax.jit(self._train_step, donate_argnums=(0,))
        self.clock = HostClock(lambda: jax.block_until_ready(self.last))

    @staticmethod
    def _train_step(params, x, y):
        import jax
        import jax.numpy as jnp

        def loss_of(params):
            a = x
            for W, b in params[:-1]:
                a = jax.nn.relu(a @ W.T + b)
            W, b = params[-1]
            log_p = jax.nn.log_softmax(a @ W.T + b)
            return -jnp.mean(jnp.take_along_axis(log_p, y[:, None], axis=1))

        loss, grads = jax.value_and_grad(loss_of)(params)
        return jax.tree.map(lambda p, g: p - LEARNING_RATE * g, params, grads), loss

    def compile(self):
        return None  # jit compiles on the first step at each batch size: that is the first step's time

    def step(self, batch) -> Timed:
        import jax

        x, y = jax.device_put(host_batch(self.sizes, batch, self.dtype), self.jax_device)

        def train_step():
            self.params, loss = self.jitted(self.params, x, y)
            self.last = loss
            return loss

        return Timed(train_step, self.clock)

    def describe(self) -> dict:
        import jax

        return {"library": "jax", "version": jax.__version__, "device": self.device,
                "device_name": str(self.jax_device.device_kind), "threads": None}


@dataclass(frozen=True)
class PeerSpec:
    """library: the module to import; device: "cpu" or "cuda"; make: the peer's class."""

    library: str
    device: str
    make: type


# peer name -> what it is; looked up by name everywhere (``--backends torch,jax``)
PEERS: dict[str, PeerSpec] = {
    "torch": PeerSpec("torch", "cpu", TorchPeer),
    "jax": PeerSpec("jax", "cpu", JaxPeer),
    "torch-cuda": PeerSpec("torch", "cuda", TorchPeer),
    "jax-cuda": PeerSpec("jax", "cuda", JaxPeer),
}


def _has_cuda(library: str) -> bool:
    if library == "torch":
        import torch

        return torch.cuda.is_available()
    import jax

    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:  # no GPU platform in this jaxlib
        return False


def peer_status(name: str) -> tuple[bool, str]:
    """(usable here, why not) for a peer name. A CPU peer only looks for its library; a CUDA peer imports it."""
    spec = PEERS[name]
    if importlib.util.find_spec(spec.library) is None:
        return False, f"{spec.library} is not installed (pip install 'deltaprop[peers]')"
    if spec.device == "cuda" and not _has_cuda(spec.library):
        return False, f"{spec.library} sees no CUDA device"
    return True, ""


def make_peer(name: str, sizes, dtype: str, threads: int):
    """The peer called ``name`` for a network of widths ``sizes`` in ``dtype``, on ``threads`` CPU threads."""
    spec = PEERS[name]
    return spec.make(name, spec.device, sizes, dtype, threads)
