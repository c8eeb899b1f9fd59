"""Write tests/fixtures/trl_losses.json: TRL's own preference losses evaluated on fixed log-probs, with
their gradients, so the trainer's losses (policy-trainer/src/loss.rs, test policy-trainer/tests/loss_trl.rs)
can be checked against the reference implementation rather than against a re-reading of it.

Set-up and run (CPU torch is enough; writes the fixture next to the other ones):
    python3 -m venv /tmp/trlvenv && /tmp/trlvenv/bin/pip install "trl==1.16.0" torch
    /tmp/trlvenv/bin/python tests/conformance/make_loss_fixture.py

How TRL is driven: nothing here re-implements a loss. For the DPO family the script calls the unbound
`DPOTrainer._compute_loss(fake_trainer, fake_model, inputs, False)`: `fake_trainer` carries only the
attributes the method reads, and `fake_model` returns fixed per-token log-probs (float64, one leaf
tensor, chosen rows first, zero outside the completion as a real model gives for label -100). The
reference log-probs go in as precomputed `ref_chosen_logps` / `ref_rejected_logps` leaves. After
`backward`, the gradient with respect to a response's summed log-prob is its per-token gradient, which
the script checks is the same on every token of that response. SimPO is the CPO trainer's
`cpo_loss(loss_type="simpo")`, called the same way on average log-probs (sum / tokens, as CPO computes
them), so the gradient reaches the summed log-probs through that division.

Two entries are not a single TRL loss type, and each case names its `source`:
- `sigmoid` with label smoothing ε (conservative DPO): TRL 1.16's `sigmoid` ignores ε. The value is TRL's
  `aot` run on each pair alone (a batch of one, where its sort is the identity and it is exactly
  −(1−ε)·log σ(βΔ) − ε·log σ(−βΔ)), averaged over the pairs; it is also checked against CPO's `sigmoid`
  formula.
- mixes such as `sigmoid:1,sft:0.5` are TRL's `loss_type` list with `loss_weights`.
"""
import json
import math
import os
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import torch
import trl

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # CPO lives in trl.experimental; its warning is noise here
from trl.experimental.cpo.cpo_trainer import CPOTrainer
from trl.trainer.dpo_trainer import DPOTrainer

OUT = Path(__file__).resolve().parents[1] / "fixtures" / "trl_losses.json"
PROMPT_TOKENS = 3  # every row starts with this many prompt tokens (completion_mask 0)
UNIFORM_TOL = 1e-12  # per-token gradients of one response must agree to this

# Pairs: (policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens), summed
# log-probs in nats. Margins positive, negative and zero (policy = reference); no two pairs of a batch tie
# in π_c − π_r, ref_c − ref_r, π_c − ref_c or π_r − ref_r, so the `aot` sorts have one answer.
BATCHES = {
    "one_positive": [(-12.5, -15.25, -13.0, -14.0, 5, 7)],
    "one_at_reference": [(-20.0, -18.5, -20.0, -18.5, 6, 4)],
    "one_negative": [(-31.0, -22.0, -29.5, -24.0, 9, 6)],
    "two_mixed": [
        (-8.0, -11.5, -9.25, -10.0, 4, 6),
        (-40.0, -35.0, -38.0, -36.5, 12, 10),
    ],
    "four_varied": [
        (-15.0, -17.0, -15.5, -16.0, 6, 8),
        (-27.25, -19.5, -26.0, -21.0, 10, 7),
        (-10.0, -14.0, -10.0, -14.0, 3, 5),
        (-55.0, -60.5, -58.0, -57.0, 20, 24),
    ],
}

