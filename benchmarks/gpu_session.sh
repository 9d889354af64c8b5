#!/usr/bin/env bash
# One GPU session's evidence run: install what the GPU image lacks (wheels in .whl/), print the machine,
# then run the steps named on the command line, each logged under $OUT. This is how the GPU results
# committed under results/ and report/ were produced.
#
#   usage: benchmarks/gpu_session.sh OUT STEP [STEP ...]     (logs in OUT, everything also in OUT.tgz)
#   steps:
#     gpu-tests[=PATHS[@K]] pytest -m gpu on PATHS (comma-separated test files; default: tests), -k K
#                           (default $PYTEST_K), e.g. "gpu-tests=tests/gpu/test_gpu.py@fsdp or meta"
#     smoke, oom
#     llama8b=DIR[@ONLY], llama8b-1gpu=DIR, llama-full=DIR[@ONLY]
#                           matrices/llama8b.yaml (llama8b-1gpu: its gpus=1 cells) or matrices/llama-full.yaml
#                           into results/DIR, ONLY as --only filters joined by '@', e.g.
#                           llama-full=llama-full-h200-c@model=llama-3.2-3b@gpus=1,2. DIR is required: the matrices'
#                           own folders, results/llama8b and results/llama-full, hold the H100 evidence, and another
#                           card's records must not go in with them (name the card in DIR; those two are refused)
#     nightly[=DIR[@ONLY]]  matrices/nightly.yaml (its repeats) into results/DIR (default results/nightly)
#     night=ROOT[@FLAG...]  one night of the gate: bench nightly matrices/nightly.yaml --root results/ROOT FLAGs,
#                           e.g. night=nightly-h200@--no-verdict, night=nightly-h200-slowed@--slow-step@0.10
#     70b[=force]           matrices/llama70b-qlora.yaml (force: launch cells predicted not to fit)
#     host-pace[=TARGETS]   benchmarks/host_pace.py on the idle machine (every vCPU alone, beside a busy loop,
#                           under load; TARGETS a cpulist, default all) into OUT/host-pace.json: run it first
#     overhead[=STEPS[@INTERVAL_S]]  benchmarks/sampler_overhead.py (STEPS timed steps; a short sampling
#                           interval, e.g. 0.002, amplifies the cost: see the script's docstring)
#     run=MATRIX@DIR[@FILTER...]  matrices/MATRIX.yaml into results/DIR, FILTERs as --only, e.g.
#                           run=llama-full@llama-full-h200@model=llama-3.2-3b@gpus=1,2
#     lane:GPUS:S1+S2+...   run steps S1, S2 ... one after the other on the cards GPUS (CUDA_VISIBLE_DEVICES,
#                           e.g. lane:2,3:nightly=nightly-b+70b), in the background beside the other lanes
#
# Lanes let a 4-GPU host run two 2-GPU jobs at once: each job sees only its own pair of cards (bench narrows
# every cell to the first N of the parent's CUDA_VISIBLE_DEVICES, and checks and samples just those).
# They share the host's CPUs, memory and PCIe; the records say which physical cards a cell used.
# DEADLINE_S (seconds from the start, optional) stops every step still running then with SIGINT: a bench
# run records the cell in flight as interrupted and a later run resumes the rest. To resume on the device
# in a later call, bring the results folder back into this tree first: a folder that exists only on the
# device machine did not survive to the next call once (2026-11-28; the tree is copied anew each call).
# Between the two calls leave bench/ and pyproject.toml as they are: resume compares the records' code digest
# (env.code_digest), so commits that touch only results, reports or docs are fine.
# The device tool sends at most 64 MiB (tree + .whl/): after ../shared/gpu/fetch-wheels, run
# benchmarks/slim_bitsandbytes_wheel.py (bitsandbytes' wheel without its CUDA 11/12 and ROCm libraries).
set -uo pipefail
out=${1:?usage: gpu_session.sh OUT STEP...}; shift
# A fresh OUT per call: an old one's logs would go into this call's archive as if they were new.
[ -e "$out" ] && { echo "$out already exists: name a new folder"; exit 2; }
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1 && [ -z "${BENCH_INSTALLED:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD BENCH_INSTALLED=1
  # The image ships its libraries without bytecode and sets PYTHONDONTWRITEBYTECODE: without this, every
  # rank of every cell compiles torch and transformers again (bench/machine/bytecode.py; results/llama8b-startup-h100*).
  python3 -m compileall -q -j 0 /tmp/site "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
    > "$out/compileall.log" 2>&1
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=index,name,memory.total,power.limit --format=csv > "$out/nvidia-smi.csv" 2>&1
python3 -m bench.cli env > "$out/env.json" 2>&1

left() {  # seconds until DEADLINE_S, or a day without one
  if [ -n "${DEADLINE_S:-}" ]; then echo $((DEADLINE_S - SECONDS)); else echo 86400; fi
}

step() {
  local name=$1; shift
  local budget; budget=$(left)
  if [ "$budget" -le 5 ]; then echo "=== $name: skipped, deadline reached"; return; fi
  echo "=== $name: $* (cards ${CUDA_VISIBLE_DEVICES:-all}, ${budget} s left)"; local t0=$SECONDS
  timeout -s INT -k 30 "$budget" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  tail -25 "$out/$name.log"
  echo "=== $name done in $((SECONDS - t0)) s, exit $rc"
}

only_args() {  # "model=x@gpus=1,2" -> --only model=x --only gpus=1,2
  local IFS='@'; for f in $1; do printf -- '--only\n%s\n' "$f"; done
}

run_step() {
  local s=$1 arg=""
  [[ $s == *=* ]] && { arg=${s#*=}; s=${s%%=*}; }
  case $s in
    gpu-tests)  # gpu-tests[=PATHS[@K]]: K as pytest -k for this step (else $PYTEST_K)
      local paths=${arg%%@*} k=${PYTEST_K:-}; paths=${paths:-tests}; [[ $arg == *@* ]] && k=${arg#*@}
      local name; name=gpu-tests-$(basename "${paths%%,*}" .py)
      step "$name" python3 -m pytest -q -rs -m gpu ${paths//,/ } -p no:cacheprovider \
        --basetemp "$out/pytest-${CUDA_VISIBLE_DEVICES:-all}-$name-$SECONDS" ${k:+-k "$k"} ;;
    smoke)        step smoke python3 -m bench.cli run matrices/smoke.yaml --device cuda --results results/smoke-gpu --only gpus=1 ;;
    oom)          step oom python3 -m bench.cli run matrices/oom.yaml --force ;;  # launch although predicted not to fit
    llama8b|llama8b-1gpu|llama-full)  # DIR[@ONLY...]: never the matrix's own (H100) folder
      local dir=${arg%%@*} rest=""; [[ $arg == *@* ]] && rest=@${arg#*@}
      if [ -z "$dir" ] || [ "$dir" = llama8b ] || [ "$dir" = llama-full ]; then
        echo "=== $s: skipped: name a new results folder, $s=DIR (e.g. $s=${s%-1gpu}-h200-c); results/llama8b and" \
             "results/llama-full hold the H100 evidence, which another card's records must not join"
        return
      fi
      [ "$s" = llama8b-1gpu ] && rest=@gpus=1$rest
      run_step "run=${s%-1gpu}@$dir$rest" ;;
    nightly)      run_step "run=nightly@${arg:-nightly}" ;;  # the matrix's repeats, into one folder (not a night)
    night)  # night=ROOT[@FLAG...]: one `bench nightly` night into results/ROOT/<date>-<commit>[-n]/
      local root=${arg%%@*} flags=(); [[ $arg == *@* ]] && IFS=@ read -ra flags <<< "${arg#*@}"
      step "night-$root-$SECONDS" python3 -m bench.cli nightly matrices/nightly.yaml --root "results/$root" "${flags[@]}" ;;
    run)
      local matrix=${arg%%@*} rest=${arg#*@}; local dir=${rest%%@*} only=()
      [[ $rest == *@* ]] && mapfile -t only < <(only_args "${rest#*@}")
      # BENCH_RUN_ARGS: more options for every bench run of the session, e.g. "--repeats 1"
      step "$dir" python3 -m bench.cli run "matrices/$matrix.yaml" --results "results/$dir" "${only[@]}" ${BENCH_RUN_ARGS:-} ;;
    70b)          step 70b python3 -m bench.cli run matrices/llama70b-qlora.yaml ${arg:+--$arg} ;;
    host-pace)  step host-pace python3 benchmarks/host_pace.py --out "$out/host-pace.json" --targets "${arg:-all}" ;;
    overhead)  # overhead[=STEPS[@INTERVAL_S]]: INTERVAL_S well under bench's 0.05 s is an amplified run
      local steps=${arg%%@*} interval=""; [[ $arg == *@* ]] && interval=${arg#*@}
      step "overhead${interval:+-$interval}" python3 benchmarks/sampler_overhead.py --out "$out/overhead${interval:+-$interval}" \
        ${steps:+--steps $steps} ${interval:+--interval $interval} ;;
    *) echo "unknown step $s" ;;
  esac
}

lanes=()
for s in "$@"; do
  if [[ $s == lane:* ]]; then
    IFS=: read -r _ gpus steps <<< "$s"
    (
      export CUDA_VISIBLE_DEVICES=$gpus
      IFS=+ read -ra list <<< "$steps"
      for t in "${list[@]}"; do run_step "$t"; done
    ) > "$out/lane-${gpus//,/-}.log" 2>&1 &
    lanes+=($!)
  else
    run_step "$s"
  fi
done
[ ${#lanes[@]} -gt 0 ] && wait "${lanes[@]}"
for f in "$out"/lane-*.log; do [ -e "$f" ] && { echo "##### $f"; cat "$f"; }; done
# Records, generated configs, logs and pytest folders as one archive beside OUT (the device tool brings
# back only a few files): OUT.tgz.
# Only the results folders this call wrote (the rest is in the tree already): the device tool brings back
# files of at most 16 MiB.
# A folder counts as written when a runs.jsonl in it changed (a resumed folder's own mtime does not).
tar czf "${out%/}.tgz" $(find results -mindepth 2 -maxdepth 3 -name runs.jsonl -newer "$out/env.json" -printf '%h\n' | sort -u) "$out" 2>/dev/null
ls -la "${out%/}.tgz"
