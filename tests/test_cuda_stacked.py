"""The CuPy backend's stacked kernels (an ensemble's: stacked_bias_act, stacked_act_backward, stacked_loss,
stacked_bias_grad) on the host stand-in (DELTAPROP_CUDA_SIM=1): on the strided (K, B, n) views of an
ensemble's workspace and parameters, in place, member k's results are the 2-D kernel's on its matrices
bit for bit and the reference's within the dtype's tolerance; shared targets are read at member stride
0; nothing outside the views is written and nothing is copied; a bad label writes nothing. With
DELTAPROP_CUDA_SIM=0 the same cases run on the device (benchmarks/device_check.sh), all but the copy count.
"""

import numpy as np
import pytest
from helpers import LOSS_REFERENCES, assert_close, labels_for, random_host

from deltaprop.backend import to_numpy
from deltaprop.kernels import reference
from deltaprop.kernels.cuda.host import standin
from deltaprop.kernels.dtypes import DTYPES
from deltaprop.kernels.layout import A_AT, B_AT, DELTA_AT, N_OUT, Z_AT, Layout
from deltaprop.model import MLPEnsemble

pytestmark = pytest.mark.cuda_sim  # conftest sets DELTAPROP_CUDA_SIM=1 for each test

SIM_DTYPES = ("float32", "float64", "float16", "bfloat16")
SIZES = (7, 33, 3)  # a hidden layer of a warp's row length plus one, three classes
BATCH = 5


def workspace(sim, members, dtype, sizes=SIZES, batch=BATCH):
    """(layout, an ensemble's (K, work_size) workspace of random values, on the stand-in)."""
    layout = Layout(sizes, batch)
    return layout, sim.asarray(random_host((members, layout.work_size), dtype, members))


def host(x):
    return np.array(to_numpy(x))


def regions(layout, *views):
    """A (work_size,) mask of the workspace views named by (column, layer) of ``Layout.offsets``."""
    mask = np.zeros(layout.work_size, bool)
    for column, layer in views:
        at, n = layout.offsets[layer, column], layout.offsets[layer, N_OUT]
        mask[at:at + layout.batch * n] = True
    return mask


def assert_rest_unchanged(before, work, mask):
    assert host(work)[:, ~mask].tobytes() == before[:, ~mask].tobytes(), "a write outside the kernel's views"


def assert_same_bits(got, expected, what):
    assert host(got).tobytes() == host(expected).tobytes(), f"{what}: not the 2-D kernel's result bit for bit"


@pytest.mark.parametrize("members", [1, 3])
@pytest.mark.parametrize("dtype", SIM_DTYPES)
def test_bias_act_and_act_backward_on_workspace_views_in_place_are_each_members_2d_kernel(sim, dtype, members):
    ensemble = MLPEnsemble(members, SIZES, backend=sim, dtype=dtype, seed=1)
    layout, work = workspace(sim, members, dtype)
    before = host(work)
    acc, b = host(layout.z(work)[0]), host(ensemble.biases[0])
    z, a = layout.z(work)[0], layout.a(work)[0]
    z_out, a_out = sim.stacked_bias_act(z, ensemble.biases[0], "tanh", z_out=z, a_out=a)  # z_out is acc
    assert z_out is z and a_out is a
    g_in = host(layout.delta(work)[0])
    g = layout.delta(work)[0]
    assert sim.stacked_act_backward(g, z, "silu", out=g) is g  # out is g
    assert_rest_unchanged(before, work, regions(layout, (Z_AT, 0), (A_AT, 0), (DELTA_AT, 0)))
    for k in range(members):
        z_k, a_k = sim.bias_act(sim.asarray(acc[k]), sim.asarray(b[k]), "tanh")
        assert_same_bits(z[k], z_k, f"z of member {k}")
        assert_same_bits(a[k], a_k, f"a of member {k}")
        assert_same_bits(g[k], sim.act_backward(sim.asarray(g_in[k]), z_k, "silu"), f"g of member {k}")
        z_ref, a_ref = reference.bias_act(acc[k], b[k], "tanh")
        assert_close(host(z[k]), z_ref, dtype)
        assert_close(host(a[k]), reference.bias_act(host(z_k), np.zeros(SIZES[1]), "tanh")[1], dtype)  # act of stored z
        assert_close(host(g[k]), reference.act_backward(g_in[k], host(z_k), "silu"), dtype)


