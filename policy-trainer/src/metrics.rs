//! `metrics.jsonl`: one JSON object per line, `"kind": "train"` per optimizer step and
//! `"kind": "eval"` per validation pass. Each line is flushed as it is written, so the file
//! is readable (and plottable) while training runs, and a crash loses at most a torn last
//! line.
//!
//! On `--resume` the log is cut back to the resumed step: lines a crashed run wrote after its
//! last checkpoint are dropped, so the continued run does not log those steps twice.
//!
//! Non-finite numbers (a NaN mean of zero pairs, say) are written as `null`, which JSON
//! allows, and read back as NaN.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Deserializer, Serialize};

/// File name of the metrics log in the run's output directory.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// One optimizer step (all values over that step's batch).
///
/// Beside this trainer's names, the record carries TRL's (`DPOTrainer`'s logged keys) for the
/// same quantities, so that dashboards and scripts written for TRL's logs read it as they are.
/// Records of older runs lack the TRL names and `loss_type`: they read back as NaN, 0 and "".
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct TrainRecord {
    pub step: usize,
    pub epoch: usize,
    pub examples_seen: usize,
    /// The training loss (`--loss`), the mean over the batch.
    #[serde(deserialize_with = "f64_or_nan")]
    pub loss: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub reward_accuracy: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub margin: f64,
    /// Before clipping (TRL's name too).
    #[serde(deserialize_with = "f64_or_nan")]
    pub grad_norm: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub lr: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub examples_per_second: f64,
    /// The `--loss` spec in use, as written on the command line (`sigmoid`, `sigmoid:1,sft:0.5`).
    #[serde(default)]
    pub loss_type: String,
    /// TRL: mean implicit reward of the chosen responses.
    #[serde(rename = "rewards/chosen", default = "nan", deserialize_with = "f64_or_nan")]
    pub rewards_chosen: f64,
    /// TRL: mean implicit reward of the rejected responses.
    #[serde(rename = "rewards/rejected", default = "nan", deserialize_with = "f64_or_nan")]
    pub rewards_rejected: f64,
    /// TRL: `reward_accuracy`.
    #[serde(rename = "rewards/accuracies", default = "nan", deserialize_with = "f64_or_nan")]
    pub rewards_accuracies: f64,
    /// TRL: `margin`.
    #[serde(rename = "rewards/margins", default = "nan", deserialize_with = "f64_or_nan")]
    pub rewards_margins: f64,
    /// TRL: mean policy log-prob of the chosen responses (summed over their tokens).
    #[serde(rename = "logps/chosen", default = "nan", deserialize_with = "f64_or_nan")]
    pub logps_chosen: f64,
    /// TRL: mean policy log-prob of the rejected responses.
    #[serde(rename = "logps/rejected", default = "nan", deserialize_with = "f64_or_nan")]
    pub logps_rejected: f64,
    /// TRL: `lr`.
    #[serde(default = "nan", deserialize_with = "f64_or_nan")]
    pub learning_rate: f64,
    /// TRL: input tokens trained on so far, counted as TRL feeds them (each response with its
    /// own copy of the prompt: prompt·2 + chosen + rejected per pair), although a shared-prompt
    /// row here computes the prompt once.
    #[serde(default)]
    pub num_tokens: u64,
}

fn nan() -> f64 {
    f64::NAN
}

/// One validation pass, averaged over the validation pairs.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq)]
pub struct EvalResult {
    #[serde(deserialize_with = "f64_or_nan")]
    pub loss: f64,
    /// Smallest and largest per-pair loss (at step 0, when policy = reference, both equal the
    /// loss). Absent where the loss is not a mean of per-pair losses (`aot`, `aot_unpaired`,
    /// a mix with `sft`: their loss is a chunk's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_min: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_max: Option<f64>,
    /// Fraction of pairs whose chosen response has the higher implicit reward by more than
    /// the tie tolerance (`stats::is_tie`, `stats::is_tie_without_reference`; ties count as
    /// wrong).
    #[serde(deserialize_with = "f64_or_nan")]
    pub reward_accuracy: f64,
    /// Fraction of pairs with π_c > π_r.
    #[serde(deserialize_with = "f64_or_nan")]
    pub logp_accuracy: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub chosen_reward: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub rejected_reward: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub margin: f64,
    pub pairs: usize,
    /// Mean policy log-probs of the chosen and the rejected responses (summed over tokens).
    #[serde(default = "nan", deserialize_with = "f64_or_nan")]
    pub chosen_logp: f64,
    #[serde(default = "nan", deserialize_with = "f64_or_nan")]
    pub rejected_logp: f64,
}

