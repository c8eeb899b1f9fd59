#!/usr/bin/env python3
"""Checks a short DPO run from its metrics.jsonl: the step-0 validation loss is ln 2.

At step 0 the policy is the reference, so every pair's margin is 0 and the DPO loss is
exactly ln 2. Here both models run in bf16 and are batched differently (the server's
batches vs the trainer's passes): their log-probs agree to about 0.1 nat, which β = 0.1
turns into about 1e-3 of loss; allowed: 1e-2. The run must also have made STEPS optimizer
steps. With `--adapter DIR` (a LoRA run's best/ or last/; repeatable, the first that
exists is read) the run must have saved a PEFT adapter there whose tensors are all f32 (the
adapters of a bf16 base are kept in f32) and which records its base (adapter_base.json).
Prints one line, `PASS|FAIL<TAB>measure`, and exits 0 either way (the line says which), 2
if a file cannot be read.

    python3 deploy/gpu/check_dpo_run.py RUN/metrics.jsonl STEPS [--adapter RUN/best ...]
"""

import argparse
import json
import math
import os
import struct

LOSS_TOLERANCE = 1e-2


def adapter_check(dirs: list[str]) -> tuple[bool, str]:
    """(ok, description) of the first adapter directory of `dirs` that exists."""
    for d in dirs:
        weights = os.path.join(d, "adapter_model.safetensors")
        if not os.path.exists(weights):
            continue
        with open(weights, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        dtypes = sorted({v["dtype"] for k, v in header.items() if k != "__metadata__"})
        has_base = os.path.exists(os.path.join(d, "adapter_base.json"))
        ok = dtypes == ["F32"] and has_base
        tensors = len(header) - ("__metadata__" in header)
        return ok, (f"adapter {os.path.basename(d)}/: {tensors} tensors, {'/'.join(dtypes)}"
                    + ("" if has_base else ", no adapter_base.json"))
    return False, "no adapter saved in " + " or ".join(dirs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("metrics", help="the run's metrics.jsonl")
    parser.add_argument("steps", type=int, help="optimizer steps the run was given")
    parser.add_argument("--adapter", action="append", default=[],
                        help="a LoRA run's adapter directory to check (repeatable)")
    args = parser.parse_args()

    with open(args.metrics) as f:
        lines = [json.loads(line) for line in f]
    evals = [m for m in lines if m.get("kind") == "eval"]
    train = [m for m in lines if m.get("kind") == "train"]
    first = evals[0]["loss"] if evals and evals[0]["step"] == 0 else float("nan")
    ok = abs(first - math.log(2)) < LOSS_TOLERANCE and len(train) == args.steps
    adapter = ""
    if args.adapter:
        adapter_ok, desc = adapter_check(args.adapter)
        ok, adapter = ok and adapter_ok, f"; {desc}"
    last = evals[-1] if evals else {}
    pairs_per_s = sum(t["examples_per_second"] for t in train) / max(len(train), 1)
    nan = float("nan")
    print(
        ("PASS" if ok else "FAIL") + "\t"
        f"{len(train)} steps; step-0 loss {first:.6f} (ln 2 = {math.log(2):.6f}); final val loss "
        f"{last.get('loss', nan):.4f}, reward acc {last.get('reward_accuracy', nan):.3f}; "
        f"{pairs_per_s:.1f} pairs/s{adapter}"
    )


if __name__ == "__main__":
    main()
