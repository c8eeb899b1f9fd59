"""TRL's DPOTrainer with a PEFT LoRA adapter on CPU: what a user of TRL runs for DPO with LoRA.

The same examples and settings as ../shared/bench/trl_baseline.py (16 single-turn HH pairs, f32,
2 threads, batch 1 accumulated over N, one RMSprop step at lr 1e-6, beta 0.1), plus
`peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0, all seven projections)`, which is
also what `policy-trainer --lora-rank 16` trains. With a PEFT model TRL takes the reference from
the same weights with the adapter disabled, so one model is loaded, not two.

Usage: trl_peft_baseline.py HF_DIR HH_JSONL_GZ [N_EXAMPLES] [RANK]
Needs torch, transformers, trl, datasets and peft (tests/bench/train.sh says which venv).
"""
import gzip
import json
import resource
import sys
import time

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

hf, data = sys.argv[1], sys.argv[2]
n = int(sys.argv[3]) if len(sys.argv) > 3 else 16
rank = int(sys.argv[4]) if len(sys.argv) > 4 else 16
torch.set_num_threads(2)
T = ("Below is an instruction that describes a task. Write a response that appropriately completes the request."
     "\n\n### Instruction:\n{instruction}\n\n### Response:\n")
tok = AutoTokenizer.from_pretrained(hf)
rows = []
for line in gzip.open(data, "rt"):
    d = json.loads(line)
    c, r = d["chosen"], d["rejected"]
    if all(s.count("\n\nHuman:") == 1 and s.count("\n\nAssistant:") == 1 for s in (c, r)):
        ins = c.split("\n\nHuman:")[1].split("\n\nAssistant:")[0].strip()
        rows.append(dict(prompt=T.format(instruction=ins), chosen=c.split("\n\nAssistant:")[1].strip(),
                         rejected=r.split("\n\nAssistant:")[1].strip()))
    if len(rows) == n:
        break
model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
lora = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, task_type="CAUSAL_LM",
                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
cfg = DPOConfig(output_dir="/tmp/trl-peft-out", beta=0.1, learning_rate=1e-6, optim="rmsprop",
                per_device_train_batch_size=1, gradient_accumulation_steps=n, num_train_epochs=1, max_length=512,
                logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, dataloader_num_workers=0,
                bf16=False, gradient_checkpointing=False)
tr = DPOTrainer(model=model, ref_model=None, args=cfg, train_dataset=Dataset.from_list(rows),
                processing_class=tok, peft_config=lora)
trainable = sum(p.numel() for p in tr.model.parameters() if p.requires_grad)
t = time.perf_counter()
tr.train()
dt = time.perf_counter() - t
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(dict(measure=f"trl_peft_r{rank}_bs1", examples=len(rows), seconds=round(dt, 3),
                      examples_per_s=round(len(rows) / dt, 3), peak_rss_mib=round(rss),
                      trainable_parameters=trainable, log=tr.state.log_history[:2])))
