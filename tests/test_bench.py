"""`deltaprop bench`: a quick run in-process on what is present, its JSON against the documented schema,
the table, the plot, the FLOP formula against a count of the GEMMs a step really makes, and refusals.
Speed is never asserted: only structure, positive finite timings and the arithmetic."""

import contextlib
import importlib.resources
import importlib.util
import io
import json
import math
import struct
import subprocess
import sys

import numpy as np
import pytest

from deltaprop.backend import Backend, available_backends, backend_status
from deltaprop.benchmarks import bench, machine, peers
from deltaprop.cli import main
from deltaprop.benchmarks.timing import HostClock, Timed, Timing, interleave
from deltaprop.benchmarks.workload import PRESETS, host_batch, kernel_calls, step_flops
from deltaprop.model import MLP

BATCHES = (1, 5)


def usable_peers():
    return [name for name in peers.PEERS if peers.peer_status(name)[0]]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One `deltaprop bench --quick` of the small preset with --kernels, --json and --plot, on every backend
    and peer present: (exit status, stdout, the JSON report, the PNG's path)."""
    folder = tmp_path_factory.mktemp("bench")
    json_path, png_path = folder / "bench.json", folder / "bench.png"
    argv = ["bench", "--quick", "--preset", "small", "--batch", ",".join(map(str, BATCHES)), "--max-time", "0.2",
            "--kernels", "--json", str(json_path)]
    if importlib.util.find_spec("matplotlib") is not None:
        argv += ["--plot", str(png_path)]
    with contextlib.redirect_stdout(io.StringIO()) as out:
        status = main(argv)
    return status, out.getvalue(), json.loads(json_path.read_text()), png_path


def test_quick_run_succeeds_on_every_backend_and_peer_present(quick_run):
    status, _, report, _ = quick_run
    assert status == 0
    assert [s["name"] for s in report["subjects"]] == available_backends() + usable_peers()
    expected = {(s["name"], b) for s in report["subjects"] for b in BATCHES}
    assert {(row["subject"], row["batch"]) for row in report["steps"]} == expected


def test_report_validates_against_the_documented_schema(quick_run):
    jsonschema = pytest.importorskip("jsonschema")  # of the test extra; a device image may lack it
    schema = json.loads(importlib.resources.files("deltaprop.benchmarks").joinpath("bench_schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(quick_run[2], schema, cls=jsonschema.Draft202012Validator)


def _timings(report):
    for section in ("peaks", "steps", "kernels"):
        for row in report[section]:
            yield section, row["timing"]


def test_timings_are_positive_and_finite(quick_run):
    report = quick_run[2]
    assert report["kernels"] and report["peaks"]
    for section, t in _timings(report):
        values = [t["median_ms"], t["q1_ms"], t["q3_ms"], t["min_ms"], t["max_ms"], *t["samples_ms"]]
        assert all(math.isfinite(v) and v > 0 for v in values), section
        assert t["min_ms"] <= t["q1_ms"] <= t["median_ms"] <= t["q3_ms"] <= t["max_ms"]
        assert t["rounds"] == len(t["samples_ms"]) >= 1
    for row in report["steps"]:
        assert row["flops"] == step_flops(PRESETS["small"], row["batch"])
        assert row["samples_per_s"] == pytest.approx(row["batch"] / row["timing"]["median_ms"] * 1e3)
        assert math.isfinite(row["first_step_ms"]) and row["first_step_ms"] > 0


def test_derived_columns_refer_to_the_same_device_and_batch(quick_run):
    report = quick_run[2]
    medians = {(r["subject"], r["batch"]): r["timing"]["median_ms"] for r in report["steps"]}
    peaks = {(p["device"], p["batch"]): p for p in report["peaks"]}
    assert len(peaks) == len(report["peaks"]) == len(BATCHES)  # one peak per batch's rounds on the one device
    for row in report["steps"]:
        # every device of this run has one of our backends; the peak is the one timed in the same rounds
        peak = peaks[row["device"], row["batch"]]
        assert row["peak_fraction"] == pytest.approx(row["gflops"] / peak["gflops"])
        assert peak["timing"]["rounds"] == row["timing"]["rounds"]
        if row["fastest_peer"] is None:
            assert row["vs_fastest_peer"] is None
            continue
        peer_ms = medians[row["fastest_peer"], row["batch"]]
        assert row["vs_fastest_peer"] == pytest.approx(peer_ms / row["timing"]["median_ms"])
        assert peer_ms == min(medians[r["subject"], row["batch"]] for r in report["steps"]
                              if r["kind"] == "peer" and r["device"] == row["device"] and r["batch"] == row["batch"])


def test_table_has_a_row_per_subject_and_batch_and_the_footnote(quick_run):
    _, out, report, _ = quick_run
    rows = [line.split() for line in out.splitlines()]
    for s in report["subjects"]:
        for batch in BATCHES:
            assert [s["name"], s["device"], str(batch)] in [r[:3] for r in rows]
    assert "the input gets no gradient" in out
    assert "GEMM peak, cpu" in out
    assert "each kernel alone" in out


def test_header_names_each_blas_library_and_its_thread_count(quick_run):
    from threadpoolctl import threadpool_info

    _, out, report, _ = quick_run
    header = out.splitlines()[1]
    # the pools loaded when the header was written are still loaded (a later import may add others)
    loaded_now = {(pool["internal_api"], pool["version"], pool["num_threads"])
                  for pool in threadpool_info() if pool["user_api"] == "blas"}
    assert report["machine"]["blas"], "the report names no BLAS in a process that has loaded NumPy"
    for pool in report["machine"]["blas"]:
        assert (pool["name"], pool["version"], pool["threads"]) in loaded_now
        assert f"{pool['name']} {pool['version']} ({pool['threads']} threads)" in header


def test_kernels_cover_every_call_of_a_step(quick_run):
    report = quick_run[2]
    depth = len(PRESETS["small"]) - 1
    for s in report["subjects"]:
        rows = [k for k in report["kernels"] if k["subject"] == s["name"] and k["batch"] == BATCHES[0]]
        assert len(rows) == (6 * depth if s["kind"] == "backend" else 0)


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="--plot needs matplotlib")
def test_plot_is_a_png(quick_run):
    png = quick_run[3].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width > 400 and height > 300


# ---- the FLOP formula against an independent count --------------------------------------------------


class CountingBackend(Backend):
    """The reference backend, recording every kernel call: (kernel name, FLOPs of a GEMM or None)."""

    name = "counting"

    def __init__(self):
        self.calls = []

    def gemm(self, a, b, out=None, trans_a=False, trans_b=False, alpha=1.0, beta=0.0):
        out = super().gemm(a, b, out, trans_a, trans_b, alpha, beta)
        inner = a.shape[-2] if trans_a else a.shape[-1]
        self.calls.append(("gemm", 2 * out.shape[-2] * out.shape[-1] * inner))
        return out


for _kernel in ("bias_act", "act_backward", "softmax_xent", "bias_grad", "sgd_update"):
    def _recorded(self, *args, _kernel=_kernel, **kwargs):
        self.calls.append((_kernel, None))
        return getattr(Backend, _kernel)(self, *args, **kwargs)

    setattr(CountingBackend, _kernel, _recorded)


@pytest.mark.parametrize("sizes", [(3, 4), (64, 128, 128, 10), (7, 5, 6, 2, 9)])
@pytest.mark.parametrize("batch", [1, 3, 32])
def test_step_flops_equal_the_gemm_flops_a_train_step_makes(sizes, batch):
    counting = CountingBackend()
    net = MLP(sizes, backend=counting, dtype="float64")
    x, y = host_batch(sizes, batch, "float64")
    net.train_step(x, y, lr=0.01)
    counted = sum(flops for kernel, flops in counting.calls if kernel == "gemm")
    assert step_flops(sizes, batch) == counted
    # by hand for one layer: forward and dW GEMMs only, 2 * 2·B·n0·n1
    assert step_flops((3, 4), batch) == 2 * 2 * batch * 3 * 4


@pytest.mark.parametrize("sizes", [(3, 4), (7, 5, 6, 2, 9)])
def test_kernel_calls_are_the_calls_of_a_train_step(sizes):
    counting = CountingBackend()
    net = MLP(sizes, backend=counting, dtype="float64")
    x, y = host_batch(sizes, 4, "float64")
    net.train_step(x, y, lr=0.01)
    step_calls = sorted(counting.calls, key=repr)
    calls = kernel_calls(net, x, y)
    assert sorted(((c.kernel, c.flops) for c in calls), key=repr) == step_calls
    counting.calls.clear()
    for call in calls:
        call.run()
    assert sorted(counting.calls, key=repr) == step_calls


# ---- the timer --------------------------------------------------------------------------------------


def test_interleave_rotates_and_stops_at_its_limits():
    order = []
    timeds = {key: Timed(lambda key=key: order.append(key), HostClock()) for key in "abc"}
    timings = interleave(timeds, rounds=4, warmup_s=0.0, min_sample_s=0.0)
    assert all(len(t.samples) == 4 and t.number == 1 for t in timings.values())
    assert all(s >= 0 and math.isfinite(s) for t in timings.values() for s in t.samples)
    firsts = [order[i] for i in range(6, len(order), 6)]  # after 2 warm-up calls each, 6 calls a round
    assert firsts == ["a", "b", "c", "a"]
    stopped = interleave(timeds, rounds=50, min_rounds=2, max_time_s=0.0, warmup_s=0.0)
    assert all(len(t.samples) == 2 for t in stopped.values())


def test_timing_quantiles():
    t = Timing([4.0, 1.0, 3.0, 2.0, 5.0], number=1)
    assert (t.median, t.quantile(0.25), t.quantile(0.75)) == (3.0, 2.0, 4.0)
    summary = t.summary_ms()
    assert (summary["min_ms"], summary["max_ms"], summary["rounds"]) == (1e3, 5e3, 5)


# ---- the machine --------------------------------------------------------------------------------------


def test_machine_facts():
    facts = machine.describe_machine()
    assert facts["cores"] >= 1 and facts["threads"] >= 1 and facts["cpu"]
    assert facts["versions"]["numpy"] == np.__version__


def test_blas_threadpoolctl_does_not_know_comes_from_numpy(monkeypatch):
    import threadpoolctl

    monkeypatch.setattr(threadpoolctl, "threadpool_info", lambda: [])
    (entry,) = machine.blas()
    assert entry["name"] and entry["threads"] is None
    assert machine.cpu_threads() == machine.usable_cores()


# ---- choices and refusals ---------------------------------------------------------------------------


def test_absent_peers_are_not_run_and_said_once(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("torch", "jax") else real_find_spec(name, *a))
    names, not_run = bench.choose_subjects(None)
    assert names == available_backends()
    assert all("not installed" in not_run[name] for name in peers.PEERS)


@pytest.mark.parametrize("argv, message", [
    (["--backends", "numpy,nonesuch"], "expected names among"),
    (["--repeat", "0"], "--repeat"),
    (["--sizes", "5"], "at least two widths"),
    (["--max-time", "-1"], "--max-time"),
])
def test_bad_arguments_exit_2_with_a_message(argv, message, capsys):
    assert main(["bench", *argv]) == 2
    assert message in capsys.readouterr().err


def test_plot_without_matplotlib_is_refused_before_running(monkeypatch, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a))
    assert main(["bench", "--plot", "x.png"]) == 2
    assert "pip install 'deltaprop[plot]'" in capsys.readouterr().err


@pytest.mark.skipif(backend_status("cupy")[0], reason="cupy is usable here")
def test_an_unusable_backend_asked_for_is_refused_with_the_reason(capsys):
    assert main(["bench", "--backends", "cupy"]) == 2
    assert "cupy cannot run here" in capsys.readouterr().err


def test_importing_the_bench_imports_no_heavy_package():
    code = ("import sys, deltaprop.benchmarks.bench; "
            "print(sorted(m for m in ('torch', 'jax', 'matplotlib', 'numba', 'cupy', 'tqdm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