# Each loss that TRL's DPO trainer knows, with the settings to try: (β, ε or None, τ or None).
DPO_LOSSES = {
    "sigmoid": [(0.1, None, None), (0.5, None, None)],
    "hinge": [(0.1, None, None), (0.5, None, None)],
    "ipo": [(0.1, None, None), (0.5, None, None)],
    "exo_pair": [(0.1, 0.1, None), (0.5, 1e-3, None)],
    "nca_pair": [(0.1, None, None), (0.5, None, None)],
    "robust": [(0.1, None, None), (0.1, 0.1, None), (0.5, 0.3, None)],
    "bco_pair": [(0.1, None, None), (0.5, None, None)],
    "sppo_hard": [(0.1, None, None), (0.5, None, None)],
    "aot": [(0.1, None, None), (0.5, 0.1, None)],
    "aot_unpaired": [(0.1, None, None), (0.5, 0.1, None)],
    "apo_zero": [(0.1, None, None), (0.5, None, None)],
    "apo_down": [(0.1, None, None), (0.5, None, None)],
    "discopop": [(0.1, None, 0.05), (0.5, None, 0.05), (0.5, None, 0.5)],
    "sft": [(0.1, None, None)],
    "sigmoid_norm": [(0.1, None, None), (0.5, None, None)],
    "sigmoid:1,sft:0.5": [(0.1, None, None)],
    "ipo:1,sft:1": [(0.5, None, None)],
    "sigmoid:1,hinge:0.5,apo_zero:0.25": [(0.1, None, None)],
    "robust:1,sft:0.25": [(0.5, 0.2, None)],
}
CDPO_SETTINGS = [(0.1, 0.1), (0.5, 0.25)]  # (β, ε) for sigmoid with label smoothing
SIMPO_SETTINGS = [(2.0, None, 0.25), (0.5, None, 0.5), (2.0, 0.1, 0.5)]  # (β, ε, gamma_beta_ratio)


def parse_spec(spec):
    """'sigmoid:1,sft:0.5' -> (['sigmoid', 'sft'], [1.0, 0.5]); a bare name has weight 1."""
    names, weights = [], []
    for term in spec.split(","):
        name, _, weight = term.partition(":")
        names.append(name)
        weights.append(float(weight) if weight else 1.0)
    return names, weights


def per_token_values(total, n):
    """n per-token log-probs summing to `total`, deliberately unequal (a real response's are)."""
    shape = [1.0 + 0.5 * math.sin(3.0 * k + 1.0) for k in range(n)]
    scale = total / sum(shape)
    return [scale * s for s in shape]


class FakeAccelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather(x):
        return x

    @staticmethod
    def gather_for_metrics(x):
        return x


def fake_dpo_trainer(loss_names, loss_weights, beta, epsilon, tau):
    """The attributes DPOTrainer._compute_loss reads, and nothing else."""
    return SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=FakeAccelerator(),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=loss_names,
        loss_weights=loss_weights,
        beta=beta,
        label_smoothing=0.0 if epsilon is None else epsilon,
        args=SimpleNamespace(discopop_tau=0.05 if tau is None else tau),
        use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )


def dpo_inputs(pairs):
    """Rows [chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}]: prompt, completion, right padding.

    Returns (inputs, per-token log-probs leaf [2B, T-1], completion position mask [2B, T-1]).
    """
    lens = [p[4] for p in pairs] + [p[5] for p in pairs]
    targets = [p[0] for p in pairs] + [p[1] for p in pairs]  # each row's summed log-prob
    t = PROMPT_TOKENS + max(lens) + 1  # at least one padding column
    rows = len(lens)
    completion_mask = torch.zeros(rows, t, dtype=torch.long)
    attention_mask = torch.zeros(rows, t, dtype=torch.long)
    logps = torch.zeros(rows, t - 1, dtype=torch.float64)
    for row, (n, total) in enumerate(zip(lens, targets)):
        completion_mask[row, PROMPT_TOKENS : PROMPT_TOKENS + n] = 1
        attention_mask[row, : PROMPT_TOKENS + n] = 1
        # The log-prob of the token at input position j sits at shifted position j - 1.
        logps[row, PROMPT_TOKENS - 1 : PROMPT_TOKENS - 1 + n] = torch.tensor(per_token_values(total, n), dtype=torch.float64)
    logps.requires_grad_(True)
    b = len(pairs)
    sums = logps.detach().sum(dim=1)  # what TRL will see, within rounding of `targets`
    inputs = {
        "input_ids": (torch.arange(rows * t).reshape(rows, t) % 97) + 1,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "ref_chosen_logps": reference_leaf(pairs, 2, 0, sums[:b]),
        "ref_rejected_logps": reference_leaf(pairs, 3, 1, sums[b:]),
    }
    return inputs, logps, completion_mask[:, 1:].bool()


