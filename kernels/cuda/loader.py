"""The CUDA kernels' table, their sources, and how they are compiled: lazily on a device, or all at once
for a named architecture without one.

``KERNELS`` is the one table: for each kernel of the Backend contract that a CUDA kernel implements
(gemm is cuBLAS), the source file and C++ function template, and its instantiations beyond the dtype.
Every kernel is instantiated for every CUDA dtype of the dtype table. Name expressions, modules, the
compile check and the backend's lookups all derive from this table. The contract's kernels over a stack
of members (``STACKED_KERNELS``) are the same instantiations: each kernel takes a member count and member
strides, and a 2-D call is a stack of one.

A module is one source file for one dtype. Its source text is complete (common.cuh, the activation
functors generated from the activation table, then the file), because CuPy's kernel cache is keyed by
the text, not by what an ``#include`` would pull in. ``Modules`` compiles a module through
``cupy.RawModule`` the first time one of its kernels is asked for; ``compile_report(arch)`` compiles
every module through NVRTC with CuPy's own options and returns ptxas's register and spill report, with
the number of 16-byte vector loads in each kernel's PTX.

Importing this module imports neither CuPy nor NVRTC.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from functools import cache
from itertools import product
from pathlib import Path

from deltaprop.errors import KernelCompileError
from deltaprop.kernels.activations import ACTIVATIONS
from deltaprop.kernels.cuda.launch import ACTIVATION_FUNCTORS, LOSS_VARIANTS, NO_TARGETS, TARGETS, TEAMS
from deltaprop.kernels.dtypes import DTYPES, dtypes_for

HERE = Path(__file__).parent
# Passed to RawModule; CuPy adds -ftz=true, -arch=sm_XX for the device (then NVRTC emits CUBIN, which a
# driver older than the NVRTC loads; PTX it might not: so no architecture option here),
# --device-as-default-execution-space and its include paths.
NVRTC_OPTIONS = ("--std=c++17",)


@dataclass(frozen=True)
class CudaKernel:
    """One C++ kernel template in ``source``; ``variants`` are its template arguments after the storage
    type T, one tuple per instantiation ("{T}" in an argument stands for T)."""

    source: str
    template: str
    variants: tuple[tuple[str, ...], ...] = ((),)

    def name_expression(self, ctype: str, variant: tuple[str, ...]) -> str:
        args = [ctype] + [arg.format(T=ctype) for arg in variant]
        return f"{self.template}<{', '.join(args)}>"


def _product(*axes):
    return tuple(product(*axes))


KERNELS: dict[str, CudaKernel] = {
    "bias_act": CudaKernel("elementwise.cu", "bias_act", _product(ACTIVATION_FUNCTORS)),
    "act_backward": CudaKernel("elementwise.cu", "act_backward", _product(ACTIVATION_FUNCTORS)),
    "softmax": CudaKernel("rows.cu", "softmax_rows", _product((NO_TARGETS,), TEAMS)),
    **{loss: CudaKernel("rows.cu", "elementwise_loss_rows" if variant else "softmax_rows",
                        _product(*([arg] for arg in variant), TARGETS.values(), TEAMS))
       for loss, variant in LOSS_VARIANTS.items()},  # a loss's own arguments, then its targets and team
    "mean_of_rows": CudaKernel("rows.cu", "mean_of_rows"),  # the loss kernels' second, deterministic step
    "bias_grad": CudaKernel("columns.cu", "column_sums"),
    "column_sums_of_partials": CudaKernel("columns.cu", "column_sums_of_partials"),  # bias_grad's second pass
    "sgd_update": CudaKernel("optim.cu", "sgd_update"),
    "momentum_update": CudaKernel("optim.cu", "momentum_update"),
    "adam_update": CudaKernel("optim.cu", "adam_update"),
}
# Contract kernels served by a library rather than by a kernel of this table.
LIBRARY_KERNELS = {"gemm": "cuBLAS (gemmStridedBatchedEx)"}
# Contract kernels over a stack of members (an ensemble's), served by the kernels of this table that serve
# the 2-D call: those take a member count and member strides, and a 2-D call is a stack of one.
STACKED_KERNELS = {
    "stacked_bias_act": ("bias_act",),
    "stacked_act_backward": ("act_backward",),
    "stacked_loss": (*LOSS_VARIANTS, "mean_of_rows"),
    "stacked_bias_grad": ("bias_grad", "column_sums_of_partials"),
}
CUDA_DTYPES = dtypes_for("cuda")


# ---- sources ----------------------------------------------------------------------------------------


def activation_functors() -> str:
    """C++ functors act_<name> with forward(z) and derivative(z), from the activation table's strings."""
    functors = ["#define C(x) static_cast<T>(x)"]
    for name, activation in ACTIVATIONS.items():
        functors.append(
            f"struct act_{name} {{\n"
            f"    template <typename T> __device__ static T forward(T z) {{ return {activation.cuda_forward}; }}\n"
            f"    template <typename T> __device__ static T derivative(T z) {{ return {activation.cuda_derivative}; }}\n"
            "};"
        )
    functors.append("#undef C")
    return "\n".join(functors) + "\n"


@cache
def module_source(source: str) -> str:
    """The complete text of the module built from ``source`` (the same for every dtype)."""
    parts = [(HERE / "common.cuh").read_text(), activation_functors(), (HERE / source).read_text()]
    return "\n".join(parts)


def sources() -> tuple[str, ...]:
    return tuple(dict.fromkeys(k.source for k in KERNELS.values()))


