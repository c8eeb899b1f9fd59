#!/usr/bin/env python3
"""Writes synthetic preference pairs of fixed length, for timing training steps.

Each line is {"prompt", "chosen", "rejected"} of random lowercase letters: PROMPT_CHARS
for the prompt, RESPONSE_CHARS for each response. With Llama 3's tokenizer and the raw
template that is one token per character, so every pair has the same token count. The
content is meaningless on purpose: only the shapes matter. Seeded, so reproducible.

    python3 deploy/gpu/make_pairs.py OUT.jsonl PROMPT_CHARS RESPONSE_CHARS COUNT
"""

import argparse
import json
import random
import string


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="the JSONL file to write")
    parser.add_argument("prompt_chars", type=int)
    parser.add_argument("response_chars", type=int)
    parser.add_argument("count", type=int, help="number of pairs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = random.Random(args.seed)

    def text(k: int) -> str:
        return "".join(rng.choice(string.ascii_lowercase) for _ in range(k))

    with open(args.out, "w") as f:
        for _ in range(args.count):
            pair = {
                "prompt": text(args.prompt_chars),
                "chosen": text(args.response_chars),
                "rejected": text(args.response_chars),
            }
            f.write(json.dumps(pair) + "\n")


if __name__ == "__main__":
    main()
