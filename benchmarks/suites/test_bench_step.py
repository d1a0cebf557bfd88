"""pytest-benchmark: one training step (``MLP.train_step``) per usable backend, preset and batch size.

    pytest benchmarks/suites --benchmark-only        time them
    pytest benchmarks/suites --benchmark-disable     run each once (CI: they cannot rot)
"""

import pytest

from deltaprop.backend import available_backends
from deltaprop.benchmarks.bench import BackendSubject
from deltaprop.benchmarks.workload import PRESETS


@pytest.mark.parametrize("batch", [32, 256])
@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("backend_name", available_backends())
def test_train_step(benchmark, backend_name, preset, batch):
    subject = BackendSubject(backend_name, PRESETS[preset], "float32")
    subject.compile()
    step = subject.step(batch)
    benchmark.group = f"train_step {preset} batch {batch}"
    benchmark.extra_info["device"] = subject.device

    def train_step():
        step.fn()
        subject.backend.synchronize()

    benchmark(train_step)
