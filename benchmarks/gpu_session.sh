#!/usr/bin/env bash
# The GPU checks of a development session in one time-boxed command: build the extension
# (CUDA kernels), the tile tuners (dense and grouped kernels: TUNE=0 skips them), the
# benchmark with their picks installed (results JSON + plot, targets, host overhead), the
# per-kernel profiles of the cases being tuned, then the whole test suite on the GPU
# (pytest-xdist) with a one-line summary. Every log and results file goes to $OUT (default
# ./gpu-session-out); at most eight files, so that they all come back from a lent machine
# (the profiles are written to one file, profiles.txt, for that reason).
#
#   MOELORA_GIT_COMMIT=$(git rev-parse HEAD) bash benchmarks/gpu_session.sh
#
# MOELORA_GIT_COMMIT names the commit when the tree has no .git (a copied working tree).
# DEADLINE (seconds, default 480) bounds the whole script: the tests get what is left.
# TUNE_B (default 40) is each tuner's budget, BENCH_B (default 120) the benchmark's, PROFILE
# the cases profiled (comma-separated; default S1's layer, S3's grouped delta and S5's
# moe_ffn, the three targets still missed). The tuners' JSON "paste" lines are what to commit into the tables; the
# benchmark's meta.tuned records the picks it ran with.
set -o pipefail
export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-session-out}
mkdir -p "$OUT"
START=$(date +%s)
DEADLINE=${DEADLINE:-480}
left() { echo $(( DEADLINE - ($(date +%s) - START) )); }
LOG="$OUT/session.log"

python3 - <<'EOF' > "$LOG" 2>&1
import torch, triton
print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| triton", triton.__version__,
      "| cuda", torch.version.cuda)
EOF
timeout 200 python3 -m pip install --no-build-isolation --no-deps -e . -q >> "$LOG" 2>&1
echo "build rc=$? after $(( $(date +%s) - START )) s" | tee -a "$LOG"
python3 -c "import moelora; print('moelora._C CUDA kernels:', moelora.ops.native.has_cuda_kernels())" 2>&1 | tee -a "$LOG"
{ echo "NEEDED of _C: $(readelf -d moelora/_C*.so 2>/dev/null | grep NEEDED | grep -o '\[.*\]' | tr '\n' ' ')"
  echo "std::basic_ostream symbols defined in _C: $(nm -C --defined-only moelora/_C*.so 2>/dev/null | grep -c 'std::basic_ostream')"
} | tee -a "$LOG"

TUNED=""
if [ "${TUNE:-1}" = 1 ]; then
  for TUNER in dense grouped; do
    timeout $(( ${TUNE_B:-40} + 60 )) python3 -m benchmarks.tune_$TUNER --budget "${TUNE_B:-40}" \
      --out "$OUT/tune-$TUNER.json" > "$OUT/tune.log" 2>&1
    RC=$?
    echo "tune_$TUNER rc=$RC after $(( $(date +%s) - START )) s" | tee -a "$LOG"
    grep -v "^ *$" "$OUT/tune.log" | tail -n 25 >> "$LOG"
    [ "$RC" = 0 ] && TUNED="$TUNED${TUNED:+,}$OUT/tune-$TUNER.json"
  done
  rm -f "$OUT/tune.log"
fi

timeout $(( ${BENCH_B:-120} + 60 )) python3 -m benchmarks --quick --time-budget "${BENCH_B:-120}" --out-dir "$OUT" \
  ${TUNED:+--tuned "$TUNED"} > "$OUT/bench.log" 2>&1
echo "benchmark rc=$? after $(( $(date +%s) - START )) s" | tee -a "$LOG"
sed -n '/^not measured\|^met\|^missed/p' "$OUT/bench.log"

PROFILE=${PROFILE:-S1/layer/fwdbwd/moelora-MoELoRALinear,S3/delta/fwdbwd/moelora-triton,S5/ffn/fwdbwd/moelora-ffn,S1@T8/layer/decode/moelora-MoELoRALinear}
mkdir -p "$OUT/profiles"
timeout 120 python3 -m benchmarks --profile "$PROFILE" --out-dir "$OUT/profiles" ${TUNED:+--tuned "$TUNED"} \
  > /dev/null 2>> "$LOG"
echo "profile rc=$? ($PROFILE)" | tee -a "$LOG"
for F in "$OUT"/profiles/profile-*.txt; do [ -f "$F" ] && { echo "==== $(basename "$F")"; cat "$F"; echo; }; done \
  > "$OUT/profiles.txt"
rm -rf "$OUT/profiles"

T=$(left)
if [ "$T" -gt 30 ]; then
  timeout "$T" python3 -m pytest -q -n 12 -p no:cacheprovider -rfE tests benchmarks > "$OUT/tests.log" 2>&1
  echo "tests rc=$? in ${T} s box :: $(tail -n 1 "$OUT/tests.log")" | tee -a "$LOG"
  grep -E "^(FAILED|ERROR)|Fatal Python error|Segmentation" "$OUT/tests.log" | head -20 | tee -a "$LOG"
else
  echo "tests skipped: only $T s left" | tee -a "$LOG"
fi
echo "session done after $(( $(date +%s) - START )) s" | tee -a "$LOG"
