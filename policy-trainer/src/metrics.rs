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
//!
//! With `--report-to tensorboard` ([`MetricsLog::report_to`]) every record also goes, as
//! scalars, to a TensorBoard event file in the same directory ([`tensorboard_scalars`] says
//! which numbers under which tags: those of Hugging Face's Trainer). Each (re)start of the log
//! begins a new event file that names the step it starts from, so TensorBoard shows what
//! `metrics.jsonl` holds: a resumed run's curves continue, without the steps it took again.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use crate::tensorboard::EventWriter;

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
    /// TRL: the mean over the chosen responses' tokens of the policy's vocabulary-mean
    /// logit at each (`stats::MeanLogits`).
    #[serde(rename = "logits/chosen", default = "nan", deserialize_with = "f64_or_nan")]
    pub logits_chosen: f64,
    /// TRL: the same over the rejected responses' tokens.
    #[serde(rename = "logits/rejected", default = "nan", deserialize_with = "f64_or_nan")]
    pub logits_rejected: f64,
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
    /// TRL's `logits/chosen` and `logits/rejected` (`stats::MeanLogits`).
    #[serde(default = "nan", deserialize_with = "f64_or_nan")]
    pub chosen_logits: f64,
    #[serde(default = "nan", deserialize_with = "f64_or_nan")]
    pub rejected_logits: f64,
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
    #[serde(rename = "eval_logits/chosen", default = "nan", deserialize_with = "f64_or_nan")]
    pub eval_logits_chosen: f64,
    #[serde(rename = "eval_logits/rejected", default = "nan", deserialize_with = "f64_or_nan")]
    pub eval_logits_rejected: f64,
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
            eval_logits_chosen: result.chosen_logits,
            eval_logits_rejected: result.rejected_logits,
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

/// Where the records go besides `metrics.jsonl` (`--report-to`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ReportTo {
    /// `metrics.jsonl` only.
    #[default]
    None,
    /// Also TensorBoard event files in the run directory.
    Tensorboard,
}

/// The metrics file, open for appending.
pub struct MetricsLog {
    path: PathBuf,
    file: File,
    /// The first step this log writes: 0, or the one after the step a resumed run continues.
    first_step: usize,
    /// `--report-to tensorboard`.
    tensorboard: Option<EventWriter>,
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
        let first_step = resume_from_step.map_or(0, |step| step + 1);
        Ok(MetricsLog { path: path.to_path_buf(), file, first_step, tensorboard: None })
    }

    /// Also writes every record to `report_to`: for TensorBoard, a new event file in the
    /// metrics file's directory. Its first events mark the step this log starts from, so
    /// TensorBoard hides what earlier event files there hold from that step on (what the
    /// crashed run logged after its checkpoint, or a whole run this one replaces), as
    /// `metrics.jsonl` no longer holds it either.
    pub fn report_to(mut self, report_to: ReportTo) -> Result<Self> {
        if report_to == ReportTo::Tensorboard {
            let dir = self.path.parent().unwrap_or(Path::new("."));
            // TensorBoard steps are i64; an optimizer step count never comes near the limit.
            let first_step = i64::try_from(self.first_step).expect("step count fits an i64");
            self.tensorboard = Some(EventWriter::create_starting_at(dir, first_step)?);
        }
        Ok(self)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The TensorBoard event file this log writes, if any.
    pub fn tensorboard_path(&self) -> Option<&Path> {
        self.tensorboard.as_ref().map(EventWriter::path)
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
            .with_context(|| format!("writing to {}", self.path.display()))?;
        if let Some(writer) = &mut self.tensorboard {
            let (step, scalars) = tensorboard_scalars(line)?;
            let scalars: Vec<(&str, f64)> = scalars.iter().map(|(t, v)| (t.as_str(), *v)).collect();
            writer.add_scalars(step, &scalars)?;
        }
        Ok(())
    }
}

