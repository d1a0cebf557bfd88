"""The CuPy backend: what only it does.

Without a device: the module imports no CuPy, the backend refuses with a reason that says what is
missing and what to install, and it overrides every kernel with the base signature. With a device
(marker ``gpu``): cuBLAS reads transposed views in place, bad labels and non-finite inputs raise, host
and strided outputs are written through a device copy, arrays come in from NumPy, CuPy and DLPack, and
warmup compiles everything. The kernels' parity with the reference on every backend, cupy included, is
in test_kernels.py and test_kernel_edges.py; the cuBLAS call's arithmetic in test_cublas_layout.py.
"""

import importlib.util
import inspect
import subprocess
import sys

import numpy as np
import pytest
from helpers import LOSS_REFERENCES, assert_close, host64, labels_for, random_host

from deltaprop.backend import backend_status, get_backend
from deltaprop.backend.base import Backend
from deltaprop.backend.cupy_backend import CupyBackend, cuda_usability
from deltaprop.benchmarks import bench
from deltaprop.errors import BackendUnavailableError, NonFiniteInputError
from deltaprop.kernels import reference
from deltaprop.kernels.cuda.launch import LOSS_VARIANTS
from deltaprop.kernels.cuda.loader import KERNELS, LIBRARY_KERNELS

CUPY_USABLE, CUPY_WHY_NOT = backend_status("cupy")


# ---- without a device ---------------------------------------------------------------------------------


