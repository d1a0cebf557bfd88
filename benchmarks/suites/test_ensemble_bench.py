"""pytest-benchmark: one SGD step of K stacked networks (``MLPEnsemble.train_step``) against a loop of K
``MLP.train_step`` calls, per usable CPU backend, K and batch (the issue's sweep; the torch and JAX peers
are in ``deltaprop bench --ensemble``).

    pytest benchmarks/suites/test_ensemble_bench.py --benchmark-only        time them
    pytest benchmarks/suites/test_ensemble_bench.py --benchmark-disable     run each once (CI: small cases)
"""

import pytest

from deltaprop.backend import available_backends, get_backend
from deltaprop.benchmarks.ensemble import CASES, Case, our_steps

SUBJECTS = {"ensemble": 0, "loop": 1}  # the Timed pair of benchmarks.ensemble.our_steps


def _cases(config):
    """The issue's sweep, or one tiny case when the benchmarks only run once (--benchmark-disable)."""
    return [((8, 16, 4), 4, 8)] if config.getoption("benchmark_disable") else list(CASES)


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases = _cases(metafunc.config)
        metafunc.parametrize("case", [Case(*c) for c in cases], ids=[Case(*c).label.replace(" ", "_") for c in cases])


@pytest.mark.parametrize("subject", sorted(SUBJECTS))
@pytest.mark.parametrize("backend_name", [n for n in available_backends() if get_backend(n).device == "cpu"])
def test_ensemble_step(benchmark, backend_name, subject, case):
    timed = our_steps(get_backend(backend_name), case, "float32")[SUBJECTS[subject]]
    benchmark.group = f"ensemble {case.label}"
    benchmark.extra_info["members"] = case.members
    benchmark(timed.fn)
