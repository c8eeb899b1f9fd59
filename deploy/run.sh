#!/usr/bin/env bash
# Runs DPO end to end: builds the release binaries, fetches the default model once,
# starts ref-server, waits until its health check says SERVING, trains against it, and
# stops the server however the trainer ends (its exit status is this script's).
#
#   deploy/run.sh                                # defaults: SmolLM2-135M-Instruct, the
#                                                #   shipped preference set, CPU, minutes
#   deploy/run.sh --data hh --hh-dir DIR         # Anthropic HH files in DIR
#   deploy/run.sh --data my_pairs.jsonl          # your {"prompt","chosen","rejected"} JSONL
#   deploy/run.sh --model /models/Llama-3.1-8B-Instruct --lr 1e-6 --batch-size 64
#   deploy/run.sh --loss ipo                     # another loss (docs/training.md#losses)
#   deploy/run.sh --loss simpo                   # reference-free: no ref-server is started
#   deploy/run.sh --lora-rank 16 --lr 1e-4       # LoRA: PEFT adapters on a frozen base
#
# Separate hosts (same flags for auth/TLS on both sides):
#   host A:  deploy/run.sh ref --listen 0.0.0.0:50051 --auth-token-file token.txt
#   host B:  deploy/run.sh train --ref-server http://hostA:50051 --auth-token-file token.txt
#
# Flags this script reads (all others go to `policy-trainer train` unchanged):
#   --model PATH          HF directory or .gguf (default: SmolLM2-135M-Instruct from PyPI)
#   --data hh|FILE        HH (with --hh-dir) or a preference JSONL (default: deploy/data/default_prefs.jsonl)
#   --hh-dir DIR          where the HH files are ({subset}/train.jsonl.gz)
#   --out DIR             run directory (default: runs/<date-time>)
#   --ref-device DEV      reference device (default: cuda:0 with DPO_CUDA=1, else cpu)
#   --device DEV          policy device (default: cuda:1 with DPO_CUDA=1, else cpu)
#   --dtype D             f32|bf16|f16 for both models (default f32); --ref-dtype D: server only
#   --listen ADDR:PORT    ref-server address (default 127.0.0.1:0 for `all`, 0.0.0.0:50051 for `ref`)
#   --ref-server URL      (train) the server (a,b,c: replicas; dns:///HOST:PORT); `none`: reference-free
#   --score-store FILE    the server's score store (all: default OUT/score-store.redb); give
#                         runs of a sweep the same FILE to compute reference scores once
#   --loss SPEC           passed on; a reference-free one (simpo, sft) starts no server
#   --auth-token-file F   bearer token file (server and client); or set DPO_AUTH_TOKEN
#   --tls-cert F --tls-key F   (ref) serve TLS;  --tls-ca F  (train) trust this CA
# Environment: DPO_CACHE (model cache, default .cache), DPO_CUDA=1 (build with CUDA),
# DPO_BIN_DIR (use the ref-server/policy-trainer binaries there instead of building),
# CARGO_TARGET_DIR as usual.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

mode=all
case ${1:-} in
  all|ref|train) mode=$1; shift ;;
  -h|--help) sed -n '2,36p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
esac

model="" data="" hh_dir="" out="" ref_device="" device="" listen="" ref_server="" dtype="" ref_dtype="" loss=""
score_store=""
auth_file="" tls_cert="" tls_key="" tls_ca=""
pass=()
need() { [[ $# -ge 2 ]] || { echo "run.sh: $1 needs a value" >&2; exit 2; }; }
while [[ $# -gt 0 ]]; do
  case $1 in
    --model) need "$@"; model=$2; shift 2 ;;
    --data) need "$@"; data=$2; shift 2 ;;
    --hh-dir) need "$@"; hh_dir=$2; shift 2 ;;
    --out) need "$@"; out=$2; shift 2 ;;
    --ref-device) need "$@"; ref_device=$2; shift 2 ;;
    --device) need "$@"; device=$2; shift 2 ;;
    --dtype) need "$@"; dtype=$2; shift 2 ;;
    --ref-dtype) need "$@"; ref_dtype=$2; shift 2 ;;
    --listen) need "$@"; listen=$2; shift 2 ;;
    --ref-server) need "$@"; ref_server=$2; shift 2 ;;
    --score-store) need "$@"; score_store=$2; shift 2 ;;
    --auth-token-file) need "$@"; auth_file=$2; shift 2 ;;
    --tls-cert) need "$@"; tls_cert=$2; shift 2 ;;
    --tls-key) need "$@"; tls_key=$2; shift 2 ;;
    --tls-ca) need "$@"; tls_ca=$2; shift 2 ;;
    # Read (the last one wins, as in the trainer) and passed on.
    --loss) need "$@"; loss=$2; pass+=("$1" "$2"); shift 2 ;;
    --loss=*) loss=${1#--loss=}; pass+=("$1"); shift ;;
    *) pass+=("$1"); shift ;;
  esac
