#!/usr/bin/env bash
# tools/gpu-check.sh: prove the steering on CUDA and measure what the hook costs there (issue 14).
#
#   tools/gpu-check.sh                  on an NVIDIA machine without network, in one command of
#                                       under 10 minutes: after tools/gpu-prepare.sh, with .gpu/
#                                       carried there; results in $OUT (or --out DIR)
#   tools/gpu-check.sh --cpu [--quick]  the same parts here on the installed environment
#                                       ($PYTHON, else python3), building nothing
#
# Phases (each with its time budget, all within GPU_CHECK_DEADLINE_S, default 570 s):
#   wheels       (CUDA) install the carried wheels the machine lacks into build/gpu-check/site
#   build-llama  (CUDA) llama-cpp-python 0.3.36 from the slimmed sdist, CUDA for this GPU's
#                architecture only; skipped when a build for that architecture is there
#                (build/ is ignored, so it survives between calls to a warm device machine)
#   build-native (CUDA) native/ with cmake against that build (FGDILP_NATIVE_LIB points to it)
#   oracle       tests/test_oracle.py (+ test_tiny_model.py) with every layer offloaded (FGDILP_TEST_NGL=99)
#   bad-input    tests/test_cli_errors.py and tests/test_native_lib.py (the CLI offloading too)
#   bench        tools/gpu_bench.py: methods' decode tokens/s and the hook's own overhead
# Output in the results folder: gpu-check.json (rewritten after every phase) and one log per phase.
# Overrides: GPU_CHECK_SHAPE (1b | small | quick), GPU_CHECK_TOKENS, GPU_CHECK_REPEATS,
# GPU_CHECK_THREADS, GPU_CHECK_DEADLINE_S.
set -euo pipefail

usage() { sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; }

MODE=cuda
QUICK=0
OUT_DIR=${OUT:-}
while (($#)); do
  case $1 in
    --cpu) MODE=cpu ;;
    --quick) QUICK=1 ;;
    --out) OUT_DIR=${2:?--out needs a folder}; shift ;;
    --out=*) OUT_DIR=${1#--out=} ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [[ -z $OUT_DIR ]]; then
  echo "error: no results folder: set \$OUT or pass --out DIR" >&2
  exit 2
fi

ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
PY=${PYTHON:-python3}
WORK=$ROOT/build/gpu-check
SITE=$WORK/site
LLAMA_VERSION=0.3.36
START=$SECONDS
DEADLINE=$((START + ${GPU_CHECK_DEADLINE_S:-570}))
mkdir -p "$WORK"
PHASES=$WORK/phases.tsv
: >"$PHASES"
rm -f "$WORK/bench.json" "$OUT_DIR/gpu-check.json"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}

if [[ $MODE == cuda ]]; then
  command -v nvidia-smi >/dev/null || { echo "error: no nvidia-smi: not a CUDA machine (use --cpu)" >&2; exit 2; }
  SLIM=$ROOT/.gpu/llama_cpp_python-$LLAMA_VERSION-slim.tar.gz
  [[ -f $SLIM ]] || { echo "error: $SLIM missing: run tools/gpu-prepare.sh here and carry .gpu" >&2; exit 2; }
  CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n1 | tr -d ' .')
  [[ $CAP =~ ^[0-9]+$ ]] || { echo "error: cannot read the GPU's compute capability ($CAP)" >&2; exit 2; }
  NPROC=$(nproc)
  THREADS=${GPU_CHECK_THREADS:-8}
  NGL=99
  export PYTHONPATH=$ROOT:$SITE
  export FGDILP_NATIVE_LIB=$WORK/native/libfgdilp.so
  # the CUDA runtime and cuBLAS that libggml-cuda links, wherever the image's loader misses them
  if [[ -d /usr/local/cuda/lib64 ]]; then export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}; fi
  SHAPE=${GPU_CHECK_SHAPE:-1b}
  TOKENS=${GPU_CHECK_TOKENS:-128} REPEATS=${GPU_CHECK_REPEATS:-5} SELFGEN=8
else
  NPROC=2
  THREADS=${GPU_CHECK_THREADS:-2}
  NGL=99            # a CPU build has nowhere to offload to: the same command changes nothing
  CAP=none
  if ((QUICK)); then SHAPE=${GPU_CHECK_SHAPE:-quick} TOKENS=${GPU_CHECK_TOKENS:-12} REPEATS=${GPU_CHECK_REPEATS:-3} SELFGEN=2
  else SHAPE=${GPU_CHECK_SHAPE:-small} TOKENS=${GPU_CHECK_TOKENS:-64} REPEATS=${GPU_CHECK_REPEATS:-5} SELFGEN=4; fi
