# The checks of deploy/gpu-check.sh (sourced, not run). Each records its results
# (lib.sh's `record`) and returns non-zero when a check did not pass. They read the
# driver's variables: bin, tools, model, device, stage, work, dry and the shapes below.

# 1: SmolLM2's response log-probs on the device (f32, bf16) against the CPU's f32 values.
step_logprobs() {
  rm -f "$stage"/results/1*   # this invocation's results replace an earlier one's
  local log=$work/1-logprobs.log run out s rc=0
  if [[ -z $model ]]; then
    record 1a FAIL "log-probs GPU vs CPU" "no SmolLM2 GGUF staged: copy bundle part b too"
    return 1
  fi
  head -n "$pairs1" deploy/data/default_prefs.jsonl >"$work/pairs.jsonl"
  for run in "cpu f32" "cpu bf16" "$device f32" "$device bf16"; do
    set -- $run
    out=$work/scores-$1-$2.jsonl
    [[ $1 == cpu && -s $out ]] && continue   # with --device cpu, scored once
    echo "== score $run" >>"$log"
    s=$(date +%s)
    if ! bounded "$(limit_for 120)" "$log" "$bin/ref-server" score --model "$model" \
      --device "$1" --dtype "$2" --input "$work/pairs.jsonl" --output "$out"; then
      record 1a FAIL "log-probs GPU vs CPU" "scoring failed or timed out (see $log)"
      return 1
    fi
    echo "score $run: $(($(date +%s) - s)) s" >>"$log"
  done
  python3 deploy/gpu/compare_logprobs.py "$work" "$device" >>"$log" 2>&1 || rc=$?
  local i=0 letters=(a b c d e) what status measure
  while IFS=$'\t' read -r _ what status measure; do
    record "1${letters[i]}" "$status" "log-probs $what" "$measure"
    i=$((i + 1))
  done < <(grep '^RESULT' "$log")
  if [[ $i == 0 ]]; then
    record 1a FAIL "log-probs GPU vs CPU" "comparison failed (see $log)"
    return 1
  fi
  return "$rc"
}

# 2: deploy/run.sh's DPO run on SmolLM2, server and trainer on the one device, bf16.
step_dpo() {
  dpo_run 2 "DPO $dpo_steps steps, server + trainer on $device" "$work/dpo"
}

# 4: the same run with LoRA r=16 on every projection: bf16 base, f32 adapters.
step_lora() {
  dpo_run 4 "LoRA r=16 DPO $dpo_steps steps, server + trainer on $device" "$work/lora" --lora-rank 16
}

# One deploy/run.sh DPO run on SmolLM2 in bf16 on the device, recorded as check ID:
# `dpo_run ID WHAT OUT [TRAINER FLAGS...]`. Under LoRA the adapter in OUT/best (or last)
# is checked too.
dpo_run() {
  local id=$1 what=$2 out=$3 s measure adapter=()
  shift 3
  rm -f "$stage/results/$id"
  local log=$work/$id-dpo.log
  if [[ -z $model ]]; then
    record "$id" FAIL "$what" "no SmolLM2 GGUF staged: copy bundle part b too"
    return 1
  fi
  s=$(date +%s)
  # run.sh's own defaults for the shipped data (batch 8, micro-batch 4, lr 1e-5, 64
  # validation pairs, eval every 4); the dry run shrinks them to its tiny model.
  local extra=()
  [[ $dry == 1 ]] && extra=(--val-size 8 --eval-every 1 --batch-size 2 --micro-batch 2 --max-length 64)
  if ! bounded "$(limit_for 240)" "$log" env DPO_BIN_DIR="$bin" deploy/run.sh --model "$model" \
    --ref-device "$device" --device "$device" --dtype bf16 --out "$out" \
    --max-steps "$dpo_steps" --no-progress "${extra[@]}" "$@"; then
    record "$id" FAIL "$what" "run.sh failed or timed out (see $log)"
    return 1
  fi
  [[ " $* " == *" --lora-rank "* ]] && adapter=(--adapter "$out/best" --adapter "$out/last")
  if ! measure=$(python3 deploy/gpu/check_dpo_run.py "$out/metrics.jsonl" "$dpo_steps" "${adapter[@]}" 2>>"$log"); then
    record "$id" FAIL "$what" "reading the run's metrics failed (see $log)"
    return 1
  fi
  record "$id" "${measure%%$'\t'*}" "$what" "${measure#*$'\t'}; $(($(date +%s) - s)) s in all"
  [[ ${measure%%$'\t'*} == PASS ]]
}

# 3: a random-weight model of Llama 3.1 8B's shape trained alone on the device: the matmul
# rate, step time, tokens/s, peak memory against the memory model's prediction, MFU.
step_big() {
  rm -f "$stage"/results/3*
  local log=$work/3-big.log big=$stage/big-$big_shape refm=$stage/ref-$ref_shape
  local what="$big_shape (random bf16), alone on $device"
  if ! big_run "$log" "$big" "$refm" "$what"; then
    record 3b FAIL "$what" "see $log"
    return 1
  fi
}