/// A record as TensorBoard scalars: its step and `(tag, value)` for every number in its JSON
/// line, tagged as Hugging Face's Trainer tags a log dict (`TensorBoardCallback`), so the curves
/// sit beside a TRL run's under the same names:
/// - an evaluation's keys get the `eval_` prefix unless they have it (`Trainer.evaluate`'s
///   `metric_key_prefix`);
/// - then `rewrite_logs`: `eval_X` becomes `eval/X`, `test_X` `test/X`, any other `X`
///   `train/X`.
///
/// Not written: `step` (the x axis, as the Trainer's global step is), what is not a number
/// (`kind`) and `null` (a non-finite value). When an evaluation has both `X` and `eval_X`,
/// which share the tag `eval/X`, `eval_X` is written. The fields are read from the record's
/// JSON, so any field a record gains is written with no change here. Tags come in name order.
pub fn tensorboard_scalars(record: &impl Serialize) -> Result<(i64, Vec<(String, f64)>)> {
    let Value::Object(fields) = serde_json::to_value(record)? else {
        bail!("a metrics record is not a JSON object");
    };
    let step =
        fields.get("step").and_then(Value::as_i64).context("a metrics record has no step")?;
    let is_eval = fields.get("kind").and_then(Value::as_str) == Some("eval");
    let mut scalars: BTreeMap<String, (f64, bool)> = BTreeMap::new();
    for (key, value) in &fields {
        if key == "step" {
            continue;
        }
        let Some(number) = value.as_f64() else { continue };
        let explicit_eval = key.starts_with("eval_");
        let key = if is_eval && !explicit_eval { format!("eval_{key}") } else { key.clone() };
        let tag = rewrite_log_key(&key);
        match scalars.get(&tag) {
            Some(&(_, true)) => {}
            _ => {
                scalars.insert(tag, (number, explicit_eval));
            }
        }
    }
    Ok((step, scalars.into_iter().map(|(tag, (value, _))| (tag, value)).collect()))
}

