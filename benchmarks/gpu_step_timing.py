"""Time one training step (forward, loss, backward, SGD update) of deltaprop's MLP on the cupy and numba
backends, and of the same network in PyTorch CUDA, and check cupy's step against the NumPy reference
backend; write everything as JSON. Run by benchmarks/device_check.sh on a GPU machine.

    python benchmarks/gpu_step_timing.py --out report.json [--budget 6]

GPU steps are timed with CUDA events around each step, CPU steps with perf_counter; each figure is the
median over repetitions after one warm-up step. Kernel compilation happens in ``warmup()`` first and is
reported, never timed. Every measurement that fails is recorded in "errors" and the rest goes on.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import traceback

import numpy as np

CONFIGS = ([784, 1024, 1024, 10], [4096, 4096, 4096, 1000])
BATCHES = (256, 8192)
DTYPE = "float32"
LEARNING_RATE = 0.01
MIN_REPS, MAX_REPS = 3, 50


def step_flops(sizes, batch):
    """FLOPs of a step: 2 B (3 sum n_l n_{l-1} - n_0 n_1) (the input gets no gradient)."""
    weights = sum(m * n for m, n in zip(sizes, sizes[1:]))
    return 2 * batch * (3 * weights - sizes[0] * sizes[1])


def median_seconds(step, clock, budget_s):
    """Median of clock(step) over MIN_REPS..MAX_REPS repetitions within about ``budget_s``, after a warm-up."""
    clock(step)
    times, start = [], time.perf_counter()
    while len(times) < MIN_REPS or (len(times) < MAX_REPS and time.perf_counter() - start < budget_s):
        times.append(clock(step))
    return statistics.median(times), len(times)


def cpu_clock(step):
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def cupy_clock(step):
    import cupy

    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    step()
    end.record()
    end.synchronize()
    return cupy.cuda.get_elapsed_time(start, end) / 1e3


def torch_clock(step):
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def batch_data(sizes, batch, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, sizes[0])).astype(DTYPE), rng.integers(0, sizes[-1], batch)


def deltaprop_step(backend_name, sizes, batch):
    """A step of deltaprop's MLP on ``backend_name``, on data already on its device."""
    from deltaprop.backend import get_backend
    from deltaprop.model import MLP

    backend = get_backend(backend_name)
    net = MLP(sizes, activation="relu", loss="softmax_cross_entropy", backend=backend_name, dtype=DTYPE, seed=0)
    x, y = (backend.asarray(a) for a in batch_data(sizes, batch))
    return lambda: net.train_step(x, y, lr=LEARNING_RATE)


def torch_step(sizes, batch):
    """The same network in PyTorch on CUDA, full float32 GEMMs (no TF32, as deltaprop's float32)."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    layers = []
    for m, n in zip(sizes, sizes[1:]):
        layers += [torch.nn.Linear(m, n), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers[:-1]).cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    loss_fn = torch.nn.CrossEntropyLoss()
    x, y = batch_data(sizes, batch)
    x, y = torch.from_numpy(x).cuda(), torch.from_numpy(y).cuda()

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()

    return step


def parity(sizes, batch, steps=3):
    """Max relative error (norm-wise) of cupy's weights and losses against the NumPy backend's after
    ``steps`` training steps from the same initial weights, in float32."""
    from deltaprop.backend import get_backend, to_numpy
    from deltaprop.model import MLP

    results = {}
    for name in ("numpy", "cupy"):
        backend = get_backend(name)
        net = MLP(sizes, activation="relu", loss="softmax_cross_entropy", backend=name, dtype=DTYPE, seed=0)
        x, y = (backend.asarray(a) for a in batch_data(sizes, batch))
        losses = [float(net.train_step(x, y, lr=LEARNING_RATE)) for _ in range(steps)]
        results[name] = losses, [to_numpy(W).astype(np.float64) for W in net.weights]
    (losses_ref, weights_ref), (losses, weights) = results["numpy"], results["cupy"]
    weight_error = max(np.abs(W - R).max() / np.abs(R).max() for W, R in zip(weights, weights_ref))
    loss_error = max(abs(a - b) / abs(b) for a, b in zip(losses, losses_ref))
    return {"sizes": sizes, "batch": batch, "steps": steps, "weights_rel_error": float(weight_error),
            "loss_rel_error": float(loss_error)}


def record(report, what, measure):
    """Run ``measure``; on failure keep the error in the report and go on."""
    try:
        return measure()
    except Exception as error:  # a missing backend or model, an out-of-memory: recorded, not fatal
        report["errors"].append({"what": what, "error": f"{type(error).__name__}: {error}",
                                 "traceback": traceback.format_exc(limit=4)})
        return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="where to write the JSON report")
    parser.add_argument("--budget", type=float, default=6.0, help="seconds of repetitions per measurement")
    args = parser.parse_args(argv)
    report = {"dtype": DTYPE, "steps": [], "ratio_to_torch": [], "errors": []}

    def cupy_facts():
        from deltaprop.backend import get_backend

        backend = get_backend("cupy")
        report["compile_seconds"] = backend.warmup()
        report["device"] = backend.describe()

    record(report, "cupy warmup", cupy_facts)
    report["parity"] = record(report, "parity", lambda: parity(list(CONFIGS[0]), 256))
    clocks = {"cupy": cupy_clock, "numba": cpu_clock}
    for sizes in CONFIGS:
        for batch in BATCHES:
            timed = {}
            for name in ("cupy", "numba", "torch"):
                def measure(name=name):
                    if name == "torch":
                        return median_seconds(torch_step(sizes, batch), torch_clock, args.budget)
                    return median_seconds(deltaprop_step(name, sizes, batch), clocks[name], args.budget)

                result = record(report, f"{name} {sizes} batch {batch}", measure)
                if result is None:
                    continue
                seconds, reps = result
                timed[name] = seconds
                report["steps"].append({
                    "backend": name, "sizes": sizes, "batch": batch, "median_ms": seconds * 1e3, "reps": reps,
                    "samples_per_s": batch / seconds, "gflops": step_flops(sizes, batch) / seconds / 1e9,
                })
                print(json.dumps(report["steps"][-1]), flush=True)
            if "cupy" in timed and "torch" in timed:
                report["ratio_to_torch"].append(
                    {"sizes": sizes, "batch": batch, "cupy_over_torch": timed["cupy"] / timed["torch"]})
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
