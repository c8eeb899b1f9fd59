#!/usr/bin/env bash
# Trainer benchmark: one DPO step (reference log-probs + policy forward/backward over N pairs,
# one RMSprop step) by our two processes (ref-server + policy-trainer, release build, CPU f32)
# at --micro-batch 1 and a larger micro-batch, beside the PyTorch single-process loop and
# TRL's DPOTrainer on the same N single-turn HH pairs, in one invocation. Prints a table of
# examples/s and peak RSS, with ratios against the baselines.
#
#   tests/bench/train.sh [N_PAIRS] [LARGE_MICRO_BATCH]
#
# Needs the PyTorch venv of ../shared/bench/README.md (TORCH_PY, default
# /tmp/torchvenv/bin/python, with transformers and trl) and the float32 HF conversion of the
# GGUF (SMOLLM2_HF, default /tmp/smollm2-hf). Run on an otherwise idle machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
n=${1:-16}
mb=${2:-4}
torch_py=${TORCH_PY:-/tmp/torchvenv/bin/python}
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
# all N pairs. Prints a JSON line.
ours() {
  local micro=$1 dir=$work/run-$1
  mkdir -p "$dir"
  /usr/bin/time -f '%M' -o "$dir/server.rss" \
    "$bin/ref-server" serve --model "$gguf" --listen 127.0.0.1:0 >"$dir/server.out" 2>"$dir/server.log" &
  server_pid=$!
  local addr="" tries=0
  until [[ -n $addr ]]; do
    (( ++tries <= 300 )) || { echo "no 'listening on' line within 60 s" >&2; cat "$dir/server.log" >&2; return 1; }
    sleep 0.2; addr=$(sed -n 's/^listening on //p' "$dir/server.out")
  done
  "$bin/ref-server" health --server "http://$addr" --wait 600 --server-pid "$server_pid" >/dev/null \
    || { cat "$dir/server.log" >&2; return 1; }
  /usr/bin/time -f '%M' -o "$dir/trainer.rss" \
    "$bin/policy-trainer" train --model "$gguf" --ref-server "http://$addr" --data "$work/pairs.jsonl" \
      --out "$dir/out" --val-size 0 --batch-size "$n" --micro-batch "$micro" --max-steps 1 \
      --max-length 512 --length-policy drop --lr 1e-6 --no-progress 2>"$dir/trainer.log" >/dev/null \
    || { echo "the trainer failed (micro-batch $micro):" >&2; tail -n 20 "$dir/trainer.log" >&2; return 1; }
  # $server_pid is /usr/bin/time; the server is its child (time writes the RSS once it exits).
  pkill -TERM -P "$server_pid"; wait "$server_pid" || true; server_pid=""
  python3 - "$dir" "$micro" <<'PY'
import json, sys
d, micro = sys.argv[1], int(sys.argv[2])
rec = [json.loads(l) for l in open(f"{d}/out/metrics.jsonl") if '"train"' in l][0]
# /usr/bin/time may prefix a "Command exited" line; the RSS (KiB) is the last line.
rss = lambda f: int(open(f).read().split()[-1]) / 1024
print(json.dumps(dict(measure=f"ours_mb{micro}", examples=rec["examples_seen"],
      examples_per_s=round(rec["examples_per_second"], 3), first_loss=rec["loss"],
      trainer_rss_mib=round(rss(f"{d}/trainer.rss")), server_rss_mib=round(rss(f"{d}/server.rss")))))
PY
}

echo "running ours (micro-batch 1, then $mb)..." >&2
{ ours 1; ours "$mb"; } | tee "$work/ours.jsonl" >&2
echo "running the PyTorch loop..." >&2
"$torch_py" ../shared/bench/torch_baseline.py "$hf" "$data" "$n" 2>/dev/null | tee "$work/torch.jsonl" >&2
echo "running TRL's DPOTrainer..." >&2
"$torch_py" ../shared/bench/trl_baseline.py "$hf" "$data" "$n" 2>/dev/null | tail -n 1 | tee "$work/trl.jsonl" >&2

python3 - "$work" "$mb" <<'PY'
import json, sys
w, mb = sys.argv[1], sys.argv[2]
ours = {d["measure"]: d for d in map(json.loads, open(f"{w}/ours.jsonl"))}
torch = {d["measure"]: d for d in map(json.loads, open(f"{w}/torch.jsonl"))}["dpo_step_single_process_bs1"]
trl = json.loads(open(f"{w}/trl.jsonl").read())
print(f"\nOne DPO step over {torch['examples']} single-turn HH pairs (harmless-base test), SmolLM2-135M-Instruct, f32, 2 threads")
print(f"| {'run':<44} | {'examples/s':>10} | {'vs PyTorch':>10} | {'vs TRL':>7} | {'peak RSS MiB':>22} |")
print(f"|{'-'*46}|{'-'*12}|{'-'*12}|{'-'*9}|{'-'*24}|")
def row(name, eps, rss):
    print(f"| {name:<44} | {eps:>10.3f} | {eps / torch['examples_per_s']:>9.2f}x | {eps / trl['examples_per_s']:>6.2f}x | {rss:>22} |")
for m in ("ours_mb1", f"ours_mb{mb}"):
    o = ours[m]
    row(f"ours, micro-batch {m[7:]} (server + trainer)", o["examples_per_s"],
        f"{o['trainer_rss_mib']} + {o['server_rss_mib']} (trainer {o['trainer_rss_mib'] / torch['peak_rss_mib']:.2f}x)")
row("PyTorch loop (ref + policy, one process)", torch["examples_per_s"], f"{torch['peak_rss_mib']}")
row("TRL DPOTrainer", trl["examples_per_s"], f"{trl['peak_rss_mib']}")
print(f"\nfirst loss: ours {ours['ours_mb1']['first_loss']:.6f}, PyTorch {torch['first_loss']} (ln 2 = 0.693147)")
PY