/// One validation pass after `step` optimizer steps: its [`EvalResult`], where in the run it
/// was taken and how long it took. The result's fields sit at the top level of the JSON line,
/// followed by the loss in use and TRL's `eval_` names for the same quantities (built by
/// [`EvalRecord::new`]; older runs' records lack them).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct EvalRecord {
    pub step: usize,
    pub examples_seen: usize,
    #[serde(flatten)]
    pub result: EvalResult,
    #[serde(deserialize_with = "f64_or_nan")]
    pub seconds: f64,
    /// The `--loss` spec in use.
    #[serde(default)]
    pub loss_type: String,
    #[serde(default = "nan", deserialize_with = "f64_or_nan")]
    pub eval_loss: f64,
    #[serde(rename = "eval_rewards/chosen", default = "nan", deserialize_with = "f64_or_nan")]
    pub eval_rewards_chosen: f64,
    #[serde(rename = "eval_rewards/rejected", default = "nan", deserialize_with = "f64_or_nan")]
    pub eval_rewards_rejected: f64,
    #[serde(rename = "eval_rewards/accuracies", default = "nan", deserialize_with = "f64_or_nan")]
    pub eval_rewards_accuracies: f64,
    #[serde(rename = "eval_rewards/margins", default = "nan", deserialize_with = "f64_or_nan")]
    pub eval_rewards_margins: f64,
    #[serde(rename = "eval_logps/chosen", default = "nan", deserialize_with = "f64_or_nan")]
    pub eval_logps_chosen: f64,
    #[serde(rename = "eval_logps/rejected", default = "nan", deserialize_with = "f64_or_nan")]
    pub eval_logps_rejected: f64,
}

impl EvalRecord {
    /// The record of `result`, with TRL's names filled from it.
    pub fn new(
        step: usize,
        examples_seen: usize,
        result: EvalResult,
        seconds: f64,
        loss_type: String,
    ) -> Self {
        EvalRecord {
            step,
            examples_seen,
            result,
            seconds,
            loss_type,
            eval_loss: result.loss,
            eval_rewards_chosen: result.chosen_reward,
            eval_rewards_rejected: result.rejected_reward,
            eval_rewards_accuracies: result.reward_accuracy,
            eval_rewards_margins: result.margin,
            eval_logps_chosen: result.chosen_logp,
            eval_logps_rejected: result.rejected_logp,
        }
    }
}

/// serde_json writes NaN and ±inf as `null`; read `null` back as NaN.
fn f64_or_nan<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// A line of the file.
#[derive(Serialize, Deserialize, Clone, Debug)]
#[serde(tag = "kind", rename_all = "lowercase")]
enum Line {
    Train(TrainRecord),
    Eval(EvalRecord),
}

impl Line {
    fn step(&self) -> usize {
        match self {
            Line::Train(r) => r.step,
            Line::Eval(r) => r.step,
        }
    }
}

/// The metrics file, open for appending.
pub struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// `resume_from_step: None` starts a new log (the file is created or truncated).
    /// `Some(step)` keeps the lines of steps `<= step` of the existing file, drops the rest
    /// and a torn last line, and appends after them; the file must exist.
    pub fn open(path: &Path, resume_from_step: Option<usize>) -> Result<Self> {
        let file = match resume_from_step {
            None => File::create(path).with_context(|| format!("creating {}", path.display()))?,
            Some(step) => {
                let text = std::fs::read_to_string(path).with_context(|| {
                    format!(
                        "cannot resume the metrics log {} (the run being resumed should have \
                         written it; create an empty file to start a new log)",
                        path.display()
                    )
                })?;
                let mut kept = String::with_capacity(text.len());
                for (line, raw) in parse_lines(&text, path)? {
                    if line.step() <= step {
                        kept.push_str(raw);
                        kept.push('\n');
                    }
                }
                if kept.len() != text.len() {
                    write_atomically(path, kept.as_bytes())?;
                }
                OpenOptions::new()
                    .append(true)
                    .open(path)
                    .with_context(|| format!("opening {} for appending", path.display()))?
            }
        };
        Ok(MetricsLog { path: path.to_path_buf(), file })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn log_train(&mut self, record: &TrainRecord) -> Result<()> {
        self.write(&Line::Train(record.clone()))
    }

    pub fn log_eval(&mut self, record: &EvalRecord) -> Result<()> {
        self.write(&Line::Eval(record.clone()))
    }

    fn write(&mut self, line: &Line) -> Result<()> {
        let mut text = serde_json::to_string(line)?;
        text.push('\n');
        // One write per line, so a reader never sees half of one unless the process dies.
        self.file
            .write_all(text.as_bytes())
            .and_then(|()| self.file.flush())
            .with_context(|| format!("writing to {}", self.path.display()))
    }
}

