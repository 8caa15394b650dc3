#!/usr/bin/env bash
# tools/rpc-check.sh: steer a model split across llama.cpp RPC servers, on this machine (issue 28).
#
#   tools/rpc-check.sh [--out DIR] [--tokens N] [--repeats N] [--no-bench]
#
# 1. builds, once (cached under build/rpc/; the installed llama-cpp-python is never touched):
#    llama-cpp-python 0.3.36 from its sdist with CMAKE_ARGS="-DGGML_RPC=ON" into build/rpc/py (a
#    --target folder put first on PYTHONPATH), llama.cpp's rpc-server from the same sources into
#    build/rpc/bin, and native/ against that build into build/rpc/native. Compiles run under nice.
# 2. starts two rpc-server processes on 127.0.0.1 (free ports), and stops them by PID whatever
#    happens (trap);
# 3. runs tests/test_oracle.py (the tiny model's layers on the two servers) and tests/test_rpc.py
#    (the embedded gemma-3-270m split across them: TR and universal logits equal to a local
#    run; a server killed mid-generation gives a clear error);
# 4. measures, local and over RPC (tools/rpc_bench.py): decode tokens/s of none, universal
#    and tr, and the hook's added time per token; prints it as JSON, also in DIR/rpc-check.json.
# Environment: PYTHON (default python3) with the project's test dependencies; RPC_CHECK_THREADS
# (default 1) for the servers and the client. Network: only 127.0.0.1 (and PyPI for the first build).
set -euo pipefail

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; }

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT_DIR=${OUT:-$ROOT/build/rpc/results}
TOKENS=32
REPEATS=3
BENCH=1
while (($#)); do
  case $1 in
    --out) OUT_DIR=${2:?--out needs a folder}; shift ;;
    --tokens) TOKENS=${2:?--tokens needs a number}; shift ;;
    --repeats) REPEATS=${2:?--repeats needs a number}; shift ;;
    --no-bench) BENCH=0 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

PY=${PYTHON:-python3}
THREADS=${RPC_CHECK_THREADS:-1}
LLAMA_VERSION=0.3.36
WORK=$ROOT/build/rpc
SRC=$WORK/src/llama_cpp_python-$LLAMA_VERSION
SITE=$WORK/py
SERVER_BIN=$WORK/bin/rpc-server
NATIVE=$WORK/native/libfgdilp.so
mkdir -p "$WORK" "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH=$ROOT:$SITE
export FGDILP_NATIVE_LIB=$NATIVE
NPROC=$(nproc)

# ---- 1. builds (each only when its output is missing) -----------------------------------------
if [[ ! -f $SITE/.fgdilp-rpc-$LLAMA_VERSION ]]; then
  if [[ ! -d $SRC ]]; then
    mkdir -p "$WORK/src"
    "$PY" -m pip download --no-deps --no-binary llama-cpp-python --no-cache-dir -d "$WORK/src" \
      "llama-cpp-python==$LLAMA_VERSION"
    tar -xzf "$WORK/src/llama_cpp_python-$LLAMA_VERSION.tar.gz" -C "$WORK/src"
  fi
  echo "building llama-cpp-python $LLAMA_VERSION with GGML_RPC=ON (minutes)"
  rm -rf "$WORK/wheel"
  CMAKE_ARGS="-DGGML_RPC=ON -DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=$NPROC \
    nice -n 19 "$PY" -m pip wheel --no-cache-dir --no-deps -w "$WORK/wheel" "$SRC"
  rm -rf "$SITE"
  "$PY" -m pip install --no-index --no-deps --no-cache-dir --target "$SITE" "$WORK"/wheel/llama_cpp_python-*.whl
  "$PY" -c "import llama_cpp.llama_cpp as ll; raise SystemExit(0 if ll.llama_supports_rpc() else 'no RPC backend')"
  touch "$SITE/.fgdilp-rpc-$LLAMA_VERSION"
fi
if [[ ! -x $SERVER_BIN ]]; then
  # rpc-server needs only ggml: one file against the libraries just built
  mkdir -p "$WORK/bin"
  nice -n 19 g++ -std=c++17 -O2 "$SRC/vendor/llama.cpp/tools/rpc/rpc-server.cpp" \
    -I "$SRC/vendor/llama.cpp/ggml/include" -L "$SITE/llama_cpp/lib" -lggml -lggml-base \
    -Wl,-rpath,"$SITE/llama_cpp/lib" -pthread -o "$SERVER_BIN"
fi
if [[ ! -f $NATIVE ]]; then
  cmake -S "$ROOT" -B "$WORK/native" -DPython_EXECUTABLE="$(command -v "$PY")" -DCMAKE_BUILD_TYPE=Release >/dev/null
  nice -n 19 cmake --build "$WORK/native" -j "$NPROC"
fi

# ---- 2. two servers on 127.0.0.1, stopped by PID whatever happens ----------------------------
PIDS=()
stop_servers() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap stop_servers EXIT
trap 'exit 130' INT TERM
free_port() { "$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }
SERVERS=()
for i in 1 2; do
  port=$(free_port)
  "$SERVER_BIN" -H 127.0.0.1 -p "$port" -t "$THREADS" >"$OUT_DIR/rpc-server-$i.log" 2>&1 &
  PIDS+=($!)
  SERVERS+=("127.0.0.1:$port")
done
RPC=$(IFS=,; echo "${SERVERS[*]}")
for s in "${SERVERS[@]}"; do
  "$PY" -c "import socket, sys, time
host, port = sys.argv[1].rsplit(':', 1)
for _ in range(300):
    try:
        socket.create_connection((host, int(port)), timeout=1).close(); break
    except OSError:
        time.sleep(0.1)
else:
    sys.exit('rpc-server at ' + sys.argv[1] + ' did not start')" "$s"
done
echo "rpc servers: $RPC (pids ${PIDS[*]})"

# ---- 3. tests with the layers on the servers ---------------------------------------------------
TESTS_RC=0
FGDILP_TEST_RPC=$RPC FGDILP_TEST_RPC_SERVER=$SERVER_BIN \
  "$PY" -m pytest -q -p no:cacheprovider tests/test_oracle.py tests/test_rpc.py 2>&1 | tee "$OUT_DIR/tests.log" \
  || TESTS_RC=$?
TESTS=$(grep -E '(passed|failed|error)[^/]* in [0-9.]+s' "$OUT_DIR/tests.log" | tail -n1 | tr -d '=' | sed 's/^ *//;s/ *$//' || true)

# ---- 4. speeds, local and over RPC -------------------------------------------------------------
rm -f "$WORK/bench.json"
if ((BENCH)); then
  "$PY" "$ROOT/tools/rpc_bench.py" --rpc "$RPC" --threads "$THREADS" --tokens "$TOKENS" --repeats "$REPEATS" \
    --out "$WORK/bench.json"
fi
"$PY" - "$WORK/bench.json" "$OUT_DIR/rpc-check.json" "$TESTS_RC" "$TESTS" <<'EOF'
import json, os, platform, sys
bench_path, out_path, rc, tests = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
out = {"tests": {"passed": rc == 0, "summary": tests or f"exit {rc}"},
       "machine": {"python": platform.python_version(), "cpu_count": os.cpu_count()}}
if os.path.exists(bench_path):
    out["bench"] = json.load(open(bench_path))
json.dump(out, open(out_path, "w"), indent=1)
print(json.dumps(out, indent=1))
EOF
exit "$TESTS_RC"
