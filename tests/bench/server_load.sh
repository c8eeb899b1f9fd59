#!/usr/bin/env bash
# Load benchmark of ref-server (not a test): starts the release server on an ephemeral
# loopback port with SmolLM2 (the GGUF from deploy/fetch-model.sh), waits for SERVING,
# and runs ref-server/examples/server_load.rs: N concurrent gRPC clients scoring
# single-turn HH pairs vs the same requests in-process (the gRPC overhead), plus a batch-1
# direct pass comparable with ../shared/bench/torch_baseline.py, which is run too when
# a Python with torch is found (TORCH_PYTHON, default python3) and HF_DIR points at the
# converted model (see ../shared/bench/README.md).
#
#   tests/bench/server_load.sh [--pairs 64] [--clients 4] [--pairs-per-request 4]
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
model=${SMOLLM2_GGUF:-$(deploy/fetch-model.sh)}
hh=${HH_FILE:-${DPO_SHARED_DATA:-$root/../shared/data}/hh/harmless-base/test.jsonl.gz}
cargo build --release -q -p ref-server --bin ref-server --example server_load >&2
bin=${CARGO_TARGET_DIR:-$root/target}/release
work=$(mktemp -d)
"$bin/ref-server" serve --model "$model" --listen 127.0.0.1:0 >"$work/out" 2>"$work/log" &
pid=$!
trap 'kill -TERM $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$work"' EXIT
addr=""
for _ in $(seq 600); do
  addr=$(sed -n 's/^listening on //p' "$work/out")
  [[ -n $addr ]] && break
  kill -0 $pid 2>/dev/null || { cat "$work/log" >&2; exit 1; }
  sleep 0.1
done
[[ -n $addr ]] || { echo "no 'listening on' line within 60 s" >&2; cat "$work/log" >&2; exit 1; }
"$bin/ref-server" health --server "http://$addr" --wait 600 --server-pid $pid >/dev/null \
  || { cat "$work/log" >&2; exit 1; }
"$bin/examples/server_load" --server "http://$addr" --model "$model" --hh "$hh" "$@"

py=${TORCH_PYTHON:-python3}
if [[ -n ${HF_DIR:-} ]] && "$py" -c 'import torch, transformers' 2>/dev/null; then
  echo
  echo "torch_baseline.py (batch 1, f32, 2 threads):"
  "$py" "$root/../shared/bench/torch_baseline.py" "$HF_DIR" "$hh" 16 | head -n 1
else
  echo
  echo "(torch_baseline.py skipped: set HF_DIR to the converted model and TORCH_PYTHON to a python with torch)"
fi
