"""The CUDA kernels without a device: the kernel table covers the contract, and every instantiation
compiles through NVRTC, with CuPy's own options, for sm_80 and sm_90 with no register spills."""

import inspect
import os

import pytest

from deltaprop.backend.base import Backend
from deltaprop.errors import KernelCompileError
from deltaprop.kernels.activations import ACTIVATIONS
from deltaprop.kernels.cuda import loader
from deltaprop.kernels.dtypes import DTYPES

# Backend members that are not kernels: the lifecycle and the arrays
NOT_KERNELS = {"asarray", "to_numpy", "empty", "zeros", "synchronize", "warmup", "describe",
               "fused_sgd_step", "fused_grads_step", "fused_ensemble_step",  # capabilities: None where a
               "device_loss"}  # backend has no fused step; device_loss runs the loss kernel it is named
CONTRACT_KERNELS = {
    name for name, member in vars(Backend).items()
    if inspect.isfunction(member) and not name.startswith("_") and name not in NOT_KERNELS
}
# an ensemble's optimizer updates over (K, P): served on CuPy by the base class's xp code (CuPy's kernels)
BASE_ON_CUPY = {"stacked_sgd_update", "stacked_adam_update"}
HELPERS = {"mean_of_rows", "column_sums_of_partials"}  # kernels of the table that serve others rather than a contract kernel
# kernels that move 16-byte chunks where aligned (common.cuh), row-wise ones with a warp or a block per row
CHUNKED = {"softmax", "softmax_xent", "sigmoid_xent", "squared_error", "act_backward", "sgd_update",
           "momentum_update", "adam_update"}
ARCHS = ("80", "90")


def nvrtc_missing():
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
    except Exception as error:  # ImportError, or the library not found when first called
        return f"{type(error).__name__}: {error}"
    return None


@pytest.fixture(scope="module", params=ARCHS)
def report(request):
    missing = nvrtc_missing()
    if missing and not os.environ.get("CI"):
        pytest.skip(f"NVRTC is not installed here ({missing}): pip install 'deltaprop[cuda]'")
    assert missing is None, f"CI must install the cuda extra (cupy-cuda13x, nvidia-cuda-nvrtc): {missing}"
    return request.param, loader.compile_report(request.param)


def test_the_table_covers_every_contract_kernel_and_nothing_else():
    served = set(loader.KERNELS) | set(loader.LIBRARY_KERNELS) | set(loader.STACKED_KERNELS)
    assert CONTRACT_KERNELS - served == BASE_ON_CUPY
    assert set(loader.KERNELS) - CONTRACT_KERNELS == HELPERS
    assert set(loader.STACKED_KERNELS) <= CONTRACT_KERNELS
    assert {name for names in loader.STACKED_KERNELS.values() for name in names} <= set(loader.KERNELS)


def test_every_instantiation_compiles_without_spills(report):
    arch, modules = report
    assert set(modules) == {(source, dtype) for source in loader.sources() for dtype in loader.CUDA_DTYPES}
    for (source, dtype), kernels in modules.items():
        assert set(kernels) == set(loader.name_expressions(source, dtype)), (arch, source, dtype)
        spilling = {name: r for name, r in kernels.items() if r.spill_store_bytes or r.spill_load_bytes}
        assert spilling == {}, f"sm_{arch}: {source} for {dtype} spills registers"


def test_every_contract_kernel_has_every_cuda_dtype(report):
    _, modules = report
    compiled = {name for kernels in modules.values() for name in kernels}
    for name, kernel in loader.KERNELS.items():
        for dtype in loader.CUDA_DTYPES:
            ctype = DTYPES[dtype].ctype
            missing = {kernel.name_expression(ctype, v) for v in kernel.variants} - compiled
            assert missing == set(), (name, dtype)


def test_the_chunked_kernels_load_16_byte_vectors_and_no_others(report):
    arch, modules = report
    for (source, dtype), kernels in modules.items():
        for expression, (name, variant) in loader.name_expressions(source, dtype).items():
            narrow_team = any(v.startswith("GroupTeam<") and v != "GroupTeam<32>" for v in variant)
            expected = name in CHUNKED and not narrow_team
            assert (kernels[expression].vector_loads > 0) == expected, (arch, expression)


