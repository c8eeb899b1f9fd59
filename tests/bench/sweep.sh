#!/usr/bin/env bash
# A β sweep against the reference: three trainers (β 0.05, 0.1, 0.2) over the same 64
# single-turn Anthropic HH harmless-base pairs with SmolLM2-135M-Instruct (the GGUF that
# deploy/fetch-model.sh fetches), run three ways:
#   (a) one after another against one server with a score store,
#   (b) concurrently against one server with a score store,
#   (c) concurrently, each with a private server without a store.
# Prints a markdown table: the reference tokens the servers ran through the model (from
# ModelInfo), the responses computed, store hits and single-flight waits, and the wall
# time of the trainers (servers already SERVING). (a) and (b) must compute each reference
# score once.
#
#   tests/bench/sweep.sh            # about 10 minutes on 2 idle CPU cores
#
# Sizes (environment): STEPS (8), BATCH (8), MICRO (4), BETAS ("0.05 0.1 0.2"), LR (1e-5),
# MAX_LENGTH (128), SEED (0); the pairs are the first STEPS × BATCH single-turn ones. Data:
# HH_DIR ($DPO_SHARED_DATA/hh, default ../shared/data/hh), the directory holding
# harmless-base/$HH_SPLIT.jsonl.gz (HH_SPLIT: test). DPO_BIN_DIR: use the binaries there
# instead of a release build.
set -euo pipefail
cd "$(dirname "$0")/../.."
steps=${STEPS:-8} batch=${BATCH:-8} micro=${MICRO:-4} lr=${LR:-1e-5}
max_length=${MAX_LENGTH:-128} seed=${SEED:-0}
read -ra betas <<<"${BETAS:-0.05 0.1 0.2}"
hh_dir=${HH_DIR:-${DPO_SHARED_DATA:-../shared/data}/hh} hh_split=${HH_SPLIT:-test}
hh_file=$(compgen -G "$hh_dir/harmless-base/$hh_split.jsonl*" | head -n 1) || {
  echo "sweep.sh: no HH file $hh_dir/harmless-base/$hh_split.jsonl.gz; set HH_DIR" >&2
  exit 2
}
pairs=$((steps * batch))

if [[ -n ${DPO_BIN_DIR:-} ]]; then
  bin=$DPO_BIN_DIR
else
  cargo build --quiet --release --locked -p ref-server -p policy-trainer
  bin=${CARGO_TARGET_DIR:-target}/release
fi
model=$(deploy/fetch-model.sh)
work=$(mktemp -d)
server_pids=()
cleanup() {
  local pid
  for pid in "${server_pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

# The first N single-turn pairs, as tests/bench/train.sh picks them.
python3 - "$hh_file" "$pairs" "$work/pairs.jsonl" <<'PY'
import gzip, json, sys
data, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rows = []
for line in (gzip.open(data, "rt") if data.endswith(".gz") else open(data)):
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

# `start_server NAME [FLAGS...]`: a server on an ephemeral port, SERVING; sets $url.
start_server() {
  local name=$1 addr="" tries=0
  shift
  "$bin/ref-server" serve --model "$model" --listen 127.0.0.1:0 "$@" \
    >"$work/$name.server.out" 2>"$work/$name.server.log" &
  server_pids+=($!)
  until [[ -n $addr ]]; do
    (( ++tries <= 300 )) || { echo "no 'listening on' line within 60 s" >&2; cat "$work/$name.server.log" >&2; exit 1; }
    sleep 0.2
    addr=$(sed -n 's/^listening on //p' "$work/$name.server.out")
  done
  url="http://$addr"
  "$bin/ref-server" health --server "$url" --wait 600 --server-pid "${server_pids[-1]}" \
    >/dev/null 2>>"$work/$name.server.log" \
    || { cat "$work/$name.server.log" >&2; exit 1; }
}

stop_servers() {
  local pid
  for pid in "${server_pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  server_pids=()
}

# `train NAME BETA URL`: one run of the sweep.
train() {
  "$bin/policy-trainer" train --model "$model" --data "$work/pairs.jsonl" --out "$work/$1" \
    --ref-server "$3" --beta "$2" --batch-size "$batch" --micro-batch "$micro" \
    --max-steps "$steps" --val-size 0 --lr "$lr" --max-length "$max_length" --seed "$seed" \
    --no-progress >"$work/$1.stdout" 2>"$work/$1.log" \
    || { echo "the run $1 failed:" >&2; tail -n 20 "$work/$1.log" >&2; exit 1; }
}

# `counters URL...`: the servers' score_store counters, summed, as one JSON object.
counters() {
  local u
  for u in "$@"; do "$bin/ref-server" info --server "$u"; done | python3 -c '
import json, sys
text, dec, objs, i = sys.stdin.read(), json.JSONDecoder(), [], 0
while i < len(text):
    if text[i].isspace():
        i += 1; continue
    obj, i = dec.raw_decode(text, i); objs.append(obj["score_store"])
keys = ["forward_tokens", "misses", "hits", "single_flight_waits"]
print(json.dumps({k: sum(o[k] for o in objs) for k in keys}))'
}

# `row LABEL SECONDS COUNTERS_JSON STORE`: one table row.
row() {
  python3 - "$@" <<'PY'
import json, sys
label, seconds, c, store = sys.argv[1], float(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4] == "1"
na = lambda k: f"{c[k]:,}" if store else "–"
print(f"| {label} | {c['forward_tokens']:,} | {c['misses']:,} | {na('hits')} "
      f"| {na('single_flight_waits')} | {seconds:.0f} |")
PY
}

now() { date +%s.%N; }
elapsed() { python3 -c "import sys; print(float(sys.argv[2]) - float(sys.argv[1]))" "$1" "$2"; }

echo "tests/bench/sweep.sh: ${#betas[@]} trainers (β ${betas[*]}) over the same $pairs single-turn HH" \
  "harmless-base $hh_split pairs, --batch-size $batch --micro-batch $micro --max-steps $steps" \
  "--max-length $max_length --lr $lr (SmolLM2-135M-Instruct GGUF, $(nproc) CPU cores, $(date +%F)):"
echo
echo "| sweep | reference forward tokens | responses computed | store hits | single-flight waits | wall time (s) |"
echo "|---|---|---|---|---|---|"

# (a) One after another, one server with a store.
start_server a --score-store "$work/a.redb"
started=$(now)
for beta in "${betas[@]}"; do train "a-$beta" "$beta" "$url"; done
row "(a) one after another, one server with the store" "$(elapsed "$started" "$(now)")" \
  "$(counters "$url")" 1
stop_servers

# (b) Concurrently, one server with a store.
start_server b --score-store "$work/b.redb"
started=$(now) runs=()
for beta in "${betas[@]}"; do train "b-$beta" "$beta" "$url" & runs+=($!); done
for pid in "${runs[@]}"; do wait "$pid"; done
row "(b) concurrently, one server with the store" "$(elapsed "$started" "$(now)")" \
  "$(counters "$url")" 1
stop_servers

# (c) Concurrently, a private server each, no store.
urls=()
for beta in "${betas[@]}"; do start_server "c-$beta"; urls+=("$url"); done
started=$(now) runs=() i=0
for beta in "${betas[@]}"; do train "c-$beta" "$beta" "${urls[$i]}" & runs+=($!); i=$((i + 1)); done
for pid in "${runs[@]}"; do wait "$pid"; done
row "(c) concurrently, a private server each, no store" "$(elapsed "$started" "$(now)")" \
  "$(counters "${urls[@]}")" 0
stop_servers
