#!/usr/bin/env bash
# The GPU check of issue 7, prepared for a lent GPU machine (no Rust toolchain, no internet,
# at most 10 minutes a command), run from the repository root with the bundle that
# deploy/gpu-bundle.sh stages in .cache/gpu-bundle/. Prints one table:
#
#   1  SmolLM2 response log-probs on the GPU (f32 and bf16) against the CPU's f32 values
#   2  ref-server and policy-trainer together on the one GPU: 20 DPO steps on SmolLM2 (bf16),
#      the step-0 validation loss must be ln 2 (policy = reference)
#   3  a random-weight model of Llama 3.1 8B's shape, written here, trained alone on the GPU:
#      step time, tokens/s, peak GPU memory, MFU against the measured bf16 matmul rate
#
#   deploy/gpu-check.sh                      # all steps on cuda:0 (bundle parts a and b staged)
#   deploy/gpu-check.sh --steps 3            # the 8B step only (needs bundle part a only)
#   deploy/gpu-check.sh --steps 1,2          # the SmolLM2 steps (need the whole GGUF: a and b)
#   deploy/gpu-check.sh --stage-only         # move the carried part(s) into the stage, run nothing
#   deploy/gpu-check.sh --dry-run            # here, on CPU: tiny random models everywhere, the
#                                            #   same commands and table (checks the plumbing)
#
# Why parts: what travels to the GPU machine is at most 64 MiB a call, and the SmolLM2 GGUF
# alone is 94 MiB, so the bundle comes in two parts, carried by two calls while the machine
# stays warm. Each call moves what it carries into the stage ($DPO_GPU_STAGE, default
# /var/tmp/dpo-gpu-check), which outlives the call on a machine kept warm; step results are
# kept there too, and every call prints the table of all results so far.
#
# Options: --device D (cuda:0; cpu with --dry-run), --bundle DIR (.cache/gpu-bundle),
# --bin DIR (use these ref-server/policy-trainer/gpu_tools instead of the bundle's),
# --model GGUF (instead of the bundle's SmolLM2), --budget SECONDS (570: the whole script),
# --big-steps N (8B optimizer steps to time, default 4). The random 8B checkpoint stays in
# the stage (16 GB), so a rerun on the same machine skips writing it.
# Every step has its own time limit inside the budget and fails with its log's tail rather
# than hang. Exit status: 0 iff every step run passed.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
started=$(date +%s)

device="" steps=1,2,3 bundle="" bin="" model="" budget=570 dry=0 stage_only=0
big_steps=4
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

