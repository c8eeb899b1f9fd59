#!/usr/bin/env bash
# Trainer benchmark: one DPO step (reference log-probs + policy forward/backward over N pairs,
# one RMSprop step) by our two processes (ref-server + policy-trainer, release build, CPU f32)
# at --micro-batch 1 and a larger micro-batch, full fine-tuning and LoRA (--lora-rank
# LORA_RANK, default 16, every projection), beside the PyTorch single-process loop, TRL's
# DPOTrainer and TRL's DPOTrainer with the same PEFT LoRA config, on the same N single-turn HH
# pairs, in one invocation. Prints a table of examples/s and peak RSS, with ratios against the
# baselines: full fine-tuning against TRL, LoRA against TRL + PEFT.
#
#   tests/bench/train.sh [N_PAIRS] [LARGE_MICRO_BATCH]
#
# Needs the PyTorch venv of ../shared/bench/README.md (TORCH_PY, default
# /tmp/torchvenv/bin/python, with transformers and trl), peft for the LoRA baseline (PEFT_PY,
# default TORCH_PY; e.g. a venv made from TORCH_PY's python with `pip install --no-deps
# peft==0.21.2`) and the float32 HF conversion of the GGUF (SMOLLM2_HF, default
# /tmp/smollm2-hf). LORA_RANK=0 leaves the LoRA rows out. Run on an otherwise idle machine.
#
# BASELINE_BIN=DIR adds two rows for another build of ours (DIR holding its release
# `ref-server` and `policy-trainer`, e.g. an earlier commit's), measured in the same
# invocation: the way to tell a change in our speed from a change in the host's.
set -euo pipefail
cd "$(dirname "$0")/../.."
n=${1:-16}
mb=${2:-4}
torch_py=${TORCH_PY:-/tmp/torchvenv/bin/python}
peft_py=${PEFT_PY:-$torch_py}
lora_rank=${LORA_RANK:-16}
hf=${SMOLLM2_HF:-/tmp/smollm2-hf}
data=${HH_FILE:-../shared/data/hh/harmless-base/test.jsonl.gz}
gguf=$(deploy/fetch-model.sh)
cargo build --quiet --release --locked -p ref-server -p policy-trainer
bin=${CARGO_TARGET_DIR:-target}/release
work=$(mktemp -d)
server_pid=""
cleanup() {
  [[ -n $server_pid ]] && pkill -TERM -P "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

# The first N single-turn pairs, exactly as the baselines pick them.
python3 - "$data" "$n" "$work/pairs.jsonl" <<'PY'
import gzip, json, sys
data, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rows = []
for line in gzip.open(data, "rt"):
    d = json.loads(line); c, r = d["chosen"], d["rejected"]
    if all(s.count("\n\nHuman:") == 1 and s.count("\n\nAssistant:") == 1 for s in (c, r)):
        ins = c.split("\n\nHuman:")[1].split("\n\nAssistant:")[0].strip()
        rows.append(dict(prompt=ins, chosen=c.split("\n\nAssistant:")[1].strip(),
                         rejected=r.split("\n\nAssistant:")[1].strip()))
    if len(rows) == n:
        break
with open(out, "w") as f:
    for r in rows:
        f.write(json.dumps(r) + "\n")
PY

# One run of ours: a fresh server (no cached reference scores) and one optimizer step over
# all N pairs. Prints a JSON line. `ours MICRO [BIN NAME [TRAINER_ARGS...]]`: another build's
# binaries, or more trainer flags (the LoRA rows).
ours() {
  local micro=$1 run_bin=${2:-$bin} name=${3:-ours} dir=$work/run-${3:-ours}-$1
  shift $(( $# < 3 ? $# : 3 ))
  mkdir -p "$dir"
  /usr/bin/time -f '%M' -o "$dir/server.rss" \
    "$run_bin/ref-server" serve --model "$gguf" --listen 127.0.0.1:0 >"$dir/server.out" 2>"$dir/server.log" &
  server_pid=$!
  local addr="" tries=0
  until [[ -n $addr ]]; do
    (( ++tries <= 300 )) || { echo "no 'listening on' line within 60 s" >&2; cat "$dir/server.log" >&2; return 1; }
    sleep 0.2; addr=$(sed -n 's/^listening on //p' "$dir/server.out")
  done
  # This build's health check waits for either build's server.
  "$bin/ref-server" health --server "http://$addr" --wait 600 --server-pid "$server_pid" >/dev/null \
    || { cat "$dir/server.log" >&2; return 1; }
  /usr/bin/time -f '%M' -o "$dir/trainer.rss" \
    "$run_bin/policy-trainer" train --model "$gguf" --ref-server "http://$addr" --data "$work/pairs.jsonl" \
      --out "$dir/out" --val-size 0 --batch-size "$n" --micro-batch "$micro" --max-steps 1 \
      --max-length 512 --length-policy drop --lr 1e-6 --no-progress "$@" 2>"$dir/trainer.log" >/dev/null \
    || { echo "the trainer failed (micro-batch $micro):" >&2; tail -n 20 "$dir/trainer.log" >&2; return 1; }
  # $server_pid is /usr/bin/time; the server is its child (time writes the RSS once it exits).
  pkill -TERM -P "$server_pid"; wait "$server_pid" || true; server_pid=""
  python3 - "$dir" "$micro" "$name" <<'PY'
import json, sys
d, micro, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rec = [json.loads(l) for l in open(f"{d}/out/metrics.jsonl") if '"train"' in l][0]
# /usr/bin/time may prefix a "Command exited" line; the RSS (KiB) is the last line.
rss = lambda f: int(open(f).read().split()[-1]) / 1024
print(json.dumps(dict(measure=f"{name}_mb{micro}", examples=rec["examples_seen"],
      examples_per_s=round(rec["examples_per_second"], 3), first_loss=rec["loss"],
      trainer_rss_mib=round(rss(f"{d}/trainer.rss")), server_rss_mib=round(rss(f"{d}/server.rss")))))
PY
}

echo "running ours (micro-batch 1, then $mb; full fine-tuning, then LoRA r=$lora_rank)..." >&2
{
  ours 1
  ours "$mb"
  if (( lora_rank > 0 )); then
    ours 1 "$bin" lora --lora-rank "$lora_rank"
    ours "$mb" "$bin" lora --lora-rank "$lora_rank"
  fi
  if [[ -n ${BASELINE_BIN:-} ]]; then
    ours 1 "$BASELINE_BIN" baseline
    ours "$mb" "$BASELINE_BIN" baseline
  fi
} | tee "$work/ours.jsonl" >&2
echo "running the PyTorch loop..." >&2
"$torch_py" ../shared/bench/torch_baseline.py "$hf" "$data" "$n" 2>/dev/null | tee "$work/torch.jsonl" >&2
echo "running TRL's DPOTrainer..." >&2
"$torch_py" ../shared/bench/trl_baseline.py "$hf" "$data" "$n" 2>/dev/null | tail -n 1 | tee "$work/trl.jsonl" >&2
if (( lora_rank > 0 )); then
  echo "running TRL's DPOTrainer with PEFT LoRA r=$lora_rank..." >&2
  "$peft_py" tests/bench/trl_peft_baseline.py "$hf" "$data" "$n" "$lora_rank" 2>/dev/null | tail -n 1 \
    | tee "$work/trl_peft.jsonl" >&2
fi

python3 - "$work" "$mb" "$lora_rank" <<'PY'
import json, os, sys
w, mb, rank = sys.argv[1], sys.argv[2], sys.argv[3]
ours = {d["measure"]: d for d in map(json.loads, open(f"{w}/ours.jsonl"))}
torch = {d["measure"]: d for d in map(json.loads, open(f"{w}/torch.jsonl"))}["dpo_step_single_process_bs1"]
trl = json.loads(open(f"{w}/trl.jsonl").read())
trl_peft = json.loads(open(f"{w}/trl_peft.jsonl").read()) if os.path.exists(f"{w}/trl_peft.jsonl") else None
print(f"\nOne DPO step over {torch['examples']} single-turn HH pairs (harmless-base test), SmolLM2-135M-Instruct, f32, 2 threads")
print("'vs TRL' compares full fine-tuning with TRL's DPOTrainer and LoRA with TRL's DPOTrainer + PEFT (same LoRA config);")
print("'trainer RSS vs TRL' likewise (TRL's one process holds policy and reference; our reference is the server's)")
print(f"| {'run':<40} | {'examples/s':>10} | {'vs PyTorch':>10} | {'vs TRL':>7} | {'trainer + server RSS MiB':>24} | {'trainer RSS vs TRL':>18} |")
print(f"|{'-'*42}|{'-'*12}|{'-'*12}|{'-'*9}|{'-'*26}|{'-'*20}|")
def row(name, eps, rss, rss_alone, against):
    vs = f"{eps / against['examples_per_s']:>6.2f}x" if against else f"{'-':>7}"
    vs_rss = f"{rss_alone / against['peak_rss_mib']:>17.2f}x" if against else f"{'-':>18}"
    print(f"| {name:<40} | {eps:>10.3f} | {eps / torch['examples_per_s']:>9.2f}x | {vs} | {rss:>24} | {vs_rss} |")
for who, label, against in (("ours", "ours", trl), ("baseline", "baseline build", trl),
                            ("lora", f"ours, LoRA r={rank}", trl_peft)):
    for m in (f"{who}_mb1", f"{who}_mb{mb}"):
        if m not in ours:
            continue
        o = ours[m]
        row(f"{label}, micro-batch {m.rsplit('_mb', 1)[1]}", o["examples_per_s"],
            f"{o['trainer_rss_mib']} + {o['server_rss_mib']}", o["trainer_rss_mib"], against)
row("PyTorch loop (ref + policy, one process)", torch["examples_per_s"], f"{torch['peak_rss_mib']}", torch["peak_rss_mib"], trl)
row("TRL DPOTrainer", trl["examples_per_s"], f"{trl['peak_rss_mib']}", trl["peak_rss_mib"], trl)
if trl_peft:
    row(f"TRL DPOTrainer + PEFT LoRA r={rank}", trl_peft["examples_per_s"], f"{trl_peft['peak_rss_mib']}",
        trl_peft["peak_rss_mib"], trl_peft)
    ratio = ours["lora_mb1"]["examples_per_s"] / ours["ours_mb1"]["examples_per_s"]
    print(f"\nLoRA r={rank} against our full fine-tuning, micro-batch 1: {ratio:.2f}x the examples/s")
first = {k: v["first_loss"] for k, v in ours.items()}
print(f"first loss: ours {first}, PyTorch {torch['first_loss']}, TRL {trl['log'][0]['loss']}"
      + (f", TRL + PEFT {trl_peft['log'][0]['loss']}" if trl_peft else "") + " (ln 2 = 0.693147)")
PY