def reference_leaf(pairs, ref_index, policy_index, policy_sums):
    """The reference log-probs as a leaf. Where a pair's reference equals its policy log-prob (the
    untrained policy), take torch's own sum of the per-token values, so that the log-ratio is exactly 0
    rather than a rounding error of the split into tokens."""
    values = [sum_ if p[ref_index] == p[policy_index] else p[ref_index] for p, sum_ in zip(pairs, policy_sums.tolist())]
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


def fake_model(log_probs):
    def forward(**_kwargs):
        shape = log_probs.shape
        return SimpleNamespace(
            log_probs=log_probs,
            entropy=torch.zeros(shape, dtype=torch.float64),
            mean_logits=torch.zeros(shape, dtype=torch.float64),
            is_top1=torch.zeros(shape, dtype=torch.bool),
        )

    return forward


def response_grad(grad_row, mask_row, what):
    values = grad_row[mask_row]
    spread = (values.max() - values.min()).item()
    assert spread <= UNIFORM_TOL * max(1.0, values.abs().max().item()), f"{what}: per-token gradient not uniform ({spread})"
    return values[0].item()


def leaf_grad(leaf, i):
    """A leaf the loss does not read (the reference, for `sft` alone) has no gradient: it is 0."""
    return 0.0 if leaf.grad is None else leaf.grad[i].item()


def run_dpo(pairs, spec, beta, epsilon, tau):
    """Batch-mean loss and per-pair gradients from TRL's DPOTrainer._compute_loss."""
    names, weights = parse_spec(spec)
    inputs, logps, mask = dpo_inputs(pairs)
    trainer = fake_dpo_trainer(names, weights, beta, epsilon, tau)
    loss = DPOTrainer._compute_loss(trainer, fake_model(logps), inputs, False)
    loss.backward()
    b = len(pairs)
    sums = logps.detach().sum(dim=1)
    recorded = [
        {
            "policy_chosen": sums[i].item(),
            "policy_rejected": sums[b + i].item(),
            "ref_chosen": inputs["ref_chosen_logps"][i].item(),
            "ref_rejected": inputs["ref_rejected_logps"][i].item(),
            "chosen_tokens": p[4],
            "rejected_tokens": p[5],
        }
        for i, p in enumerate(pairs)
    ]
    grads = [
        {
            "policy_chosen": response_grad(logps.grad[i], mask[i], f"{spec} pair {i} chosen"),
            "policy_rejected": response_grad(logps.grad[b + i], mask[b + i], f"{spec} pair {i} rejected"),
            "ref_chosen": leaf_grad(inputs["ref_chosen_logps"], i),
            "ref_rejected": leaf_grad(inputs["ref_rejected_logps"], i),
        }
        for i in range(b)
    ]
    return recorded, loss.item(), grads


def run_cdpo(pairs, beta, epsilon):
    """Conservative DPO from TRL: `aot` on each pair alone, averaged (see the module doc)."""
    b = len(pairs)
    total, grads, recorded = 0.0, [], []
    for pair in pairs:
        rec, loss, g = run_dpo([pair], "aot", beta, epsilon, None)
        total += loss / b
        grads.append({k: v / b for k, v in g[0].items()})
        recorded += rec
        # Cross-check with CPO's sigmoid, which takes the same formula on its own logits.
        lr_c = torch.tensor([pair[0] - pair[2]], dtype=torch.float64)
        lr_r = torch.tensor([pair[1] - pair[3]], dtype=torch.float64)
        cpo, _, _ = CPOTrainer.cpo_loss(fake_cpo_trainer("sigmoid", beta, epsilon, 0.0), lr_c, lr_r)
        assert abs(cpo.item() - loss) <= 1e-12 * max(1.0, abs(loss)), (pair, cpo.item(), loss)
    return recorded, total, grads


