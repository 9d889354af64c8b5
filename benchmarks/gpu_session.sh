#!/usr/bin/env bash
# One GPU session's evidence run: install what the GPU image lacks (wheels in .whl/), print the machine,
# then run the steps named on the command line, each logged under $OUT. This is how the GPU results
# committed under results/ and report/ were produced.
#   usage: benchmarks/gpu_session.sh OUT STEP [STEP ...]
#   steps: gpu-tests, smoke, llama8b-1gpu, oom, llama8b, llama-full, nightly, 70b, overhead
set -uo pipefail
out=${1:?usage: gpu_session.sh OUT STEP...}; shift
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
bench() { python3 -m bench.cli "$@"; }
nvidia-smi --query-gpu=name,memory.total,power.limit --format=csv > "$out/nvidia-smi.csv" 2>&1
bench env > "$out/env.json" 2>&1

step() {
  local name=$1; shift
  echo "=== $name: $*"; local t0=$SECONDS
  "$@" 2>&1 | tee "$out/$name.log" | tail -25
  echo "=== $name done in $((SECONDS - t0)) s"
}

for s in "$@"; do
  case $s in
    gpu-tests)    step gpu-tests python3 -m pytest -q -m gpu tests -p no:cacheprovider ${PYTEST_K:+-k "$PYTEST_K"} ;;
    smoke)        step smoke bench run matrices/smoke.yaml --device cuda --results results/smoke-gpu --only gpus=1 ;;
    llama8b-1gpu) step llama8b-1gpu bench run matrices/llama8b.yaml --only gpus=1 ;;
    oom)          step oom bench run matrices/oom.yaml --force ;;  # launch although predicted not to fit
    llama8b)      step llama8b bench run matrices/llama8b.yaml ;;
    llama-full)   step llama-full bench run matrices/llama-full.yaml ;;
    nightly)      step nightly bench run matrices/nightly.yaml --repeats 3 ;;
    70b)          step 70b bench run matrices/llama70b-qlora.yaml ;;
    overhead)     step overhead python3 benchmarks/sampler_overhead.py ;;
    *) echo "unknown step $s" ;;
  esac
done
# Records, generated configs and logs come back as one archive (the rank folders are small).
tar czf "$out/results.tgz" results report 2>/dev/null
ls -la "$out"
