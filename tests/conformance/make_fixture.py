"""Write the log-prob conformance fixture that the Rust scorer is checked against.

Usage: python make_fixture.py HF_DIR HH_JSONL_GZ OUT_JSON [N]

Takes the first N (default 6) single-turn pairs of an Anthropic HH file, formats the prompt with the
Alpaca template, tokenizes as TRL does (prompt with the tokenizer's own special tokens; response
without them, plus EOS) and records, for chosen and rejected, the ids and the float32 log-probs of
the response tokens under the transformers model (eval, no_grad). As a sanity check the same numbers
are recomputed in one right-padded batch and must agree within 1e-4.
check_hf_load.py reuses the functions here.
"""
import gzip, json, sys
import torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

TEMPLATE = ("Below is an instruction that describes a task. Write a response that appropriately completes "
            "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
H, A = "\n\nHuman:", "\n\nAssistant:"


def single_turn_pairs(path, n):
    """First n HH pairs with exactly one Human and one Assistant turn in both texts: (line, instruction, chosen, rejected)."""
    out = []
    with gzip.open(path, "rt") as f:
        for line_no, line in enumerate(f):
            d = json.loads(line)
            c, r = d["chosen"], d["rejected"]
            if all(s.count(H) == 1 and s.count(A) == 1 for s in (c, r)):
                ins = c.split(H)[1].split(A)[0].strip()
                out.append((line_no, ins, c.split(A)[1].strip(), r.split(A)[1].strip()))
                if len(out) == n:
                    break
    return out


def tokenize(tok, instruction, response):
    prompt_ids = tok(TEMPLATE.format(instruction=instruction)).input_ids
    response_ids = tok(response, add_special_tokens=False).input_ids + [tok.eos_token_id]
    return prompt_ids, response_ids


def load(hf_dir):
    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    return tok, model


@torch.no_grad()
def response_logprobs(model, prompt_ids, response_ids):
    """Per-token log-probs of response_ids given prompt_ids (logits at t predict token t+1).

    The model runs in float32; the log-softmax of its logits runs in float64. torch's float32
    log-softmax over the 49k-token vocabulary is biased by ~2e-5 per token (its exp-sum loses
    the small terms), which adds up to ~1.5e-3 over a long response: more than the tolerance
    the Rust side is held to. float64 here makes the fixture the exact value for f32 logits."""
    ids = torch.tensor([prompt_ids + response_ids])
    lp = model(ids).logits.double().log_softmax(-1)[0]
    tok_lp = lp[:-1].gather(-1, ids[0, 1:, None])[:, 0]
    return tok_lp[len(prompt_ids) - 1:]


@torch.no_grad()
def batched_response_logprobs(model, items, pad_id):
    """Same as response_logprobs for a list of (prompt_ids, response_ids), in one right-padded batch."""
    seqs = [p + r for p, r in items]
    L = max(map(len, seqs))
    ids = torch.tensor([s + [pad_id] * (L - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (L - len(s)) for s in seqs])
    lp = model(input_ids=ids, attention_mask=mask).logits.double().log_softmax(-1)
    tok_lp = lp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    return [tok_lp[i, len(p) - 1:len(p) + len(r) - 1] for i, (p, r) in enumerate(items)]


def main():
    hf_dir, data, out = sys.argv[1:4]
    n = int(sys.argv[4]) if len(sys.argv) > 4 else 6
    tok, model = load(hf_dir)
    examples, items, lps = [], [], []
    for line_no, ins, chosen, rejected in single_turn_pairs(data, n):
        ex = {"hh_line": line_no, "instruction": ins}
        for key, resp in (("chosen", chosen), ("rejected", rejected)):
            p, r = tokenize(tok, ins, resp)
            lp = response_logprobs(model, p, r)
            items.append((p, r)); lps.append(lp)
            ex[key] = {"response": resp, "prompt_ids": p, "response_ids": r, "logprob_sum": float(lp.sum()),
                       "n_tokens": len(r), "per_token": lp.tolist()}
        examples.append(ex)
    for a, b in zip(lps, batched_response_logprobs(model, items, tok.pad_token_id or tok.eos_token_id)):
        assert torch.allclose(a, b, atol=1e-4, rtol=0), (a - b).abs().max()
        assert abs(float(a.sum()) - float(b.sum())) < 1e-4, (float(a.sum()), float(b.sum()))
    fixture = {"model": "SmolLM2-135M-Instruct Q4_1 gguf via convert_gguf.py",
               "transformers_version": transformers.__version__, "torch_version": torch.__version__,
               "template": TEMPLATE, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
               "examples": examples}
    with open(out, "w") as f:
        json.dump(fixture, f, indent=1)
    print(f"wrote {out}: {len(examples)} examples, batched check ok")


if __name__ == "__main__":
    main()