# ---------------------------------------------------------------- helpers
say() { echo "gpu-check: $*" >&2; }
# Errors without captured backtraces (candle captures one per error when RUST_BACKTRACE is
# set): the log's error line stays readable.
export RUST_LIB_BACKTRACE=${RUST_LIB_BACKTRACE:-0}
left() { echo $((budget - ($(date +%s) - started))); }
# Seconds a step may take: its own limit, cut to what the budget has left (minus 15 s for
# the table). Zero or less: the step is not started.
limit_for() { local l; l=$(left); l=$((l - 15)); ((l < $1)) && echo "$l" || echo "$1"; }
# Results: one file per check, `status<TAB>what<TAB>measure`, kept in the stage so that a
# later call's table shows them too.
record() { printf '%s\t%s\t%s\n' "$2" "$3" "$4" >"$stage/results/$1"; }
pids=()
cleanup() {
  trap '' INT TERM
  local p
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  sleep 1
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  pids=()
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
# Runs a command under a time limit; on failure or timeout prints the tail of its log.
bounded() {
  local secs=$1 log=$2; shift 2
  if ((secs <= 0)); then echo "no time left in the budget" >>"$log"; return 124; fi
  local rc=0
  timeout -k 10 "$secs" "$@" >>"$log" 2>&1 || rc=$?
  if ((rc != 0)); then
    ((rc == 124 || rc == 137)) && say "timed out after ${secs}s: $*" || say "failed ($rc): $*"
    { grep -m 5 -iE 'error|panicked' "$log" || true; echo "..."; tail -n 8 "$log"; } | cut -c1-300 | sed 's/^/    | /' >&2
  fi
  return "$rc"
}
# Starts ref-server in the background; sets `url` once it is SERVING, within $1 seconds.
start_server() {
  local secs=$1 log=$2; shift 2
  "$bin/ref-server" serve --listen 127.0.0.1:0 "$@" >"$log.stdout" 2>"$log" &
  server_pid=$!
  pids+=("$server_pid")
  local deadline=$(($(date +%s) + secs)) addr=""
  url=""
  while (($(date +%s) < deadline)); do
    kill -0 "$server_pid" 2>/dev/null || { say "ref-server exited during start-up:"; tail -n 15 "$log" >&2; return 1; }
    addr=${addr:-$(sed -n 's/^listening on //p' "$log.stdout" | head -n 1)}
    if [[ -n $addr ]] && "$bin/ref-server" health --server "http://$addr" >/dev/null 2>&1; then
      url=http://$addr
      return 0
    fi
    sleep 0.5
  done
  say "ref-server was not SERVING within ${secs}s:"; tail -n 15 "$log" >&2
  return 1
}
stop_pid() {
  kill -TERM "$1" 2>/dev/null || true
  for _ in $(seq 1 20); do kill -0 "$1" 2>/dev/null || break; sleep 0.5; done
  kill -KILL "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

# ---------------------------------------------------------------- stage the bundle
# Parts carried by this call move into the stage; the GGUF is reassembled once all its
# parts are there (checked against the manifest's SHA-256).
for part in "$bundle"/*/; do
  [[ -f $part/MANIFEST ]] || continue
  say "staging $(basename "$part") ($(du -sh "$part" | cut -f1))"
  cp -f "$part"/* "$stage/bundle/"
done
gguf_staged=""
if [[ -f $stage/bundle/MANIFEST ]]; then
  parts=$(sed -n 's/^gguf_parts //p' "$stage/bundle/MANIFEST")
  want=$(sed -n 's/^gguf_sha256 //p' "$stage/bundle/MANIFEST")
  if [[ -s $stage/smollm2.gguf ]] && [[ -f $stage/smollm2.gguf.sha256 ]] && [[ $(cat "$stage/smollm2.gguf.sha256") == "$want" ]]; then
    gguf_staged=$stage/smollm2.gguf
  else
    have=0
    for i in $(seq 1 "$parts"); do [[ -f $stage/bundle/smollm2.gguf.part$i ]] && have=$((have + 1)); done
    if [[ $have == "$parts" ]]; then
      for i in $(seq 1 "$parts"); do cat "$stage/bundle/smollm2.gguf.part$i"; done >"$stage/smollm2.gguf.tmp"
      got=$(sha256sum "$stage/smollm2.gguf.tmp" | cut -d' ' -f1)
      if [[ $got == "$want" ]]; then
        mv "$stage/smollm2.gguf.tmp" "$stage/smollm2.gguf"
        echo "$want" >"$stage/smollm2.gguf.sha256"
        rm -f "$stage"/bundle/smollm2.gguf.part*
        gguf_staged=$stage/smollm2.gguf
      else
        say "the reassembled GGUF's SHA-256 is $got, the manifest says $want: parts from different bundles?"
        rm -f "$stage/smollm2.gguf.tmp"
      fi
    else
      say "SmolLM2 GGUF: $have of $parts parts staged (the other part comes with the other call)"
    fi
  fi
  if [[ -f $stage/bundle/bin.tar.xz && ( ! -d $stage/bin || $stage/bundle/bin.tar.xz -nt $stage/bin ) ]]; then
    rm -rf "$stage/bin" && mkdir -p "$stage/bin"
    tar -xJf "$stage/bundle/bin.tar.xz" -C "$stage/bin" 2>/dev/null ||
      python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' \
        "$stage/bundle/bin.tar.xz" "$stage/bin"
    touch "$stage/bin"
  fi
fi
[[ $stage_only == 1 ]] && { say "staged: $(ls "$stage/bundle" | tr '\n' ' ')"; exit 0; }
work=$stage/run-$(date +%Y%m%d-%H%M%S)
mkdir -p "$work"

bin=${bin:-$stage/bin}
model=${model:-$gguf_staged}
# gpu_tools is a cargo example: in a target directory it sits in examples/.
tools=$bin/gpu_tools
[[ -x $tools ]] || tools=$bin/examples/gpu_tools
for b in "$bin/ref-server" "$bin/policy-trainer" "$tools"; do
  [[ -x $b ]] || { say "no $b: carry bundle part a (deploy/gpu-bundle.sh makes it) or pass --bin DIR"; exit 1; }
done

# ---------------------------------------------------------------- the GPU's libraries
# The binaries link the CUDA libraries dynamically (cudarc's dynamic-linking): libcuda from
# the driver, cuBLAS, cuRAND, NVRTC and cudart from a CUDA 13 install or the PyPI wheels
# (PyTorch's nvidia-* packages have them). Found here, not carried: cuBLAS alone is 500 MB.
gpu_name=cpu driver=""
if [[ $device == cuda* ]]; then
  dirs=()
  while IFS= read -r d; do dirs+=("$d"); done < <(
    python3 - <<'PY' 2>/dev/null || true
import glob, site, sys
for sp in site.getsitepackages() + [site.getusersitepackages()]:
    for d in sorted(glob.glob(sp + "/nvidia/*/lib")) + sorted(glob.glob(sp + "/nvidia/cu13/lib")):
        print(d)
PY
  )
  dirs+=(/usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/nvidia/lib64
         /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu /usr/lib64)
  for lib in libcuda.so.1 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13 libcudart.so.13; do
    ldconfig -p 2>/dev/null | grep -q "$lib " && continue
    for d in "${dirs[@]}"; do
      if [[ -e $d/$lib ]]; then
        export LD_LIBRARY_PATH=$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
        break
      fi
    done
  done
  missing=$(ldd "$bin/policy-trainer" | grep 'not found' || true)
  if [[ -n $missing ]]; then
    say "libraries the binaries need are missing on this machine:"; echo "$missing" >&2
    say "searched: ldconfig, ${dirs[*]}"
    exit 1
  fi
  # The driver compiles candle's PTX at first use; keep its cache for later calls.
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
if [[ $dry == 1 && ( -z $model || $model == "$gguf_staged" ) ]]; then
  # The dry run needs no SmolLM2: a tiny random model goes through the same commands.
  model=$stage/tiny-model
  [[ -f $model/config.json ]] || "$tools" random-model "$model" tiny f32 3 >/dev/null
fi

want_step() { [[ ,$steps, == *,$1,* ]]; }
failed=0

# ---------------------------------------------------------------- 1: log-probs, GPU vs CPU
if want_step 1; then
  rm -f "$stage"/results/1*   # this call's results replace an earlier call's
  log=$work/1-logprobs.log
  if [[ -z $model ]]; then
    record 1a FAIL "log-probs GPU vs CPU" "no SmolLM2 GGUF staged: carry bundle part b too"
    failed=1
  else
    head -n "$pairs1" deploy/data/default_prefs.jsonl >"$work/pairs.jsonl"
    ok=1
    for run in "cpu f32" "cpu bf16" "$device f32" "$device bf16"; do
      set -- $run
      out=$work/scores-$1-$2.jsonl
      [[ $1 == cpu && -s $work/scores-cpu-$2.jsonl ]] && continue
      echo "== score $run" >>"$log"
      s=$(date +%s)
      bounded "$(limit_for 120)" "$log" "$bin/ref-server" score --model "$model" --device "$1" \
        --dtype "$2" --input "$work/pairs.jsonl" --output "$out" || { ok=0; break; }
      echo "score $run: $(($(date +%s) - s)) s" >>"$log"
    done
    if [[ $ok == 1 ]]; then
      # Tolerances: f32 on two devices differs by summation order only. bf16 rounds the
      # weights and activations: measured on CPU (SmolLM2, 16 pairs, 2026-11-30), bf16 moves a
      # response's summed log-prob by up to 0.11·√tokens nats from f32; allowed: 0.25·√tokens.
      python3 - "$work" "$device" >>"$log" 2>&1 <<'PY' && c=0 || c=$?
import json, math, sys
work, dev = sys.argv[1], sys.argv[2]
load = lambda d, t: [json.loads(l) for l in open(f"{work}/scores-{d}-{t}.jsonl")]
ref = load("cpu", "f32")
rows = []
for d, t, tol in [("cpu", "bf16", None), (dev, "f32", "f32"), (dev, "bf16", "bf16")]:
    got = load(d, t)
    worst, worst_scaled, ok = 0.0, 0.0, True
    for a, b in zip(ref, got):
        for k in ("chosen", "rejected"):
            n = a[k + "_tokens"]
            ok &= b[k + "_tokens"] == n
            diff = abs(a[k + "_logprob"] - b[k + "_logprob"])
            worst = max(worst, diff)
            worst_scaled = max(worst_scaled, diff / math.sqrt(n))
            if tol == "f32":
                ok &= diff <= 1e-2
            elif tol == "bf16":
                ok &= diff <= 0.25 * math.sqrt(n)
    ok &= len(got) == len(ref)
    rows.append((d, t, tol, ok, worst, worst_scaled, 2 * len(ref)))
for d, t, tol, ok, worst, scaled, n in rows:
    status = "PASS" if ok else "FAIL"
    if tol is None:
        status = "info"
    limit = {"f32": "tol 1e-2", "bf16": "tol 0.25·√n", None: "bf16's own effect"}[tol]
    print(f"RESULT\t{d} {t} vs cpu f32\t{status}\tmax |Δ| {worst:.2e} nats, max |Δ|/√n {scaled:.3f} over {n} responses ({limit})")
sys.exit(0 if all(r[3] for r in rows if r[2]) else 1)
PY
      i=0 letters=(a b c d e)
      while IFS=$'\t' read -r _ what status measure; do
        record "1${letters[i]}" "$status" "log-probs $what" "$measure"
        i=$((i + 1))
      done < <(grep '^RESULT' "$log")
      [[ $c == 0 ]] || failed=1
      [[ $i == 0 ]] && { record 1a FAIL "log-probs GPU vs CPU" "comparison failed (see $log)"; failed=1; }
    else
      record 1a FAIL "log-probs GPU vs CPU" "scoring failed or timed out (see $log)"
      failed=1
    fi
  fi
fi

# ---------------------------------------------------------------- 2: DPO on SmolLM2, one GPU
if want_step 2; then
  rm -f "$stage"/results/2*
  log=$work/2-dpo.log
  if [[ -z $model ]]; then
    record 2 FAIL "DPO $dpo_steps steps, server + trainer on $device" "no SmolLM2 GGUF staged: carry bundle part b too"
    failed=1
  else
    s=$(date +%s)
    # deploy/run.sh's own defaults for the shipped data (batch 8, micro-batch 4, lr 1e-5,
    # 64 validation pairs, eval every 4), both processes on the one device, bf16.
    extra=()
    [[ $dry == 1 ]] && extra=(--val-size 8 --eval-every 1 --batch-size 2 --micro-batch 2 --max-length 64)
    if bounded "$(limit_for 240)" "$log" env DPO_BIN_DIR="$bin" deploy/run.sh --model "$model" \
        --ref-device "$device" --device "$device" --dtype bf16 --out "$work/dpo" \
        --max-steps "$dpo_steps" --no-progress "${extra[@]}"; then
      measure=$(python3 - "$work/dpo/metrics.jsonl" "$dpo_steps" <<'PY'
import json, math, sys
lines = [json.loads(l) for l in open(sys.argv[1])]
ev = [l for l in lines if l.get("kind") == "eval"]
tr = [l for l in lines if l.get("kind") == "train"]
first = ev[0]["loss"] if ev and ev[0]["step"] == 0 else float("nan")
# bf16 on both sides, batched differently (server batches vs trainer passes): log-probs
# agree to ~0.1 nat, and β = 0.1 turns that into ~1e-3 of loss. Allowed: 1e-2.
ok = abs(first - math.log(2)) < 1e-2 and len(tr) == int(sys.argv[2])
last = ev[-1] if ev else {}
eps = sum(t["examples_per_second"] for t in tr) / max(len(tr), 1)
print(("PASS" if ok else "FAIL") + "\t" +
      f"{len(tr)} steps; step-0 loss {first:.6f} (ln 2 = {math.log(2):.6f}); final val loss "
      f"{last.get('loss', float('nan')):.4f}, reward acc {last.get('reward_accuracy', float('nan')):.3f}; "
      f"{eps:.1f} pairs/s")
PY
)
      record 2 "${measure%%$'\t'*}" "DPO $dpo_steps steps, server + trainer on $device" \
        "${measure#*$'\t'}; $(($(date +%s) - s)) s in all"
      [[ ${measure%%$'\t'*} == PASS ]] || failed=1
    else
      record 2 FAIL "DPO $dpo_steps steps, server + trainer on $device" "run.sh failed or timed out (see $log)"
      failed=1
    fi
  fi
fi

# ---------------------------------------------------------------- 3: 8B shape, speed and memory
if want_step 3; then
  rm -f "$stage"/results/3*
  log=$work/3-big.log
  big=$stage/big-$big_shape refm=$stage/ref-$ref_shape
  what="$big_shape (random bf16), alone on $device"
  ok=1
  # The matmul rate first: MFU's denominator, measured on this card with the same library.
  if bounded "$(limit_for 60)" "$log" "$tools" matmul "$device" "$matmul_n" 20 bf16; then
    tflops=$(sed -n 's/^matmul_tflops //p' "$log" | tail -n 1)
    record 3a info "bf16 matmul rate on $device" "$tflops TFLOP/s (${matmul_n}³ products through candle: cuBLAS on a GPU)"
  else
    ok=0
  fi
  # The checkpoints: written here (16 GB for 8B), reused by a later call on a warm machine.
  for m in "$big $big_shape 1" "$refm $ref_shape 2"; do
    set -- $m
    [[ $ok == 1 ]] || break
    if [[ ! -f $1/.complete ]]; then
      rm -rf "$1"
      bounded "$(limit_for 200)" "$log" "$tools" random-model "$1" "$2" bf16 "$3" && touch "$1/.complete" || ok=0
    fi
  done
  # Synthetic pairs of fixed length: one token per byte with this tokenizer (raw template).
  # Far more than the steps timed: the run must never end on its own, since its end saves
  # last/ (16 GB of model and 32 GB of optimizer state for the 8B).
  python3 - "$work/big.jsonl" "$big_prompt" "$big_resp" $((big_batch * 50 * big_steps)) <<'PY'
import json, random, string, sys
out, p, r, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(0)
text = lambda k: "".join(rng.choice(string.ascii_lowercase) for _ in range(k))
with open(out, "w") as f:
    for _ in range(n):
        f.write(json.dumps({"prompt": text(p), "chosen": text(r), "rejected": text(r)}) + "\n")
PY
  if [[ $ok == 1 ]] && start_server "$(limit_for 120)" "$work/3-ref-server.log" --model "$refm" --device "$device" --dtype bf16; then
    # The reference is a tiny model with the same vocabulary and tokenizer: its log-probs
    # cost nothing next to the policy's, so the step time is the policy's alone (in
    # production the reference has its own GPU). Hence --allow-different-reference.
    mem_log=$work/gpu-mem.csv
    if [[ $device == cuda* ]] && command -v nvidia-smi >/dev/null; then
      base_mem=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -n 1)
      nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 250 >"$mem_log" 2>/dev/null &
      pids+=($!); smi_pid=$!
    fi
    "$bin/policy-trainer" train --model "$big" --ref-server "$url" --data "$work/big.jsonl" \
      --out "$work/big-run" --device "$device" --dtype bf16 --template raw \
      --batch-size "$big_batch" --micro-batch 1 --max-length $((big_prompt + big_resp + 8)) \
      --val-size 0 --eval-every 100000 --save-every 100000 --lr 1e-6 \
      --allow-different-reference --no-progress >>"$log" 2>&1 &
    trainer=$!
    pids+=("$trainer")
    deadline=$(($(date +%s) + $(limit_for 420)))
    hwm=0
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
    [[ -n ${smi_pid:-} ]] && stop_pid "$smi_pid"
    stop_pid "$server_pid"
    if [[ $ok == 1 ]]; then
      if [[ -s $mem_log ]]; then
        peak_mib=$(sort -n "$mem_log" | tail -n 1)
        peak_desc="$(awk -v p="$peak_mib" -v b="$base_mem" 'BEGIN{printf "%.1f GiB (nvidia-smi, GPU total; %.1f GiB before start; incl. the tiny reference server)", p/1024, b/1024}')"
        peak_bytes=$((peak_mib * 1048576))
      else
        peak_desc="$(awk -v k="$hwm" 'BEGIN{printf "%.2f GiB (trainer peak RSS)", k/1048576}')"
        peak_bytes=$((hwm * 1024))
      fi
      python3 - "$work/big-run/metrics.jsonl" "$big/config.json" "$log" "$tflops" "$big_batch" "$big_resp" "$peak_bytes" \
        $((big_prompt + big_resp + 1)) >"$work/big.txt" <<'PY'
