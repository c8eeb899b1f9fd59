//! The JSON report every subcommand writes, its short table, and `compare`.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Report {
    /// `gsm8k`, `mmlu`, `alpacaeval` or `safety`.
    pub benchmark: String,
    /// The model path as given (with `server`: the path that server loaded).
    pub model: String,
    /// `dpo_common::fingerprint` of the model: which weights produced these numbers.
    pub fingerprint: String,
    /// The `ref-server` URL that generated and scored, when the model ran there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    pub input: String,
    /// Everything that changes the numbers: template, decoding, limit, judge.
    pub settings: BTreeMap<String, Value>,
    /// Headline numbers (fractions in 0..1, counts, seconds).
    pub metrics: BTreeMap<String, f64>,
    /// Per-group numbers, e.g. MMLU accuracy per subject: group → metric → value.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub groups: BTreeMap<String, BTreeMap<String, f64>>,
    /// One record per example (prompt, output, parsed answer, correctness or judgement).
    #[serde(default)]
    pub examples: Vec<Value>,
}

impl Report {
    pub fn write(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let text = serde_json::to_string_pretty(self).context("serialising the report")?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
    }

    pub fn read(path: &Path) -> Result<Report> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{}: not a dpo-eval report", path.display()))
    }

    /// Rows (name, value) for the table: headline metrics, then groups as `group/metric`.
    fn rows(&self) -> Vec<(String, f64)> {
        let mut rows: Vec<(String, f64)> =
            self.metrics.iter().map(|(k, v)| (k.clone(), *v)).collect();
        for (g, m) in &self.groups {
            for (k, v) in m {
                rows.push((format!("{g}/{k}"), *v));
            }
        }
        rows
    }

    /// The rows worth printing: a long per-group list (57 MMLU subjects) would bury the
    /// headline, so above [`MAX_PRINTED_GROUPS`] groups only the headline metrics are shown
    /// (the JSON report has the rest).
    fn printed_rows(&self) -> Vec<(String, f64)> {
        if self.groups.len() > MAX_PRINTED_GROUPS {
            self.metrics.iter().map(|(k, v)| (k.clone(), *v)).collect()
        } else {
            self.rows()
        }
    }

    /// The model as a reader should see it: its path, and the server it ran on if any.
    pub fn model_label(&self) -> String {
        match &self.server {
            Some(url) => format!("{} @ {url}", self.model),
            None => self.model.clone(),
        }
    }

    /// The short table printed after a run.
    pub fn table(&self) -> String {
        let mut s = format!(
            "{} · {} ({} examples)\n",
            self.benchmark,
            self.model_label(),
            self.examples.len()
        );
        if self.groups.len() > MAX_PRINTED_GROUPS {
            s += &format!("  ({} per-group numbers in the report)\n", self.groups.len());
        }
        let rows = self.printed_rows();
        let w = rows.iter().map(|r| r.0.len()).max().unwrap_or(6).max(6);
        for (k, v) in rows {
            s += &format!("  {k:<w$}  {}\n", fmt_value(&k, v));
        }
        s
    }
}

fn fmt_value(key: &str, v: f64) -> String {
    if v.is_nan() {
        "—".into()
    } else if key == "n" || key.ends_with("/n") || key.ends_with("_n") {
        format!("{v:.0}")
    } else if key.ends_with("seconds") || key.contains("per_second") || key.contains("mean_") {
        format!("{v:.3}")
    } else {
        format!("{:.2}%", 100.0 * v)
    }
}

/// Above this many groups, tables show the headline metrics only.
const MAX_PRINTED_GROUPS: usize = 12;

/// Two reports side by side (e.g. SFT vs DPO): every metric either has, with the difference.
pub fn compare(a: &Report, b: &Report, a_name: &str, b_name: &str) -> String {
    let mut s = String::new();
    if a.benchmark != b.benchmark {
        s += &format!("note: comparing a {} report with a {} report\n", a.benchmark, b.benchmark);
    }
    if a.settings != b.settings {
        s += "note: the settings differ (template, decoding, limit or judge): see the reports\n";
    }
    let ra: BTreeMap<String, f64> = a.printed_rows().into_iter().collect();
    let rb: BTreeMap<String, f64> = b.printed_rows().into_iter().collect();
    let order: Vec<String> =
        a.printed_rows().into_iter().chain(b.printed_rows()).map(|r| r.0).collect();
    let mut seen = std::collections::HashSet::new();
    let order: Vec<String> = order.into_iter().filter(|k| seen.insert(k.clone())).collect();
    let w = order.iter().map(|k| k.len()).max().unwrap_or(6).max(6);
    let (wa, wb) = (a_name.len().max(10), b_name.len().max(10));
    s += &format!("{} · {} vs {}\n", a.benchmark, a.model_label(), b.model_label());
    if a.fingerprint == b.fingerprint {
        s += "note: both reports come from the same weights (same fingerprint)\n";
    }
    if a.groups.len().max(b.groups.len()) > MAX_PRINTED_GROUPS {
        s += "  (per-group numbers: see the reports)\n";
    }
    s += &format!("  {:<w$}  {a_name:>wa$}  {b_name:>wb$}  {:>10}\n", "metric", "Δ (b − a)");
    for k in &order {
        let cell =
            |m: &BTreeMap<String, f64>| m.get(k).map(|v| fmt_value(k, *v)).unwrap_or("—".into());
        let delta = match (ra.get(k), rb.get(k)) {
            (Some(x), Some(y)) => {
                let d = fmt_value(k, y - x);
                if y >= x {
                    format!("+{d}")
                } else {
                    d
                }
            }
            _ => "—".into(),
        };
        s += &format!("  {k:<w$}  {:>wa$}  {:>wb$}  {delta:>10}\n", cell(&ra), cell(&rb));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_and_compare_format_counts_and_fractions() {
        let mut a = Report {
            benchmark: "mmlu".into(),
            model: "sft".into(),
            fingerprint: "f".into(),
            server: None,
            input: "i".into(),
            settings: BTreeMap::new(),
            metrics: BTreeMap::from([("accuracy".into(), 0.25), ("n".into(), 4.0)]),
            groups: BTreeMap::from([(
                "anatomy".into(),
                BTreeMap::from([("accuracy".into(), 0.5), ("n".into(), 2.0)]),
            )]),
            examples: vec![],
        };
        let t = a.table();
        assert!(t.contains("accuracy  25.00%") || t.contains("25.00%"), "{t}");
        assert!(t.contains("anatomy/n") && t.contains(" 2\n"), "{t}");
        let mut b = a.clone();
        b.metrics.insert("accuracy".into(), 0.5);
        let c = compare(&a, &b, "sft", "dpo");
        let line = c.lines().find(|l| l.trim_start().starts_with("accuracy")).unwrap();
        assert!(
            line.contains("25.00%") && line.contains("50.00%") && line.contains("+25.00%"),
            "{c}"
        );
        a.groups.clear();
        assert!(!a.table().contains("anatomy"));
    }
}