/// All train and eval records of a metrics file, in file order. A torn last line (a run
/// killed mid-write) is skipped; any other unreadable line is an error naming it.
pub fn read_metrics(path: &Path) -> Result<(Vec<TrainRecord>, Vec<EvalRecord>)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for (line, _) in parse_lines(&text, path)? {
        match line {
            Line::Train(r) => train.push(r),
            Line::Eval(r) => eval.push(r),
        }
    }
    Ok((train, eval))
}

/// Parses every non-empty line, returning each with its raw text. Only the last line may
/// fail to parse, and only when it lacks its newline (torn by a crash).
fn parse_lines<'a>(text: &'a str, path: &Path) -> Result<Vec<(Line, &'a str)>> {
    let mut out = Vec::new();
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    for (i, raw) in lines.iter().enumerate() {
        let complete = raw.ends_with('\n');
        let raw = raw.trim_end_matches(['\n', '\r']);
        if raw.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Line>(raw) {
            Ok(line) => out.push((line, raw)),
            Err(_) if !complete && i + 1 == lines.len() => {}
            Err(err) => bail!("{} line {}: not a metrics record: {err}", path.display(), i + 1),
        }
    }
    Ok(out)
}

/// Replaces `path` with `bytes` via a temporary file in the same directory and a rename,
/// so a crash leaves either the old or the new file, never a mix.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path.file_name().context("metrics path has no file name")?.to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| -> Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("rewriting {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn train(step: usize) -> TrainRecord {
        TrainRecord {
            step,
            epoch: 0,
            examples_seen: step * 64,
            loss: 0.69 - step as f64 * 0.01,
            reward_accuracy: 0.5,
            margin: 0.01 * step as f64,
            grad_norm: 1.5,
            lr: 1e-6,
            examples_per_second: 3.25,
            loss_type: "sigmoid".into(),
            rewards_chosen: 0.02,
            rewards_rejected: 0.02 - 0.01 * step as f64,
            rewards_accuracies: 0.5,
            rewards_margins: 0.01 * step as f64,
            logps_chosen: -40.0,
            logps_rejected: -45.0,
            learning_rate: 1e-6,
            num_tokens: step as u64 * 9000,
        }
    }

    fn result() -> EvalResult {
        EvalResult {
            loss: 0.6,
            loss_min: Some(0.1),
            loss_max: Some(1.2),
            reward_accuracy: 0.55,
            logp_accuracy: 0.45,
            chosen_reward: 0.02,
            rejected_reward: -0.01,
            margin: 0.03,
            pairs: 200,
            chosen_logp: -40.5,
            rejected_logp: -44.0,
        }
    }

    fn eval(step: usize) -> EvalRecord {
        EvalRecord::new(step, step * 64, result(), 12.0, "sigmoid".into())
    }

    #[test]
    fn round_trip_with_kinds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(METRICS_FILE);
        let mut log = MetricsLog::open(&path, None).unwrap();
        log.log_eval(&eval(0)).unwrap();
        log.log_train(&train(1)).unwrap();
        log.log_train(&train(2)).unwrap();
        log.log_eval(&eval(2)).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 4);
        assert!(text.lines().next().unwrap().contains(r#""kind":"eval""#));
        let (t, e) = read_metrics(&path).unwrap();
        assert_eq!(t, vec![train(1), train(2)]);
        assert_eq!(e, vec![eval(0), eval(2)]);
        // A new (non-resumed) log starts empty.
        drop(log);
        MetricsLog::open(&path, None).unwrap();
        assert_eq!(read_metrics(&path).unwrap().0.len(), 0);
    }

    /// The JSON line of an evaluation is flat (the result's fields beside `step` and
    /// `seconds`), in this key order: readers of older runs' files and scripts rely on it.
    #[test]
    fn eval_lines_keep_their_flat_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(METRICS_FILE);
        let mut log = MetricsLog::open(&path, None).unwrap();
        log.log_eval(&eval(2)).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            concat!(
                r#"{"kind":"eval","step":2,"examples_seen":128,"loss":0.6,"loss_min":0.1,"#,
                r#""loss_max":1.2,"reward_accuracy":0.55,"logp_accuracy":0.45,"#,
                r#""chosen_reward":0.02,"rejected_reward":-0.01,"margin":0.03,"pairs":200,"#,
                r#""chosen_logp":-40.5,"rejected_logp":-44.0,"seconds":12.0,"#,
                r#""loss_type":"sigmoid","eval_loss":0.6,"eval_rewards/chosen":0.02,"#,
                r#""eval_rewards/rejected":-0.01,"eval_rewards/accuracies":0.55,"#,
                r#""eval_rewards/margins":0.03,"eval_logps/chosen":-40.5,"#,
                r#""eval_logps/rejected":-44.0}"#,
                "\n"
            )
        );
    }

    /// Lines written before the TRL names, the logps and `loss_type` existed still read; a
    /// loss without per-pair losses leaves `loss_min` / `loss_max` out of the line.
    #[test]
    fn older_lines_read_and_absent_extremes_are_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(METRICS_FILE);
        std::fs::write(
            &path,
            concat!(
                r#"{"kind":"eval","step":0,"examples_seen":0,"loss":0.69,"loss_min":0.69,"#,
                r#""loss_max":0.69,"reward_accuracy":0.0,"logp_accuracy":0.5,"chosen_reward":0.0,"#,
                r#""rejected_reward":0.0,"margin":0.0,"pairs":8,"seconds":1.0}"#,
                "\n",
                r#"{"kind":"train","step":1,"epoch":0,"examples_seen":8,"loss":0.69,"#,
                r#""reward_accuracy":0.5,"margin":0.0,"grad_norm":1.0,"lr":1e-6,"#,
                r#""examples_per_second":2.0}"#,
                "\n"
            ),
        )
        .unwrap();
        let (t, e) = read_metrics(&path).unwrap();
        assert_eq!(e[0].result.loss_max, Some(0.69));
        assert!(e[0].eval_loss.is_nan() && e[0].result.chosen_logp.is_nan());
        assert_eq!((t[0].num_tokens, t[0].loss_type.as_str()), (0, ""));
        assert!(t[0].rewards_chosen.is_nan());

        let mut log = MetricsLog::open(&path, None).unwrap();
        let mut coupled = result();
        (coupled.loss_min, coupled.loss_max) = (None, None);
        log.log_eval(&EvalRecord::new(3, 24, coupled, 1.0, "aot".into())).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("loss_min") && !text.contains("loss_max"), "{text}");
        assert!(text.contains(r#""loss_type":"aot""#), "{text}");
        assert_eq!(read_metrics(&path).unwrap().1[0].result, coupled);
    }

    #[test]
    fn non_finite_values_survive_as_nan() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(METRICS_FILE);
        let mut log = MetricsLog::open(&path, None).unwrap();
        let mut r = train(1);
        r.loss = f64::NAN;
        r.examples_per_second = f64::INFINITY;
        log.log_train(&r).unwrap();
        let (t, _) = read_metrics(&path).unwrap();
        assert!(t[0].loss.is_nan() && t[0].examples_per_second.is_nan());
        assert_eq!(t[0].grad_norm, 1.5);
        let mut e = eval(1);
        e.result.reward_accuracy = f64::NAN;
        log.log_eval(&e).unwrap();
        let (_, e) = read_metrics(&path).unwrap();
        assert!(e[0].result.reward_accuracy.is_nan() && e[0].result.loss == 0.6);
    }

    #[test]
    fn resume_drops_later_steps_and_a_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(METRICS_FILE);
        let mut log = MetricsLog::open(&path, None).unwrap();
        log.log_eval(&eval(0)).unwrap();
        for s in 1..=5 {
            log.log_train(&train(s)).unwrap();
        }
        log.log_eval(&eval(4)).unwrap();
        drop(log);
        // A crash mid-line.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"kind":"train","step":6,"ep"#).unwrap();
        drop(f);
        assert_eq!(read_metrics(&path).unwrap().0.len(), 5, "the torn line is skipped");

        let mut log = MetricsLog::open(&path, Some(3)).unwrap();
        log.log_train(&train(4)).unwrap();
        let (t, e) = read_metrics(&path).unwrap();
        assert_eq!(t.iter().map(|r| r.step).collect::<Vec<_>>(), [1, 2, 3, 4]);
        assert_eq!(e.iter().map(|r| r.step).collect::<Vec<_>>(), [0]);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file left behind");
    }

    #[test]
    fn resume_requires_the_file_and_reports_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(METRICS_FILE);
        let err = MetricsLog::open(&path, Some(3)).err().unwrap();
        assert!(format!("{err:#}").contains("cannot resume the metrics log"), "{err:#}");
        std::fs::write(&path, "{\"kind\":\"train\"}\n{}\n").unwrap();
        let err = read_metrics(&path).unwrap_err();
        assert!(err.to_string().contains("line 1"), "{err}");
        let err = MetricsLog::open(&path, Some(3)).err().unwrap();
        assert!(err.to_string().contains("line 1"), "{err}");
    }
}