@pytest.mark.parametrize("members", [1, 3])
@pytest.mark.parametrize("dtype", SIM_DTYPES)
@pytest.mark.parametrize("sizes", [SIZES, (7, 5, 3)])  # 2 column tiles; 1 tile, its 300 rows in 2 chunks
def test_bias_grad_of_workspace_views_into_the_gradient_buffer_is_each_members_2d_kernel(sim, dtype, members, sizes):
    ensemble = MLPEnsemble(members, sizes, backend=sim, dtype=dtype, seed=1)
    layout, work = workspace(sim, members, dtype, sizes, batch=300)
    grads_before = host(ensemble.grads)
    delta = layout.delta(work)[0]
    assert sim.stacked_bias_grad(delta, out=ensemble.grad_biases[0]) is ensemble.grad_biases[0]
    b_at, n = layout.offsets[0, B_AT], sizes[1]
    outside = np.ones(ensemble.grads.shape[1], bool)
    outside[b_at:b_at + n] = False
    assert host(ensemble.grads)[:, outside].tobytes() == grads_before[:, outside].tobytes()
    for k in range(members):
        assert_same_bits(ensemble.grad_biases[0][k], sim.bias_grad(sim.asarray(host(delta[k]))), f"member {k}")
        assert_close(host(ensemble.grad_biases[0][k]), reference.bias_grad(host(delta[k])), dtype)


def target_cases(sim, members, batch, classes, dtype):
    """(name, the targets stacked_loss is given, member k's targets) for shared labels and rows (broadcast
    views: member stride 0) and per-member ones."""
    labels = labels_for(batch, classes)
    rows = reference.softmax(random_host((batch, classes), "float64", 9)).astype(DTYPES[dtype].numpy_dtype())
    own_labels = np.stack([labels_for(batch, classes, seed=k + 2) for k in range(members)])
    own_rows = np.stack([np.roll(rows, k, axis=0) for k in range(members)])
    broadcast = sim.xp.broadcast_to
    return [
        ("shared labels", broadcast(sim.asarray(labels), (members, batch)), lambda k: labels),
        ("shared rows", broadcast(sim.asarray(rows), (members, batch, classes)), lambda k: rows),
        ("labels per member", sim.asarray(own_labels), lambda k: own_labels[k]),
        ("rows per member", sim.asarray(own_rows), lambda k: own_rows[k]),
    ]


@pytest.mark.parametrize(("members", "sizes", "dtypes"), [
    (3, SIZES, SIM_DTYPES), (1, SIZES, ("float32",)),
    (2, (4, 40), ("float32",)), (2, (4, 1025), ("float32", "bfloat16")),  # a warp per row; a block per row
])
def test_each_loss_on_workspace_views_with_shared_or_own_targets_is_each_members_2d_kernel(sim, members, sizes,
                                                                                           dtypes):
    classes = sizes[-1]
    for dtype in dtypes:
        layout, work = workspace(sim, members, dtype, sizes)
        logits = host(layout.z(work)[-1])
        for kernel, expected in LOSS_REFERENCES.items():
            for name, targets, own in target_cases(sim, members, BATCH, classes, dtype):
                before = host(work)
                delta = layout.delta(work)[-1]
                losses = sim.stacked_loss(kernel, layout.z(work)[-1], targets, delta)
                assert losses.dtype == np.float64 and losses.shape == (members,)
                assert_rest_unchanged(before, work, regions(layout, (DELTA_AT, layout.depth - 1)))
                losses = host(losses)
                for k in range(members):
                    delta_k = sim.empty((BATCH, classes), logits.dtype)
                    loss_k = getattr(sim, kernel)(sim.asarray(logits[k]), sim.asarray(own(k)), delta_out=delta_k)
                    where = f"{dtype} {kernel} {name}, member {k}"
                    assert losses[k] == loss_k, where
                    assert_same_bits(delta[k], delta_k, where)
                    loss_ref, delta_ref = expected(logits[k], own(k))
                    assert_close(losses[k], loss_ref, dtype)
                    assert_close(host(delta[k]), delta_ref, dtype)


