//! The trainer's two checkpoints, both Hugging Face directories any Llama loader reads:
//!
//! - `best/`: the policy with the best validation metric so far, plus `best.json` saying
//!   which step and metrics it came from;
//! - `last/`: everything `--resume` needs — the policy, the optimizer state
//!   (`optimizer.safetensors`) and `trainer_state.json` (step, data position, best metric,
//!   the fingerprints the run started from).
//!
//! With LoRA (`--lora-rank`), both hold the adapters in PEFT's format instead of the model
//! (`adapter_config.json`, `adapter_model.safetensors`, the tokenizer), which
//! `peft.PeftModel.from_pretrained(base, dir)` loads on the base model; `--save-merged`
//! adds `merged/`, the base with the adapters added into its weights.
//!
//! Both are written atomically (`dpo_common`'s `save_hf` or `save_peft`): a crash or a full
//! disk mid-save leaves the previous checkpoint whole.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use dpo_common::model::lora;
use dpo_common::model::save::{save_hf, save_hf_with, write_file, SaveOptions};
use dpo_common::model::Llama;
use dpo_common::tokenizer::LlamaTokenizer;
use serde::{Deserialize, Serialize};

use crate::optim::RmsProp;

pub const BEST_DIR: &str = "best";
pub const LAST_DIR: &str = "last";
pub const BEST_META: &str = "best.json";
pub const TRAINER_STATE: &str = "trainer_state.json";
pub const OPTIMIZER_STATE: &str = "optimizer.safetensors";
pub const MERGED_DIR: &str = "merged";

/// What `best/best.json` records.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BestMeta {
    pub step: usize,
    pub examples_seen: usize,
    pub select_metric: String,
    pub value: f64,
    /// The full evaluation record of that step.
    pub eval: serde_json::Value,
}

/// Where a run stands, saved in `last/trainer_state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps taken.
    pub step: usize,
    /// Epoch in progress (0-based) and pairs of it already consumed.
    pub epoch: usize,
    pub epoch_position: usize,
    pub examples_seen: usize,
    /// Input tokens trained on so far, as TRL counts them (`metrics::TrainRecord::num_tokens`);
    /// 0 in the state of a run saved before it was counted.
    #[serde(default)]
    pub num_tokens: u64,
    /// Best validation value so far and its step (`None` before the first eligible eval).
    pub best_value: Option<f64>,
    pub best_step: Option<usize>,
    pub seed: u64,
    /// Fingerprint of the model training started from (the reference must match it, not
    /// the partly trained weights in `last/`).
    pub start_fingerprint: String,
    /// Identity of the training data (hash of the tokenized pairs and the split), so a
    /// resume on different data or flags is refused instead of silently diverging.
    pub data_fingerprint: String,
    /// The `--loss` spec the run trains with; empty in the state of a run saved before it
    /// was recorded.
    #[serde(default)]
    pub loss: String,
}

pub fn best_dir(out: &Path) -> PathBuf {
    out.join(BEST_DIR)
}

pub fn last_dir(out: &Path) -> PathBuf {
    out.join(LAST_DIR)
}

/// The base model a LoRA policy adapts: `--model` and its fingerprint.
#[derive(Debug, Clone, Copy)]
pub struct Base<'a> {
    pub path: &'a Path,
    pub fingerprint: &'a str,
}

/// Writes the policy to `dir` (atomically) with the files `write_extra` adds: the whole
/// model as a Hugging Face directory, or under LoRA its adapters as a PEFT directory (with
/// the tokenizer, as TRL saves one) naming `base`, with `base`'s fingerprint beside it
/// (`lora::ADAPTER_BASE`).
fn save_policy_with(
    model: &Llama,
    tokenizer: &LlamaTokenizer,
    base: Base,
    dir: &Path,
    write_extra: impl FnOnce(&Path) -> dpo_common::Result<()>,
) -> dpo_common::Result<()> {
    match model.lora() {
        Some(adapters) => {
            let base_model = base.path.display().to_string();
            lora::save_peft_with(adapters, &base_model, dir, |tmp| {
                lora::write_adapter_base(tmp, &base_model, base.fingerprint)?;
                tokenizer.save_hf(tmp)?;
                write_extra(tmp)
            })
        }
        None => save_hf_with(model, tokenizer, dir, &SaveOptions::default(), write_extra),
    }
}

