#!/usr/bin/env bash
# The one script a GPU session runs: it installs deltaprop, records the machine and CuPy's config,
# compiles every CUDA kernel (one process per dtype, timed apart), runs the `gpu` tests, `deltaprop
# check`, and the training-step timings against numba and PyTorch CUDA, and writes JSON under $OUT.
#
#     OUT=/path/to/report bash benchmarks/device_check.sh      (PYTHON defaults to python3)
#
# It needs no network: CuPy, numba, numpy, pytest and torch must be installed already. Each stage runs
# under its own time limit; a stage that fails or runs out of time is recorded and the next one runs.
# Two files land in $OUT: device_check.json, which sums it all up with each stage's output and the
# benchmark reports, and logs.tar.gz with the full logs.

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
stage install 30 "$PYTHON" -m pip install --no-deps --no-build-isolation -e .
if ! "$PYTHON" -c "import deltaprop.model" 2>/dev/null; then
    # no pip or setuptools that can build it there: the repository root is the package, so a link
    # named deltaprop on PYTHONPATH imports it as it stands
    mkdir -p "$WORK/site" && ln -sfn "$PWD" "$WORK/site/deltaprop"
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
    echo "install failed: importing deltaprop from $PWD through PYTHONPATH" >> "$WORK/install.log"
fi
stage cupy-config 10 "$PYTHON" -c "import cupy; cupy.show_config()
from deltaprop.backend import backend_status
print('deltaprop cupy backend usable:', backend_status('cupy'))"
stage warmup 50 bash -c "$WARMUP" "$PYTHON"
stage pytest-gpu 90 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider -rfE "${XDIST[@]}" \
    --junitxml="$WORK/pytest-gpu.xml" tests
stage deltaprop-check 30 "${DELTAPROP[@]}" check
# the training step on cupy against numba and PyTorch CUDA, through `deltaprop bench` (CUDA events)
BENCH=(bench --batch 256,8192 --backends cupy,numba,torch-cuda --repeat 5 --max-time 2)
stage bench-mlp 30 "${DELTAPROP[@]}" "${BENCH[@]}" --sizes 784,1024,1024,10 --kernels --json "$WORK/bench_mlp.json"
stage bench-large 40 "${DELTAPROP[@]}" "${BENCH[@]}" --sizes 4096,4096,4096,1000 --json "$WORK/bench_large.json"

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
junit = work / "pytest-gpu.xml"
if junit.exists():
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    report["pytest_gpu"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    report["pytest_gpu"]["failed"] = [
        f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
for name in ("bench_mlp", "bench_large"):
    bench = work / f"{name}.json"
    if bench.exists():
        report[name] = json.loads(bench.read_text())
(out / "device_check.json").write_text(json.dumps(report, indent=2))
print(json.dumps({s["stage"]: s["rc"] for s in report["stages"]}))
EOF
tar -czf "$OUT/logs.tar.gz" -C "$WORK" .
