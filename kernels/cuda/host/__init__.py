"""The host execution harness: the project's CUDA C++ compiled with the system C++ compiler and run on the
CPU with CUDA's semantics (cuda_host.h says which), for tests on machines without a GPU.

``build(units, sanitizer)`` compiles translation units into one shared library, once: the library lives
in a cache directory outside the package (``DELTAPROP_HOST_CACHE``, else ``$XDG_CACHE_HOME/deltaprop``
or ``~/.cache/deltaprop``), keyed by a hash of every source text, the instantiations and the flags. Each
kernel instantiation gets one extern "C" entry; ``Program.launch`` runs it with a grid, a block, dynamic
shared memory and arguments, after checking every argument against the kernel's C signature (count,
pointer or value, the width and signedness of each scalar), as a device would need them.
``project_units()`` are the project's modules (loader.KERNELS), every instantiation of every dtype.

The sources stay as they are; two mechanical rewrites make their ``__shared__`` memory per block (a
``__shared__`` declaration becomes a reference to a block allocation, ``extern __shared__`` a pointer to
the launch's dynamic shared memory), line for line so that reported lines match the files.

Sanitizers: ``sanitizer="address"`` (AddressSanitizer + UBSan, like compute-sanitizer memcheck) and
``"thread"`` (ThreadSanitizer: data races between the threads of a block) builds must be loaded in a
process started with ``sanitizer_environment(sanitizer)`` (the runtime preloaded). ``exact_copy`` gives a
buffer of exactly an array's bytes (optionally at an offset from 16-byte alignment), so that AddressSanitizer
sees a read or write past its end.

Nothing here is imported by ``import deltaprop``; the compiler runs on the first ``build``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import weakref
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
CUDA_DIR = HERE.parent
COMPILER = os.environ.get("CXX", "g++")
COMMON_FLAGS = ("-std=c++17", "-fPIC", "-pthread", "-fno-omit-frame-pointer",
                "-I", str(HERE / "include"), "-I", str(HERE))
# sanitizer -> (compile flags, link flags); the plain build checks alignment through cuda_host.cpp's handler
BUILD_FLAGS = {
    None: (("-O2", "-fsanitize=alignment"), ()),
    "address": (("-O1", "-g", "-DDP_SANITIZED", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"),
                ("-fsanitize=address,undefined",)),
    "thread": (("-O1", "-g", "-DDP_SANITIZED", "-fsanitize=thread"), ("-fsanitize=thread",)),
}
SANITIZER_RUNTIME = {"address": "libasan.so", "thread": "libtsan.so"}
SANITIZER_OPTIONS = {
    "address": {"ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1",
                "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"},
    "thread": {"TSAN_OPTIONS": "halt_on_error=1:report_signal_unsafe=0"},
}
HARNESS_FILES = ("cuda_host.h", "cuda_host.cpp", "include/cuda_fp16.h", "include/cuda_bf16.h")

# CUDA's launch limits (cudaErrorInvalidConfiguration beyond them); dynamic shared memory beyond 48 KiB
# needs cudaFuncAttributeMaxDynamicSharedMemorySize, which the project never sets
MAX_BLOCK = (1024, 1024, 64)
MAX_THREADS_PER_BLOCK = 1024
MAX_GRID = (2**31 - 1, 65535, 65535)
MAX_DYNAMIC_SHARED = 48 * 1024

# C type of a kernel parameter -> the NumPy dtype a device reads it as (width and signedness)
C_TYPES = {
    "bool": "bool", "char": "int8", "signed char": "int8", "unsigned char": "uint8",
    "short": "int16", "unsigned short": "uint16", "int": "int32", "unsigned int": "uint32",
    "long": "int64", "unsigned long": "uint64", "long long": "int64", "unsigned long long": "uint64",
    "float": "float32", "double": "float64", "__half": "float16", "__nv_bfloat16": "bfloat16",
}
# a Python scalar argument goes to the device as CuPy passes it: as this NumPy type
PYTHON_SCALARS = {bool: np.bool_, int: np.int64, float: np.float64}

_EXTERN_SHARED = re.compile(
    r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?(?P<type>[A-Za-z_][\w:<>, ]*?)\s+(?P<name>\w+)\s*\[\s*\]\s*;")
_SHARED = re.compile(
    r"__shared__\s+(?:__align__\(\d+\)\s+)?(?P<type>[A-Za-z_][\w:<>, ]*?)\s+(?P<name>\w+)\s*"
    r"(?P<dims>(?:\[[^\]]+\]\s*)*);")
_KERNEL = re.compile(r"__global__\s+void\s+(\w+)\s*\(([^)]*)\)")


class HarnessUnavailable(RuntimeError):
    """No C++ compiler here (the harness cannot be built)."""


class BuildError(RuntimeError):
    """The compiler rejected a translation unit; the message holds its output."""


class KernelFault(RuntimeError):
    """A fault detected while a kernel ran (a stuck barrier, a bad shuffle mask, a misaligned access)."""


@dataclass(frozen=True)
class Unit:
    """One translation unit: source ``parts`` (file name, text) in order, and the name expressions of
    the kernel instantiations it exports (e.g. "column_sums<float>")."""

    name: str
    parts: tuple[tuple[str, str], ...]
    expressions: tuple[str, ...]


@dataclass(frozen=True)
class Param:
    name: str
    ctype: str  # the C type without const and *: "float", "long long", "void"
    pointer: bool
    const: bool

    def __str__(self):
        return f"{'const ' if self.const else ''}{self.ctype}{'*' if self.pointer else ''} {self.name}"


def rewrite_shared(text: str) -> str:
    """``text`` with its __shared__ declarations per block (see the module docstring); lines are kept."""
    text = _EXTERN_SHARED.sub(
        lambda m: f"{m['type']}* const {m['name']} = static_cast<{m['type']}*>(::dp::dynamic_shared());", text)

    def per_block(m):
        name, dims = m["name"], re.sub(r"\s+", "", m["dims"])
        reference = f"(&{name}){dims}" if dims else f"&{name}"
        return (f"static char {name}_dp_key; {m['type']} {reference} = "
                f"::dp::shared<{m['type']}{dims}>(&{name}_dp_key);")

    return _SHARED.sub(per_block, text)


def kernel_parameters(texts) -> dict[str, tuple[str, ...]]:
    """Kernel template name -> its parameter names, from the __global__ declarations in ``texts``."""
    names = {}
    for text in texts:
        for kernel, params in _KERNEL.findall(text):
            names[kernel] = tuple(re.findall(r"(\w+)\s*$", p.strip())[0] for p in params.split(",") if p.strip())
    return names


def unit_source(unit: Unit, first_entry: int) -> str:
    """The C++ text of ``unit``: the harness header, its parts (rewritten, with #line so that reports
    name the real files), then entry points dp_launch_<i> and dp_signature_<i> from ``first_entry``."""
    lines = ['#include "cuda_host.h"']
    for file_name, text in unit.parts:
        lines += [f'#line 1 "{file_name}"', rewrite_shared(text)]
    lines.append('#line 1 "host harness entries"')
    for index, expression in enumerate(unit.expressions, first_entry):
        lines.append(f'extern "C" int dp_launch_{index}(const ::dp::Launch* launch, void** args) '
                     f'{{ return ::dp::launch(&{expression}, "{expression}", *launch, args); }}')
        lines.append(f'extern "C" const char* dp_signature_{index}() {{ return ::dp::signature(&{expression}); }}')
    return "\n".join(lines) + "\n"


def project_units(dtypes=None) -> tuple[Unit, ...]:
    """The project's modules as the loader assembles them (common.cuh, the activation functors, the
    file), one unit per (source file, dtype), with every instantiation of loader.KERNELS."""
    from deltaprop.kernels.cuda import loader

    common = (CUDA_DIR / "common.cuh").read_text()
    functors = loader.activation_functors()
    return tuple(
        Unit(f"{source}[{dtype}]",
             (("common.cuh", common), ("activation functors", functors), (source, (CUDA_DIR / source).read_text())),
             tuple(loader.name_expressions(source, dtype)))
        for dtype in (loader.CUDA_DTYPES if dtypes is None else dtypes)
        for source in loader.sources()
    )


def cache_dir() -> Path:
    if "DELTAPROP_HOST_CACHE" in os.environ:
        return Path(os.environ["DELTAPROP_HOST_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "deltaprop" / "cuda-host"


def compiler_path() -> str:
    found = shutil.which(COMPILER)
    if found is None:
        raise HarnessUnavailable(f"the CUDA host harness needs a C++17 compiler: {COMPILER!r} is not on PATH"
                                 " (install g++, or set CXX)")
    return found


def sanitizer_environment(sanitizer: str) -> dict[str, str]:
    """Environment variables for a process that loads a ``sanitizer`` build (its runtime preloaded)."""
    runtime = subprocess.run([compiler_path(), f"-print-file-name={SANITIZER_RUNTIME[sanitizer]}"],
                             capture_output=True, text=True, check=True).stdout.strip()
    if not os.path.isabs(runtime):  # the compiler names a library it does not have by its bare name
        raise HarnessUnavailable(f"{COMPILER} has no {SANITIZER_RUNTIME[sanitizer]}: install its {sanitizer}"
                                 " sanitizer runtime (e.g. the libasan/libtsan package of the same version)")
    return {"LD_PRELOAD": runtime, **SANITIZER_OPTIONS[sanitizer]}


def build(units, sanitizer: str | None = None) -> Program:
    """The library of ``units`` built with ``sanitizer`` (None, "address", "thread"), from the cache when
    it is there. Raises HarnessUnavailable without a compiler, BuildError when a unit does not compile."""
    units = tuple(units)
    compiler = compiler_path()
    compile_flags, link_flags = BUILD_FLAGS[sanitizer]
    sources, first = [], 0
    for unit in units:
        sources.append(unit_source(unit, first))
        first += len(unit.expressions)
    flags = (*COMMON_FLAGS, *compile_flags, *link_flags)
    harness = [(HERE / f).read_text() for f in HARNESS_FILES]
    directory = cache_dir() / _digest(compiler, *flags, *harness, *sources)
    library = directory / "harness.so"
    if not library.exists():
        runtime = cache_dir() / f"runtime-{_digest(compiler, *flags, *harness)}.o"  # shared by every build
        _compile(compiler, units, sources, compile_flags, link_flags, runtime, library)
    expressions = [e for unit in units for e in unit.expressions]
    return Program(library, expressions, kernel_parameters(text for unit in units for _, text in unit.parts))


def _digest(compiler, *texts) -> str:
    digest = hashlib.sha256(f"{compiler}\0{os.stat(compiler).st_mtime_ns}".encode())
    for text in texts:
        digest.update(text.encode() + b"\0")
    return digest.hexdigest()[:24]


def _compile(compiler, units, sources, compile_flags, link_flags, runtime, library):
    """Compile every unit (and the runtime, unless cached) in parallel, link, and move the library into
    place atomically (a concurrent build of the same key writes the same file)."""
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as work:
        work = Path(work)
        jobs = [] if runtime.exists() else [("the harness runtime", HERE / "cuda_host.cpp", work / "runtime.o")]
        for index, (unit, source) in enumerate(zip(units, sources)):
            path = work / f"unit{index}.cpp"
            path.write_text(source)
            jobs.append((unit.name, path, work / f"unit{index}.o"))
        parallel = os.cpu_count() or 1
        for start in range(0, len(jobs), parallel):
            running = [(name, subprocess.Popen([compiler, *COMMON_FLAGS, *compile_flags, "-c", str(path), "-o",
                                                str(obj)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
                       for name, path, obj in jobs[start:start + parallel]]
            for name, process in running:
                output = process.communicate()[0]
                if process.returncode != 0:
                    raise BuildError(f"the host harness does not compile {name}:\n{output[-8000:]}")
        if not runtime.exists():
            os.replace(work / "runtime.o", runtime)
        linked = work / "harness.so"
        objects = [str(runtime)] + [str(work / f"unit{index}.o") for index in range(len(units))]
        result = subprocess.run([compiler, "-shared", "-pthread", *link_flags, "-o", str(linked), *objects],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise BuildError(f"the host harness does not link:\n{result.stderr[-8000:]}")
        os.replace(linked, library)


def _dim3(name, value, limits) -> tuple[int, int, int]:
    dims = (value,) if isinstance(value, (int, np.integer)) else tuple(value)
    if not 1 <= len(dims) <= 3 or not all(isinstance(d, (int, np.integer)) for d in dims):
        raise TypeError(f"{name}: expected an int or 1 to 3 ints, got {value!r}")
    dims = tuple(int(d) for d in dims) + (1,) * (3 - len(dims))
    for axis, (d, limit) in enumerate(zip(dims, limits)):
        if not 1 <= d <= limit:
            raise ValueError(f"{name}: invalid configuration argument: {'xyz'[axis]} = {d}, expected 1 to {limit}")
    return dims


class _Launch(ctypes.Structure):
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("dynamic_shared_bytes", ctypes.c_size_t)]


class Program:
    """A built harness library: launch any of its kernel instantiations by name expression."""

    def __init__(self, library: Path, expressions, parameter_names):
        self.path = library
        self._loaded = None
        self._index = {expression: i for i, expression in enumerate(expressions)}
        self._parameter_names = parameter_names
        self._signatures = {}

    @property
    def _library(self):
        """The library, loaded on first use (a sanitizer build loads only where its runtime is preloaded)."""
        if self._loaded is None:
            self._loaded = ctypes.CDLL(str(self.path))
            self._loaded.dp_last_error.restype = ctypes.c_char_p
        return self._loaded

    @property
    def expressions(self) -> tuple[str, ...]:
        return tuple(self._index)

    def signature(self, expression: str) -> tuple[Param, ...]:
        """The kernel's parameters as its C++ declaration has them."""
        if expression not in self._signatures:
            try:
                index = self._index[expression]
            except KeyError:
                raise KeyError(f"the host harness has no kernel {expression!r}") from None
            entry = getattr(self._library, f"dp_signature_{index}")
            entry.restype = ctypes.c_char_p
            types = [t for t in entry().decode().split(",") if t.strip()]
            names = self._parameter_names.get(expression.split("<")[0], ())
            params = []
            for i, spelled in enumerate(types):
                const, pointer = spelled.startswith("const "), spelled.endswith("*")
                ctype = spelled.removeprefix("const ").removesuffix("*")
                params.append(Param(names[i] if i < len(names) else f"#{i}", ctype, pointer, const))
            self._signatures[expression] = tuple(params)
        return self._signatures[expression]

    def launch(self, expression: str, grid, block, args, shared_mem: int = 0) -> None:
        """Run ``expression`` on a grid of blocks, as ``kernel<<<grid, block, shared_mem>>>(args...)``.

        Raises TypeError for an argument its parameter would misread, ValueError for a launch
        configuration CUDA refuses, KernelFault for a fault detected while the kernel ran.
        """
        params = self.signature(expression)
        grid3 = _dim3(f"{expression}: grid", grid, MAX_GRID)
        block3 = _dim3(f"{expression}: block", block, MAX_BLOCK)
        if block3[0] * block3[1] * block3[2] > MAX_THREADS_PER_BLOCK:
            raise ValueError(f"{expression}: block: invalid configuration argument: {block3} is more than"
                             f" {MAX_THREADS_PER_BLOCK} threads")
        if not 0 <= shared_mem <= MAX_DYNAMIC_SHARED:
            raise ValueError(f"{expression}: shared_mem: expected 0 to {MAX_DYNAMIC_SHARED} bytes, got {shared_mem}")
        args = tuple(args)
        if len(args) != len(params):
            raise TypeError(f"{expression}: expected {len(params)} arguments ({', '.join(map(str, params))}),"
                            f" got {len(args)}")
        values = [_argument(expression, i, param, arg) for i, (param, arg) in enumerate(zip(params, args))]
        pointers = (ctypes.c_void_p * max(len(values), 1))(*(v.ctypes.data for v in values))
        config = _Launch((ctypes.c_uint * 3)(*grid3), (ctypes.c_uint * 3)(*block3), shared_mem)
        entry = getattr(self._library, f"dp_launch_{self._index[expression]}")
        if entry(ctypes.byref(config), pointers) != 0:
            raise KernelFault(self._library.dp_last_error().decode())


