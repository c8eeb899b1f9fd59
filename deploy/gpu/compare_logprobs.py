#!/usr/bin/env python3
"""Compares response log-probs scored on the GPU with the CPU's f32 values.

Reads WORK/scores-DEVICE-DTYPE.jsonl, as `ref-server score --output` writes them for
preference pairs (chosen_logprob, chosen_tokens, rejected_logprob, rejected_tokens), for
cpu f32 (the reference), cpu bf16, DEVICE f32 and DEVICE bf16, and prints one line per
comparison:

    RESULT<TAB>what<TAB>PASS|FAIL|info<TAB>measure

Tolerances: f32 on two devices differs by summation order only, so within 1e-2 nats.
bf16 rounds the weights and activations: on a CPU (SmolLM2, 16 pairs) it moves a
response's summed log-prob by up to about 0.11·√tokens nats from f32, so a GPU's bf16 is
allowed 0.25·√tokens. The CPU's own bf16 line is information (no tolerance). Token counts
must agree exactly. Exit status 1 if any comparison with a tolerance fails.

    python3 deploy/gpu/compare_logprobs.py WORK DEVICE
"""

from __future__ import annotations

import argparse
import json
import math
import sys

F32_TOLERANCE = 1e-2
BF16_TOLERANCE_PER_SQRT_TOKEN = 0.25


def load(work: str, device: str, dtype: str) -> list[dict]:
    with open(f"{work}/scores-{device}-{dtype}.jsonl") as f:
        return [json.loads(line) for line in f]


def compare(ref: list[dict], got: list[dict], tolerance: str | None) -> tuple[bool, float, float]:
    """Whether `got` is within tolerance of `ref`, the largest |Δ| and |Δ|/√tokens."""
    worst, worst_scaled, ok = 0.0, 0.0, len(got) == len(ref)
    for a, b in zip(ref, got):
        for k in ("chosen", "rejected"):
            n = a[k + "_tokens"]
            ok &= b[k + "_tokens"] == n
            diff = abs(a[k + "_logprob"] - b[k + "_logprob"])
            worst = max(worst, diff)
            worst_scaled = max(worst_scaled, diff / math.sqrt(n))
            if tolerance == "f32":
                ok &= diff <= F32_TOLERANCE
            elif tolerance == "bf16":
                ok &= diff <= BF16_TOLERANCE_PER_SQRT_TOKEN * math.sqrt(n)
    return ok, worst, worst_scaled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("work", help="directory holding the scores-*.jsonl files")
    parser.add_argument("device", help="the device compared with the CPU, e.g. cuda:0")
    args = parser.parse_args()

    ref = load(args.work, "cpu", "f32")
    limits = {"f32": "tol 1e-2", "bf16": "tol 0.25·√n", None: "bf16's own effect"}
    all_ok = True
    for device, dtype, tolerance in [
        ("cpu", "bf16", None),
        (args.device, "f32", "f32"),
        (args.device, "bf16", "bf16"),
    ]:
        ok, worst, scaled = compare(ref, load(args.work, device, dtype), tolerance)
        status = "info" if tolerance is None else ("PASS" if ok else "FAIL")
        all_ok &= ok or tolerance is None
        print(
            f"RESULT\t{device} {dtype} vs cpu f32\t{status}\tmax |Δ| {worst:.2e} nats, "
            f"max |Δ|/√n {scaled:.3f} over {2 * len(ref)} responses ({limits[tolerance]})"
        )
    sys.exit(0 if all_ok else 1)


if __name__ == "__main__":
    main()
