#!/usr/bin/env python3
"""Step time, throughput and MFU of a timed training run, from its metrics and log.

Reads the trainer's metrics.jsonl (one "train" line per optimizer step), the model's
config.json and the trainer's log (its memory plan: the row layout and the predicted
total), and prints `key value` lines:

    step_s, layout, steps, tokens, tok_s, mfu, achieved_tflops, predicted_gib, measured_gib

The step time is the median over steps 2 onwards: step 1 includes warm-up (kernel
compilation, allocator growth). MFU counts the model FLOPs of what the code computes:
decoder matmuls on every token of a row, the output head on response tokens only, and
attention scores and values over the full row (QKᵀ and AV, T×T); a forward+backward is 3×
the forward's 2 FLOPs per weight use. Its denominator is the bf16 matmul rate measured on
the same device (`gpu_tools matmul`), the step time includes the optimizer.

    python3 deploy/gpu/step_report.py --metrics RUN/metrics.jsonl --config MODEL/config.json \
        --log TRAINER.log --tflops 700 --batch 8 --response-tokens 255 \
        --peak-bytes 60000000000 --sequence-tokens 512
"""

from __future__ import annotations

import argparse
import json
import re
import statistics


def row_layout(log: str, sequence_tokens: int) -> tuple[int, int, str]:
    """(rows per pair, tokens per row, description) from the trainer's memory line.

    One row per pair (the prompt once, then chosen and rejected, each attending to the
    prompt and itself) or two sequences (prompt + response each). Neither line: one token
    per character, no BOS, EOS appended, two sequences of `sequence_tokens`.
    """
    m = re.search(r"micro-batch \d+ of (\d+)-token pair rows", log)
    if m:
        return 1, int(m.group(1)), f"one {m.group(1)}-token row per pair, the prompt once"
    m = re.search(r"micro-batch \d+ of (\d+)-token pairs", log)
    seq = int(m.group(1)) if m else sequence_tokens
    return 2, seq, f"2 sequences of {seq} per pair"


def flops_per_pair(config: dict, rows: int, row_len: int, response_tokens: int) -> int:
    """Model FLOPs of one pair's policy forward+backward."""
    vocab, hidden = config["vocab_size"], config["hidden_size"]
    inter, layers = config["intermediate_size"], config["num_hidden_layers"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    # q, k, v, o projections and the three SwiGLU matrices: weights used once per token.
    layer = hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
    layer += heads * head_dim * hidden + 3 * hidden * inter
    per_row = 6 * layers * layer * row_len + 12 * layers * heads * head_dim * row_len * row_len
    return rows * per_row + 6 * vocab * hidden * 2 * response_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--metrics", required=True, help="the run's metrics.jsonl")
    parser.add_argument("--config", required=True, help="the policy's config.json")
    parser.add_argument("--log", required=True, help="the trainer's log (stderr)")
    parser.add_argument("--tflops", type=float, required=True, help="measured matmul TFLOP/s")
    parser.add_argument("--batch", type=int, required=True, help="pairs per optimizer step")
    parser.add_argument(
        "--response-tokens", type=int, required=True, help="tokens per response, EOS excluded"
    )
    parser.add_argument("--peak-bytes", type=int, required=True, help="measured peak memory")
    parser.add_argument(
        "--sequence-tokens",
        type=int,
        required=True,
        help="prompt + response tokens of one sequence, if the log names no layout",
    )
    args = parser.parse_args()

    with open(args.metrics) as f:
        train = [json.loads(line) for line in f if '"kind":"train"' in line]
    if not train:
        raise SystemExit(f"no training steps in {args.metrics}")
    seconds = [args.batch / t["examples_per_second"] for t in train]
    step = statistics.median(seconds[1:] if len(seconds) > 1 else seconds)
    with open(args.log) as f:
        log = f.read()
    with open(args.config) as f:
        config = json.load(f)

    rows, row_len, layout = row_layout(log, args.sequence_tokens)
    response = args.response_tokens + 1  # EOS
    flops = flops_per_pair(config, rows, row_len, response) * args.batch
    tokens = rows * row_len * args.batch
    m = re.search(r"total\s+([\d.]+) GiB", log)
    predicted = float(m.group(1)) if m else float("nan")

    print(f"step_s {step:.3f}")
    print(f"layout {layout}")
    print(f"steps {len(train)}")
    print(f"tokens {tokens}")
    print(f"tok_s {tokens / step:.0f}")
    print(f"mfu {100 * flops / step / (args.tflops * 1e12):.2f}")
    print(f"achieved_tflops {flops / step / 1e12:.3g}")
    print(f"predicted_gib {predicted:.2f}")
    print(f"measured_gib {args.peak_bytes / 2**30:.2f}")


if __name__ == "__main__":
    main()
