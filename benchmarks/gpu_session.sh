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
# DEADLINE (seconds, default 480) bounds the whole script: every step's timeout is cut to what is
# left of it (a tuner's also keeps the benchmark's time in reserve), and the tests get what is left.
# TUNE_B (default 40) is each tuner's budget, BENCH_B (default 120) the benchmark's (its watchdog,
# --hard-deadline, fires 30 s before its timeout, so that the table, targets and JSON are written
# even when a case hangs), PROFILE the cases profiled (comma-separated; default S1's layer, S3's
# grouped delta, S5's moe_ffn and S1's decode pass). The tuners' JSON "paste" lines are what to
# commit into the tables; the benchmark's meta.tuned records the picks it ran with.
set -o pipefail
export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-session-out}
mkdir -p "$OUT"
START=$(date +%s)
DEADLINE=${DEADLINE:-480}
left() { echo $(( DEADLINE - ($(date +%s) - START) )); }
# limit WANT LEAST [RESERVE]: a step's timeout, WANT seconds or what is left of DEADLINE (less RESERVE
# seconds kept for later steps) when less; 0 (skip the step) when that is under LEAST seconds
limit() { local t=$(( $(left) - ${3:-0} )); t=$(( t < $1 ? t : $1 )); echo $(( t < $2 ? 0 : t )); }
LOG="$OUT/session.log"

python3 - <<'EOF' > "$LOG" 2>&1
import torch, triton
print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| triton", triton.__version__,
      "| cuda", torch.version.cuda)
EOF
L=$(limit 200 30)  # (never "timeout 0": that is no timeout at all)
if [ "$L" = 0 ]; then echo "build skipped: $(left) s left" | tee -a "$LOG"; else
  timeout "$L" python3 -m pip install --no-build-isolation --no-deps -e . -q >> "$LOG" 2>&1
  echo "build rc=$? after $(( $(date +%s) - START )) s" | tee -a "$LOG"
fi
python3 -c "import moelora; print('moelora._C CUDA kernels:', moelora.ops.native.has_cuda_kernels())" 2>&1 | tee -a "$LOG"
{ echo "NEEDED of _C: $(readelf -d moelora/_C*.so 2>/dev/null | grep NEEDED | grep -o '\[.*\]' | tr '\n' ' ')"
  echo "std::basic_ostream symbols defined in _C: $(nm -C --defined-only moelora/_C*.so 2>/dev/null | grep -c 'std::basic_ostream')"
} | tee -a "$LOG"

TUNED=""
if [ "${TUNE:-1}" = 1 ]; then
  for TUNER in dense grouped; do
    L=$(limit $(( ${TUNE_B:-40} + 60 )) 70 $(( ${BENCH_B:-120} + 60 )))
    if [ "$L" = 0 ]; then echo "tune_$TUNER skipped: $(left) s left" | tee -a "$LOG"; continue; fi
    timeout "$L" python3 -m benchmarks.tune_$TUNER --budget "$(( L - 60 ))" \
      --out "$OUT/tune-$TUNER.json" > "$OUT/tune.log" 2>&1
    RC=$?
    echo "tune_$TUNER rc=$RC after $(( $(date +%s) - START )) s" | tee -a "$LOG"
    grep -v "^ *$" "$OUT/tune.log" | tail -n 25 >> "$LOG"
    [ "$RC" = 0 ] && TUNED="$TUNED${TUNED:+,}$OUT/tune-$TUNER.json"
  done
  rm -f "$OUT/tune.log"
fi

L=$(limit $(( ${BENCH_B:-120} + 60 )) 70)
if [ "$L" = 0 ]; then
  echo "benchmark skipped: $(left) s left" | tee -a "$LOG"
else
  timeout "$L" python3 -m benchmarks --quick --time-budget "$(( L - 60 ))" --hard-deadline "$(( L - 30 ))" \
    --out-dir "$OUT" ${TUNED:+--tuned "$TUNED"} > "$OUT/bench.log" 2>&1
  echo "benchmark rc=$? after $(( $(date +%s) - START )) s" | tee -a "$LOG"
  sed -n '/^not measured\|^met\|^missed\|^direct launch/p' "$OUT/bench.log" | tee -a "$LOG"
fi

PROFILE=${PROFILE:-S1/layer/fwdbwd/moelora-MoELoRALinear,S3/delta/fwdbwd/moelora-triton,S5/ffn/fwdbwd/moelora-ffn,S1@T8/layer/decode/moelora-MoELoRALinear}
mkdir -p "$OUT/profiles"
L=$(limit 120 20)
if [ "$L" = 0 ]; then
  echo "profile skipped: $(left) s left" | tee -a "$LOG"
else
  timeout "$L" python3 -m benchmarks --profile "$PROFILE" --out-dir "$OUT/profiles" ${TUNED:+--tuned "$TUNED"} \
    > /dev/null 2>> "$LOG"
  echo "profile rc=$? ($PROFILE)" | tee -a "$LOG"
fi
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
