#!/usr/bin/env bash
# Model-core benchmark: our forward and forward+backward throughput on SmolLM2-135M-Instruct
# beside transformers' on the same examples, in one invocation, printed as ratios.
#
#   tests/bench/model.sh [N_PAIRS]
#
# Needs the PyTorch venv of ../shared/bench/README.md (TORCH_PY, default
# /tmp/torchvenv/bin/python) and the float32 HF conversion of the GGUF (SMOLLM2_HF, default
# /tmp/smollm2-hf; made by ../shared/bench/convert_gguf.py). Run on an otherwise idle machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
n=${1:-16}
torch_py=${TORCH_PY:-/tmp/torchvenv/bin/python}
hf=${SMOLLM2_HF:-/tmp/smollm2-hf}
data=${HH_FILE:-../shared/data/hh/harmless-base/test.jsonl.gz}
gguf=$(deploy/fetch-model.sh)
cargo build --quiet --release -p dpo-common --example bench_model
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
echo "running ours (rust, candle CPU f32)..." >&2
target/release/examples/bench_model "$gguf" "$data" "$n" | tee "$out/ours.jsonl" >&2
echo "running PyTorch baseline..." >&2
"$torch_py" ../shared/bench/torch_baseline.py "$hf" "$data" "$n" 2>/dev/null | tee "$out/torch.jsonl" >&2
python3 - "$out/ours.jsonl" "$out/torch.jsonl" <<'PY'
import json, sys
ours = {d["measure"]: d for d in map(json.loads, open(sys.argv[1]))}
torch = {d["measure"]: d for d in map(json.loads, open(sys.argv[2]))}
t_fwd = torch["score_forward_bs1"]["tokens_per_s"]
t_dpo = torch["dpo_step_single_process_bs1"]
# torch's DPO pass = reference forward + policy forward/backward on the same tokens; its
# policy-only forward+backward rate is that pass minus its forward-only scoring time.
t_fb = t_dpo["tokens"] / (t_dpo["seconds"] - torch["score_forward_bs1"]["seconds"])
# Token rates count every sequence's tokens, prompt included, as torch processes them: with
# the prompt shared, the same log-probs cost fewer tokens of compute.
rows = [
    ("forward, batch 1, weights not packed (tokens/s)", ours["score_forward_bs1_unpacked"]["tokens_per_s"], t_fwd),
    ("forward, batch 1 (tokens/s)", ours["score_forward_bs1"]["tokens_per_s"], t_fwd),
    ("forward, chosen+rejected padded (tokens/s)", ours["score_forward_pair_batch"]["tokens_per_s"], t_fwd),
    ("forward, chosen+rejected shared prompt (tokens/s)", ours["score_forward_pair_shared"]["tokens_per_s"], t_fwd),
    ("forward, batch 1, prefix cache (tokens/s)", ours["score_forward_bs1_prefix_cache"]["tokens_per_s"], t_fwd),
    ("forward, shared prompt + prefix cache (tokens/s)", ours["score_forward_pair_shared_prefix_cache"]["tokens_per_s"], t_fwd),
    ("policy forward+backward, batch 1 (tokens/s)", ours["policy_forward_backward_bs1"]["tokens_per_s"], round(t_fb, 1)),
    ("policy fwd+bwd, shared prompt (tokens/s)", ours["policy_forward_backward_pair_shared"]["tokens_per_s"], round(t_fb, 1)),
    ("policy fwd+bwd, shared prompt + prefix (tokens/s)", ours["policy_forward_backward_pair_shared_prefix"]["tokens_per_s"], round(t_fb, 1)),
    ("DPO pass: ref fwd + policy fwd+bwd (examples/s)", ours["dpo_pass_pair_shared"]["examples_per_s"], t_dpo["examples_per_s"]),
    ("DPO pass, shared prompt + prefix (examples/s)", ours["dpo_pass_pair_shared_prefix"]["examples_per_s"], t_dpo["examples_per_s"]),
]
print(f"\n{ours['score_forward_bs1']['examples']} HH pairs, {ours['score_forward_bs1']['tokens']} tokens")
print(f"| {'measure':<50} | {'ours':>9} | {'PyTorch':>9} | {'ratio':>6} |")
print(f"|{'-'*52}|{'-'*11}|{'-'*11}|{'-'*8}|")
for name, a, b in rows:
    print(f"| {name:<50} | {a:>9} | {b if b is not None else '-':>9} | {f'{a/b:.2f}x' if b else '-':>6} |")
PY
