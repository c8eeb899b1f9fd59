#!/usr/bin/env bash
# Every preference loss on the same footing: SmolLM2-135M-Instruct (the GGUF that
# deploy/fetch-model.sh fetches), the same preference pairs (single-turn Anthropic HH
# harmless-base), the same split, steps and
# optimizer, one reference server (and one reference cache) shared by all reference-based
# runs; SimPO runs with no server. Prints a markdown table: the loss, the flags that select
# it, the validation reward accuracy and margin at the end, and the validation loss at step 0
# (policy = reference) and at the end.
#
#   tests/bench/losses.sh                 # every row (about 30 minutes on 2 idle CPU cores)
#   tests/bench/losses.sh ipo simpo       # only these rows (by the name in the first column)
#
# Sizes (environment): STEPS (20), BATCH (8), MICRO (4), VAL (64), LR (1e-5),
# MAX_LENGTH (128), SEED (0). Data: HH_DIR ($DPO_SHARED_DATA/hh, default ../shared/data/hh),
# the directory holding harmless-base/{train,test}.jsonl.gz, split HH_SPLIT (test: the file
# at hand offline); or DATA=FILE.jsonl, any preference JSONL (e.g. the shipped
# deploy/data/default_prefs.jsonl). DPO_BIN_DIR: use the binaries there instead of a release
# build.
set -euo pipefail
cd "$(dirname "$0")/../.."
steps=${STEPS:-20} batch=${BATCH:-8} micro=${MICRO:-4} val=${VAL:-64} lr=${LR:-1e-5}
max_length=${MAX_LENGTH:-128} seed=${SEED:-0}
hh_dir=${HH_DIR:-${DPO_SHARED_DATA:-../shared/data}/hh} hh_split=${HH_SPLIT:-test}
if [[ -n ${DATA:-} ]]; then
  data_args=(--data "$DATA") data_name=$DATA
elif compgen -G "$hh_dir/harmless-base/$hh_split.jsonl*" >/dev/null; then
  data_args=(--hh-dir "$hh_dir" --hh-subsets harmless-base --hh-split "$hh_split")
  data_name="HH harmless-base $hh_split (single-turn pairs)"
else
  echo "losses.sh: no HH file $hh_dir/harmless-base/$hh_split.jsonl.gz; set HH_DIR, or DATA=FILE.jsonl" >&2
  exit 2
fi

# name | the flags that select the loss (β 0.1 unless given). `none`-reference rows are the
# reference-free ones.
rows=(
  "sigmoid|--loss sigmoid"
  "sigmoid ε=0.1|--loss sigmoid --label-smoothing 0.1"
  "robust|--loss robust --label-smoothing 0.1"
  "ipo|--loss ipo"
  "hinge|--loss hinge"
  "exo_pair|--loss exo_pair --label-smoothing 1e-3"
  "nca_pair|--loss nca_pair"
  "bco_pair|--loss bco_pair"
  "sppo_hard|--loss sppo_hard"
  "aot|--loss aot"
  "aot_unpaired|--loss aot_unpaired"
  "apo_zero|--loss apo_zero"
  "apo_down|--loss apo_down"
  "discopop|--loss discopop"
  "sigmoid_norm|--loss sigmoid_norm"
  "rpo|--loss sigmoid --sft-weight 0.5"
  "simpo|--loss simpo --beta 2 --gamma-beta-ratio 0.5 --ref-server none"
  "sigmoid, LoRA r=16|--loss sigmoid --lora-rank 16"
  "sigmoid, LoRA r=16, lr 1e-4|--loss sigmoid --lora-rank 16 --lr 1e-4"
)
if [[ $# -gt 0 ]]; then
  picked=()
  for want in "$@"; do
    found=""
    for row in "${rows[@]}"; do
      [[ ${row%%|*} == "$want" ]] && picked+=("$row") && found=1
    done
    [[ -n $found ]] || { echo "losses.sh: no row named '$want'" >&2; exit 2; }
  done
  rows=("${picked[@]}")
fi

if [[ -n ${DPO_BIN_DIR:-} ]]; then
  bin=$DPO_BIN_DIR
else
  cargo build --quiet --release --locked -p ref-server -p policy-trainer
  bin=${CARGO_TARGET_DIR:-target}/release
fi
model=$(deploy/fetch-model.sh)
work=$(mktemp -d)
server_pid=""
cleanup() {
  if [[ -n $server_pid ]]; then
    kill -TERM "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

needs_server=""
for row in "${rows[@]}"; do
  [[ ${row#*|} == *"--ref-server none"* ]] || needs_server=1
done
url=none
if [[ -n $needs_server ]]; then
  "$bin/ref-server" serve --model "$model" --listen 127.0.0.1:0 >"$work/server.out" 2>"$work/server.log" &
  server_pid=$!
  addr="" tries=0
  until [[ -n $addr ]]; do
    (( ++tries <= 300 )) || { echo "no 'listening on' line within 60 s" >&2; cat "$work/server.log" >&2; exit 1; }
    sleep 0.2
    addr=$(sed -n 's/^listening on //p' "$work/server.out")
  done
  url="http://$addr"
  "$bin/ref-server" health --server "$url" --wait 600 --server-pid "$server_pid" >/dev/null \
    || { cat "$work/server.log" >&2; exit 1; }
fi

common=(--model "$model" "${data_args[@]}" --batch-size "$batch" --micro-batch "$micro"
  --val-size "$val" --lr "$lr" --max-length "$max_length" --max-steps "$steps"
  --eval-every "$steps" --seed "$seed" --no-progress)
echo "policy-trainer train ${data_args[*]} --batch-size $batch --micro-batch $micro --val-size $val" \
  "--lr $lr --max-length $max_length --max-steps $steps --seed $seed ($data_name," \
  "SmolLM2-135M-Instruct GGUF, $(date +%F)); each row adds its flags:"
echo
echo "| loss | flags | val reward accuracy | val margin | val loss at step 0 | val loss at step $steps | minutes |"
echo "|---|---|---|---|---|---|---|"
i=0
for row in "${rows[@]}"; do
  name=${row%%|*} flags=${row#*|}
  i=$((i + 1))
  out=$work/run-$i
  read -ra extra <<<"$flags"
  reference=(--ref-server "$url" --ref-cache "$work/ref_cache.jsonl")
  [[ $flags == *"--ref-server none"* ]] && reference=()
  started=$SECONDS
  if ! "$bin/policy-trainer" train "${common[@]}" --out "$out" "${reference[@]}" "${extra[@]}" \
      >"$work/run-$i.stdout" 2>"$work/run-$i.log"; then
    echo "| $name | \`$flags\` | failed: $(tail -n 1 "$work/run-$i.log") | | | | |"
    continue
  fi
  python3 - "$out/metrics.jsonl" "$name" "$flags" "$(( SECONDS - started ))" <<'PY'
import json, sys
path, name, flags, seconds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
evals = [r for r in map(json.loads, open(path)) if r["kind"] == "eval"]
first, last = evals[0], evals[-1]
print(f"| {name} | `{flags}` | {last['reward_accuracy']:.3f} | {last['margin']:+.4f} "
      f"| {first['loss']:.4f} | {last['loss']:.4f} | {seconds / 60:.1f} |")
PY
done
