"""pytest-benchmark: each kernel call of an ``mlp`` training step alone, per usable backend and batch size.

    pytest benchmarks/suites --benchmark-only        time them
    pytest benchmarks/suites --benchmark-disable     run each once (CI: they cannot rot)
"""

import functools

import pytest

from deltaprop.backend import available_backends
from deltaprop.benchmarks.bench import BackendSubject
from deltaprop.benchmarks.workload import PRESETS, kernel_calls


@functools.lru_cache(maxsize=None)
def subject_calls(backend_name, batch):
    """The backend's subject (compiled) and {label: KernelCall} of one mlp step at ``batch``."""
    subject = BackendSubject(backend_name, PRESETS["mlp"], "float32")
    subject.compile()
    return subject, {c.label: c for c in kernel_calls(subject.net, *subject.inputs(batch))}


# the calls of a step are the same on every backend: list them once, on the reference backend
CALLS = list(subject_calls("numpy", 1)[1])


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("batch", [32, 256])
@pytest.mark.parametrize("backend_name", available_backends())
def test_kernel(benchmark, backend_name, batch, call):
    subject, calls = subject_calls(backend_name, batch)
    kernel = calls[call]
    benchmark.group = f"{call} batch {batch}"
    benchmark.extra_info.update(device=subject.device, shape=list(kernel.shape), flops=kernel.flops)

    def run():
        kernel.run()
        subject.backend.synchronize()

    benchmark(run)