done

features=()
if [[ ${DPO_CUDA:-0} == 1 ]]; then
  features=(--features cuda)
  ref_device=${ref_device:-cuda:0}
  device=${device:-cuda:1}
fi
ref_device=${ref_device:-cpu}
device=${device:-cpu}

if [[ -n ${DPO_BIN_DIR:-} ]]; then
  bin=$DPO_BIN_DIR   # prebuilt binaries (tests, installed copies): no build
else
  echo "run.sh: building the release binaries (first time: several minutes)" >&2
  cargo build --release --locked -p ref-server -p policy-trainer "${features[@]}" >&2
  bin=${CARGO_TARGET_DIR:-$root/target}/release
fi

if [[ -z $model ]]; then
  model=$(deploy/fetch-model.sh)
fi

start_server_args() {
  server_args=(serve --model "$model" --device "$ref_device" --listen "$1")
  [[ -n ${ref_dtype:-$dtype} ]] && server_args+=(--dtype "${ref_dtype:-$dtype}")
  [[ -n $auth_file ]] && server_args+=(--auth-token-file "$auth_file")
  [[ -n $tls_cert ]] && server_args+=(--tls-cert "$tls_cert")
  [[ -n $tls_key ]] && server_args+=(--tls-key "$tls_key")
  [[ -n $score_store ]] && server_args+=(--score-store "$score_store")
  return 0
}

if [[ $mode == ref ]]; then
  start_server_args "${listen:-0.0.0.0:50051}"
  exec "$bin/ref-server" "${server_args[@]}" "${pass[@]}"
fi

# Training data.
data_args=()
if [[ $data == hh ]]; then
  if [[ -z $hh_dir ]]; then
    echo "run.sh: --data hh needs --hh-dir DIR (the directory holding harmless-base/, helpful-base/, ...)" >&2
    exit 2
  fi
  if ! compgen -G "$hh_dir/*/train.jsonl*" >/dev/null; then
    cat >&2 <<EOF
run.sh: no Anthropic HH files in $hh_dir.
  Expected {subset}/train.jsonl.gz for harmless-base, helpful-base, helpful-online and
  helpful-rejection-sampled, as in the official dataset Anthropic/hh-rlhf:
    https://huggingface.co/datasets/Anthropic/hh-rlhf  (or github.com/anthropics/hh-rlhf)
  e.g.  git clone https://huggingface.co/datasets/Anthropic/hh-rlhf $hh_dir
EOF
    exit 2
  fi
  data_args=(--hh-dir "$hh_dir")
elif [[ -n $data ]]; then
  data_args=(--data "$data")
else
  # The shipped set trains visibly in minutes on a CPU; these defaults size the run for it
  # (any of them can be overridden on the command line: later flags win).
  data_args=(--data deploy/data/default_prefs.jsonl
    --batch-size 8 --micro-batch 4 --lr 1e-5 --val-size 64 --eval-every 4 --max-steps 20
    --max-length 128)
