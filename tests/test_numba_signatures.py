"""No silent promotion of float32 to float64 in the Numba kernels, and how they load and cache.

Every kernel is compiled for float32 (through ``warmup``); its dispatcher's signatures must hold no
float64, and a fresh, uncached compile of the same function must type no variable or call of the
kernel as float64 and emit no ``double`` in the optimised LLVM IR of the nopython code: the kernel and
every helper and activation formula it calls (LLVM folds away only promotions that change no result).
Only Numba's CPython wrappers, which convert Python scalars and return values, may touch doubles.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

numba = pytest.importorskip("numba")
from numba.extending import register_jitable  # noqa: E402

from deltaprop.backend import get_backend  # noqa: E402
from deltaprop.backend.checks import LOSS_KERNELS  # noqa: E402
from deltaprop.kernels.activations import ACTIVATIONS  # noqa: E402
from deltaprop.kernels.cpu import built_kernels, jit_options  # noqa: E402

_DEFINE = re.compile(r"^define .*?@(\S+?)\(", re.MULTILINE)


def promotions(dispatcher, signature, name="") -> list[str]:
    """What computes in float64 in a fresh compile of ``dispatcher`` for ``signature``, with the options
    of kernel ``name`` (not cached: kernels.cache does that): the kernel's own variables and calls typed
    float64, and the nopython functions whose LLVM IR uses doubles."""
    fresh = numba.njit(**jit_options(name))(dispatcher.py_func)
    fresh.compile(signature)
    annotation = fresh.overloads[tuple(signature)].type_annotation
    typed = [f"{var}: {ty}" for var, ty in annotation.typemap.items() if "float64" in str(ty)]
    typed += [f"call {sig}" for sig in annotation.calltypes.values() if "float64" in str(sig)]
    ir = fresh.inspect_llvm(signature)
    starts = [(m.start(), m.group(1)) for m in _DEFINE.finditer(ir)]
    bodies = [(name, ir[start:end]) for (start, name), (end, _) in zip(starts, starts[1:] + [(len(ir), "")])]
    return typed + [
        f"IR of {name}" for name, body in bodies if not name.startswith("_ZN7cpython") and re.search(r"\bdouble\b", body)
    ]


@pytest.fixture(scope="module")
def float32_kernels():
    backend = get_backend("numba")
    backend.warmup(["float32"], activations=sorted(ACTIVATIONS), losses=LOSS_KERNELS, uses=["kernels"])
    backend.warmup(["float32"], uses=["train_step", "fit"])  # relu, softmax cross-entropy: both variants
    backend.warmup(["float32"], uses=["ensemble"], batches=[9])  # MLPEnsemble's steps: the GEMM variant
    return {key: d for key, d in built_kernels().items() if key[1] == "float32"}


def test_every_kernel_is_built_for_float32(float32_kernels):
    names = {key[0] for key in float32_kernels}
    from deltaprop.kernels.cpu import BUILDERS

    assert names == set(BUILDERS)


def test_float32_kernels_do_not_promote(float32_kernels):
    promoted = {}
    for key, dispatcher in float32_kernels.items():
        assert dispatcher.signatures, key
        for signature in dispatcher.signatures:
            assert "float64" not in str(signature), (key, signature)
            found = promotions(dispatcher, signature, key[0])
            if found:
                promoted[(key, str(signature))] = found
    assert not promoted


def _halve(x):
    return x * 0.1  # a bare float literal: float64


def test_promotion_is_detected():
    """The check itself: a float64 literal in a kernel, or in a helper it calls, is caught."""
    signature = (numba.float32[::1], numba.float32[::1])
    helper = register_jitable(_halve)

    def promotes(x, out):
        for i in range(x.shape[0]):
            out[i] = x[i] * 0.5

    def calls_a_promoting_helper(x, out):
        for i in range(x.shape[0]):
            out[i] = helper(x[i])

    assert any("float64" in found for found in promotions(numba.njit(promotes), signature))
    assert any(found.startswith("IR of") for found in promotions(numba.njit(calls_a_promoting_helper), signature))


def _run(code, cache_dir):
    env = {**os.environ, "DELTAPROP_CACHE_DIR": str(cache_dir)}  # the kernel cache in cache_dir, whatever else is set
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return result.stdout.strip()


def test_imports_compile_nothing(tmp_path):
    code = (
        "import sys; import deltaprop.backend, deltaprop.kernels;"
        "print('numba' in sys.modules);"
        "import deltaprop.backend.numba_backend, deltaprop.kernels.cpu as cpu;"
        "print(len(cpu.built_kernels()))"
    )
    assert _run(code, tmp_path).split() == ["False", "0"]


def test_kernels_load_from_the_cache_in_a_new_process(tmp_path):
    """Closures over jitted dispatchers would miss Numba's cache in every new process; ours must hit."""
    code = (
        "import numpy as np; from deltaprop.backend import get_backend; from deltaprop.kernels.cpu import get_kernel;"
        "get_backend('numba').bias_act(np.ones((2, 3), np.float32), np.ones(3, np.float32), 'gelu');"
        "print(sum(get_kernel('bias_act', 'float32', 'gelu').stats.cache_hits.values()))"
    )
    assert _run(code, tmp_path) == "0"
    assert _run(code, tmp_path) == "1"
    assert any(tmp_path.rglob("*.nbi"))


@pytest.mark.parametrize(("model", "steps"), [
    ("MLP([4, 5, 3], backend='numba', seed=0)", "net._fused_step, net._fused_grads_step"),
    # compiled with ``parallel``: their loop over the members is a prange
    ("MLPEnsemble(2, [4, 5, 3], backend='numba', seed=0)", "net._sgd_steps, net._gradient_steps"),
], ids=["MLP", "MLPEnsemble"])
def test_fused_steps_load_from_the_cache_in_a_new_process(tmp_path, model, steps):
    """The fused steps reach intrinsics and the small-batch dispatchers through their closures; those
    pickled with a per-process uuid once, and every new process compiled the steps again (~9 s)."""
    code = (
        f"import numpy as np; from deltaprop.model import MLP, MLPEnsemble; net = {model};"
        "x = np.ones((2, 4), np.float32); y = np.array([0, 2]); net.train_step(x, y); net.loss_and_grads(x, y);"
        f"print(*(sum(s[2].stats.cache_hits.values()) for s in ({steps})))"
    )
    assert _run(code, tmp_path) == "0 0"
    assert _run(code, tmp_path) == "1 1"