def test_importing_the_backend_and_its_loader_imports_no_cupy():
    code = (
        "import sys, deltaprop.backend.cupy_backend, deltaprop.kernels.cuda.loader;"
        "assert 'cupy' not in sys.modules, 'cupy was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.skipif(CUPY_USABLE, reason="a device is usable here")
def test_get_backend_refuses_at_once_with_the_reason():
    with pytest.raises(BackendUnavailableError, match="install") as refused:
        get_backend("cupy")
    assert CUPY_WHY_NOT in str(refused.value)


def test_availability_names_a_missing_cupy_and_what_to_install(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cupy" else find_spec(name, *a))
    usable, why = CupyBackend.availability()
    assert not usable
    assert "CuPy is not installed" in why and "pip install 'deltaprop[cuda]'" in why


@pytest.mark.parametrize(
    ("driver", "devices", "expected"),
    [
        (0, 1, "no NVIDIA driver is installed"),
        (12080, 1, "the NVIDIA driver supports CUDA 12.8; CuPy's CUDA 13.2 runtime needs a driver for CUDA 13.0"),
        (13020, 0, "no CUDA device is visible"),
    ],
)
def test_availability_names_a_missing_driver_or_device(monkeypatch, driver, devices, expected):
    runtime = pytest.importorskip("cupy_backends.cuda.api.runtime")
    monkeypatch.setattr(runtime, "driverGetVersion", lambda: driver)
    monkeypatch.setattr(runtime, "runtimeGetVersion", lambda: 13020)
    monkeypatch.setattr(runtime, "getDeviceCount", lambda: devices)
    usable, why = CupyBackend.availability()
    assert not usable
    assert expected in why


@pytest.mark.parametrize(
    ("driver", "linked", "devices", "expected"),
    [
        # the H200 we target: driver 580.159 (CUDA 13.0) under cupy-cuda13x, which links CUDA 13.2
        (13000, 13020, 1, (True, "")),
        (13020, 13020, 1, (True, "")),
        (14000, 13020, 1, (True, "")),
        (12090, 13020, 1, (False, "the NVIDIA driver supports CUDA 12.9; CuPy's CUDA 13.2 runtime needs a driver"
                                  " for CUDA 13.0 or newer: update the driver, or install the cupy-cuda12x wheel")),
        (0, 13020, 0, (False, "no NVIDIA driver is installed (CUDA reports driver version 0): install an NVIDIA"
                              " driver for CUDA 13.0 or newer, and a GPU")),
        (13000, 13020, 0, (False, "no CUDA device is visible (is CUDA_VISIBLE_DEVICES empty?)")),
    ],
)
def test_cuda_usability_compares_the_majors_of_driver_and_runtime(driver, linked, devices, expected):
    assert cuda_usability(driver, linked, devices) == expected


def test_a_machine_without_a_driver_is_not_run_for_want_of_a_driver_not_of_a_newer_one(monkeypatch):
    """`deltaprop bench`'s "not run here" reason when CUDA answers as it does on a machine with no driver."""
    runtime = pytest.importorskip("cupy_backends.cuda.api.runtime")

    def no_driver():
        raise runtime.CUDARuntimeError(35)  # cudaErrorInsufficientDriver, what getDeviceCount raises here

    monkeypatch.setattr(runtime, "driverGetVersion", lambda: 0)
    monkeypatch.setattr(runtime, "runtimeGetVersion", lambda: 13020)
    monkeypatch.setattr(runtime, "getDeviceCount", no_driver)
    why = bench.choose_subjects(None)[1]["cupy"]
    assert "no NVIDIA driver" in why and "13.2" not in why


def test_availability_reports_a_refusing_driver_without_raising(monkeypatch):
    runtime = pytest.importorskip("cupy_backends.cuda.api.runtime")

    def refuse():
        raise RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")

    monkeypatch.setattr(runtime, "driverGetVersion", lambda: 13020)
    monkeypatch.setattr(runtime, "runtimeGetVersion", lambda: 13020)
    monkeypatch.setattr(runtime, "getDeviceCount", refuse)
    usable, why = CupyBackend.availability()
    assert not usable
    assert "cudaErrorNoDevice" in why and "pip install" in why


def test_every_kernel_is_overridden_with_the_base_signature():
    """Every kernel of the CUDA table (and gemm) replaces the base's NumPy body; the loss kernels are
    served through the base's one loss hook, ``_loss``."""
    kernels = (set(KERNELS) | set(LIBRARY_KERNELS)) & set(vars(Backend))
    for name in sorted(kernels):
        served_by = "_loss" if name in LOSS_VARIANTS else name
        assert served_by in vars(CupyBackend), name
        override, base = (inspect.signature(getattr(cls, served_by)).parameters.values() for cls in (CupyBackend, Backend))
        assert [(p.name, p.kind, p.default) for p in override] == [(p.name, p.kind, p.default) for p in base], name


# ---- what only the device backend does ------------------------------------------------------------------


@pytest.fixture
def cupy_backend():
    backend = get_backend("cupy")
    yield backend
    backend.check_inputs = False


@pytest.mark.gpu
@pytest.mark.skipif(not CUPY_USABLE, reason=f"cupy backend unusable: {CUPY_WHY_NOT}")
class TestOnTheDevice:
    def test_gemm_reads_transposed_views_without_copies(self, cupy_backend):
        cp = cupy_backend.xp
        pool = cp.get_default_memory_pool()
        for stack in [(), (4,)]:
            a = cupy_backend.asarray(random_host(stack + (96, 64), "float32", 1))
            b = cupy_backend.asarray(random_host(stack + (80, 96), "float32", 2))
            out = cupy_backend.empty(stack + (64, 80), "float32")
            at, bt = cp.swapaxes(a, -1, -2), cp.swapaxes(b, -1, -2)  # (.., 64, 96) and (.., 96, 80) views
            cupy_backend.synchronize()
            used = pool.used_bytes()
            cupy_backend.gemm(at, bt, out)
            cupy_backend.gemm(a, b, out, trans_a=True, trans_b=True)
            cupy_backend.synchronize()
            assert pool.used_bytes() == used
            expected = reference.gemm(random_host(stack + (96, 64), "float32", 1), random_host(stack + (80, 96), "float32", 2),
                                      trans_a=True, trans_b=True)
            assert_close(host64(cupy_backend, out), expected, "float32")

    def test_bad_labels_raise_and_check_inputs_refuses_non_finite_logits(self, cupy_backend):
        z = cupy_backend.asarray(random_host((6, 10), "float32", 1))
        for loss in LOSS_REFERENCES:
            with pytest.raises(ValueError, match=r"labels: expected class labels in \[0, 9\], got 10"):
                getattr(cupy_backend, loss)(z, cupy_backend.asarray(np.array([0, 1, 2, 10, 4, 5])))
        infinite = z * np.float32(np.inf)
        assert np.isnan(cupy_backend.softmax_xent(infinite, labels_for(6, 10)))
        cupy_backend.check_inputs = True
        with pytest.raises(NonFiniteInputError, match="softmax_xent: z: expected finite values"):
            cupy_backend.softmax_xent(infinite, labels_for(6, 10))

    def test_host_and_strided_outputs_are_written_through_a_device_copy(self, cupy_backend):
        cp = cupy_backend.xp
        acc, b = random_host((5, 3), "float32", 1), random_host(3, "float32", 2)
        z_ref, a_ref = reference.bias_act(acc, b, "tanh")
        a_host = np.empty((3, 5), np.float32).T  # a transposed host buffer
        z, a = cupy_backend.bias_act(acc, b, "tanh", a_out=a_host)
        assert a is a_host and isinstance(z, cp.ndarray)
        assert_close(a_host, a_ref, "float32")
        assert_close(host64(cupy_backend, z), z_ref, "float32")
        out = cp.empty((3, 5), dtype=np.float32).T  # a transposed device view
        assert cupy_backend.softmax(cupy_backend.asarray(acc), out=out) is out
        assert_close(host64(cupy_backend, out), reference.softmax(acc), "float32")

    def test_asarray_takes_numpy_cupy_and_dlpack(self, cupy_backend):
        cp = cupy_backend.xp
        host = random_host((5, 3), "float32")
        device = cupy_backend.asarray(host)
        assert isinstance(device, cp.ndarray) and device.flags.c_contiguous
        assert cupy_backend.asarray(device).data.ptr == device.data.ptr  # no copy
        assert cupy_backend.asarray(host, dtype="bfloat16").dtype.name == "bfloat16"
        np.testing.assert_array_equal(cupy_backend.to_numpy(cupy_backend.asarray(host.tolist())), host)
        torch = pytest.importorskip("torch")
        if torch.cuda.is_available():
            tensor = torch.arange(12, dtype=torch.float32, device="cuda").reshape(3, 4)
            shared = cupy_backend.asarray(tensor)
            assert shared.data.ptr == tensor.data_ptr()  # no copy
        np.testing.assert_array_equal(cupy_backend.to_numpy(cupy_backend.asarray(torch.ones(2, 2))), np.ones((2, 2)))

    def test_warmup_compiles_everything_and_describe_names_the_gpu(self, cupy_backend):
        assert cupy_backend.warmup() >= 0
        facts = cupy_backend.describe()
        assert facts["name"] == "cupy" and facts["gpu"] and facts["cupy"]
        assert {"driver_cuda", "cupy_cuda_runtime", "nvrtc", "compute_capability"} <= set(facts)