/// Saves the best policy so far (atomically replacing the previous one); `base` is the
/// `--model` a LoRA adapter applies to.
pub fn save_best(
    out: &Path,
    model: &Llama,
    tokenizer: &LlamaTokenizer,
    base: Base,
    meta: &BestMeta,
) -> Result<PathBuf> {
    let dir = best_dir(out);
    let meta = serde_json::to_vec_pretty(meta)?;
    save_policy_with(model, tokenizer, base, &dir, |tmp| write_file(&tmp.join(BEST_META), &meta))
        .with_context(|| format!("cannot save the best checkpoint to {}", dir.display()))?;
    Ok(dir)
}

/// Saves everything `--resume` needs (atomically replacing the previous `last/`). The
/// optimizer state is written straight to its file, a tensor at a time.
pub fn save_last(
    out: &Path,
    model: &Llama,
    tokenizer: &LlamaTokenizer,
    base: Base,
    optimizer: &RmsProp,
    state: &TrainerState,
) -> Result<PathBuf> {
    let dir = last_dir(out);
    let state = serde_json::to_vec_pretty(state)?;
    save_policy_with(model, tokenizer, base, &dir, |tmp| {
        write_file(&tmp.join(TRAINER_STATE), &state)?;
        let path = tmp.join(OPTIMIZER_STATE);
        optimizer.save(&path).map_err(|e| dpo_common::Error::file(&path, format!("{e:#}")))
    })
    .with_context(|| format!("cannot save the resume checkpoint to {}", dir.display()))?;
    Ok(dir)
}

/// Writes `OUT/merged/`: `model` (a base with LoRA adapters) with the adapters added into
/// its weights, as a plain Hugging Face checkpoint.
pub fn save_merged(out: &Path, model: &Llama, tokenizer: &LlamaTokenizer) -> Result<PathBuf> {
    let dir = out.join(MERGED_DIR);
    let merged = model.merged().context("merging the adapters into the base")?;
    save_hf(&merged, tokenizer, &dir, &SaveOptions::default(), &[])
        .with_context(|| format!("cannot save the merged model to {}", dir.display()))?;
    Ok(dir)
}

/// True when `dir` holds LoRA adapters (PEFT's format) rather than a whole model.
pub fn holds_adapter(dir: &Path) -> bool {
    lora::is_adapter_dir(dir)
}

/// Reads `last/trainer_state.json`, with errors that say what to do.
pub fn read_trainer_state(out: &Path) -> Result<TrainerState> {
    let dir = last_dir(out);
    let path = dir.join(TRAINER_STATE);
    if !path.exists() {
        bail!(
            "--resume: no checkpoint to resume from ({} does not exist); run without --resume \
             to start a new run in {}",
            path.display(),
            out.display()
        );
    }
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{} is not a trainer state", path.display()))
}

/// Writes a small file atomically (tmp + rename), e.g. the run's `args.json`.
pub fn write_small_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    write_file(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot move {} into place", path.display()))?;
    Ok(())
}

/// Removes the temporary directories (`.best.tmp-PID`, `.last.tmp-PID`) that a save cut
/// short by a crash or kill leaves in `out`, when process PID is gone. Returns what was
/// removed. The real `best/` and `last/` are never touched: a save only ever swaps a
/// complete temporary directory in.
pub fn sweep_stale_temp_dirs(out: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(out) else { return Ok(removed) };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = [BEST_DIR, LAST_DIR].iter().find_map(|d| {
            name.strip_prefix(&format!(".{d}.tmp-")).and_then(|p| p.parse::<u32>().ok())
        });
        let Some(pid) = pid else { continue };
        let alive = pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists();
        if !alive {
            std::fs::remove_dir_all(entry.path()).with_context(|| {
                format!("cannot remove the stale temporary directory {}", entry.path().display())
            })?;
            removed.push(entry.path());
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_temp_dirs_of_dead_processes_are_swept_and_nothing_else() {
        let out = tempfile::tempdir().unwrap();
        let dead = out.path().join(".last.tmp-4000000000");
        let live = out.path().join(format!(".best.tmp-{}", std::process::id()));
        let real = out.path().join(LAST_DIR);
        for d in [&dead, &live, &real] {
            std::fs::create_dir(d).unwrap();
        }
        assert_eq!(sweep_stale_temp_dirs(out.path()).unwrap(), vec![dead.clone()]);
        assert!(!dead.exists() && live.exists() && real.exists());
    }
}
