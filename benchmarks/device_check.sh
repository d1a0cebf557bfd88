#!/usr/bin/env bash
# The one script a GPU session runs: it installs deltaprop, records the machine and CuPy's config,
# compiles every CUDA kernel (one process per dtype, timed apart), runs the `gpu` tests, `deltaprop
# check`, and the training-step timings against numba and PyTorch CUDA, and writes JSON under $OUT.
#
#     OUT=/path/to/report bash benchmarks/device_check.sh      (PYTHON defaults to python3)
#
# Made for the H200 machine: no network, CuPy 14, numba, numpy, pytest, torch already installed.
# Each stage runs under its own time limit (together under 5 minutes); a stage that fails or runs out
# of time is recorded and the next one runs. $OUT/device_check.json sums it all up.

set -u
OUT=${OUT:?set OUT to the folder that receives the report}
PYTHON=${PYTHON:-python3}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
STAGES="$OUT/stages.jsonl"
: > "$STAGES"

# stage NAME LIMIT_S COMMAND...: run COMMAND under a time limit, its output in $OUT/NAME.log; record rc and time
stage() {
    local name=$1 limit=$2
    shift 2
    local start end rc
    start=$(date +%s%N)
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    end=$(date +%s%N)
    printf '{"stage": "%s", "rc": %d, "timed_out": %s, "seconds": %d.%03d, "log": "%s.log"}\n' \
        "$name" "$rc" "$([ "$rc" = 124 ] && echo true || echo false)" \
        $(( (end - start) / 1000000000 )) $(( (end - start) / 1000000 % 1000 )) "$name" >> "$STAGES"
    echo "== $name: rc=$rc ($(( (end - start) / 1000000 )) ms)"
    tail -n 4 "$OUT/$name.log"
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
DELTAPROP="$(dirname "$(command -v "$PYTHON")")/deltaprop"
[ -x "$DELTAPROP" ] || DELTAPROP=deltaprop

stage nvidia-smi 10 nvidia-smi
stage install 40 "$PYTHON" -m pip install --no-deps --no-build-isolation -e .
stage cupy-config 20 "$PYTHON" -c "import cupy; cupy.show_config()
from deltaprop.backend import backend_status
print('deltaprop cupy backend usable:', backend_status('cupy'))"
stage warmup 50 bash -c "$WARMUP" "$PYTHON"
stage pytest-gpu 90 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider -rfE "${XDIST[@]}" \
    --junitxml="$OUT/pytest-gpu.xml" tests
stage deltaprop-check 30 "$DELTAPROP" check
stage step-timing 50 "$PYTHON" benchmarks/gpu_step_timing.py --out "$OUT/step_timing.json" --budget 1

"$PYTHON" - "$OUT" <<'EOF'
import json, pathlib, sys
import xml.etree.ElementTree as ET

out = pathlib.Path(sys.argv[1])
report = {"stages": [json.loads(line) for line in (out / "stages.jsonl").read_text().splitlines()]}
warmup = out / "warmup.log"
report["compile"] = [json.loads(l) for l in warmup.read_text().splitlines() if l.startswith("{")] if warmup.exists() else []
junit = out / "pytest-gpu.xml"
if junit.exists():
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    report["pytest_gpu"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    report["pytest_gpu"]["failed"] = [
        f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
timing = out / "step_timing.json"
if timing.exists():
    report["step_timing"] = json.loads(timing.read_text())
(out / "device_check.json").write_text(json.dumps(report, indent=2))
print(json.dumps({s["stage"]: s["rc"] for s in report["stages"]}))
EOF
