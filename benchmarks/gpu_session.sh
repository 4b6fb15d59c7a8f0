#!/usr/bin/env bash
# The GPU checks of a development session in one command: build the extension (CUDA
# kernels), run the GPU tests in time-boxed groups, then the benchmark CLI. Every log and
# the results files go to $OUT (default ./gpu-session-out).
#
#   MOELORA_GIT_COMMIT=$(git rev-parse HEAD) bash benchmarks/gpu_session.sh
#
# MOELORA_GIT_COMMIT names the commit when the tree has no .git (a copied working tree).
# Time boxes (seconds) can be changed with TESTS_T (each test group) and BENCH_B (the
# benchmark's own budget). A group that times out is reported and the next one runs.
set -o pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-session-out}
mkdir -p "$OUT"

python3 -m pip install --no-build-isolation --no-deps -e . -q > "$OUT/build.log" 2>&1
echo "build rc=$?"
python3 - <<'EOF' | tee "$OUT/env.log"
import torch, triton, moelora
print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| triton", triton.__version__)
print("moelora._C CUDA kernels:", moelora._ext.has_cuda_kernels())
EOF

run_group() {  # name, pytest args...
  local name=$1; shift
  timeout "${TESTS_T:-240}" python3 -X faulthandler -m pytest -q -p no:cacheprovider -x "$@" > "$OUT/tests-$name.log" 2>&1
  echo "tests $name rc=$? :: $(tail -n 1 "$OUT/tests-$name.log")"
  grep -E "^(FAILED|ERROR)|Fatal Python error|Segmentation" "$OUT/tests-$name.log" | head -5
}

run_group extension tests/test_routing.py tests/test_dispatch.py tests/test_cuda_sources.py
run_group operator tests/test_moe_lora.py tests/test_kernels.py tests/test_custom_ops.py tests/test_validation.py
run_group ffn tests/test_moe_ffn.py tests/test_upcycle.py
run_group layers tests/test_layer.py tests/test_routers.py tests/test_model.py tests/test_compile.py \
  tests/test_cuda_graphs.py tests/test_molex.py tests/test_persistence.py
run_group rest tests/test_docs.py tests/test_examples.py tests/test_hf_trainer.py benchmarks/test_bench_ops.py

timeout $(( ${BENCH_B:-240} + 120 )) python3 -m benchmarks --time-budget "${BENCH_B:-240}" --out-dir "$OUT" \
  > "$OUT/bench.log" 2>&1
echo "benchmark rc=$?"
tail -n 30 "$OUT/bench.log"
timeout 120 python3 -m benchmarks.bench_routing --out "$OUT/routing-$(date -u +%Y%m%dT%H%M).json" \
  > "$OUT/bench-routing.log" 2>&1
echo "routing benchmark rc=$?"
