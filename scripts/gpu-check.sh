#!/usr/bin/env bash
# scripts/gpu-check.sh: what one NVIDIA GPU measures of the Stable Diffusion v1.5 run, with nothing downloaded.
#
#   scripts/gpu-check.sh              on a machine with one NVIDIA GPU (about 5 minutes on an H100/H200)
#   scripts/gpu-check.sh --dry-run    the same steps on a CPU at toy size (checks the script, measures nothing)
#
# Steps (each recorded with its exit status and seconds; a failing step does not stop the others):
#   1. the gpu-marked tests                       pytest --run-gpu -m gpu tests
#   2. ctpo and ddpo throughput                   python -m sacode bench sd-throughput --profile class
#      (bf16 and fp16, gradient checkpointing off and on; random SD v1.5 weights, model=sd15-random)
#   3. two ctpo iterations end to end             python -m sacode train sd15-compressibility --set model=sd15-random
#      (sampling, JPEG rewards, value network, LoRA update, LoRA export; then the LoRA is loaded into a pipeline)
#   4. the cost model with the measured rate      python -m sacode bench sd-cost
# Output: one JSON, figures/gpu-check.json (--dry-run: under the work directory); on a GPU also
# figures/bench-sd-throughput.json and figures/sd-cost.json, which chapter 12 and the README read.
# Environment: PYTHON (default .venv/bin/python, else python3), GPU_CHECK_OUT (the JSON's path).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/sacode-gpu-check.XXXXXX")"
if [[ $DRY == 1 ]]; then
    OUT="${GPU_CHECK_OUT:-$WORK/gpu-check.json}"
    PROFILE=smoke
    TRAIN_SETS=(--set device=cpu --set amp=no --set resolution=64 --set K=2 --set batch=2 --set minibatch=4
                --set micro_batch=2 --set value_minibatch=4)
else
    OUT="${GPU_CHECK_OUT:-figures/gpu-check.json}"
    PROFILE=class
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu-check: torch.cuda.is_available() is False here; use --dry-run to check the script on a CPU" >&2
        exit 2
    fi
    TRAIN_SETS=(--set K=50 --set batch=4 --set minibatch=200 --set micro_batch=4 --set value_minibatch=100)
fi
echo "gpu-check: work directory $WORK"

step() {           # step NAME COMMAND...: run, log to WORK/NAME.log, record "name rc seconds command"
    local name=$1; shift
    local t0 t1 rc
    t0=$(date +%s.%N)
    echo "== $name: $*"
    "$@" > "$WORK/$name.log" 2>&1
    rc=$?
    t1=$(date +%s.%N)
    tail -n 25 "$WORK/$name.log"
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(awk "BEGIN{print $t1 - $t0}")" "$*" >> "$WORK/steps.tsv"
}

step gpu-tests "$PY" -m pytest -q -p no:cacheprovider --run-gpu -m gpu tests --junitxml "$WORK/gpu-tests.xml"
step sd-throughput "$PY" -m sacode bench sd-throughput --profile "$PROFILE" --out "$WORK/bench"
step ctpo-2-iterations "$PY" -m sacode train sd15-compressibility --algo ctpo --profile ci --no-progress \
    --set model=sd15-random --set iterations=2 --set export_lora=true "${TRAIN_SETS[@]}" --out "$WORK/train"
# the cost model reads the measured rate from the throughput JSON next to its own output
step sd-cost "$PY" -m sacode bench sd-cost --out "$WORK/bench"

"$PY" -m sacode.bench.gpu_check "$WORK" "$OUT" $([[ $DRY == 1 ]] && echo --dry-run)
rc=$?
if [[ $DRY == 0 ]]; then
    for f in bench-sd-throughput.json bench-sd-throughput.png sd-cost.json sd-cost.png; do
        [[ -f "$WORK/bench/$f" ]] && cp "$WORK/bench/$f" figures/
    done
fi
echo "gpu-check: one JSON written to $OUT (logs in $WORK)"
exit $rc