# The body of step 3; returns non-zero at the first thing that fails.
big_run() {
  local log=$1 big=$2 refm=$3 what=$4 tflops m
  # The matmul rate first: MFU's denominator, measured on this card with the same library.
  bounded "$(limit_for 60)" "$log" "$tools" matmul "$device" "$matmul_n" 20 bf16 || return 1
  tflops=$(sed -n 's/^matmul_tflops //p' "$log" | tail -n 1)
  [[ -n $tflops ]] || { say "gpu_tools matmul printed no matmul_tflops line"; return 1; }
  record 3a info "bf16 matmul rate on $device" "$tflops TFLOP/s (${matmul_n}³ products through candle: cuBLAS on a GPU)"
  # The checkpoints: written here (16 GB for 8B), reused by a later invocation.
  for m in "$big $big_shape 1" "$refm $ref_shape 2"; do
    set -- $m
    if [[ ! -f $1/.complete ]]; then
      rm -rf "$1"
      bounded "$(limit_for 200)" "$log" "$tools" random-model "$1" "$2" bf16 "$3" || return 1
      touch "$1/.complete"
    fi
  done
  # Far more pairs than the steps timed: the run must never end on its own, since its end
  # saves last/ (16 GB of model and 32 GB of optimizer state for the 8B).
  python3 deploy/gpu/make_pairs.py "$work/big.jsonl" "$big_prompt" "$big_resp" \
    $((big_batch * 50 * big_steps)) 2>>"$log" || return 1
  # The reference is a tiny model with the same vocabulary and tokenizer: its log-probs
  # cost nothing next to the policy's, so the step time is the policy's alone (in
  # production the reference has its own GPU). Hence --allow-different-reference.
  start_server "$(limit_for 120)" "$work/3-ref-server.log" --model "$refm" --device "$device" --dtype bf16 || return 1
  local mem_log=$work/gpu-mem.csv base_mem="" smi_pid="" trainer ok=1 n h hwm=0 deadline
  if [[ $device == cuda* ]] && command -v nvidia-smi >/dev/null; then
    base_mem=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -n 1)
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 250 >"$mem_log" 2>/dev/null &
    smi_pid=$!
    pids+=("$smi_pid")
  fi
  "$bin/policy-trainer" train --model "$big" --ref-server "$url" --data "$work/big.jsonl" \
    --out "$work/big-run" --device "$device" --dtype bf16 --template raw \
    --batch-size "$big_batch" --micro-batch 1 --max-length $((big_prompt + big_resp + 8)) \
    --val-size 0 --eval-every 100000 --save-every 100000 --lr 1e-6 \
    --allow-different-reference --no-progress >>"$log" 2>&1 &
  trainer=$!
  pids+=("$trainer")
  deadline=$(($(date +%s) + $(limit_for 420)))
  while :; do
    n=$(grep -c '"kind":"train"' "$work/big-run/metrics.jsonl" 2>/dev/null || true)
    ((${n:-0} >= big_steps)) && break
    kill -0 "$trainer" 2>/dev/null || { say "the trainer exited early:"; tail -n 15 "$log" >&2; ok=0; break; }
    (($(date +%s) >= deadline)) && { say "timed out waiting for $big_steps steps"; tail -n 15 "$log" >&2; ok=0; break; }
    h=$(sed -n 's/^VmHWM:[[:space:]]*\([0-9]*\) kB/\1/p' "/proc/$trainer/status" 2>/dev/null || true)
    hwm=${h:-$hwm}
    sleep 0.5
  done
  # Stopped, not finished: a finished run would save 16 GB of model and 32 GB of
  # optimizer state, which is not what is measured (and fills the disk).
  stop_pid "$trainer"
  [[ -n $smi_pid ]] && stop_pid "$smi_pid"
  stop_pid "$server_pid"
  ((ok == 1)) || return 1

  local peak_desc peak_bytes peak_mib
  if [[ -s $mem_log ]]; then
    peak_mib=$(sort -n "$mem_log" | tail -n 1)
    peak_desc="$(awk -v p="$peak_mib" -v b="$base_mem" 'BEGIN{printf "%.1f GiB (nvidia-smi, GPU total; %.1f GiB before start; incl. the tiny reference server)", p/1024, b/1024}')"
    peak_bytes=$((peak_mib * 1048576))
  else
    peak_desc="$(awk -v k="$hwm" 'BEGIN{printf "%.2f GiB (trainer peak RSS)", k/1048576}')"
    peak_bytes=$((hwm * 1024))
  fi
  python3 deploy/gpu/step_report.py --metrics "$work/big-run/metrics.jsonl" \
    --config "$big/config.json" --log "$log" --tflops "$tflops" --batch "$big_batch" \
    --response-tokens "$big_resp" --peak-bytes "$peak_bytes" \
    --sequence-tokens $((big_prompt + big_resp + 1)) >"$work/big.txt" 2>>"$log" || return 1
  get() { sed -n "s/^$1 //p" "$work/big.txt"; }
  record 3b info "$what: step time" "$(get step_s) s per optimizer step of $big_batch pairs (median of steps 2-$(get steps)), micro-batch 1"
  record 3c info "$what: throughput" "$(get tok_s) tokens/s ($(get tokens) tokens per step, $(get layout))"
  record 3d info "$what: peak memory" "$peak_desc; memory model predicted $(get predicted_gib) GiB"
  record 3e info "$what: MFU" "$(get mfu)% ($(get achieved_tflops) of $tflops TFLOP/s; model FLOPs, step time incl. optimizer)"
}