fi
export FGDILP_TEST_NGL=$NGL
export MODE QUICK ROOT WORK SITE PY CAP NPROC THREADS NGL SHAPE TOKENS REPEATS SELFGEN OUT_DIR LLAMA_VERSION
export SLIM=${SLIM:-}

# ---- the phases (each runs in its own bash under `timeout`, its output in its log) ----------
phase_wheels() {
  local missing=() whl dist mod
  for whl in "$ROOT"/.gpu/wheels/*.whl; do
    [[ -f $whl ]] || continue
    dist=$(basename "$whl" | cut -d- -f1 | tr 'A-Z' 'a-z')
    case $dist in pyyaml) mod=yaml ;; *) mod=$dist ;; esac
    if "$PY" -c "import $mod" 2>/dev/null; then echo "present: $mod"; else missing+=("$whl"); fi
  done
  if ((${#missing[@]})); then
    "$PY" -m pip install --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${missing[@]}"
  fi
  "$PY" -c "import gguf, diskcache, click, jinja2, yaml, numpy, torch, pytest; print('imports ok')"
}

phase_build_llama() {
  local stamp=$SITE/.fgdilp-llama-$LLAMA_VERSION-sm$CAP
  if [[ -f $stamp ]]; then echo "llama-cpp-python $LLAMA_VERSION for sm_$CAP already built"; return 0; fi
  local src=$WORK/src/llama_cpp_python-$LLAMA_VERSION
  [[ -d $src ]] || { mkdir -p "$WORK/src"; tar -xzf "$SLIM" -C "$WORK/src"; }
  if ! command -v nvcc >/dev/null && [[ -x /usr/local/cuda/bin/nvcc ]]; then export PATH=/usr/local/cuda/bin:$PATH; fi
  nvcc --version | tail -n2
  # CUDA for this GPU only; nothing llama-cpp-python does not load (mtmd, tests, tools, server)
  CMAKE_ARGS="-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=$CAP -DGGML_NATIVE=ON -DGGML_CCACHE=OFF \
-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
-DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF" \
  CMAKE_BUILD_PARALLEL_LEVEL=$NPROC \
  "$PY" -m pip install --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target "$SITE" \
    -C build-dir="$WORK/llama-build" -C cmake.build-type=Release "$src"
  ls "$SITE"/llama_cpp/lib
  test -e "$SITE"/llama_cpp/lib/libggml-cuda.so || { echo "no libggml-cuda.so: not a CUDA build" >&2; return 1; }
  # it must load (cuBLAS and the CUDA runtime found) and see the GPU before anything relies on it
  "$PY" -c "import llama_cpp.llama_cpp as ll; ll.llama_backend_init(); ok = ll.llama_supports_gpu_offload(); \
print('gpu offload:', ok); raise SystemExit(0 if ok else 1)"
  touch "$stamp"
}

phase_build_native() {
  cmake -S "$ROOT" -B "$WORK/native" -DPython_EXECUTABLE="$(command -v "$PY")" -DCMAKE_BUILD_TYPE=Release
  cmake --build "$WORK/native" -j "$NPROC"
  "$PY" -c "from fgdilp_cpp import native; print('native library:', native.load_library()._name)"
}

phase_oracle() {
  local files=(tests/test_oracle.py)
  if ((QUICK == 0)); then files+=(tests/test_tiny_model.py); fi
  cd "$ROOT" && "$PY" -m pytest -q -p no:cacheprovider "${files[@]}"
}

phase_bad_input() {
  local deselect=()
  # --quick: not the C++ unit tests, which build native/ again (the normal suite runs them)
  if ((QUICK)); then deselect=(--deselect tests/test_native_lib.py::test_native_unit_tests); fi
  cd "$ROOT" && "$PY" -m pytest -q -p no:cacheprovider tests/test_cli_errors.py tests/test_native_lib.py "${deselect[@]}"
}

phase_bench() {
  cd "$ROOT" && "$PY" tools/gpu_bench.py --shape "$SHAPE" --model "$WORK/bench-$SHAPE.gguf" --ngl "$NGL" \
    --threads "$THREADS" --tokens "$TOKENS" --repeats "$REPEATS" --selfgen-samples "$SELFGEN" \
    --out "$WORK/bench.json"
}
export -f phase_wheels phase_build_llama phase_build_native phase_oracle phase_bad_input phase_bench

# ---- JSON: phases, machine and bench together; written after every phase ----------------------
write_json() {
  "$PY" - "$PHASES" "$WORK/bench.json" "$OUT_DIR/gpu-check.json" <<'EOF'
import json, os, platform, subprocess, sys
phases_path, bench_path, out_path = sys.argv[1:4]
phases = {}
for line in open(phases_path):
    name, status, secs, budget, log, detail = line.rstrip("\n").split("\t")
    phases[name] = {"status": status, "seconds": int(secs), "budget_s": int(budget), "log": log, "detail": detail}
commit = subprocess.run(["git", "-C", os.environ["ROOT"], "rev-parse", "--short", "HEAD"], capture_output=True,
                        text=True).stdout.strip() or "unknown"
machine = {"python": platform.python_version(), "cpu_count": os.cpu_count(), "threads": int(os.environ["THREADS"])}
if os.environ["MODE"] == "cuda":
    q = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap,driver_version,memory.total",
                        "--format=csv,noheader"], capture_output=True, text=True)
    machine["gpu"] = q.stdout.strip()
out = {"commit": commit, "mode": os.environ["MODE"], "quick": os.environ["QUICK"] == "1", "n_gpu_layers": int(os.environ["NGL"]),
       "passed": bool(phases) and all(p["status"] in ("passed", "skipped") for p in phases.values()),
       "machine": machine, "phases": phases}
if os.path.exists(bench_path):
    out["bench"] = json.load(open(bench_path))
json.dump(out, open(out_path + ".tmp", "w"), indent=1)
os.replace(out_path + ".tmp", out_path)
EOF
}

FAILED=0
# run_phase NAME BUDGET_S FUNCTION: time-boxed (budget and the overall deadline), logged, recorded
run_phase() {
  local name=$1 budget=$2 fn=$3 left t0 rc=0 status detail log
  log=$name.log
  left=$((DEADLINE - SECONDS))
  ((budget < left)) || budget=$left
  if ((budget < 10)); then
    printf '%s\tnot-run\t0\t%s\t-\tno time left before the deadline\n' "$name" "$budget" >>"$PHASES"
    echo "== $name: skipped, no time left"; FAILED=1; write_json; return
  fi
  echo "== $name: budget ${budget}s (${left}s left of the deadline, $((SECONDS - START))s spent)"
  t0=$SECONDS
  timeout --kill-after=10 "$budget" bash -c "set -euo pipefail; $fn" >"$OUT_DIR/$log" 2>&1 || rc=$?
  case $rc in
    0) status=passed ;;
    124|137) status=timeout ;;
    *) status=failed ;;
  esac
  detail=$(grep -E '(passed|failed|error)[^/]* in [0-9.]+s' "$OUT_DIR/$log" | tail -n1 | tr -d '=\t' | sed 's/^ *//;s/ *$//' || true)
  [[ -n $detail ]] || detail="exit $rc"
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - t0))" "$budget" "$log" "$detail" >>"$PHASES"
  echo "   $name: $status in $((SECONDS - t0))s ($detail)"
  if [[ $status != passed ]]; then
    FAILED=1
    tail -n 25 "$OUT_DIR/$log" | sed 's/^/   | /'
  fi
  write_json
}