def fake_cpo_trainer(loss_type, beta, epsilon, simpo_gamma):
    return SimpleNamespace(
        alpha=0.0,
        accelerator=FakeAccelerator(),
        loss_type=loss_type,
        beta=beta,
        label_smoothing=0.0 if epsilon is None else epsilon,
        simpo_gamma=simpo_gamma,
    )


def run_simpo(pairs, beta, epsilon, gamma_beta_ratio):
    """SimPO from CPOTrainer.cpo_loss on average log-probs (sum / tokens, as CPO's forward makes them)."""
    sums_c = torch.tensor([p[0] for p in pairs], dtype=torch.float64, requires_grad=True)
    sums_r = torch.tensor([p[1] for p in pairs], dtype=torch.float64, requires_grad=True)
    len_c = torch.tensor([float(p[4]) for p in pairs], dtype=torch.float64)
    len_r = torch.tensor([float(p[5]) for p in pairs], dtype=torch.float64)
    trainer = fake_cpo_trainer("simpo", beta, epsilon, gamma_beta_ratio * beta)
    losses, _, _ = CPOTrainer.cpo_loss(trainer, sums_c / len_c, sums_r / len_r)
    loss = losses.mean()
    loss.backward()
    recorded = [dict(zip(PAIR_KEYS, p)) for p in pairs]
    grads = [
        {"policy_chosen": sums_c.grad[i].item(), "policy_rejected": sums_r.grad[i].item(), "ref_chosen": 0.0, "ref_rejected": 0.0}
        for i in range(len(pairs))
    ]
    return recorded, loss.item(), grads


PAIR_KEYS = ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected", "chosen_tokens", "rejected_tokens")


def case(batch, spec, beta, source, result, epsilon=None, tau=None, gamma_beta_ratio=None):
    pairs, loss, grads = result
    assert math.isfinite(loss), (batch, spec, loss)
    given = {"β": beta, "ε": epsilon, "τ": tau, "gamma/β": gamma_beta_ratio}
    settings = " ".join(f"{k}={v}" for k, v in given.items() if v is not None)
    return {
        "name": f"{spec} {settings} on {batch}",
        "loss": spec,
        "beta": beta,
        "label_smoothing": epsilon,
        "discopop_tau": tau,
        "gamma_beta_ratio": gamma_beta_ratio,
        "source": source,
        "pairs": pairs,
        "loss_value": loss,
        "grads": grads,
    }


def main():
    torch.set_default_dtype(torch.float64)
    cases = []
    for batch, pairs in BATCHES.items():
        for spec, settings in DPO_LOSSES.items():
            for beta, epsilon, tau in settings:
                result = run_dpo(pairs, spec, beta, epsilon, tau)
                cases.append(case(batch, spec, beta, "DPOTrainer._compute_loss", result, epsilon, tau))
        for beta, epsilon in CDPO_SETTINGS:
            result = run_cdpo(pairs, beta, epsilon)
            cases.append(case(batch, "sigmoid", beta, "DPOTrainer._compute_loss aot per pair (cDPO)", result, epsilon))
        for beta, epsilon, ratio in SIMPO_SETTINGS:
            result = run_simpo(pairs, beta, epsilon, ratio)
            cases.append(case(batch, "simpo", beta, "CPOTrainer.cpo_loss simpo", result, epsilon, gamma_beta_ratio=ratio))
    fixture = {
        "about": "TRL preference losses on fixed summed log-probs: batch-mean loss and its gradient with respect to "
        "each pair's four log-probs. Written by tests/conformance/make_loss_fixture.py.",
        "trl_version": trl.__version__,
        "torch_version": torch.__version__,
        "cases": cases,
    }
    # One case per line: small, and a regenerated fixture diffs case by case.
    head = json.dumps({k: v for k, v in fixture.items() if k != "cases"}, indent=1, ensure_ascii=False)[:-2]
    body = ",\n".join(json.dumps(c, ensure_ascii=False) for c in cases)
    OUT.write_text(f'{head},\n "cases": [\n{body}\n ]\n}}\n')
    print(f"wrote {len(cases)} cases to {OUT}")


if __name__ == "__main__":
    main()