def name_expressions(source: str, dtype: str) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Every instantiation in ``source`` for ``dtype``: name expression -> (kernel name, variant)."""
    ctype = DTYPES[dtype].ctype
    return {
        kernel.name_expression(ctype, variant): (name, variant)
        for name, kernel in KERNELS.items()
        if kernel.source == source
        for variant in kernel.variants
    }


# ---- on a device: compile on first use ------------------------------------------------------------


class Modules:
    """The compiled modules of this process's current device, each built on first use."""

    def __init__(self):
        self._modules = {}
        self._functions = {}

    def function(self, kernel: str, dtype: str, *variant: str):
        """The cupy.RawKernel of ``kernel`` for ``dtype`` and template arguments ``variant``."""
        key = (kernel, dtype, variant)
        if key not in self._functions:
            entry = KERNELS[kernel]
            if variant not in entry.variants:
                raise KernelCompileError(
                    f"CUDA kernel {kernel!r}: expected one of its instantiations {entry.variants}, got {variant}")
            expression = entry.name_expression(DTYPES[dtype].ctype, variant)
            self._functions[key] = self._get_function(entry.source, dtype, expression)
        return self._functions[key]

    def module(self, source: str, dtype: str):
        key = (source, dtype)
        if key not in self._modules:
            import cupy

            self._modules[key] = cupy.RawModule(
                code=module_source(source),
                options=NVRTC_OPTIONS,
                name_expressions=list(name_expressions(source, dtype)),
            )
        return self._modules[key]

    def _get_function(self, source: str, dtype: str, expression: str):
        """The kernel ``expression`` of a module; RawModule compiles on the first fetch, and a source that
        does not compile raises KernelCompileError with NVRTC's log."""
        from cupy.cuda.compiler import CompileException

        try:
            return self.module(source, dtype).get_function(expression)
        except CompileException as error:
            raise KernelCompileError(f"{source} for {dtype} does not compile:\n{error}") from error

    def compile_all(self, dtypes) -> None:
        """Build every module of ``dtypes`` now (RawModule compiles when a function is first fetched)."""
        for dtype in dtypes:
            for source in sources():
                for expression in name_expressions(source, dtype):
                    self._get_function(source, dtype, expression)


# ---- without a device: the compile check ----------------------------------------------------------


@dataclass(frozen=True)
class KernelResources:
    """What ptxas reports for one compiled kernel."""

    registers: int
    stack_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int
    vector_loads: int = 0  # 16-byte global loads in the kernel's PTX (ld.global.v4 of 32 bits, .v2 of 64)


_PTXAS_ENTRY = re.compile(r"Compiling entry function '(\w+)' for 'sm_\d+a?'")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
_PTX_ENTRY = re.compile(r"\.entry (\w+)\(")
_PTX_VECTOR_LOAD = re.compile(r"\bld\.global(?:\.nc)?\.(?:v4\.[fub]32|v2\.[fub]64)\b")


def nvrtc_options(arch: str) -> tuple[str, ...]:
    """The options CuPy's RawModule compiles with for ``arch`` ("80", "90"), plus ptxas's report."""
    from cupy._core.core import assemble_cupy_compiler_options  # CuPy's own include paths and -std

    return assemble_cupy_compiler_options(NVRTC_OPTIONS) + (
        "-ftz=true",
        f"-arch=sm_{arch}",
        "--device-as-default-execution-space",
        "-Xptxas=-v",
    )


def parse_ptxas_report(log: str) -> dict[str, KernelResources]:
    """Mangled kernel name -> resources, from ptxas's -v output."""
    report, current, frame = {}, None, None
    for line in log.splitlines():
        if entry := _PTXAS_ENTRY.search(line):
            current, frame = entry.group(1), None
        elif (found := _PTXAS_FRAME.search(line)) and current:
            frame = tuple(int(g) for g in found.groups())
        elif (registers := _PTXAS_REGISTERS.search(line)) and current and frame:
            report[current] = KernelResources(int(registers.group(1)), *frame)
            current = None
    return report


def count_vector_loads(ptx: str) -> dict[str, int]:
    """Mangled kernel name -> how many 16-byte global loads its entry in ``ptx`` has."""
    entries = list(_PTX_ENTRY.finditer(ptx))
    ends = [entry.start() for entry in entries[1:]] + [len(ptx)]
    return {entry.group(1): len(_PTX_VECTOR_LOAD.findall(ptx, entry.end(), end)) for entry, end in zip(entries, ends)}


def compile_module(source: str, dtype: str, arch: str) -> dict[str, KernelResources]:
    """Compile one module for ``arch`` through NVRTC (no device needed); name expression -> resources.

    Raises KernelCompileError with NVRTC's log when the source does not compile.
    """
    from cupy_backends.cuda.libs import nvrtc

    expressions = list(name_expressions(source, dtype))
    program = nvrtc.createProgram(module_source(source), f"{source}[{dtype}]", (), ())
    try:
        for expression in expressions:
            nvrtc.addNameExpression(program, expression)
        try:
            nvrtc.compileProgram(program, nvrtc_options(arch))
        except nvrtc.NVRTCError as error:
            raise KernelCompileError(
                f"{source} for {dtype} on sm_{arch} does not compile:\n{nvrtc.getProgramLog(program)}"
            ) from error
        lowered = {nvrtc.getLoweredName(program, e): e for e in expressions}
        report = parse_ptxas_report(nvrtc.getProgramLog(program))
        vector_loads = count_vector_loads(nvrtc.getPTX(program).decode())
    finally:
        nvrtc.destroyProgram(program)
    return {lowered[mangled]: replace(resources, vector_loads=vector_loads[mangled])
            for mangled, resources in report.items()}


def compile_report(arch: str, dtypes=CUDA_DTYPES) -> dict[tuple[str, str], dict[str, KernelResources]]:
    """Compile every module for sm_``arch`` without a device: (source, dtype) -> name expression -> resources."""
    return {(source, dtype): compile_module(source, dtype, arch) for dtype in dtypes for source in sources()}
