"""PEFT's side of the LoRA conformance check (tests/tests/lora_e2e.rs, `peft_*` test).

Usage: python lora_peft.py MODEL_DIR ADAPTER_DIR SPEC_JSON OUT_DIR

MODEL_DIR is a Hugging Face Llama our Rust code wrote, ADAPTER_DIR the LoRA adapter our trainer saved
at step 0 (its initialisation), SPEC_JSON {"pairs": [{"prompt": [ids], "chosen": [ids],
"rejected": [ids]}], "lr": float, "beta": float}. The script loads the adapter with
`peft.PeftModel.from_pretrained(base, ADAPTER_DIR)`, scores every response (summed log-probs of the
response tokens, the model in float32 and its log-softmax in float64, as tests/conformance/make_fixture.py
does), takes the reference scores from the same model with the adapter disabled, and runs one DPO
step (the sigmoid loss, mean over the pairs) with `torch.optim.RMSprop(lr=lr)` (PyTorch's defaults
otherwise) on the adapter's parameters. It writes OUT_DIR/peft.json (the step-0 log-probs, the
reference's, the loss before and after the step) and the adapter after the step, saved by PEFT, to
OUT_DIR/adapter_after_step.

Set-up (CPU torch is enough):
    python3 -m venv /tmp/peftvenv && /tmp/peftvenv/bin/pip install torch transformers "peft==0.21.2"
then run the Rust test with DPO_PEFT_PYTHON=/tmp/peftvenv/bin/python (add DPO_UPDATE_FIXTURES=1
to write its output to tests/fixtures/peft_lora/, which the test reads when no Python is set).
"""
import json
import os
import sys

import peft
import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import AutoModelForCausalLM


def response_logprob_sums(model, pairs):
    """[(chosen, rejected)] summed log-probs of each pair's responses after its prompt (a graph when
    gradients are on)."""
    out = []
    for p in pairs:
        sums = []
        for response in (p["chosen"], p["rejected"]):
            ids = torch.tensor([p["prompt"] + response])
            lp = model(input_ids=ids).logits.double().log_softmax(-1)[0]
            per_token = lp[:-1].gather(-1, ids[0, 1:, None])[:, 0]
            sums.append(per_token[len(p["prompt"]) - 1:].sum())
        out.append(sums)
    return out


def dpo_loss(policy, reference, beta):
    """TRL's `sigmoid` loss, the mean over the pairs."""
    margins = [(pc - rc) - (pr - rr) for (pc, pr), (rc, rr) in zip(policy, reference)]
    return torch.stack([-F.logsigmoid(beta * m) for m in margins]).mean()


def values(pairs_sums):
    return [[float(c.detach()), float(r.detach())] for c, r in pairs_sums]


def main():
    model_dir, adapter_dir, spec_path, out_dir = sys.argv[1:5]
    torch.manual_seed(0)
    torch.set_num_threads(2)
    spec = json.load(open(spec_path))
    pairs, lr, beta = spec["pairs"], spec["lr"], spec["beta"]
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
    model.eval()  # no dropout (ours trains with lora_dropout 0 too)
    trainable = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names), names

    with torch.no_grad(), model.disable_adapter():
        reference = response_logprob_sums(model, pairs)
    policy = response_logprob_sums(model, pairs)
    loss = dpo_loss(policy, reference, beta)
    optimizer = torch.optim.RMSprop(trainable, lr=lr)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        after = dpo_loss(response_logprob_sums(model, pairs), reference, beta)

    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(os.path.join(out_dir, "adapter_after_step"))
    result = {
        "peft_version": peft.__version__,
        "trainable_tensors": len(names),
        "logps_step0": values(policy),
        "reference_logps": values(reference),
        "loss_step0": float(loss.detach()),
        "loss_after_step": float(after),
    }
    with open(os.path.join(out_dir, "peft.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"OK: {len(pairs)} pairs, loss {float(loss.detach()):.6f} -> {float(after):.6f} after one RMSprop step")


if __name__ == "__main__":
    main()
