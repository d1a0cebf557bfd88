"""PyTorch interchange against real PyTorch: state_dict in torch.nn.Sequential's layout both ways, and
DLPack in (no copy on the CPU) and out."""

import numpy as np
import pytest

from deltaprop.backend import to_numpy
from deltaprop.model import MLP
from deltaprop.model import training

torch = pytest.importorskip("torch")

SIZES = [7, 9, 8, 4]

# our activation name -> the torch module that computes the same function
TORCH_ACTIVATIONS = {
    "relu": lambda: torch.nn.ReLU(),
    "tanh": lambda: torch.nn.Tanh(),
    "sigmoid": lambda: torch.nn.Sigmoid(),
    "leaky_relu": lambda: torch.nn.LeakyReLU(0.01),
    "gelu": lambda: torch.nn.GELU(),
    "gelu_tanh": lambda: torch.nn.GELU(approximate="tanh"),
    "silu": lambda: torch.nn.SiLU(),
    "softplus": lambda: torch.nn.Softplus(),
    "elu": lambda: torch.nn.ELU(alpha=1.0),
}


def sequential(activation, sizes=SIZES):
    """torch.nn.Sequential(Linear, act, Linear, act, ..., Linear) in float64."""
    layers = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        layers += [torch.nn.Linear(n_in, n_out, dtype=torch.float64), TORCH_ACTIVATIONS[activation]()]
    return torch.nn.Sequential(*layers[:-1])


def torch_outputs(model, X):
    with torch.no_grad():
        return model(torch.from_numpy(X)).numpy()


def on_this_device(backend_name):
    """Skips where torch cannot hold the backend's arrays (a CPU-only torch and the GPU backend)."""
    if backend_name == "cupy" and not torch.cuda.is_available():
        pytest.skip("this torch has no CUDA: it cannot hold the GPU backend's arrays")


@pytest.mark.parametrize("activation", sorted(TORCH_ACTIVATIONS))
def test_torch_loads_ours_and_gives_the_same_outputs(backend_name, activation, rng):
    net = MLP(SIZES, activation=activation, backend=backend_name, dtype="float64", seed=1)
    model = sequential(activation)
    state = {key: torch.from_numpy(to_numpy(value)) for key, value in net.state_dict().items()}
    model.load_state_dict(state)  # strict: the keys and shapes are torch's own
    X = rng.standard_normal((16, SIZES[0]))
    np.testing.assert_allclose(to_numpy(net.forward(X).logits), torch_outputs(model, X), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(to_numpy(net.predict_proba(X)),
                               torch.softmax(torch.from_numpy(torch_outputs(model, X)), dim=1).numpy(),
                               rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_ours_loads_torchs_and_gives_the_same_outputs(backend_name, activation, rng):
    torch.manual_seed(0)
    model = sequential(activation)
    net = MLP(SIZES, activation=activation, backend=backend_name, dtype="float64", seed=5)
    assert list(net.state_dict()) == list(model.state_dict())
    net.load_state_dict(model.state_dict())
    for key, value in model.state_dict().items():
        assert np.array_equal(to_numpy(net.state_dict()[key]), value.numpy())
    X = rng.standard_normal((16, SIZES[0]))
    np.testing.assert_allclose(to_numpy(net.forward(X).logits), torch_outputs(model, X), rtol=1e-6, atol=1e-9)


def test_state_dict_values_view_the_parameters():
    net = MLP([3, 4, 2], backend="numpy", dtype="float64", seed=0)
    state = net.state_dict()
    assert state["0.weight"].shape == (4, 3) and state["2.weight"].shape == (2, 4) and state["2.bias"].shape == (2,)
    for value in state.values():
        assert np.shares_memory(value, net.params)


def test_a_float32_network_loads_float64_tensors(rng):
    torch.manual_seed(1)
    model = sequential("tanh")
    net = MLP(SIZES, activation="tanh", backend="numpy", dtype="float32", seed=0)
    net.load_state_dict(model.state_dict())
    X = rng.standard_normal((16, SIZES[0])).astype(np.float32)
    np.testing.assert_allclose(net.forward(X).logits, torch_outputs(model, X.astype(np.float64)), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.pop("2.bias"), r"state_dict: expected the keys \['0.weight', '0.bias', '2.weight', '2.bias'\] of a "
                                    r"2-layer network, got 1 missing \['2.bias'\] and 0 unexpected \[\]"),
        (lambda s: s.update({"1.weight": s["0.weight"]}), r"got 0 missing \[\] and 1 unexpected \['1.weight'\]"),
        (lambda s: s.update({"0.weight": s["0.weight"].T}), r"state_dict: 0.weight: expected shape \(4, 3\), got \(3, 4\)"),
        (lambda s: s["2.bias"].__setitem__(0, float("nan")), r"state_dict: 2.bias: expected finite values, got NaN or inf"),
    ],
)
def test_load_state_dict_refuses_what_does_not_fit_and_changes_nothing(change, message):
    net = MLP([3, 4, 2], backend="numpy", dtype="float64", seed=0)
    state = {key: torch.from_numpy(to_numpy(value).copy()) for key, value in net.state_dict().items()}
    for value in state.values():
        value.add_(1.0)
    change(state)
    before = net.params.copy()
    with pytest.raises(ValueError, match=message):
        net.load_state_dict(state)
    assert np.array_equal(net.params, before)


# ---- DLPack -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend_name", ["numpy", "numba"])
def test_torch_tensors_come_in_without_a_copy_on_the_cpu(backend_name, rng):
    net = MLP([5, 6, 3], backend=backend_name, dtype="float32", seed=0)
    X = torch.from_numpy(rng.standard_normal((20, 5)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 3, 20))
    inputs, labels = training._dataset(net, X, y)  # what fit trains on
    assert np.shares_memory(inputs, X.numpy()) and np.shares_memory(labels, y.numpy())
    assert np.shares_memory(net.as_inputs(X), X.numpy())  # what predict runs on, chunk by chunk
    expected = net.predict(X.numpy())
    assert np.array_equal(net.predict(X), expected)
    history = net.fit(X, y, epochs=2, progress=False)
    assert history.epochs == 2


def test_our_arrays_go_out_through_dlpack(backend_name, rng):
    on_this_device(backend_name)
    net = MLP([5, 6, 3], backend=backend_name, dtype="float32", seed=0)
    X = rng.standard_normal((20, 5)).astype(np.float32)
    proba = net.predict_proba(X)
    tensor = torch.from_dlpack(proba)
    assert tensor.shape == (20, 3) and tensor.dtype == torch.float32
    pointer = proba.data.ptr if backend_name == "cupy" else proba.__array_interface__["data"][0]
    assert tensor.data_ptr() == pointer  # no copy
    weight = torch.from_dlpack(net.state_dict()["0.weight"])
    weight.mul_(0.0)  # the tensor views the network's parameters
    assert not to_numpy(net.weights[0]).any()


@pytest.mark.gpu
def test_torch_cuda_tensors_come_in_without_a_copy_on_the_gpu(rng):
    if not torch.cuda.is_available():
        pytest.skip("this torch has no CUDA")
    net = MLP([5, 6, 3], backend="cupy", dtype="float32", seed=0)
    X = torch.from_numpy(rng.standard_normal((20, 5)).astype(np.float32)).cuda()
    assert net.as_inputs(X).data.ptr == X.data_ptr()
    assert np.array_equal(to_numpy(net.predict(X)), to_numpy(net.predict(X.cpu().numpy())))
