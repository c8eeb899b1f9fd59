//! Reading JSON-lines files (`.jsonl`, or gzip-compressed `.jsonl.gz`) of preference records,
//! accounting for every line in a [`LoadReport`].
//!
//! A line is *kept* (it became a pair), *dropped* (a valid record the data rules exclude, e.g.
//! a multi-turn HH conversation; counted per [`DropReason`]) or *malformed* (not JSON, not an
//! object, a required field missing or not a string, not UTF-8). Malformed lines are counted
//! and the first few listed with their line numbers; they stop the load only when no line of
//! the file is valid (then the file is almost certainly not what the user meant to pass).
//! Blank lines are skipped and counted.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::PreferencePair;
use crate::error::{Error, Result};

/// How many malformed lines a report lists by number (all are counted).
pub const MALFORMED_LISTED: usize = 5;

/// Why a well-formed record was not used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DropReason {
    /// HH: chosen or rejected is not exactly one human turn and one assistant turn.
    MultiTurn,
    /// HH: chosen and rejected start from different human turns.
    PromptMismatch,
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DropReason::MultiTurn => "multi-turn",
            DropReason::PromptMismatch => "chosen and rejected differ in the human turn",
        })
    }
}

/// A line that could not be read as a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MalformedLine {
    /// 1-based line number in the (decompressed) file.
    pub line: usize,
    pub reason: String,
}

/// What happened to every line of one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadReport {
    /// The HH subset, or the file name for generic data.
    pub source: String,
    pub path: PathBuf,
    /// Non-blank lines read.
    pub lines: usize,
    /// Blank lines skipped.
    pub blank: usize,
    /// Lines that became pairs.
    pub kept: usize,
    /// Well-formed records not used, by reason.
    pub dropped: BTreeMap<DropReason, usize>,
    /// Lines that are not a valid record.
    pub malformed: usize,
    /// The first [`MALFORMED_LISTED`] malformed lines.
    pub malformed_lines: Vec<MalformedLine>,
}

impl LoadReport {
    fn new(source: &str, path: &Path) -> Self {
        LoadReport {
            source: source.to_string(),
            path: path.to_path_buf(),
            lines: 0,
            blank: 0,
            kept: 0,
            dropped: BTreeMap::new(),
            malformed: 0,
            malformed_lines: Vec::new(),
        }
    }

    /// Records dropped for `reason`.
    pub fn dropped(&self, reason: DropReason) -> usize {
        self.dropped.get(&reason).copied().unwrap_or(0)
    }

    fn add_malformed(&mut self, line: usize, reason: String) {
        self.malformed += 1;
        if self.malformed_lines.len() < MALFORMED_LISTED {
            self.malformed_lines.push(MalformedLine { line, reason });
        }
    }

    fn malformed_listing(&self) -> String {
        let mut s = self
            .malformed_lines
            .iter()
            .map(|m| format!("line {}: {}", m.line, m.reason))
            .collect::<Vec<_>>()
            .join("; ");
        if self.malformed > self.malformed_lines.len() {
            s += &format!("; and {} more", self.malformed - self.malformed_lines.len());
        }
        s
    }
}

impl fmt::Display for LoadReport {
    /// One line, e.g. `harmless-base (hh/harmless-base/test.jsonl.gz): 2312 records, 661
    /// kept, 1651 dropped as multi-turn, 0 malformed`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}): {} records, {} kept",
            self.source,
            self.path.display(),
            self.lines,
            self.kept
        )?;
        for (reason, n) in &self.dropped {
            write!(f, ", {n} dropped as {reason}")?;
        }
        write!(f, ", {} malformed", self.malformed)?;
        if self.malformed > 0 {
            write!(f, " ({})", self.malformed_listing())?;
        }
        if self.blank > 0 {
            write!(f, ", {} blank lines skipped", self.blank)?;
        }
        Ok(())
    }
}

/// What a format's parser makes of one well-formed JSON object.
pub(crate) type Parsed = std::result::Result<PreferencePair, DropReason>;