def _numpy_type(ctype: str) -> np.dtype | None:
    from deltaprop.kernels.dtypes import DTYPES

    name = C_TYPES.get(ctype)
    if name in DTYPES:
        return DTYPES[name].numpy_dtype()
    return None if name is None else np.dtype(name)


def _describe(value) -> str:
    if isinstance(value, np.ndarray):
        return f"a numpy.ndarray of {value.dtype}"
    if isinstance(value, np.generic):
        return f"numpy.{value.dtype} {value!r}"
    return f"{type(value).__name__} {value!r}"


def _argument(expression: str, index: int, param: Param, value) -> np.ndarray:
    """The bytes the device would read for parameter ``param``, as a one-element array; TypeError when
    ``value`` is not what the parameter reads (wrong kind, width or signedness)."""
    where = f"{expression}: argument {index} ({param})"
    if param.pointer:
        if value is None:
            return np.zeros(1, np.uint64)
        if isinstance(value, np.uint64):  # CuPy's spelling of a raw device address (0: a null pointer)
            return np.array([value], np.uint64)
        if not isinstance(value, np.ndarray):
            raise TypeError(f"{where}: expected an array, None or a numpy.uint64 address, got {_describe(value)}")
        expected = None if param.ctype == "void" else _numpy_type(param.ctype)
        if expected is not None and value.dtype != expected:
            raise TypeError(f"{where}: expected an array of {expected}, got {_describe(value)}")
        if not value.flags.c_contiguous:
            raise TypeError(f"{where}: expected a C-contiguous array (a kernel reads a pointer), got strides"
                            f" {value.strides} for shape {value.shape}")
        if not param.const and not value.flags.writeable:
            raise TypeError(f"{where}: the kernel writes through this pointer, got a read-only array")
        return np.array([value.ctypes.data], np.uint64)
    expected = _numpy_type(param.ctype)
    if expected is None:
        raise TypeError(f"{where}: the host harness cannot pass a parameter of C type {param.ctype}")
    scalar_type = PYTHON_SCALARS.get(type(value))
    passed = np.dtype(scalar_type) if scalar_type else value.dtype if isinstance(value, np.generic) else None
    if passed is None:
        raise TypeError(f"{where}: expected a scalar of {expected}, got {_describe(value)}")
    if passed != expected:
        how = f", as CuPy passes a Python {type(value).__name__}" if scalar_type else ""
        raise TypeError(f"{where}: expected {expected} ({expected.itemsize} bytes), got {_describe(value)}"
                        f" ({passed}, {passed.itemsize} bytes{how})")
    return np.array([value], expected)


@cache
def _libc():
    """The C library's malloc and free (the ones AddressSanitizer replaces when it is preloaded)."""
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    return libc


def exact_copy(array: np.ndarray, misalign: int = 0) -> np.ndarray:
    """A C-contiguous copy of ``array`` in a buffer of exactly its bytes, whose address is ``misalign``
    bytes past a 16-byte boundary (a multiple of the item size): an access past its end leaves the
    allocation, which an AddressSanitizer build reports."""
    array = np.asarray(array)
    if misalign % array.itemsize or not 0 <= misalign < 16:
        raise ValueError(f"misalign: expected a multiple of {array.itemsize} below 16, got {misalign}")
    libc = _libc()
    start = libc.malloc(max(array.nbytes + misalign, 1))
    if not start:
        raise MemoryError(f"exact_copy: cannot allocate {array.nbytes} bytes")
    storage = (ctypes.c_char * array.nbytes).from_address(start + misalign)
    weakref.finalize(storage, libc.free, start)
    copy = np.frombuffer(storage, dtype=array.dtype, count=array.size).reshape(array.shape)
    copy[...] = array
    return copy