/// transformers' `rewrite_logs` for one key.
fn rewrite_log_key(key: &str) -> String {
    for (prefix, section) in [("eval_", "eval"), ("test_", "test")] {
        if let Some(rest) = key.strip_prefix(prefix) {
            return format!("{section}/{rest}");
        }
    }
    format!("train/{key}")
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
            logits_chosen: 4.4,
            logits_rejected: 4.2,
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
            chosen_logits: 4.4,
            rejected_logits: 4.2,
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
                r#""chosen_logp":-40.5,"rejected_logp":-44.0,"chosen_logits":4.4,"#,
                r#""rejected_logits":4.2,"seconds":12.0,"#,
                r#""loss_type":"sigmoid","eval_loss":0.6,"eval_rewards/chosen":0.02,"#,
                r#""eval_rewards/rejected":-0.01,"eval_rewards/accuracies":0.55,"#,
                r#""eval_rewards/margins":0.03,"eval_logps/chosen":-40.5,"#,
                r#""eval_logps/rejected":-44.0,"eval_logits/chosen":4.4,"#,
                r#""eval_logits/rejected":4.2}"#,
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

    /// The tags of Hugging Face's Trainer: `train/` for a training record's keys, `eval/` for
    /// an evaluation's (whether or not the key has the `eval_` prefix itself), every number but
    /// the step, at the record's step.
    #[test]
    fn tensorboard_tags_are_hugging_faces() {
        let train = serde_json::json!({
            "kind": "train", "step": 7, "epoch": 1, "loss": 0.5, "rewards/chosen": 0.25,
            "learning_rate": 1e-6, "grad_norm": null, "eval_odd": 2.0, "test_x": 3.0,
        });
        let (step, scalars) = tensorboard_scalars(&train).unwrap();
        assert_eq!(step, 7);
        let expected = [
            ("eval/odd", 2.0),
            ("test/x", 3.0),
            ("train/epoch", 1.0),
            ("train/learning_rate", 1e-6),
            ("train/loss", 0.5),
            ("train/rewards/chosen", 0.25),
        ];
        assert_eq!(scalars, expected.map(|(t, v)| (t.to_string(), v)));

        // `loss` and `eval_loss` share `eval/loss`: the prefixed one is written, whichever
        // comes first in the line.
        for (a, b) in [("loss", "eval_loss"), ("eval_loss", "loss")] {
            let mut eval = serde_json::Map::new();
            eval.insert("kind".into(), "eval".into());
            eval.insert("step".into(), 10.into());
            eval.insert(a.into(), if a == "loss" { 9.0 } else { 0.75 }.into());
            eval.insert(b.into(), if b == "loss" { 9.0 } else { 0.75 }.into());
            eval.insert("rewards/accuracies".into(), 0.5.into());
            eval.insert("eval_logps/chosen".into(), (-12.5).into());
            let (step, scalars) = tensorboard_scalars(&Value::Object(eval)).unwrap();
            assert_eq!(step, 10);
            let expected = [
                ("eval/loss", 0.75),
                ("eval/logps/chosen", -12.5),
                ("eval/rewards/accuracies", 0.5),
            ];
            let mut expected = expected.map(|(t, v)| (t.to_string(), v)).to_vec();
            expected.sort_by(|x, y| x.0.cmp(&y.0));
            assert_eq!(scalars, expected);
        }

        let err = tensorboard_scalars(&serde_json::json!({"kind": "train"})).unwrap_err();
        assert!(err.to_string().contains("no step"), "{err}");
    }

    /// With `--report-to tensorboard`, TensorBoard shows exactly the records `metrics.jsonl`
    /// holds, also after a resume that drops the steps a crashed run logged past its checkpoint.
    #[test]
    fn report_to_tensorboard_shows_what_the_log_holds() {
        use crate::tensorboard::read_scalars;

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(METRICS_FILE);
        let mut log =
            MetricsLog::open(&path, None).unwrap().report_to(ReportTo::Tensorboard).unwrap();
        let first_file = log.tensorboard_path().unwrap().to_path_buf();
        assert_eq!(first_file.parent(), Some(dir.path()));
        log.log_eval(&eval(0)).unwrap();
        for step in 1..=3 {
            log.log_train(&train(step)).unwrap();
        }
        log.log_eval(&eval(2)).unwrap();
        drop(log);

        // Resumed from step 2: step 3 is taken again, with another loss.
        let mut log =
            MetricsLog::open(&path, Some(2)).unwrap().report_to(ReportTo::Tensorboard).unwrap();
        assert_ne!(log.tensorboard_path(), Some(first_file.as_path()));
        let mut again = train(3);
        again.loss = 0.125;
        log.log_train(&again).unwrap();
        log.log_train(&train(4)).unwrap();
        log.log_eval(&eval(4)).unwrap();
        drop(log);

        let mut expected = Vec::new();
        for line in std::fs::read_to_string(&path).unwrap().lines() {
            let record: Value = serde_json::from_str(line).unwrap();
            let (step, scalars) = tensorboard_scalars(&record).unwrap();
            expected.extend(scalars.into_iter().map(|(tag, v)| (tag, step, v as f32)));
        }
        let shown: Vec<_> = read_scalars(dir.path())
            .unwrap()
            .into_iter()
            .map(|s| (s.tag, s.step, s.value))
            .collect();
        assert_eq!(shown, expected);
        assert!(shown.contains(&("train/loss".into(), 3, 0.125)));
        assert!(shown.contains(&("eval/reward_accuracy".into(), 4, 0.55)));

        // Without --report-to, no event file.
        let plain = tempfile::tempdir().unwrap();
        let log = MetricsLog::open(&plain.path().join(METRICS_FILE), None)
            .unwrap()
            .report_to(ReportTo::None)
            .unwrap();
        assert!(log.tensorboard_path().is_none());
        assert_eq!(std::fs::read_dir(plain.path()).unwrap().count(), 1);
    }
}