fi
out=${out:-runs/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"

train_args=(train --model "$model" --out "$out" --device "$device" "${data_args[@]}")
[[ -n $dtype ]] && train_args+=(--dtype "$dtype")
[[ -n $auth_file ]] && train_args+=(--auth-token-file "$auth_file")
[[ -n $tls_ca ]] && train_args+=(--tls-ca "$tls_ca")

# Whether --loss reads no reference: every term (NAME or NAME:WEIGHT) is simpo or sft. The
# trainer checks the spec itself; this only decides whether a server is needed.
reference_free() {
  local term name terms
  [[ -n $loss ]] || return 1
  IFS=, read -ra terms <<<"$loss"
  for term in "${terms[@]}"; do
    name=${term%%:*}
    name=${name//[[:space:]]/}
    [[ $name == simpo || $name == sft ]] || return 1
  done
}
if [[ -z $ref_server ]] && reference_free; then
  ref_server=none
fi

if [[ $mode == train ]]; then
  [[ -n $ref_server ]] || { echo "run.sh train: --ref-server URL is required" >&2; exit 2; }
  exec "$bin/policy-trainer" "${train_args[@]}" --ref-server "$ref_server" "${pass[@]}"
fi

if [[ $ref_server == none ]]; then
  echo "run.sh: --loss ${loss:-sigmoid} without a reference: no ref-server; training (outputs in $out)" >&2
  exec "$bin/policy-trainer" "${train_args[@]}" --ref-server none "${pass[@]}"
fi

# mode all: our own server on an ephemeral loopback port, keeping its scores in the run
# directory unless told where.
score_store=${score_store:-$out/score-store.redb}
start_server_args "${listen:-127.0.0.1:0}"
server_out="$out/ref-server.stdout"
server_log="$out/ref-server.log"
"$bin/ref-server" "${server_args[@]}" >"$server_out" 2>"$server_log" &
server_pid=$!
trainer_pid=""
# However the script ends (trainer done or failed, Ctrl-C, kill), nothing it started
# outlives it. Both children run in the background and the script `wait`s on them, so a
# signal is handled at once instead of after the trainer finishes.
stop_children() {
  # A second Ctrl-C or kill during clean-up must not cut it short and orphan the server.
  trap '' INT TERM
  local pids=() pid
  for pid in $trainer_pid $server_pid; do
    kill -0 "$pid" 2>/dev/null && pids+=("$pid") && kill -TERM "$pid" 2>/dev/null
  done
  # The server finishes in-flight requests first; give it 30 s, then force it.
  for _ in $(seq 1 60); do
    local alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [[ $alive == 0 ]] && break
    sleep 0.5
  done
  for pid in "${pids[@]}"; do
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
}
trap stop_children EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

echo "run.sh: starting ref-server on $ref_device (log: $server_log)" >&2
addr=""
for _ in $(seq 1 600); do
  if ! kill -0 "$server_pid" 2>/dev/null; then
    echo "run.sh: ref-server exited during start-up; its log ($server_log):" >&2
    tail -n 20 "$server_log" >&2
    exit 1
  fi
  addr=$(sed -n 's/^listening on //p' "$server_out" | head -n 1)
  [[ -n $addr ]] && break
  sleep 0.5
done
[[ -n $addr ]] || { echo "run.sh: ref-server did not start within 5 minutes (log: $server_log)" >&2; exit 1; }
scheme=http
[[ -n $tls_cert ]] && scheme=https
url="$scheme://$addr"
# Waits for the model to load; gives up early if the server exits (a model that fails to
# load), and after an hour in any case.
health_args=(health --server "$url" --wait 3600 --server-pid "$server_pid")
[[ -n $tls_ca ]] && health_args+=(--tls-ca "$tls_ca")
if ! "$bin/ref-server" "${health_args[@]}" >/dev/null; then
  echo "run.sh: ref-server did not become SERVING; its log ($server_log):" >&2
  tail -n 20 "$server_log" >&2
  exit 1
fi
echo "run.sh: ref-server SERVING at $url; training (outputs in $out)" >&2

"$bin/policy-trainer" "${train_args[@]}" --ref-server "$url" "${pass[@]}" &
trainer_pid=$!
status=0
wait "$trainer_pid" || status=$?
trainer_pid=""
exit "$status"