def test_the_activation_functors_come_from_the_activation_table():
    functors = loader.activation_functors()
    for name, activation in ACTIVATIONS.items():
        assert f"struct act_{name} " in functors
        assert activation.cuda_forward in functors and activation.cuda_derivative in functors


def test_the_ptxas_report_is_parsed_per_entry():
    log = """ptxas info    : Compiling entry function '_Z1kIfEvPT_x' for 'sm_90'
ptxas info    : Function properties for _Z1kIfEvPT_x
ptxas         .     8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 26 registers, used 0 barriers
ptxas info    : Compiling entry function '_Z1kIdEvPT_x' for 'sm_90'
ptxas info    : Function properties for _Z1kIdEvPT_x
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 30 registers, used 1 barriers
"""
    assert loader.parse_ptxas_report(log) == {
        "_Z1kIfEvPT_x": loader.KernelResources(26, 8, 4, 12),
        "_Z1kIdEvPT_x": loader.KernelResources(30, 0, 0, 0),
    }


def test_vector_loads_are_counted_per_ptx_entry():
    ptx = """.visible .entry _Z1kIfEvPT_x(
	ld.global.v4.f32 	{%f1, %f2, %f3, %f4}, [%rd5];
	ld.global.nc.v4.u32 	{%r1, %r2, %r3, %r4}, [%rd6];
	ld.shared.v4.f32 	{%f5, %f6, %f7, %f8}, [%r9];
	ld.global.v2.f32 	{%f9, %f10}, [%rd7];
}
.weak .entry _Z1kIdEvPT_x(
	ld.global.v2.f64 	{%fd1, %fd2}, [%rd5];
	st.global.v2.f64 	[%rd6], {%fd1, %fd2};
}
"""
    assert loader.count_vector_loads(ptx) == {"_Z1kIfEvPT_x": 2, "_Z1kIdEvPT_x": 1}


def test_an_unknown_instantiation_is_a_kernel_compile_error():
    with pytest.raises(KernelCompileError, match=r"CUDA kernel 'bias_act': expected one of its instantiations "
                                                 r"\(\('act_identity',\).*, got \('act_swish',\)"):
        loader.Modules().function("bias_act", "float32", "act_swish")


def test_a_source_that_does_not_compile_is_a_kernel_compile_error_with_nvrtc_log(monkeypatch):
    missing = nvrtc_missing()
    if missing:
        pytest.skip(f"NVRTC is not installed here ({missing})")
    monkeypatch.setattr(loader, "module_source", lambda source: "this is not C++;")
    with pytest.raises(KernelCompileError, match=r"(?s)optim.cu for float32 on sm_90 does not compile:\n.*error"):
        loader.compile_module("optim.cu", "float32", "90")


def test_the_loader_lets_cupy_compile_cubin_for_the_device(monkeypatch):
    """PTX from an NVRTC newer than the driver does not load (CUDA_ERROR_UNSUPPORTED_PTX_VERSION): the
    modules must reach the driver as CUBIN for the device. CuPy's RawModule adds -arch=sm_XX and asks
    NVRTC for CUBIN unless the options name an architecture, so ours name none (cupy/cuda/compiler.py,
    ``_get_arch_for_options_for_nvrtc``)."""
    cupy = pytest.importorskip("cupy")
    if why := nvrtc_missing():
        pytest.skip(f"NVRTC is not usable here: {why}")
    from cupy.cuda import compiler

    passed = {}
    monkeypatch.setattr(cupy, "RawModule", lambda **kwargs: passed.update(kwargs))
    loader.Modules().module("rows.cu", "float32")
    options = passed["options"]
    assert options == loader.NVRTC_OPTIONS
    assert not any(o.startswith(("-arch", "--gpu-architecture", "-code")) or "compute_" in o for o in options)
    assert passed.get("backend", "nvrtc") == "nvrtc"
    # what CuPy then adds for an H200 (sm_90) when CUPY_COMPILE_WITH_PTX is unset (undecorated: no device)
    monkeypatch.setattr(compiler, "_use_ptx", False)
    assert compiler._get_arch_for_options_for_nvrtc.__wrapped__("90") == ("-arch=sm_90", "cubin")
