#!/usr/bin/env bash
# The GPU check: run from the repository root on a machine with an NVIDIA GPU and the
# bundle that deploy/gpu-bundle.sh stages in .cache/gpu-bundle/ (no Rust toolchain or
# internet needed there). Prints one table:
#
#   1  SmolLM2 response log-probs on the GPU (f32 and bf16) against the CPU's f32 values
#   2  ref-server and policy-trainer together on the one GPU: 20 DPO steps on SmolLM2 (bf16),
#      the step-0 validation loss must be ln 2 (policy = reference)
#   4  the same with LoRA (--lora-rank 16): ln 2 at step 0, and f32 adapters saved in PEFT's
#      format (run before 3)
#   3  a random-weight model of Llama 3.1 8B's shape, written here, trained alone on the GPU:
#      step time, tokens/s, peak GPU memory, MFU against the measured bf16 matmul rate
#
#   deploy/gpu-check.sh                      # all steps on cuda:0 (bundle parts a and b there)
#   deploy/gpu-check.sh --steps 3            # the 8B step only (needs bundle part a only)
#   deploy/gpu-check.sh --steps 1,2,4        # the SmolLM2 steps (need the whole GGUF: a and b)
#   deploy/gpu-check.sh --stage-only         # move the bundle part(s) into the stage, run nothing
#   deploy/gpu-check.sh --dry-run            # on CPU: tiny random models everywhere, the
#                                            #   same commands and table (checks the plumbing)
#
# The bundle comes in two parts (each under 64 MiB; see deploy/gpu-bundle.sh), which may be
# copied and checked one at a time: each invocation moves the parts it finds into the
# stage ($DPO_GPU_STAGE, default /var/tmp/dpo-gpu-check), which keeps them and every step's
# results, and prints the table of all results so far.
#
# Options: --device D (cuda:0; cpu with --dry-run), --bundle DIR (.cache/gpu-bundle),
# --bin DIR (use these ref-server/policy-trainer/gpu_tools instead of the bundle's),
# --model GGUF (instead of the bundle's SmolLM2), --budget SECONDS (570: the whole script),
# --big-steps N (8B optimizer steps to time, default 4), --copy-to DIR (also copy the table
# and the logs there; default $OUT when that is a directory). The random 8B checkpoint
# stays in the stage (16 GB), so a rerun on the same machine skips writing it.
# Every step has its own time limit inside the budget and fails with its log's tail rather
# than hang. Exit status: 0 iff every step run passed.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
started=$(date +%s)
source deploy/gpu/lib.sh
source deploy/gpu/steps.sh

device="" steps=1,2,3,4 bundle="" bin="" model="" budget=570 dry=0 stage_only=0 big_steps=4
copy_to=${OUT:-}
stage=${DPO_GPU_STAGE:-/var/tmp/dpo-gpu-check}
need() { [[ $# -ge 2 ]] || { echo "gpu-check: $1 needs a value" >&2; exit 2; }; }
while [[ $# -gt 0 ]]; do
  case $1 in
    --device) need "$@"; device=$2; shift 2 ;;
    --steps) need "$@"; steps=$2; shift 2 ;;
    --bundle) need "$@"; bundle=$2; shift 2 ;;
    --bin) need "$@"; bin=$2; shift 2 ;;
    --model) need "$@"; model=$2; shift 2 ;;
    --budget) need "$@"; budget=$2; shift 2 ;;
    --big-steps) need "$@"; big_steps=$2; shift 2 ;;
    --copy-to) need "$@"; copy_to=$2; shift 2 ;;
    --dry-run) dry=1; shift ;;
    --stage-only) stage_only=1; shift ;;
    -h|--help) sed -n '2,33p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu-check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [[ $dry == 1 ]]; then
  device=${device:-cpu}
  bundle=${bundle:-/nonexistent}   # tiny models only: no bundle to stage
  if [[ -z ${DPO_GPU_STAGE:-} ]]; then
    stage=$root/.cache/gpu-check-dry
    rm -rf "$stage"   # a dry run starts clean: no results or models of an earlier one
  fi