@pytest.mark.parametrize("shared", [True, False])
def test_a_label_outside_the_classes_writes_nothing(sim, shared):
    members, classes = 3, SIZES[-1]
    layout, work = workspace(sim, members, "float32")
    labels = np.stack([labels_for(BATCH, classes, seed=k) for k in range(members)])
    labels[-1, 2] = classes
    targets = sim.xp.broadcast_to(sim.asarray(labels[-1]), labels.shape) if shared else sim.asarray(labels)
    before = host(work)
    with pytest.raises(ValueError, match=r"^softmax_xent: labels: expected class labels in \[0, 2\], got 3$"):
        sim.stacked_loss("softmax_xent", layout.z(work)[-1], targets, layout.delta(work)[-1])
    assert host(work).tobytes() == before.tobytes()


def test_the_stacked_kernels_on_workspace_views_copy_nothing(sim, monkeypatch):
    """After a first call at a shape (which makes the scratch buffers), a call allocates and copies no
    array: each view is read and written where it lies, shared labels too."""
    if not standin.simulated():  # DELTAPROP_CUDA_SIM=0: the suite on the device, which keeps no such log
        pytest.skip("counts the stand-in's allocations and copies")
    members = 3
    ensemble = MLPEnsemble(members, SIZES, backend=sim, seed=1)
    layout, work = workspace(sim, members, "float32")
    z, a, delta = layout.z(work), layout.a(work), layout.delta(work)
    labels = sim.xp.broadcast_to(sim.asarray(labels_for(BATCH, SIZES[-1])), (members, BATCH))

    def calls():
        sim.stacked_bias_act(z[0], ensemble.biases[0], "relu", z_out=z[0], a_out=a[0])
        sim.stacked_act_backward(delta[0], z[0], "relu", out=delta[0])
        sim.stacked_bias_grad(delta[0], out=ensemble.grad_biases[0])
        return sim.stacked_loss("softmax_xent", z[-1], labels, delta[-1])

    calls()
    made = []
    for name in ("ascontiguousarray", "array", "empty", "empty_like", "copy"):
        def spy(*args, _original=getattr(standin.xp, name), _name=name, **kwargs):
            result = _original(*args, **kwargs)
            if not args or result is not args[0]:
                made.append(_name)
            return result
        monkeypatch.setattr(standin.xp, name, spy)
    with standin.recording() as log:
        losses = calls()
    assert made == []
    assert [e.kind for e in log if e.kind != "launch"] == ["to_host", "to_host"]  # the label check's min and max
    assert [e.name.split("<")[0] for e in log if e.kind == "launch"] == [
        "bias_act", "act_backward", "column_sums", "softmax_rows", "mean_of_rows"]
    assert losses.shape == (members,)


def test_stacks_whose_members_are_not_c_contiguous_go_through_copies(sim):
    """A transposed stack (members not C-contiguous) is copied in and written back: the results are the
    reference's all the same."""
    rng = np.random.default_rng(4)
    g_t, z_host = rng.standard_normal((3, 6, 5)), rng.standard_normal((3, 5, 6))
    g = sim.asarray(g_t).transpose(0, 2, 1)  # (3, 5, 6), members column-major
    out = sim.asarray(np.full((3, 6, 5), np.nan)).transpose(0, 2, 1)
    assert sim.stacked_act_backward(g, sim.asarray(z_host), "relu", out=out) is out
    for k in range(3):
        assert_close(host(out[k]), reference.act_backward(g_t[k].T, z_host[k], "relu"), "float64")
    sums = sim.stacked_bias_grad(g)
    assert_close(host(sums), g_t.sum(axis=2), "float64")