import json, re, statistics, sys
metrics, config, log, tflops, batch, resp, peak = sys.argv[1:8]
batch, resp, peak, tflops = int(batch), int(resp) + 1, int(peak), float(tflops)
tr = [json.loads(l) for l in open(metrics) if '"kind":"train"' in l]
secs = [batch / t["examples_per_second"] for t in tr]
# Step 1 includes warm-up (kernel compilation, allocator growth): the median of the rest.
step = statistics.median(secs[1:] if len(secs) > 1 else secs)
text = open(log).read()
c = json.load(open(config))
V, H, I, L = c["vocab_size"], c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
nh, nkv = c["num_attention_heads"], c["num_key_value_heads"]
hd = c.get("head_dim") or H // nh
# What one pair costs depends on the trainer's layout, which its memory line names: one row
# per pair (the prompt once, then chosen and rejected, each attending to the prompt and
# itself) or two sequences (prompt + response each). Neither line: one token per byte, no
# BOS, EOS appended, two sequences.
m = re.search(r"micro-batch \d+ of (\d+)-token pair rows", text)
if m:
    rows, row_len, layout = 1, int(m.group(1)), f"one {m.group(1)}-token row per pair, the prompt once"
else:
    m = re.search(r"micro-batch \d+ of (\d+)-token pairs", text)
    seq = int(m.group(1)) if m else int(sys.argv[8])
    rows, row_len, layout = 2, seq, f"2 sequences of {seq} per pair"