else
  device=${device:-cuda:0}
  bundle=${bundle:-.cache/gpu-bundle}
fi
mkdir -p "$stage/bundle" "$stage/results"
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
# Errors without captured backtraces (candle captures one per error when RUST_BACKTRACE is
# set): the log's error line stays readable.
export RUST_LIB_BACKTRACE=${RUST_LIB_BACKTRACE:-0}

stage_bundle "$bundle"
[[ $stage_only == 1 ]] && { say "staged: $(ls "$stage/bundle" | tr '\n' ' ')"; exit 0; }
work=$stage/run-$(date +%Y%m%d-%H%M%S)
mkdir -p "$work"

bin=${bin:-$stage/bin}
model=${model:-$gguf_staged}
# gpu_tools is a cargo example: in a target directory it sits in examples/.
tools=$bin/gpu_tools
[[ -x $tools ]] || tools=$bin/examples/gpu_tools
for b in "$bin/ref-server" "$bin/policy-trainer" "$tools"; do
  [[ -x $b ]] || { say "no $b: copy bundle part a (deploy/gpu-bundle.sh makes it) or pass --bin DIR"; exit 1; }
done

gpu_name=cpu driver=""
if [[ $device == cuda* ]]; then
  find_cuda_libraries || exit 1
  # The driver compiles candle's PTX at first use; keep its cache for later invocations.
  export CUDA_CACHE_PATH=$stage/nv-cache CUDA_CACHE_MAXSIZE=1073741824
  gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 || true)
  gpu_name=${gpu_name:-"a GPU nvidia-smi does not name"}
  driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1 || true)
fi
say "device $device ($gpu_name${driver:+, driver $driver}); binaries in $bin; work in $work; budget ${budget}s"

# Shapes and sizes: the real run, or the dry run's tiny stand-ins.
if [[ $dry == 1 ]]; then
  big_shape=tiny ref_shape=tiny pairs1=4 dpo_steps=3 big_batch=2 big_prompt=24 big_resp=15
  matmul_n=256
else
  big_shape=llama-3.1-8b ref_shape=tiny-vocab-128k pairs1=16 dpo_steps=20 big_batch=8
  big_prompt=256 big_resp=255 matmul_n=8192
fi
if [[ $dry == 1 && (-z $model || $model == "$gguf_staged") ]]; then
  # The dry run needs no SmolLM2: a tiny random model goes through the same commands.
  model=$stage/tiny-model
  [[ -f $model/config.json ]] || "$tools" random-model "$model" tiny f32 3 >/dev/null
fi

want_step() { [[ ,$steps, == *,$1,* ]]; }
failed=0
if want_step 1; then step_logprobs || failed=1; fi
if want_step 2; then step_dpo || failed=1; fi
# LoRA before the 8B step: minutes on SmolLM2, where the 8B step takes what budget is left.
if want_step 4; then step_lora || failed=1; fi
if want_step 3; then step_big || failed=1; fi

table=$work/table.txt
{
  printf 'GPU check on %s%s, %s, %s\n' "$gpu_name" "${driver:+, driver $driver}" "$device" "$(date -u +%Y-%m-%dT%H:%MZ)"
  printf '%-4s %-6s %-52s %s\n' step status check measure
  for f in $(ls "$stage/results" | sort); do
    IFS=$'\t' read -r status what measure <"$stage/results/$f"
    printf '%-4s %-6s %-52s %s\n' "$f" "$status" "$what" "$measure"
  done
  printf 'total %ss this invocation (budget %ss)\n' $(($(date +%s) - started)) "$budget"
} >"$table"
cat "$table"
if [[ -n $copy_to && -d $copy_to ]]; then
  cp "$table" "$copy_to/gpu-check-table.txt"
  for f in "$work"/*.log; do cp "$f" "$copy_to/" 2>/dev/null || true; done
fi
exit "$failed"
