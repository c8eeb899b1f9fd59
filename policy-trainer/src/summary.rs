//! What a finished run prints: how far it trained, its last validation, and where its
//! outputs are. Only outputs that exist are named: a run without validation pairs draws no
//! chart, one that took no step saves no `last/`.

use std::fmt;
use std::path::{Path, PathBuf};

use dpo_common::model::lora;

use crate::checkpoint;
use crate::metrics::{EvalResult, METRICS_FILE};
use crate::plot::CHART_FILE;

pub struct RunSummary {
    /// The `--loss` spec.
    pub loss: String,
    /// True when the loss read no reference (no server was contacted).
    pub reference_free: bool,
    /// How the reference was used: requests, retries, each replica's share.
    pub reference: Option<String>,
    pub steps: usize,
    pub examples_seen: usize,
    /// The best checkpoint's step, value and metric name (`None` when none was saved).
    pub best: Option<(usize, f64, String)>,
    pub final_eval: Option<EvalResult>,
    pub outputs: RunOutputs,
}

/// The run's outputs in its directory, each `None` when it was not written.
#[derive(Debug, Clone, PartialEq)]
pub struct RunOutputs {
    pub best: Option<PathBuf>,
    pub last: Option<PathBuf>,
    pub metrics: Option<PathBuf>,
    pub chart: Option<PathBuf>,
    /// The directory holding TensorBoard event files (`--report-to tensorboard`).
    pub tensorboard: Option<PathBuf>,
    /// `merged/` (`--save-merged`): the base with the LoRA adapter merged in.
    pub merged: Option<PathBuf>,
    /// When `best/` and `last/` hold LoRA adapters rather than whole models: the base model
    /// they adapt (`base_model_name_or_path`).
    pub adapter_base: Option<String>,
}

impl RunOutputs {
    /// Looks for each output in `out`.
    pub fn found_in(out: &Path) -> Self {
        let existing = |path: PathBuf| path.exists().then_some(path);
        RunOutputs {
            best: existing(checkpoint::best_dir(out)),
            last: existing(checkpoint::last_dir(out)),
            metrics: existing(out.join(METRICS_FILE)),
            chart: existing(out.join(CHART_FILE)),
            tensorboard: has_event_files(out).then(|| out.to_path_buf()),
            merged: existing(out.join(checkpoint::MERGED_DIR)),
            adapter_base: [checkpoint::best_dir(out), checkpoint::last_dir(out)]
                .iter()
                .find(|d| checkpoint::holds_adapter(d))
                .map(|d| lora::base_model_of(d).unwrap_or_else(|| "the --model base".into())),
        }
    }
}

/// Whether `dir` holds a TensorBoard event file (TensorFlow's naming, which the trainer's
/// writer follows: `events.out.tfevents.<time>.<host>…`).
fn has_event_files(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("events.out.tfevents."))
    })
}

impl fmt::Display for RunSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut lines = vec![
            format!("trained {} steps ({} examples)", self.steps, self.examples_seen),
            match self.reference_free {
                true => format!("loss:    {} (reference-free: no reference server)", self.loss),
                false => format!("loss:    {}", self.loss),
            },
        ];
        if let Some(r) = &self.reference {
            lines.push(format!("reference: {r}"));
        }
        if let Some(e) = &self.final_eval {
            lines.push(format!(
                "final validation: loss {:.4}, reward accuracy {:.3}, log-prob accuracy {:.3}, margin {:.4}",
                e.loss, e.reward_accuracy, e.logp_accuracy, e.margin
            ));
        }
        let outputs = &self.outputs;
        match (&self.best, &outputs.best) {
            (Some((step, value, metric)), Some(dir)) => {
                lines.push(format!("best:    {} (step {step}, {metric} {value:.4})", dir.display()))
            }
            _ => lines.push("best:    none saved (no evaluation after step 0)".into()),
        }
        if let Some(base) = &outputs.adapter_base {
            lines.push(format!(
                "adapter: best/ and last/ hold LoRA adapters in PEFT's format for {base}"
            ));
            if let Some(best) = &outputs.best {
                lines.push(format!(
                    "serve:   ref-server serve --model {base} --adapter {}",
                    best.display()
                ));
            }
        }
        for (label, path) in [
            ("merged: ", &outputs.merged),
            ("resume: ", &outputs.last),
            ("metrics:", &outputs.metrics),
            ("chart:  ", &outputs.chart),
        ] {
            if let Some(path) = path {
                lines.push(format!("{label} {}", path.display()));
            }
        }
        if let Some(dir) = &outputs.tensorboard {
            lines.push(format!("events:  {} (tensorboard --logdir {0})", dir.display()));
        }
        if let Some(peak) = dpo_common::memory::peak_rss_bytes() {
            lines.push(format!("peak memory (RSS): {:.2} GiB", peak as f64 / (1u64 << 30) as f64));
        }
        write!(f, "{}", lines.join("\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(out: &Path, best: Option<(usize, f64, String)>) -> String {
        RunSummary {
            loss: "simpo".into(),
            reference_free: true,
            reference: None,
            steps: 3,
            examples_seen: 24,
            best,
            final_eval: None,
            outputs: RunOutputs::found_in(out),
        }
        .to_string()
    }

    #[test]
    fn names_only_the_outputs_that_were_written() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        let name = |file: &str| out.join(file).display().to_string();
        // A run without validation pairs: metrics and last/, no evaluation, no chart.
        std::fs::write(out.join(METRICS_FILE), "").unwrap();
        std::fs::create_dir(checkpoint::last_dir(out)).unwrap();
        let text = summary(out, None);
        assert!(text.contains(&format!("metrics: {}", name(METRICS_FILE))), "{text}");
        assert!(text.contains(&format!("resume:  {}", name(checkpoint::LAST_DIR))), "{text}");
        assert!(text.contains("best:    none saved"), "{text}");
        assert!(text.contains("loss:    simpo (reference-free: no reference server)"), "{text}");
        assert!(!text.contains(CHART_FILE) && !text.contains("chart:"), "{text}");

        // With a chart and best/, both are named.
        std::fs::write(out.join(CHART_FILE), b"png").unwrap();
        std::fs::create_dir(checkpoint::best_dir(out)).unwrap();
        let text = summary(out, Some((2, 0.75, "reward_accuracy".into())));
        assert!(text.contains(&format!("chart:   {}", name(CHART_FILE))), "{text}");
        assert!(
            text.contains(&format!(
                "best:    {} (step 2, reward_accuracy 0.7500)",
                name(checkpoint::BEST_DIR)
            )),
            "{text}"
        );
        assert!(!text.contains("events:"), "no event file yet: {text}");

        // With an event file (--report-to tensorboard), the directory to point TensorBoard at.
        std::fs::write(out.join("events.out.tfevents.1764860000.host"), b"").unwrap();
        let text = summary(out, None);
        let dir = out.display();
        assert!(text.contains(&format!("events:  {dir} (tensorboard --logdir {dir})")), "{text}");

        // Nothing written at all: no path is named.
        let empty = tempfile::tempdir().unwrap();
        let text = summary(empty.path(), None);
        assert!(!text.contains(&empty.path().display().to_string()), "{text}");
    }
}
