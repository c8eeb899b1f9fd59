"""Check that a Hugging Face directory (e.g. one our Rust trainer wrote) loads in transformers and reproduces the fixture.

Usage: python check_hf_load.py HF_DIR FIXTURE_JSON

Loads HF_DIR with AutoModelForCausalLM / AutoTokenizer, re-tokenizes every fixture prompt and response
(ids must be equal) and recomputes the response log-prob sums in float32 (must agree within 1e-3
absolute). Prints one line per mismatch and exits 1 if there is any; exits 0 and prints "OK" otherwise.
"""
import json, os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fixture import load, response_logprobs

TOL = 1e-3


def main():
    hf_dir, fixture_path = sys.argv[1:3]
    fx = json.load(open(fixture_path))
    tok, model = load(hf_dir)
    errors, worst = [], 0.0
    for i, ex in enumerate(fx["examples"]):
        prompt_ids = tok(fx["template"].format(instruction=ex["instruction"])).input_ids
        for key in ("chosen", "rejected"):
            want = ex[key]
            response_ids = tok(want["response"], add_special_tokens=False).input_ids + [tok.eos_token_id]
            where = f"example {i} {key}"
            if prompt_ids != want["prompt_ids"]:
                errors.append(f"{where}: prompt_ids differ: got {prompt_ids}, want {want['prompt_ids']}")
            if response_ids != want["response_ids"]:
                errors.append(f"{where}: response_ids differ: got {response_ids}, want {want['response_ids']}")
            # Score the fixture's own ids, so a tokenizer bug does not hide a weights bug (or vice versa).
            got = float(response_logprobs(model, want["prompt_ids"], want["response_ids"]).sum())
            diff = abs(got - want["logprob_sum"])
            worst = max(worst, diff)
            if not diff <= TOL:
                errors.append(f"{where}: logprob_sum {got:.6f} vs fixture {want['logprob_sum']:.6f} (|diff| {diff:.2e} > {TOL})")
    for e in errors:
        print("MISMATCH", e)
    if errors:
        print(f"FAILED: {len(errors)} mismatch(es) for {hf_dir} against {fixture_path}")
        sys.exit(1)
    print(f"OK: {2 * len(fx['examples'])} sequences match (max |logprob_sum diff| {worst:.2e})")


if __name__ == "__main__":
    main()