# skip_phase NAME STATUS WHY: "skipped" (not part of this mode) or "not-run" (an earlier phase failed)
skip_phase() {
  printf '%s\t%s\t0\t0\t-\t%s\n' "$1" "$2" "$3" >>"$PHASES"
}

echo "gpu-check: mode $MODE$( ((QUICK)) && echo ' (quick)'), python $("$PY" -c 'import sys; print(sys.version.split()[0])'), results in $OUT_DIR"
if [[ $MODE == cuda ]]; then
  nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader
  run_phase wheels 60 phase_wheels
  run_phase build-llama 400 phase_build_llama
  if [[ -f $SITE/.fgdilp-llama-$LLAMA_VERSION-sm$CAP ]]; then
    run_phase build-native 90 phase_build_native
  fi
  if [[ ! -f $FGDILP_NATIVE_LIB || ! -f $SITE/.fgdilp-llama-$LLAMA_VERSION-sm$CAP ]]; then
    # nothing to test without the CUDA build; the build folder stays, so a second call to the
    # still-warm machine goes on where this one stopped
    why="the CUDA build did not finish: see build-llama.log / build-native.log, or run again"
    grep -q '^build-native' "$PHASES" || skip_phase build-native not-run "$why"
    for p in oracle bad-input bench; do skip_phase "$p" not-run "$why"; done
    write_json
    echo "gpu-check: FAILED in $((SECONDS - START))s: $why"
    exit 1
  fi
else
  skip_phase wheels skipped "--cpu: the installed environment"
  skip_phase build-llama skipped "--cpu: the installed llama-cpp-python"
  skip_phase build-native skipped "--cpu: the installed native library"
fi
run_phase oracle 150 phase_oracle
run_phase bad-input 180 phase_bad_input
run_phase bench 240 phase_bench
write_json
echo "gpu-check: $( ((FAILED)) && echo FAILED || echo passed) in ${SECONDS}s; $OUT_DIR/gpu-check.json"
exit "$FAILED"
