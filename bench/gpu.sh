#!/usr/bin/env bash
# The one-shot GPU check: five phases, each its own time-boxed process, so one failing or hanging
# phase never stops the next. Run from the repository root of a bare GPU machine (torch, triton and
# transformers installed; nothing of this repository installed):
#
#   bash bench/gpu.sh             # at most 7 minutes on an H200
#   bash bench/gpu.sh --dry-run   # every phase on the CPU at tiny shapes (kernels in Triton's interpreter)
#
# Figures go to $OUT when it is set, else bench/results/gpu/: gpu.md (tables, targets), gpu.json
# (every figure) and gpu.log (this whole output). The report is rewritten after every phase, so a run
# cut short still leaves one; its closing table is printed last. stories260K is read from
# $SUBFIT_ASSETS, else from .assets/ (git-ignored: copy ../shared/assets/models/stories260K to
# .assets/models/); Liger-Kernel from the pinned wheel in .whl/ (git-ignored; bench/GPU_NOTES.md).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=""
case "${1:-}" in
  "") ;;
  --dry-run) DRY_RUN="--dry-run" ;;
  *) echo "usage: bash bench/gpu.sh [--dry-run]" >&2; exit 2 ;;
esac

OUT_DIR="${OUT:-bench/results/gpu}"
mkdir -p "$OUT_DIR"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
PYTHON="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" SUBFIT_GPU_WORK="$WORK"
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"  # triton >= 3.9 warns without it
if [ -z "${SUBFIT_ASSETS:-}" ] && [ -d .assets ]; then export SUBFIT_ASSETS="$PWD/.assets"; fi
if [ -n "$DRY_RUN" ]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""  # the CPU, even on a GPU machine
  export OMP_NUM_THREADS=1  # tiny shapes: more threads only contend
fi

# Seconds per phase: 25 + 85 + 85 + 130 + 75 = 400 of the 420 allowed on the GPU.
if [ -n "$DRY_RUN" ]; then
  BOXES=(0 120 120 120 180 120)
else
  BOXES=(0 25 85 85 130 75)
fi
MODULES=("" device cuda_tests kernels decode compress)

main() {
  echo "== bench/gpu.sh ${DRY_RUN:-(GPU)}: $(date -u +%FT%TZ) on $(hostname); out: $OUT_DIR"
  echo "SUBFIT_ASSETS=${SUBFIT_ASSETS:-unset}"
  local wheel
  wheel="$(ls .whl/liger_kernel-*.whl 2>/dev/null | head -n 1)"
  if [ -n "$wheel" ]; then
    if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" "$wheel"; then
      export PYTHONPATH="$PYTHONPATH:$WORK/site"
      echo "liger-kernel: installed $wheel into $WORK/site"
    else
      echo "LIGER-KERNEL: installing $wheel FAILED; its column will read 'unavailable'"
    fi
  else
    echo "LIGER-KERNEL: no wheel in .whl/; its column will read 'unavailable' (bench/GPU_NOTES.md says how to bring it)"
  fi
  for n in 1 2 3 4 5; do
    local box="${BOXES[$n]}" start rc
    echo
    echo "== phase $n: ${MODULES[$n]} (time box ${box} s)"
    start=$(date +%s)
    timeout -k 10 "$box" "$PYTHON" -m "bench.gpu.${MODULES[$n]}" --work "$WORK" --budget "$box" $DRY_RUN
    rc=$?
    echo "$rc $box $(( $(date +%s) - start ))" > "$WORK/phase$n.rc"
    echo "== phase $n: exit $rc after $(( $(date +%s) - start )) s"
    "$PYTHON" -m bench.gpu.report --work "$WORK" --out "$OUT_DIR" || echo "report failed (exit $?)"
  done
  "$PYTHON" -m bench.gpu.report --work "$WORK" --out "$OUT_DIR" --print
}

main 2>&1 | tee "$OUT_DIR/gpu.log"
