#!/usr/bin/env bash
# The GPU check's entry point on the lent GPU machine: one device `run` call, see bench/gpu/README.md.
#
#   run(command="bash bench/gpu/run.sh", carry=["bench/gpu/carry"], timeout_s=590)
#
# Everything comes back under $OUT (8 files at most): gpu.md, gpu.json, check.log, build.log,
# alloc.log, server-tied.log, server-untied.log, server-pair.log. check.py stops starting new
# steps after BUDGET_S seconds (default 510) and kills what it started before it returns.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1
OUT=${OUT:-/tmp/gpu-check-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PATH="$PATH:/usr/local/cuda/bin"
if [[ ! -f bench/gpu/carry/llama.cpp/CMakeLists.txt || ! -f bench/gpu/carry/expected.json ]]; then
    echo "bench/gpu/carry is missing or incomplete: run 'bash bench/gpu/prepare.sh' on the CPU machine first," \
         "and name bench/gpu/carry in the run call's carry list" | tee "$OUT/check.log"
fi
python3 bench/gpu/check.py --out "$OUT" --budget "${BUDGET_S:-510}" "$@" 2>&1 | tee -a "$OUT/check.log"
rc=${PIPESTATUS[0]}
echo
echo "================ summary (all of it in \$OUT/gpu.md and gpu.json)"
if [[ -f $OUT/gpu.md ]]; then
    # tables and key lines only: the reply's output_tail keeps the last 12,000 characters
    grep -E '^(#|\||- (state|configure_s|build_s|name|driver|cuda_driver|persistence|mig)|Two servers|Not run|- at )' \
        "$OUT/gpu.md" | cut -c1-400 | tail -c 9000
fi
ls -la "$OUT"
exit "$rc"
