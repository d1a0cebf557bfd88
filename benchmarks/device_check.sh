#!/usr/bin/env bash
# The one script a GPU session runs: it installs deltaprop, records the machine and CuPy's config,
# compiles every CUDA kernel (one process per dtype, timed apart), runs the `gpu` tests (NCCL's among them), the simulator's
# suites on the real device (`pytest -m cuda_sim` with DELTAPROP_CUDA_SIM=0: the cupy-sim cases on CuPy, to
# compare with the CPU stand-in's run in CI), `deltaprop check` and the training-step timings on cupy
# against PyTorch CUDA only, an ensemble step against a loop of MLPs, and writes one JSON file under $OUT.
#
#     OUT=/path/to/report bash benchmarks/device_check.sh      (PYTHON defaults to python3)
#
# It needs no network: CuPy, numba, numpy, pytest and torch must be installed already (the device image:
# Python 3.12, cupy-cuda13x 14.2, torch 2.11 cu130, no jsonschema). Each stage runs under its own time
# limit (together under 5 minutes) and prints its result whether or not the one before it passed. The GPU
# stages check and time only the GPU and its PyTorch peer: no CPU backend compiles inside their limits.
# $OUT/device_check.json sums it all up, with the end of each stage's output and the benchmark reports.

set -u
OUT=${OUT:?set OUT to the folder that receives the report}
PYTHON=${PYTHON:-python3}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
WORK=$(mktemp -d)
export PYTHONUNBUFFERED=1
STAGES="$WORK/stages.jsonl"
: > "$STAGES"

# stage NAME LIMIT_S COMMAND...: run COMMAND under a time limit, its output in $WORK/NAME.log; record rc and time
stage() {
    local name=$1 limit=$2
    shift 2
    local start end rc
    start=$(date +%s%N)
    timeout "$limit" "$@" > "$WORK/$name.log" 2>&1
    rc=$?
    end=$(date +%s%N)
    printf '{"stage": "%s", "rc": %d, "timed_out": %s, "seconds": %d.%03d, "log": "%s.log"}\n' \
        "$name" "$rc" "$([ "$rc" = 124 ] && echo true || echo false)" \
        $(( (end - start) / 1000000000 )) $(( (end - start) / 1000000 % 1000 )) "$name" >> "$STAGES"
    echo "== $name: rc=$rc ($(( (end - start) / 1000000 )) ms)"
    tail -n 4 "$WORK/$name.log"
}

# compile every module for each dtype in parallel processes; CuPy's disk cache then serves the tests
WARMUP='
pids=()
for dtype in float32 float64 float16 bfloat16; do
    "$0" -c "import json, sys
from deltaprop.backend import get_backend
print(json.dumps({\"dtype\": sys.argv[1], \"compile_seconds\": get_backend(\"cupy\").warmup([sys.argv[1]])}))" "$dtype" &
    pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
exit $rc'

XDIST=()
"$PYTHON" -c "import xdist" 2>/dev/null && XDIST=(-n 4)
# the command, whichever way the package got installed
DELTAPROP=("$PYTHON" -m deltaprop)

stage nvidia-smi 10 nvidia-smi
stage install 20 "$PYTHON" -m pip install --no-deps --no-build-isolation -e .
if ! "$PYTHON" -c "import deltaprop.model" 2>/dev/null; then
    # no pip or setuptools that can build it there: the repository root is the package, so a link
    # named deltaprop on PYTHONPATH imports it as it stands
    mkdir -p "$WORK/site" && ln -sfn "$PWD" "$WORK/site/deltaprop"
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
    echo "install failed: importing deltaprop from $PWD through PYTHONPATH" >> "$WORK/install.log"
fi
export DELTAPROP_CUDA_SIM=0  # every stage on the real device, the cuda_sim cases included
stage cupy-config 10 "$PYTHON" -c "import cupy; cupy.show_config()
from deltaprop.backend import backend_status
print('deltaprop cupy backend usable:', backend_status('cupy'))"
stage warmup 50 bash -c "$WARMUP" "$PYTHON"
stage pytest-gpu 65 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider -rfE "${XDIST[@]}" \
    --junitxml="$WORK/pytest-gpu.xml" tests
stage pytest-cuda-sim 40 "$PYTHON" -m pytest -m cuda_sim -q -p no:cacheprovider -rfE "${XDIST[@]}" \
    --junitxml="$WORK/pytest-cuda-sim.xml" tests --deselect tests/test_cuda_host.py --deselect tests/test_cuda_sim.py
stage deltaprop-check 20 "${DELTAPROP[@]}" check --backends cupy
# the training step on cupy against PyTorch CUDA, through `deltaprop bench` (CUDA events)
BENCH=(bench --batch 256,8192 --backends cupy,torch-cuda --repeat 5 --max-time 2)
stage bench-mlp 25 "${DELTAPROP[@]}" "${BENCH[@]}" --sizes 784,1024,1024,10 --kernels --json "$WORK/bench_mlp.json"
stage bench-large 25 "${DELTAPROP[@]}" "${BENCH[@]}" --sizes 4096,4096,4096,1000 --json "$WORK/bench_large.json"
# K stacked networks (MLPEnsemble) against a loop of K MLPs on the device, K = 8 and 64
stage bench-ensemble 25 "${DELTAPROP[@]}" bench --ensemble --quick --backends cupy --json "$WORK/bench_ensemble.json"

"$PYTHON" - "$WORK" "$OUT" <<'EOF'
import json, pathlib, sys
import xml.etree.ElementTree as ET

work, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
stages = [json.loads(line) for line in (work / "stages.jsonl").read_text().splitlines()]
for stage in stages:  # the end of each stage's output, so that the one JSON file tells the story
    stage["output_tail"] = (work / stage["log"]).read_text(errors="replace")[-4000:]
report = {"stages": stages}
warmup = work / "warmup.log"
report["compile"] = [json.loads(l) for l in warmup.read_text().splitlines() if l.startswith("{")] if warmup.exists() else []
for name in ("pytest-gpu", "pytest-cuda-sim"):  # the device's own cases, and the simulator's on the device
    junit = work / f"{name}.xml"
    if junit.exists():
        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        counts["failed"] = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
                            if case.find("failure") is not None or case.find("error") is not None]
        report[name.replace("-", "_")] = counts
for name in ("bench_mlp", "bench_large", "bench_ensemble"):
    bench = work / f"{name}.json"
    if bench.exists():
        report[name] = json.loads(bench.read_text())
(out / "device_check.json").write_text(json.dumps(report, indent=2))
print(json.dumps({s["stage"]: s["rc"] for s in report["stages"]}))
EOF