/// The string field `key` of a JSON object, or why it cannot be used.
pub(crate) fn string_field<'a>(v: &'a Value, key: &str) -> std::result::Result<&'a str, String> {
    match v.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(format!("field `{key}` is not a string ({})", json_kind(other))),
        None => Err(format!("missing field `{key}`")),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Reads `path` line by line, turning each JSON object into a pair with `parse` (which
/// returns `Err(message)` for a malformed record). Fails on I/O errors, on an empty file and
/// on a file none of whose lines is a valid record.
pub(crate) fn read_records(
    path: &Path,
    source: &str,
    mut parse: impl FnMut(&Value, &str) -> std::result::Result<Parsed, String>,
) -> Result<(Vec<PreferencePair>, LoadReport)> {
    let mut report = LoadReport::new(source, path);
    let mut pairs = Vec::new();
    for_each_line(path, |number, line| {
        let line = match line {
            Ok(l) => l,
            Err(e) => {
                report.lines += 1;
                report.add_malformed(number, format!("not UTF-8 ({e})"));
                return;
            }
        };
        if line.trim().is_empty() {
            report.blank += 1;
            return;
        }
        report.lines += 1;
        let record = serde_json::from_str::<Value>(line)
            .map_err(|e| format!("invalid JSON ({e})"))
            .and_then(|v| match v {
                Value::Object(_) => parse(&v, source),
                other => Err(format!("not a JSON object but {}", json_kind(&other))),
            });
        match record {
            Ok(Ok(pair)) => {
                report.kept += 1;
                pairs.push(pair);
            }
            Ok(Err(reason)) => *report.dropped.entry(reason).or_insert(0) += 1,
            Err(reason) => report.add_malformed(number, reason),
        }
    })?;
    if report.lines == 0 {
        return Err(Error::file(path, "holds no records (the file is empty)"));
    }
    if report.malformed == report.lines {
        return Err(Error::file(
            path,
            format!(
                "none of its {} lines is a valid record ({})",
                report.lines,
                report.malformed_listing()
            ),
        ));
    }
    Ok((pairs, report))
}

/// Calls `f(line_number, line)` for every line of a `.jsonl` or `.jsonl.gz` file (decided by
/// the `.gz` extension); line endings (`\n`, `\r\n`) are removed. A line that is not UTF-8 is
/// passed as an error rather than ending the read: it is one bad record, not a bad file.
pub(crate) fn for_each_line(
    path: &Path,
    mut f: impl FnMut(usize, std::result::Result<&str, std::str::Utf8Error>),
) -> Result<()> {
    let file = std::fs::File::open(path).map_err(|e| Error::file(path, e))?;
    let reader: Box<dyn Read> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(flate2::read::MultiGzDecoder::new(file))
    } else {
        Box::new(file)
    };
    let mut reader = BufReader::with_capacity(1 << 16, reader);
    let mut buf = Vec::new();
    let mut number = 0;
    loop {
        buf.clear();
        let n = reader
            .read_until(b'\n', &mut buf)
            .map_err(|e| Error::file(path, format!("read error after line {number}: {e}")))?;
        if n == 0 {
            return Ok(());
        }
        number += 1;
        let mut line = buf.as_slice();
        if let Some(l) = line.strip_suffix(b"\n") {
            line = l;
        }
        if let Some(l) = line.strip_suffix(b"\r") {
            line = l;
        }
        f(number, std::str::from_utf8(line));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_prompt(v: &Value, source: &str) -> std::result::Result<Parsed, String> {
        let prompt = string_field(v, "prompt")?;
        if prompt == "drop me" {
            return Ok(Err(DropReason::MultiTurn));
        }
        Ok(Ok(PreferencePair {
            prompt: prompt.into(),
            chosen: String::new(),
            rejected: String::new(),
            source: source.into(),
        }))
    }

    #[test]
    fn every_line_is_accounted_for() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.jsonl");
        let mut text = String::new();
        text += "{\"prompt\": \"a\"}\n"; // 1 kept
        text += "{\"prompt\": 3}\n"; // 2 malformed
        text += "\n"; // 3 blank
        text += "{\"prompt\": \"drop me\"}\r\n"; // 4 dropped
        text += "[1, 2]\n"; // 5 malformed
        text += "{\"prompt\"\n"; // 6 malformed
        text += "{\"other\": \"b\"}\n"; // 7 malformed
        text += "{\"prompt\": \"c\"}"; // 8 kept, no final newline
        std::fs::write(&path, text).unwrap();
        let (pairs, r) = read_records(&path, "x", parse_prompt).unwrap();
        assert_eq!(pairs.iter().map(|p| p.prompt.as_str()).collect::<Vec<_>>(), ["a", "c"]);
        assert_eq!((r.lines, r.blank, r.kept, r.malformed), (7, 1, 2, 4));
        assert_eq!(r.dropped(DropReason::MultiTurn), 1);
        let numbers: Vec<usize> = r.malformed_lines.iter().map(|m| m.line).collect();
        assert_eq!(numbers, [2, 5, 6, 7]);
        assert!(r.malformed_lines[0].reason.contains("not a string (a number)"), "{r:?}");
        assert!(r.malformed_lines[1].reason.contains("not a JSON object"), "{r:?}");
        assert!(r.malformed_lines[2].reason.contains("invalid JSON"), "{r:?}");
        assert!(r.malformed_lines[3].reason.contains("missing field `prompt`"), "{r:?}");
        let shown = r.to_string();
        assert!(
            shown.contains("7 records, 2 kept, 1 dropped as multi-turn, 4 malformed"),
            "{shown}"
        );
        assert!(shown.contains("line 2: field `prompt`"), "{shown}");
    }

    #[test]
    fn only_the_first_malformed_lines_are_listed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.jsonl");
        let mut text = "{\"prompt\": \"a\"}\n".to_string();
        text += &"oops\n".repeat(MALFORMED_LISTED + 3);
        std::fs::write(&path, text).unwrap();
        let (_, r) = read_records(&path, "x", parse_prompt).unwrap();
        assert_eq!(r.malformed, MALFORMED_LISTED + 3);
        assert_eq!(r.malformed_lines.len(), MALFORMED_LISTED);
        assert!(r.to_string().contains("and 3 more"), "{r}");
    }

    #[test]
    fn an_all_bad_or_empty_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.jsonl");
        std::fs::write(&path, "oops\n{\"x\": 1}\n").unwrap();
        let e = read_records(&path, "bad", parse_prompt).unwrap_err().to_string();
        assert!(e.contains("bad.jsonl") && e.contains("none of its 2 lines"), "{e}");
        assert!(e.contains("line 1: invalid JSON") && e.contains("line 2: missing"), "{e}");
        std::fs::write(&path, "\n\n").unwrap();
        let e = read_records(&path, "bad", parse_prompt).unwrap_err().to_string();
        assert!(e.contains("no records"), "{e}");
        let e = read_records(&dir.path().join("nope.jsonl"), "x", parse_prompt).unwrap_err();
        assert!(e.to_string().contains("nope.jsonl"), "{e}");
    }

    #[test]
    fn reads_gzip_and_survives_invalid_utf8() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.jsonl.gz");
        let mut gz = flate2::write::GzEncoder::new(
            std::fs::File::create(&path).unwrap(),
            flate2::Compression::default(),
        );
        gz.write_all(b"{\"prompt\": \"a\"}\n\xff\xfe\n{\"prompt\": \"b\"}\n").unwrap();
        gz.finish().unwrap();
        let (pairs, r) = read_records(&path, "x", parse_prompt).unwrap();
        assert_eq!(pairs.len(), 2);
        assert_eq!(
            r.malformed_lines,
            [MalformedLine { line: 2, reason: r.malformed_lines[0].reason.clone() }]
        );
        assert!(r.malformed_lines[0].reason.contains("UTF-8"));
    }
}