m = re.search(r"total\s+([\d.]+) GiB", text)
predicted = float(m.group(1)) if m else float("nan")
# Model FLOPs of one policy forward+backward (×3 of the forward's 2 per weight use), of
# what the code computes: decoder matmuls on every token of a row, the output head on
# response tokens only, attention scores and values over the full row (QKᵀ and AV, T×T).
layer = H * nh * hd + 2 * H * nkv * hd + nh * hd * H + 3 * H * I
per_row = 6 * L * layer * row_len + 12 * L * nh * hd * row_len * row_len
per_pair = rows * per_row + 6 * V * H * 2 * resp
flops = per_pair * batch
tokens = rows * row_len * batch
print(f"step_s {step:.3f}")
print(f"layout {layout}")
print(f"steps {len(tr)}")
print(f"tokens {tokens}")
print(f"tok_s {tokens / step:.0f}")
print(f"mfu {100 * flops / step / (tflops * 1e12):.2f}")
print(f"achieved_tflops {flops / step / 1e12:.3g}")
print(f"predicted_gib {predicted:.2f}")
print(f"measured_gib {peak / 2**30:.2f}")
PY
      get() { sed -n "s/^$1 //p" "$work/big.txt"; }
      record 3b info "$what: step time" "$(get step_s) s per optimizer step of $big_batch pairs (median of steps 2-$(get steps)), micro-batch 1"
      record 3c info "$what: throughput" "$(get tok_s) tokens/s ($(get tokens) tokens per step, $(get layout))"
      record 3d info "$what: peak memory" "$peak_desc; memory model predicted $(get predicted_gib) GiB"
      record 3e info "$what: MFU" "$(get mfu)% ($(get achieved_tflops) of $tflops TFLOP/s; model FLOPs, step time incl. optimizer)"
    fi
  fi
  if [[ $ok != 1 ]]; then
    record 3b FAIL "$what" "see $log"
    failed=1
  fi
fi

# ---------------------------------------------------------------- the table
table=$work/table.txt
{
  printf 'GPU check (issue 7) on %s%s, %s, %s\n' "$gpu_name" "${driver:+, driver $driver}" "$device" "$(date -u +%Y-%m-%dT%H:%MZ)"
  printf '%-4s %-6s %-52s %s\n' step status check measure
  for f in $(ls "$stage/results" | sort); do
    IFS=$'\t' read -r status what measure <"$stage/results/$f"
    printf '%-4s %-6s %-52s %s\n' "$f" "$status" "$what" "$measure"
  done
  printf 'total %ss this call (budget %ss)\n' $(($(date +%s) - started)) "$budget"
} >"$table"
cat "$table"
if [[ -n ${OUT:-} && -d ${OUT:-} ]]; then
  cp "$table" "$OUT/gpu-check-table.txt"
  for f in "$work"/*.log; do cp "$f" "$OUT/" 2>/dev/null || true; done
fi
exit "$failed"
